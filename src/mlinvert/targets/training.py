"""Train any target kind on a data set and describe it in a model card.

:func:`train_target` is the one entry point used by ``mlinvert train``, the audit and
the benchmarks. Face kinds train the torch models on the data set's private
(training) split; kind ``"tree"`` and every survey data set go to
:func:`mlinvert.targets.tree.train_tree`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mlinvert.core import Seed
from mlinvert.data.base import ImageDataset
from mlinvert.errors import ConfigError, DataError
from mlinvert.targets.dp import DPConfig, config_dict

log = logging.getLogger(__name__)

FACE_KINDS = ("softmax", "mlp", "dae", "cnn", "evaluation")
KINDS = (*FACE_KINDS, "tree")
#: Face kinds that DP-SGD can train (the DAE in four stages, composed; see
#: :mod:`mlinvert.targets.dae`).
DP_KINDS = ("softmax", "mlp", "cnn", "dae")
#: The CNN trained by DP-SGD is smaller than the plain one (4.8 k weights for 40 classes
#: instead of 160 k): DP-SGD's noise grows with the parameter count, and the plain network
#: stayed at chance on digits at epsilon 8 where this one reaches 64-75 %.
DP_CNN: dict[str, Any] = {"channels": (8, 16), "pool": 2, "features": 32, "dropout": 0.0}

#: The DAE trained by DP-SGD is smaller than the plain one (256 -> 64 units instead of
#: 1000 -> 300: 5.3 M weights instead of 21 M), for the reason of :data:`DP_CNN`; on AT&T
#: without noise (clipping only) it reached 92 % test accuracy with the schedule below.
DP_DAE: dict[str, Any] = {"hidden": 256, "code": 64}
#: Its four DP-SGD stages: (stage, epochs, lr, clip), expected Poisson batch
#: :data:`DP_DAE_BATCH`, SGD momentum 0.9, one noise multiplier for all. The
#: reconstruction stages' per-example gradients (mean squared error over the features)
#: have norms near 0.01-0.04 at initialisation on AT&T, the fine-tuning's (cross-entropy)
#: near 5, so each stage clips at its own scale.
DP_DAE_STAGES: tuple[tuple[str, int, float, float], ...] = (
    ("layer1", 10, 10.0, 0.04),
    ("layer2", 10, 10.0, 0.02),
    ("finetune", 30, 1.0, 1.0),
    ("decoder", 20, 10.0, 0.01),
)
DP_DAE_BATCH = 70
#: After public pre-training (``DAEConfig.public``) the DAE has one DP-SGD stage, the one
#: that reads the private images: (epochs, lr, clip) by its name, expected batch
#: :data:`DP_DAE_BATCH`, momentum 0.9 (see :func:`dp_config`). The learning rates were
#: picked at epsilon 8 on a validation split of AT&T's training photos (5 train / 2
#: validation per person; head lr 0.3 of 0.3/1/3, fine-tuning lr 0.1 of 0.02/0.1/1), not
#: on the test photos.
DP_DAE_PUBLIC_STAGES: dict[str, tuple[int, float, float]] = {
    "head": (30, 0.3, 1.0),
    "finetune": (30, 0.1, 1.0),
}
#: The DAE pre-trained on public faces (with or without DP): 256 -> 128 units, masking
#: noise 0.1, :data:`PUBLIC_EPOCHS` epochs per layer on the public faces. Picked on the
#: same validation split by the code's linear separability and the clip-only head's
#: accuracy (256 -> 64 at 60 epochs: 21 % / 9 %; 256 -> 128 at 200: 74 % / 59 %;
#: 512 -> 256 at 200: 83 % / 70 % but twice the time and worse at epsilon 8).
DP_DAE_PUBLIC: dict[str, Any] = {"hidden": 256, "code": 128, "corruption": 0.1}
#: Epochs of public pre-training per layer (``PublicPretrain.epochs``); ``quick``: 10.
PUBLIC_EPOCHS = 200

#: The evaluation model gets this offset added to the seed, so a target and the model
#: that judges attacks on it never share their initialisation.
EVALUATION_SEED_OFFSET = 7919


@dataclass(frozen=True)
class TrainedTarget:
    """A fitted model and its card (data spec, split, seed, config, accuracies, seconds)."""

    model: Any
    card: dict[str, Any]


def resolve_seed(seed: Seed) -> int:
    """An int seed from an int, a Generator (one draw) or None (a fresh random seed)."""
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(2**31 - 1))
    if seed is None:
        return int(np.random.default_rng().integers(2**31 - 1))
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int, a Generator or None, got {seed!r}")
    return int(seed)


def face_config(kind: str, *, seed: int, quick: bool) -> Any:
    """The config used for a face ``kind``: the real settings, or tiny ones if ``quick``."""
    from mlinvert.targets import torch_models as tm
    from mlinvert.targets.dae import DAEConfig

    if kind == "softmax":
        return tm.SoftmaxConfig(seed=seed, max_iter=40 if quick else 150)
    if kind == "mlp":
        return (
            tm.MLPConfig(seed=seed, hidden=256, max_iter=60) if quick else tm.MLPConfig(seed=seed)
        )
    if kind == "dae":
        if quick:
            return DAEConfig(
                seed=seed, hidden=256, code=300, pretrain_epochs=10, finetune_epochs=20
            )
        return DAEConfig(seed=seed)
    if kind == "cnn":
        return (
            tm.CNNConfig(seed=seed, channels=(8, 16, 32), epochs=15, batch_size=64)
            if quick
            else (tm.CNNConfig(seed=seed))
        )
    if kind == "evaluation":
        eseed = seed + EVALUATION_SEED_OFFSET
        if quick:
            return tm.EvaluationConfig(seed=eseed, channels=(12, 24, 48), epochs=12, batch_size=64)
        return tm.EvaluationConfig(seed=eseed)
    raise ConfigError(f"unknown model kind {kind!r}; choose one of: {', '.join(KINDS)}")


def dp_config(
    kind: str,
    epsilon: float,
    *,
    delta: float | None = None,
    quick: bool = False,
    private: str | None = None,
) -> DPConfig:
    """DP-SGD settings for ``kind`` at privacy target ``(epsilon, delta)``.

    Softmax and MLP: chosen for test accuracy on AT&T at epsilon 8 (BENCHMARKS.md,
    "DP-SGD training"): expected Poisson batch 70 (sampling rate 0.25 of 280 images), 30
    epochs (120 steps), clip 1, SGD momentum 0.9 with lr 0.01 (a larger lr lost 15-30
    points); ``quick`` halves the epochs (tests). CNN (trained as :data:`DP_CNN`):
    expected batch 256, 15 epochs, lr 0.5, chosen on digits at epsilon 8; on AT&T no
    setting tried learned at epsilon <= 32 (BENCHMARKS.md). DAE: four stages
    (:data:`DP_DAE_STAGES`, ``quick`` quarters their epochs) whose composed epsilon meets
    the target; after public pre-training (``private`` = ``"head"`` or ``"finetune"``, the
    stage that then reads the private images; see
    :class:`~mlinvert.targets.dae.PublicPretrain`) that one stage alone
    (:data:`DP_DAE_PUBLIC_STAGES`).
    """
    kind = kind.strip().lower()
    if kind not in DP_KINDS:
        raise ConfigError(
            f"DP-SGD training is available for {', '.join(DP_KINDS)}, not {kind!r}; "
            "train without --dp-epsilon or pick one of those kinds"
        )
    if kind == "cnn":  # with DP_CNN's small network; fewer steps spend less noise
        return DPConfig(epsilon=epsilon, delta=delta, clip=1.0, epochs=15, batch_size=256, lr=0.5)
    if private is not None and kind != "dae":
        raise ConfigError(
            f"public pre-training (private stages {private!r}) is available for the dae only, "
            f"not {kind!r}"
        )
    if kind == "dae":
        return _dp_dae(epsilon, delta, quick, private)
    return DPConfig(
        epsilon=epsilon, delta=delta, clip=1.0, epochs=15 if quick else 30, batch_size=70, lr=0.01
    )


def _dp_dae(epsilon: float, delta: float | None, quick: bool, private: str | None) -> DPConfig:
    """The DAE's four DP-SGD stages (:data:`DP_DAE_STAGES`), or after public pre-training
    its one private stage (:data:`DP_DAE_PUBLIC_STAGES`; see :func:`dp_config`)."""
    from mlinvert.targets.dp import DPStage

    def stage(name: str, epochs: int, lr: float, clip: float) -> DPStage:
        quarter = max(1, epochs // 4) if quick and epochs else epochs
        return DPStage(name=name, epochs=quarter, batch_size=DP_DAE_BATCH, lr=lr, clip=clip)

    if private is None:
        stages = tuple(stage(*s) for s in DP_DAE_STAGES)
    elif private in DP_DAE_PUBLIC_STAGES:
        stages = (stage(private, *DP_DAE_PUBLIC_STAGES[private]),)
    else:
        raise ConfigError(
            f"after public pre-training the dae's private stage is one of "
            f"{', '.join(DP_DAE_PUBLIC_STAGES)}, got {private!r}"
        )
    return DPConfig(epsilon=epsilon, delta=delta, batch_size=DP_DAE_BATCH, stages=stages)


def make_face_model(kind: str, config: Any) -> Any:
    """An unfitted face model of ``kind`` with ``config``."""
    from mlinvert.targets.io import model_class

    return model_class(kind)(config)


def _train_tree(dataset: Any, seed: int, quick: bool) -> TrainedTarget:
    from mlinvert.targets.tree import train_tree

    start = time.perf_counter()
    model, card = train_tree(dataset, seed=seed, quick=quick)
    card = {**card, "train_seconds": round(time.perf_counter() - start, 3), "quick": quick}
    return TrainedTarget(model=model, card=card)


def public_pretrain(data: str, private: str, *, quick: bool = False) -> Any:
    """The DAE's public pre-training option (:class:`~mlinvert.targets.dae.PublicPretrain`)
    on public face set ``data`` with ``private`` stages; :data:`PUBLIC_EPOCHS` (10 if
    ``quick``)."""
    from mlinvert.targets.dae import PublicPretrain

    return PublicPretrain(data=data, private=private, epochs=10 if quick else PUBLIC_EPOCHS)


def train_target(
    dataset: Any,
    kind: str,
    *,
    seed: Seed,
    quick: bool = False,
    dp: DPConfig | None = None,
    public: Any = None,
) -> TrainedTarget:
    """Train ``kind`` on ``dataset``'s private split and return the model and its card.

    Face kinds: ``softmax``, ``mlp``, ``dae``, ``cnn``, ``evaluation`` on an
    :class:`~mlinvert.data.ImageDataset`; ``tree`` on a survey data set. ``quick``
    picks tiny settings (for tests). The card holds the data spec, split (train/test
    indices), seed, config, train/test accuracy, chance level and training seconds.
    ``dp`` (see :func:`dp_config`) trains a kind of :data:`DP_KINDS` by DP-SGD instead;
    its card then also holds ``privacy``: the achieved epsilon, delta, noise multiplier,
    clip, sampling rate, steps and accountant (for the DAE, composed over its stages,
    each listed in ``privacy["stages"]``). ``public`` (the dae only; a
    :class:`~mlinvert.targets.dae.PublicPretrain`, see :func:`public_pretrain`) pre-trains
    the autoencoder and decoder on public faces first (the network :data:`DP_DAE_PUBLIC`,
    with or without ``dp``); the card's ``training_stages`` then
    names the public data and which stages were public and which private (with ``dp``,
    ``privacy`` composes only the private ones: pass ``dp_config(..., private=...)``).
    """
    kind = _checked_kind(kind, dp, public)
    s = resolve_seed(seed)
    if kind == "tree" or not isinstance(dataset, ImageDataset):
        _check_survey(dataset, kind)
        return _train_tree(dataset, s, quick)
    return _train_face(dataset, kind, seed=s, quick=quick, dp=dp, public=public)


def _checked_kind(kind: str, dp: DPConfig | None, public: Any) -> str:
    """``kind`` normalised; ConfigError unless it is known and can train with ``dp`` and
    ``public``."""
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise ConfigError(f"unknown model kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if dp is not None and kind not in DP_KINDS:
        raise ConfigError(
            f"DP-SGD training is available for {', '.join(DP_KINDS)}, not {kind!r}; "
            "train without --dp-epsilon or pick one of those kinds"
        )
    if public is not None and kind != "dae":
        raise ConfigError(
            f"public pre-training is available for the dae only, not {kind!r}; "
            "drop --public-pretrain or train --model dae"
        )
    return kind


def _check_survey(dataset: Any, kind: str) -> None:
    """ConfigError unless a tree trains on a survey (a face kind needs images)."""
    if kind != "tree":
        raise ConfigError(
            f"model kind {kind!r} needs an image data set; {dataset.spec!r} is a survey — "
            "use --model tree for surveys"
        )
    if isinstance(dataset, ImageDataset):
        raise ConfigError(
            f"decision trees train on surveys (steak:PATH, gss:PATH, fair), not on the "
            f"image data set {dataset.spec!r}; pick a face kind: {', '.join(FACE_KINDS)}"
        )


def _face_training_config(
    kind: str, *, seed: int, quick: bool, dp: DPConfig | None, public: Any
) -> Any:
    """:func:`face_config` with the DP-SGD network and settings (``dp``) and the public
    pre-training (``public``) applied."""
    config = face_config(kind, seed=seed, quick=quick)
    changes: dict[str, Any] = {}
    if dp is not None:
        changes.update(dp=dp, **{"cnn": DP_CNN, "dae": DP_DAE}.get(kind, {}))
    if public is not None:  # the public-pre-trained network, with or without DP
        changes.update(public=public, **DP_DAE_PUBLIC)
    if changes:  # one replace: the DAE checks its DP stages against its public option
        config = replace(config, **changes)
    return config


def _train_face(
    dataset: ImageDataset,
    kind: str,
    *,
    seed: int,
    quick: bool,
    dp: DPConfig | None,
    public: Any,
) -> TrainedTarget:
    """Fit a face ``kind`` on ``dataset``'s private split and describe it in its card."""
    X, y = dataset.train()
    Xt, yt = dataset.test()
    if X.shape[0] == 0:
        raise DataError(f"data set {dataset.spec!r} has no training images")
    config = _face_training_config(kind, seed=seed, quick=quick, dp=dp, public=public)
    model = make_face_model(kind, config)
    log.info(
        "training %s on %s (%d images %dx%d, %d classes)",
        kind,
        dataset.spec,
        X.shape[0],
        X.shape[1],
        X.shape[2],
        dataset.n_classes,
    )
    start = time.perf_counter()
    model.fit(X, y, class_names=dataset.class_names)
    seconds = time.perf_counter() - start
    card = {
        "kind": kind,
        "dataset": dataset.spec,
        "split": dataset.split.to_dict(),
        "seed": seed,
        "quick": quick,
        "config": config_dict(config),
        **_scores(model, kind, (X, y), (Xt, yt), dataset.n_classes, seconds),
    }
    if model.privacy_ is not None:
        card["privacy"] = model.privacy_.to_dict()
    if getattr(model, "stages_", None) is not None:
        card["training_stages"] = model.stages_
    if kind == "dae" and yt.size:
        recon = model.decode(model.encode(Xt))
        card["test_reconstruction_mse"] = float(((recon - Xt) ** 2).mean())
        card["mean_image_mse"] = float(((Xt - X.mean(axis=0)) ** 2).mean())
    return TrainedTarget(model=model, card=card)


def _scores(
    model: Any,
    kind: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    n_classes: int,
    seconds: float,
) -> dict[str, Any]:
    """The card's sizes, accuracies (train, test, chance) and training seconds."""
    (X, y), (Xt, yt) = train, test
    train_acc = model.score(X, y)
    test_acc = model.score(Xt, yt) if yt.size else None
    log.info(
        "%s: train accuracy %.4f, test accuracy %s, %.1f s",
        kind,
        train_acc,
        "n/a" if test_acc is None else f"{test_acc:.4f}",
        seconds,
    )
    return {
        "n_train": int(X.shape[0]),
        "n_test": int(Xt.shape[0]),
        "chance_accuracy": 1.0 / n_classes,
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "train_seconds": round(seconds, 3),
    }
