"""Learned attacker priors: training, the folder format, the latent search, the checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_miface import _class_means, _quality
from typer.testing import CliRunner

from mlinvert.attacks.base import AttackResult
from mlinvert.attacks.gradients import Exact
from mlinvert.attacks.miface import MIFace, MIFaceConfig
from mlinvert.attacks.priors import (
    FinetuneConfig,
    PriorConfig,
    finetune_prior,
    load_prior,
    train_prior,
)
from mlinvert.attacks.priors.nets import LinearDecoder
from mlinvert.cli.main import build_app, main
from mlinvert.defenses import Predictor
from mlinvert.errors import ConfigError, ModelError
from mlinvert.oracle import WhiteBoxOracle
from mlinvert.targets import save, train_target


def _tiny(kind: str, **overrides: Any) -> PriorConfig:
    base: dict[str, Any] = {
        "kind": kind,
        "shape": (8, 8),
        "latent": 4,
        "epochs": 1,
        "batch_size": 16,
        "width": 8,
        "mirror": False,
    }
    return PriorConfig(**{**base, **overrides})


@pytest.mark.parametrize("kind", ["vae", "gan"])
def test_tiny_deep_prior_trains_and_loads_from_its_folder(
    digits: Any, kind: str, tmp_path: Path
) -> None:
    public, _ = digits.test()
    steps: list[tuple[int, int]] = []
    prior = train_prior(
        public[:128],
        _tiny(kind),
        source="digits held-out",
        n_people=10,
        progress=lambda step, total, metrics: steps.append((step, total)),
    )
    assert steps == [(i, 8) for i in range(1, 9)]
    prior.save(tmp_path / "p")
    back = load_prior(tmp_path / "p")
    card = json.loads((tmp_path / "p" / "prior.json").read_text())
    assert card["kind"] == kind and card["data"] == {
        "spec": "digits held-out",
        "n_images": 128,
        "n_people": 10,
    }
    assert isinstance(card["training_seconds"], float) and card["training_seconds"] >= 0
    assert card["weights_bytes"] > 0 and card["seed"] == 0 and card["parameters"] > 0
    z = np.random.default_rng(1).standard_normal((3, 4))
    np.testing.assert_array_equal(back.decode(z), prior.decode(z))
    faces = back.sample(5, size=(12, 10))
    assert faces.shape == (5, 12, 10) and faces.min() >= 0.0 and faces.max() <= 1.0


def test_generator_gradient_matches_finite_differences(digits: Any) -> None:
    """White-box: d<g, G(z)>/dz by autograd through the decoder and its resampling."""
    prior = train_prior(digits.test()[0][:32], _tiny("gan"), source="t", n_people=10)
    space = prior.space(shape=(12, 10))
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1, 4))
    g = rng.standard_normal((1, 12, 10))
    grad = space.pullback(z, g)[0]
    eps = 1e-3
    fd = [
        float(((space.raw(z + eps * e) - space.raw(z - eps * e)) * g).sum() / (2 * eps))
        for e in np.eye(4)[:, None, :]
    ]
    np.testing.assert_allclose(grad, fd, rtol=2e-2, atol=1e-4)


def test_latent_search_in_a_public_prior_recovers_the_class(digits: Any, toy_softmax: Any) -> None:
    """MI-Face in the latent space of an eigenface prior learned from the other classes'
    held-out digits: every attacked class's reconstruction is nearest its own private
    class mean (the judge here: correlation with each class's private mean)."""
    x_test, y_test = digits.test()
    private, _ = digits.train()
    oracle = WhiteBoxOracle(Predictor(toy_softmax, name="toy"))
    parts = []
    for label in (1, 3, 5, 7, 9):
        public = x_test[y_test != label]
        prior = train_prior(public, _tiny("pca", latent=20), source="others", n_people=9)
        attack = MIFace(
            MIFaceConfig.improved(max_iter=150),
            gradient=Exact(),
            space=prior.space(private=private),
        )
        parts.append(attack.run(oracle, label, seed=0))
    result = AttackResult.merge(parts)
    hits, own = _quality(result, _class_means(digits))
    assert result.status == "succeeded"
    assert hits == 5 and own > 0.85, (hits, own)
    assert result.config["space"]["name"] == "prior"


def test_prior_refuses_the_targets_private_photos(digits: Any) -> None:
    private, _ = digits.train()
    public, _ = digits.test()
    with pytest.raises(ConfigError, match="private training photo"):
        train_prior(
            np.concatenate([public[:50], private[7:8]]),
            _tiny("pca", latent=5),
            source="leaky",
            n_people=10,
            private=private,
        )
    leaky = train_prior(private[:40], _tiny("pca", latent=5), source="leaky", n_people=10)
    with pytest.raises(ConfigError, match="retrain it on public photos"):
        leaky.space(private=private, shape=(8, 8))
    clean = train_prior(public[:40], _tiny("pca", latent=5), source="public", n_people=10)
    assert clean.space(private=private, shape=(8, 8)).dim == 5


def test_finetune_adapts_the_decoder_to_in_domain_photos_of_others(digits: Any) -> None:
    """Fine-tuning on other classes' held-out digits brings their reconstructions closer,
    leaves the original prior unchanged, and refuses a private photo."""
    x_test, y_test = digits.test()
    private, _ = digits.train()
    prior = train_prior(x_test[y_test < 5], _tiny("pca", latent=6), source="0-4", n_people=5)
    domain = x_test[y_test >= 5][:24]
    tuned = finetune_prior(
        prior, domain, FinetuneConfig(steps=60, lr=3e-3, mirror=False), source="5-9"
    )

    def error(p: Any) -> float:
        space = p.space(radius=None, shape=(8, 8))
        return float(((space.decode(space.encode(domain)) - domain) ** 2).mean())

    before = prior.decode(np.zeros((1, 6)))
    assert error(tuned) < 0.8 * error(prior), (error(tuned), error(prior))
    np.testing.assert_array_equal(prior.decode(np.zeros((1, 6))), before)
    assert tuned.card["finetuned"]["n_images"] == 24
    with pytest.raises(ConfigError, match="private training"):
        finetune_prior(prior, private[:5], FinetuneConfig(steps=1), source="x", private=private)


def test_broken_prior_folder_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no prior\.json"):
        load_prior(tmp_path)
    (tmp_path / "prior.json").write_text('{"format": "something else"}')
    with pytest.raises(ModelError, match="retrain it"):
        load_prior(tmp_path)


def _person_folders(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        person = root / f"person_{lab}"
        person.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(person / f"{i}.png")
    return root


def test_cli_trains_a_prior_and_attacks_in_it(
    digits: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trained = train_target(digits, "softmax", seed=0, quick=True)
    model = tmp_path / "model"
    save(trained.model, model, card=trained.card)
    x_test, y_test = digits.test()
    public = _person_folders(tmp_path / "public", x_test[:120], y_test[:120])
    (tmp_path / "exclude.txt").write_text("person_9  # a development person\n")
    args = ["prior", "train", "--data", f"lfw:{public}", "--size", "8x8", "--latent", "8"]
    runner = CliRunner()
    res = runner.invoke(
        build_app(),
        [*args, "--exclude-people", str(tmp_path / "exclude.txt"), "--out", str(tmp_path / "p")],
    )
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "p" / "prior.json").read_text())
    assert card["data"]["excluded_people"] == ["person_9"]
    assert card["data"]["n_images"] == int((y_test[:120] != 9).sum())
    out = tmp_path / "attack"
    argv = ["attack", "miface", "--model", str(model), "--label", "3", "--max-iter", "30"]
    res = CliRunner().invoke(
        build_app(), [*argv, "--prior", str(tmp_path / "p"), "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["space"]["name"] == "prior"
    assert result["config"]["space"]["trained_on"]["n_people"] == 9
    # a prior trained on the model's own private photos is refused before any query
    x_train, y_train = digits.train()
    leaky = _person_folders(tmp_path / "leaky", x_train[:60], y_train[:60])
    res = runner.invoke(
        build_app(), [*args[:3], f"lfw:{leaky}", *args[4:], "--out", str(tmp_path / "leaky-prior")]
    )
    assert res.exit_code == 0, res.output
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--prior", str(tmp_path / "leaky-prior"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert "private training photo" in err and not (tmp_path / "x" / "result.json").exists()


def test_finetune_the_mean_only_keeps_the_public_basis_and_stops_on_held_out_people(
    digits: Any,
) -> None:
    """``train=("mean",)`` moves the eigenface prior's mean face and nothing else; with
    ``holdout`` whole people (digits) are held out and the card says at which checked
    step their error was lowest."""
    import dataclasses
    import itertools

    x_test, y_test = digits.test()
    prior = train_prior(x_test[y_test < 5], _tiny("pca", latent=6), source="0-4", n_people=5)
    domain, groups = x_test[y_test >= 5][:60], y_test[y_test >= 5][:60]
    config = FinetuneConfig(steps=40, lr=1e-2, mirror=False, train=("mean",))
    tuned = finetune_prior(prior, domain, config, source="5-9")
    assert isinstance(tuned.decoder, LinearDecoder) and isinstance(prior.decoder, LinearDecoder)
    np.testing.assert_array_equal(tuned.decoder.basis.numpy(), prior.decoder.basis.numpy())
    assert not np.array_equal(tuned.decoder.mean.numpy(), prior.decoder.mean.numpy())
    stopped = dataclasses.replace(config, holdout=0.4, check_every=5)
    card = finetune_prior(prior, domain, stopped, source="5-9", groups=groups).card["finetuned"]
    assert card["n_heldout"] + card["n_fit"] == 60 and card["stopped_at"] % 5 == 0
    counts = np.bincount(groups)[5:]
    assert card["n_heldout"] in {a + b for a, b in itertools.combinations(counts, 2)}
    with pytest.raises(ConfigError, match="no parameters named weights"):
        finetune_prior(prior, domain, FinetuneConfig(steps=1, train=("weights",)), source="x")


def test_cli_finetunes_a_tiny_prior_and_refuses_private_photos(
    digits: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mlinvert prior finetune` writes an adapted prior that loads; photos that include
    the target's private training photos are refused before anything is written."""
    trained = train_target(digits, "softmax", seed=0, quick=True)
    model = tmp_path / "model"
    save(trained.model, model, card=trained.card)
    x_test, y_test = digits.test()
    x_train, y_train = digits.train()
    prior = train_prior(x_test[y_test < 5], _tiny("pca", latent=6), source="0-4", n_people=5)
    prior.save(tmp_path / "p")
    others = _person_folders(tmp_path / "others", x_test[y_test >= 5], y_test[y_test >= 5])
    argv = ["prior", "finetune", "--prior", str(tmp_path / "p"), "--steps", "20"]
    argv += ["--train", "mean", "--holdout", "0.4", "--model", str(model)]
    res = CliRunner().invoke(
        build_app(), [*argv, "--data", f"lfw:{others}", "--out", str(tmp_path / "a")]
    )
    assert res.exit_code == 0, res.output
    adapted = load_prior(tmp_path / "a")
    assert adapted.card["finetuned"]["config"]["train"] == ["mean"]
    assert adapted.card["finetuned"]["n_images"] == int((y_test >= 5).sum())
    assert "stopped_at" in adapted.card["finetuned"]
    leaky = _person_folders(tmp_path / "leaky", x_train[:60], y_train[:60])
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--data", f"lfw:{leaky}", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert "private training" in err and not (tmp_path / "b" / "prior.json").exists()
