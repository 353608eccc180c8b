"""MI-Face on a toy digits target: quality, budget, resume, statuses, result JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlinvert.attacks.base import AttackResult, ProgressEvent
from mlinvert.attacks.checkpoint import Checkpoint
from mlinvert.attacks.gradients import NES, Broyden, Exact
from mlinvert.attacks.miface import MIFace, MIFaceConfig
from mlinvert.attacks.spaces import PCAPrior, Pixel
from mlinvert.defenses import Predictor
from mlinvert.errors import AttackError, Blocked, ConfigError
from mlinvert.oracle import LocalOracle, WhiteBoxOracle
from mlinvert.oracle.wrappers import Recording, _Wrapper


def _class_means(ds: Any) -> np.ndarray:
    X, y = ds.train()
    return np.stack([X[y == c].mean(axis=0) for c in range(ds.n_classes)])


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _aux_without(ds: Any, label: int) -> np.ndarray:
    """Attacker's auxiliary images: held-out digits of the *other* classes."""
    X, y = ds.test()
    return X[y != label]


def _quality(result: AttackResult, means: np.ndarray) -> tuple[int, float]:
    """(# reconstructions closest to their own class mean, mean own-class correlation)."""
    hits, own = 0, []
    for img, lab in zip(result.reconstructions, result.labels, strict=True):
        c = [_corr(img, m) for m in means]
        hits += int(np.argmax(c) == lab)
        own.append(c[lab])
    return hits, float(np.mean(own))


def test_whitebox_prior_attack_reconstructs_class_images(digits: Any, toy_softmax: Any) -> None:
    """Every attacked class (half of them, including the hardest, 5) is recovered."""
    means = _class_means(digits)
    oracle = WhiteBoxOracle(Predictor(toy_softmax, name="toy"))
    parts = []
    for label in (1, 3, 5, 7, 9):
        attack = MIFace(
            MIFaceConfig.improved(max_iter=150, target_confidence=0.999),
            gradient=Exact(),
            space=PCAPrior(_aux_without(digits, label), 20),
        )
        parts.append(attack.run(oracle, label, seed=0))
    result = AttackResult.merge(parts)
    hits, own = _quality(result, means)
    assert result.status == "succeeded"
    assert hits == 5 and own > 0.85, (hits, own)
    # inside the prior's ball the model is sure, though not beyond what a typical face allows
    assert (result.confidence >= 0.99).all()


def test_paper_mode_pixel_space_reaches_gamma(toy_softmax: Any, digits: Any) -> None:
    oracle = WhiteBoxOracle(Predictor(toy_softmax, name="toy"))
    result = MIFace(MIFaceConfig.paper(), gradient=Exact(), space=Pixel()).run(oracle, 0, seed=0)
    per = result.per_label[0]
    assert per["stop"] == "confidence" and result.confidence[0] >= 0.99
    assert result.status == "succeeded"
    assert per["queries_per_iteration"] == 2
    assert result.n_queries == 2 * (per["iterations"] + 1)
    assert _corr(result.reconstructions[0], _class_means(digits)[0]) > 0.3


def test_blackbox_nes_in_prior_space_within_budget(digits: Any, toy_softmax: Any) -> None:
    means = _class_means(digits)
    oracle = LocalOracle(Predictor(toy_softmax, name="toy"))
    parts = []
    for label in (0, 3, 6):
        attack = MIFace(
            MIFaceConfig.improved(max_iter=400, target_confidence=0.99),
            gradient=NES(samples=10, sigma=0.02),
            space=PCAPrior(_aux_without(digits, label), 20),
        )
        parts.append(attack.run(oracle, label, seed=1, budget=3000))
    result = AttackResult.merge(parts)
    assert all(p["n_queries"] <= 3000 for p in result.per_label)
    assert result.n_queries == oracle.n_queries
    hits, own = _quality(result, means)
    assert hits == 3 and own > 0.5, (hits, own)


def test_blackbox_broyden_matches_whitebox_quality_in_few_queries(
    digits: Any, toy_softmax: Any
) -> None:
    """Against a linear softmax, one Jacobian estimate (d + 1 queries) then one query per
    step reconstructs as well as the white-box attack."""
    means = _class_means(digits)
    parts = {}
    for name, gradient, oracle in (
        ("broyden", Broyden(), LocalOracle(Predictor(toy_softmax, name="toy"))),
        ("exact", Exact(), WhiteBoxOracle(Predictor(toy_softmax, name="toy"))),
    ):
        runs = [
            MIFace(
                MIFaceConfig.improved(max_iter=150),
                gradient=gradient,
                space=PCAPrior(_aux_without(digits, label), 20),
            ).run(oracle, label, seed=0, budget=3000)
            for label in (0, 3, 6)
        ]
        parts[name] = AttackResult.merge(runs)
    bb, wb = parts["broyden"], parts["exact"]
    hits, own = _quality(bb, means)
    assert hits == 3 and own > _quality(wb, means)[1] - 0.05, (hits, own)
    assert all(p["n_queries"] <= 21 + 151 + 2 * 21 for p in bb.per_label), bb.per_label
    assert all(p["jacobian_estimates"] <= 3 for p in bb.per_label)


