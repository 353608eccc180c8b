"""Every face kind trains, beats chance clearly, round-trips, and differentiates."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mlinvert.data.base import ImageDataset
from mlinvert.errors import ConfigError, DataError, NotFittedError
from mlinvert.targets import load, save
from mlinvert.targets.base import Differentiable, Target
from mlinvert.targets.dae import DAEConfig, StackedDAE
from mlinvert.targets.torch_models import (
    MLP,
    CNNConfig,
    EvaluationConfig,
    EvaluationNet,
    MLPConfig,
    SoftmaxConfig,
    SoftmaxRegression,
)
from mlinvert.targets.training import FACE_KINDS, train_target

from .conftest import Trained

#: digits test accuracy each quick model must reach (chance is 0.1)
FLOOR = {"softmax": 0.9, "mlp": 0.9, "dae": 0.8, "cnn": 0.8, "evaluation": 0.8}


@pytest.mark.parametrize("kind", FACE_KINDS)
def test_kind_trains_and_round_trips(
    kind: str, trained: Trained, digits: ImageDataset, tmp_path: Path
) -> None:
    t = trained(kind)
    model, card = t.model, t.card
    assert isinstance(model, Target) and isinstance(model, Differentiable)
    assert model.kind == kind and model.input_shape_ == (8, 8)
    assert model.class_names_ == digits.class_names
    assert card["test_accuracy"] >= FLOOR[kind], card
    assert card["train_accuracy"] >= card["test_accuracy"] - 0.05
    assert card["train_seconds"] > 0 and card["split"]["train"] == digits.split.train.tolist()
    xt, _ = digits.test()
    probs = model.predict_proba(xt[:50])
    assert probs.shape == (50, 10) and np.allclose(probs.sum(axis=1), 1.0)
    save(model, tmp_path / kind, card=card)
    again = load(tmp_path / kind)
    assert type(again) is type(model) and again.class_names_ == model.class_names_
    assert np.array_equal(again.predict_proba(xt), model.predict_proba(xt))
    g = again.class_gradient(xt[:3], np.array([0, 1, 2]))
    assert g.shape == (3, 8, 8) and np.isfinite(g).all() and np.abs(g).max() > 0


def test_same_seed_same_model_other_seed_differs(digits: ImageDataset) -> None:
    sub = digits.subset(3)
    x, y = sub.train()
    cfg = MLPConfig(seed=5, hidden=16, max_iter=20)
    a = MLP(cfg).fit(x, y).predict_proba(x)
    b = MLP(cfg).fit(x, y).predict_proba(x)
    c = MLP(MLPConfig(seed=6, hidden=16, max_iter=20)).fit(x, y).predict_proba(x)
    assert np.array_equal(a, b) and not np.allclose(a, c)


def _directional_fd(model: object, x: np.ndarray, labels: np.ndarray, proba: str) -> None:
    """Compare the analytic gradient with a central difference along random directions."""
    rng = np.random.default_rng(0)
    grad = getattr(model, "class_gradient" if proba == "predict_proba" else "code_gradient")(
        x, labels
    )
    f = getattr(model, proba)
    for _ in range(3):
        v = rng.normal(size=x.shape).astype(np.float32)
        v /= np.linalg.norm(v)
        eps = 1e-2
        fd = (
            f((x + eps * v).astype(np.float32))[np.arange(len(x)), labels]
            - f((x - eps * v).astype(np.float32))[np.arange(len(x)), labels]
        ) / (2 * eps)
        analytic = (grad * v).reshape(len(x), -1).sum(axis=1)
        assert np.allclose(analytic, fd, rtol=0.05, atol=1e-4), (analytic, fd)


def test_class_gradient_matches_finite_differences(digits: ImageDataset) -> None:
    sub = digits.subset(4)
    x, y = sub.train()
    model = MLP(MLPConfig(seed=0, hidden=20, max_iter=30)).fit(x, y)
    xt = x[:4].astype(np.float64).clip(0.1, 0.9).astype(np.float32)
    _directional_fd(model, xt, np.array([0, 1, 2, 3]), "predict_proba")


def test_dae_code_space(trained: Trained, digits: ImageDataset) -> None:
    model = trained("dae").model
    assert isinstance(model, StackedDAE)
    xt, yt = digits.test()
    z = model.encode(xt)
    assert z.shape == (len(xt), 300) and z.dtype == np.float32
    assert np.allclose(model.code_proba(z), model.predict_proba(xt), atol=1e-5)
    recon = model.decode(z)
    assert recon.shape == xt.shape and recon.min() >= 0.0 and recon.max() <= 1.0
    # the decoder gives the face back: far better than the mean image of the data set
    mse = ((recon - xt) ** 2).mean()
    baseline = ((xt - digits.train()[0].mean(axis=0)) ** 2).mean()
    assert mse < 0.6 * baseline, (mse, baseline)
    _directional_fd(model, z[:4], yt[:4], "code_proba")


def test_evaluation_embeddings_group_identities(trained: Trained, digits: ImageDataset) -> None:
    model = trained("evaluation").model
    assert isinstance(model, EvaluationNet)
    xt, yt = digits.test()
    e = model.embed(xt)
    assert e.shape == (len(xt), model.config.features) and np.isfinite(e).all()
    d = np.linalg.norm(e[:, None] - e[None], axis=2)
    same = yt[:, None] == yt[None]
    assert d[same & ~np.eye(len(yt), dtype=bool)].mean() < 0.7 * d[~same].mean()
    assert trained("evaluation").card["seed"] == 0
    assert model.config.seed != trained("cnn").model.config.seed


def test_softmax_on_a_few_att_faces(att_few: ImageDataset) -> None:
    t = train_target(att_few, "softmax", seed=0, quick=True)
    assert t.model.input_shape_ == (112, 92)
    assert t.card["test_accuracy"] >= 0.9
    assert t.card["n_train"] == 42 and t.card["n_test"] == 18


def test_not_fitted_and_bad_inputs(trained: Trained) -> None:
    with pytest.raises(NotFittedError, match="not fitted"):
        SoftmaxRegression().predict(np.zeros((1, 8, 8), np.float32))
    with pytest.raises(NotFittedError, match="not fitted"):
        StackedDAE().encode(np.zeros((1, 8, 8), np.float32))
    with pytest.raises(NotFittedError, match="not fitted"):
        EvaluationNet().embed(np.zeros((1, 8, 8), np.float32))
    model = trained("softmax").model
    with pytest.raises(DataError, match=r"\(8, 8\)"):
        model.predict_proba(np.zeros((2, 9, 9), np.float32))
    with pytest.raises(DataError, match="class indices"):
        model.class_gradient(np.zeros((2, 8, 8), np.float32), np.array([0]))
    with pytest.raises(DataError, match=r"0 \.\. 9"):
        model.class_gradient(np.zeros((1, 8, 8), np.float32), np.array([10]))
    with pytest.raises(DataError, match="codes must have shape"):
        StackedDAE.decode(trained("dae").model, np.zeros((1, 5), np.float32))


@pytest.mark.parametrize(
    "make",
    [
        lambda: SoftmaxConfig(l2=0),
        lambda: SoftmaxConfig(seed=-1),
        lambda: MLPConfig(hidden=0),
        lambda: DAEConfig(corruption=1.0),
        lambda: CNNConfig(dropout=1.5),
        lambda: CNNConfig(channels=()),
    ],
)
def test_configs_validate(make: Callable[[], object]) -> None:
    with pytest.raises(ConfigError):
        make()


def test_train_target_rejects_mismatches(digits: ImageDataset) -> None:
    with pytest.raises(ConfigError, match="unknown model kind"):
        train_target(digits, "svm", seed=0)
    with pytest.raises(ConfigError, match="surveys"):
        train_target(digits, "tree", seed=0)
    with pytest.raises(ConfigError, match="seed"):
        train_target(digits, "softmax", seed=-3)


def test_mlp_trains_in_the_span_of_a_few_att_faces(att_few: ImageDataset) -> None:
    """42 images of 10304 pixels: the first layer trains in the span of the images."""
    from torch import nn

    x, y = att_few.train()
    xt, yt = att_few.test()
    m = MLP(MLPConfig(hidden=64, max_iter=100)).fit(x, y, class_names=att_few.class_names)
    assert m.class_names_ == att_few.class_names
    assert isinstance(m.net_, nn.Sequential)
    first = m.net_[2]  # an ordinary Linear(10304, 64) again
    assert isinstance(first, nn.Linear)
    assert tuple(first.weight.shape) == (64, 112 * 92)
    assert m.score(xt, yt) >= 0.8  # chance is 1/6


def test_evaluation_augmentations_blur_and_same_identity_mix() -> None:
    import torch

    from mlinvert.targets._torch import gaussian_blur, same_identity_mix

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 16, 12, generator=gen)
    sigma = torch.tensor([0.0, 0.5, 1.0, 2.0])
    y = gaussian_blur(x, sigma)
    assert torch.equal(y[0], x[0])  # sigma 0 leaves the image alone
    rough = [float((img[:, 1:] - img[:, :-1]).abs().mean()) for img in y]
    assert rough[1] > rough[2] > rough[3]  # more blur, smoother
    assert torch.allclose(y.mean(dim=(1, 2)), x.mean(dim=(1, 2)), atol=0.03)
    flat = gaussian_blur(torch.full((2, 8, 8), 0.3), torch.tensor([1.0, 3.0]))
    assert torch.allclose(flat, torch.full((2, 8, 8), 0.3), atol=1e-6)
    # mixing averages photos of the SAME identity only: identity 0 is black, 1 is white
    X = torch.cat([torch.zeros(5, 4, 4), torch.ones(5, 4, 4)])
    Y = torch.tensor([0] * 5 + [1] * 5)
    mixed = same_identity_mix(X, Y, X, Y, 1.0, 4)
    assert torch.equal(mixed, X)
    # and changes an image when the identity's photos differ
    X2 = torch.rand(6, 4, 4, generator=gen)
    Y2 = torch.tensor([0, 0, 0, 1, 1, 1])
    assert not torch.equal(same_identity_mix(X2, Y2, X2, Y2, 1.0, 4), X2)
    with pytest.raises(ConfigError, match="probabilities"):
        EvaluationConfig(mix=1.5)
    with pytest.raises(ConfigError, match="mix_max"):
        EvaluationConfig(mix_max=1)
