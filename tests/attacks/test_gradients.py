"""Every gradient source agrees with autograd; query counts are exact."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mlinvert.attacks.gradients import (
    NES,
    SPSA,
    Broyden,
    Exact,
    FiniteDifferences,
    GradientSource,
    Objective,
    ObjectiveKind,
)
from mlinvert.attacks.spaces import DCT, LowRes, PCAPrior, Pixel, Space
from mlinvert.data.base import ImageDataset
from mlinvert.defenses import Predictor, parse_policy
from mlinvert.errors import GradientUnavailable
from mlinvert.oracle import LocalOracle, WhiteBoxOracle

TorchToy = Any


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def _autograd(model: TorchToy, space: Space, z: np.ndarray, label: int) -> np.ndarray:
    """Reference: d p_label / d z by autograd through the model, chain rule by hand."""
    x = space.decode(z[None])
    return space.pullback(z[None], model.class_gradient(x, np.asarray([label])))[0]


@pytest.mark.parametrize(
    ("source", "threshold"),
    [
        (FiniteDifferences(step=1e-3), 0.99),
        (FiniteDifferences(step=1e-3, central=True), 0.99),
        (NES(samples=400, sigma=0.005), 0.8),
        (SPSA(samples=400, sigma=0.005), 0.8),
    ],
)
@pytest.mark.parametrize("space", [Pixel(), DCT(4)])
def test_estimators_agree_with_autograd(
    toy_mlp: TorchToy, source: GradientSource, threshold: float, space: Space
) -> None:
    oracle = LocalOracle(Predictor(toy_mlp, name="mlp"))
    bound = space.bind(toy_mlp.input_shape_)
    z = bound.encode(np.full((1, 8, 8), 0.4))[0]
    label = 3
    est = source.estimate(
        oracle, bound, z, Objective(kind="prob", label=label), np.random.default_rng(0), {}, 512
    )
    ref = _autograd(toy_mlp, bound, z, label)
    assert _cos(est.grad, ref) >= threshold
    # counting is exact: the estimate reports what the oracle counted, as documented
    assert est.n_queries == oracle.n_queries == source.queries_per_step(bound.dim)
    assert est.probs[label] == pytest.approx(toy_mlp.predict_proba(bound.decode(z[None]))[0, label])


def test_exact_matches_autograd_for_log_and_margin(toy_mlp: TorchToy) -> None:
    oracle = WhiteBoxOracle(Predictor(toy_mlp, name="mlp"))
    space = LowRes(4, 4).bind((8, 8))
    z = np.full(space.dim, 0.3)
    fd = FiniteDifferences(step=1e-4, central=True)
    rng = np.random.default_rng(0)
    for kind in ("prob", "log", "margin"):
        obj = Objective(kind=kind, label=5)
        exact = Exact().estimate(oracle, space, z, obj, rng, {}, 512)
        approx = fd.estimate(LocalOracle(Predictor(toy_mlp, name="m")), space, z, obj, rng, {}, 512)
        assert _cos(exact.grad, approx.grad) > 0.99, kind


@pytest.mark.parametrize("kind", ["prob", "log", "margin"])
def test_broyden_estimates_every_score_once_then_one_query_per_step(
    toy_mlp: TorchToy, toy_softmax: TorchToy, kind: ObjectiveKind
) -> None:
    """First step: d + 1 queries, gradient = autograd's for any objective. Later steps: one
    query each; on the linear softmax the updated Jacobian stays exact far from the start
    (the model is extracted), on the MLP it tracks the gradient along the path."""
    space = LowRes(4, 4).bind((8, 8))
    obj = Objective(kind=kind, label=5)
    rng = np.random.default_rng(0)
    exact_fd = FiniteDifferences(step=1e-4, central=True)
    for model, floor in ((toy_softmax, 0.999), (toy_mlp, 0.9)):
        oracle = LocalOracle(Predictor(model, name="m"))
        source = Broyden(step=1e-3)
        state: dict[str, Any] = {}
        z = np.full(space.dim, 0.3)
        first = source.estimate(oracle, space, z, obj, rng, state, 512)
        assert first.n_queries == oracle.n_queries == space.dim + 1
        ref = exact_fd.estimate(
            LocalOracle(Predictor(model, name="r")), space, z, obj, rng, {}, 512
        )
        assert _cos(first.grad, ref.grad) > 0.99, kind
        path = np.random.default_rng(1).normal(scale=0.02, size=(5, space.dim)).cumsum(axis=0)
        for step in path:
            est = source.estimate(oracle, space, z + step, obj, rng, state, 512)
            assert est.n_queries == 1
        ref = exact_fd.estimate(
            LocalOracle(Predictor(model, name="r")), space, z + path[-1], obj, rng, {}, 512
        )
        assert _cos(est.grad, ref.grad) > floor, (kind, model.kind)
        assert state["jacobian_estimates"] == 1.0


def test_auto_source_follows_the_api_output_policy() -> None:
    from mlinvert.attacks.gradients import parse_gradient

    assert isinstance(parse_gradient("auto", policy="full"), Broyden)
    assert isinstance(parse_gradient("auto", samples=5, policy="round:2"), NES)
    top = parse_gradient("auto", samples=5, policy="top:1")
    assert isinstance(top, NES) and top.samples == 5


def test_exact_without_gradient_names_the_fix(toy_mlp: TorchToy) -> None:
    oracle = LocalOracle(Predictor(toy_mlp, name="mlp"))
    space = Pixel().bind((8, 8))
    with pytest.raises(GradientUnavailable, match="NES"):
        Exact().estimate(
            oracle,
            space,
            np.zeros(64),
            Objective(kind="prob", label=0),
            np.random.default_rng(0),
            {},
            64,
        )


def test_nes_adapts_sigma_to_rounded_scores(toy_mlp: TorchToy, digits: ImageDataset) -> None:
    """With scores rounded to 2 decimals a tiny sigma sees only zeros; adaptation fixes it."""
    oracle = LocalOracle(Predictor(toy_mlp, name="mlp", policy=parse_policy("round:2")))
    space = PCAPrior(digits.images[digits.labels != 3][:300], 12).bind((8, 8))
    z = np.zeros(space.dim)
    nes = NES(samples=100, sigma=1e-4)
    state: dict[str, float] = {}
    rng = np.random.default_rng(0)
    obj = Objective(kind="prob", label=3)
    first = nes.estimate(oracle, space, z, obj, rng, state, 512)
    assert np.allclose(first.grad, 0.0)  # every probe rounded back to the same score
    for _ in range(12):
        est = nes.estimate(oracle, space, z, obj, rng, state, 512)
    assert state["nes_sigma"] > 1e-4 / space.pixel_scale
    assert _cos(est.grad, _autograd(toy_mlp, space, z, 3)) > 0.5


def test_margin_floor_follows_the_api_rounding(toy_softmax: TorchToy) -> None:
    """A rival that flips between reading 0 and one step moves the floored margin by
    log 2, not by the ~23 nats a 1e-12 floor would add; MI-Face takes the floor from the
    policy the API documents and reports it."""
    from mlinvert.attacks.gradients import EPS, score_floor
    from mlinvert.attacks.miface import MIFace, MIFaceConfig
    from mlinvert.core import OracleInfo

    answers = np.asarray([[0.98, 0.02, 0.00], [0.99, 0.01, 0.00], [1.00, 0.00, 0.00]])
    rounded = OracleInfo("t", "softmax", (1,), ("a", "b", "c"), "probs", "round:2", 0.01)
    floored = Objective(kind="margin", label=0, floor=score_floor(rounded)).value(answers)
    assert floored[1] - floored[0] == pytest.approx(np.log(0.99 / 0.98) + np.log(2.0))
    assert floored[2] - floored[1] == pytest.approx(np.log(1.0 / 0.99) + np.log(2.0))
    raw = Objective(kind="margin", label=0).value(answers)
    assert raw[2] - raw[1] > 20.0  # the jump the floor removes
    for policy, floor in (("full", EPS), ("round:2", 0.005), ("top:3+round-to:0.05", 0.025)):
        oracle = LocalOracle(Predictor(toy_softmax, name="t", policy=parse_policy(policy)))
        attack = MIFace(MIFaceConfig.improved(max_iter=2), gradient=NES(samples=4), space=DCT(4))
        result = attack.run(oracle, 1, seed=0)
        assert result.per_label[0]["score_floor"] == pytest.approx(floor), policy