def test_budget_is_honoured_and_reported(toy_softmax: Any) -> None:
    base = LocalOracle(Predictor(toy_softmax, name="toy"))
    attack = MIFace(
        MIFaceConfig.paper(target_confidence=1.0), gradient=NES(samples=20), space=Pixel()
    )
    result = attack.run(base, 2, seed=0, budget=500)
    assert result.status == "budget_exhausted"
    assert result.n_queries == base.n_queries <= 500
    assert base.n_queries > 500 - 41  # stopped only when the next step no longer fit
    assert "budget" in result.per_label[0]["message"]


@pytest.mark.parametrize(
    ("gradient", "stop_at"), [(NES(samples=8, sigma=0.02), 400), (Broyden(tol=0.05), 40)]
)
def test_resume_repeats_no_query_and_matches_uninterrupted(
    toy_softmax: Any, digits: Any, tmp_path: Path, gradient: Any, stop_at: int
) -> None:
    """Also for Broyden, whose Jacobian (an array) must come back from the checkpoint."""

    def attack() -> MIFace:
        return MIFace(
            MIFaceConfig.improved(max_iter=60, target_confidence=1.0, patience=1000),
            gradient=gradient,
            space=PCAPrior(_aux_without(digits, 4), 10),
        )

    full = attack().run(LocalOracle(Predictor(toy_softmax, name="toy")), 4, seed=3)
    ckpt = Checkpoint(tmp_path / "run.npz")
    first = Recording(LocalOracle(Predictor(toy_softmax, name="toy")))
    part = attack().run(first, 4, seed=3, budget=stop_at, checkpoint=ckpt)
    assert part.status == "budget_exhausted" and ckpt.exists()
    second = Recording(LocalOracle(Predictor(toy_softmax, name="toy")))
    resumed = attack().run(second, 4, seed=3, budget=10_000, checkpoint=ckpt)
    assert resumed.status == full.status
    assert not set(first.fingerprints()) & set(second.fingerprints())
    assert first.n_queries + second.n_queries == full.n_queries == resumed.n_queries
    np.testing.assert_allclose(resumed.reconstructions, full.reconstructions, atol=1e-6)
    with pytest.raises(ConfigError, match="different attack"):
        attack().run(second, 5, seed=3, checkpoint=ckpt)


class _BlockAfter(_Wrapper):
    def __init__(self, oracle: Any, n: int) -> None:
        super().__init__(oracle)
        self.n = n

    def query(self, x: np.ndarray) -> Any:
        if self.inner.n_queries + len(x) > self.n:
            raise Blocked("account blocked by the query detector")
        return self.inner.query(x)


def test_blocked_progress_and_json_roundtrip(toy_softmax: Any, tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    oracle = _BlockAfter(LocalOracle(Predictor(toy_softmax, name="toy")), 300)
    attack = MIFace(
        MIFaceConfig.improved(target_confidence=1.0), gradient=NES(samples=10), space=Pixel()
    )
    result = attack.run(oracle, 1, seed=0, progress=events.append)
    assert result.status == "blocked"
    assert events and events[-1].n_queries <= 300
    assert [e.n_queries for e in events] == sorted(e.n_queries for e in events)
    back = AttackResult.from_json(result.to_json())
    np.testing.assert_array_equal(back.reconstructions, result.reconstructions)
    assert back.status == "blocked" and back.config == result.config
    assert back.config["gradient"]["name"] == "nes" and back.config["space"]["name"] == "pixel"
    paths = result.save_pngs(tmp_path, scale=4)
    from PIL import Image

    assert Image.open(paths[0]).size == (32, 32)


def test_labels_only_api_and_bad_config_are_refused(toy_softmax: Any) -> None:
    from mlinvert.defenses import parse_policy

    oracle = LocalOracle(Predictor(toy_softmax, name="toy", policy=parse_policy("labels")))
    with pytest.raises(AttackError, match="label-only"):
        MIFace(MIFaceConfig.improved(), gradient=NES()).run(oracle, 0, seed=0)
    with pytest.raises(ConfigError, match="gamma"):
        MIFaceConfig(target_confidence=1.5)
    with pytest.raises(ConfigError, match="unknown label"):
        MIFace().run(WhiteBoxOracle(Predictor(toy_softmax, name="toy")), "eleven", seed=0)
