"""Data containers shared by every loader: float32 in [0, 1], int64 labels, names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlinvert.errors import ConfigError, DataError

Seed = int | np.random.Generator | None


def rng_from(seed: Seed) -> np.random.Generator:
    """Return a generator for ``seed`` (an int, an existing generator, or None)."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


@dataclass(frozen=True, eq=False)
class Split:
    """Which rows were private training data and which were held out.

    ``train`` and ``test`` are sorted int64 row indices into the data set. The split
    is recorded in every model card so attacks and lineups know what was private.
    """

    train: np.ndarray
    test: np.ndarray
    seed: int
    rule: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "train": self.train.tolist(),
            "test": self.test.tolist(),
            "seed": self.seed,
            "rule": self.rule,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Split:
        """Inverse of :meth:`to_dict`."""
        return cls(
            train=np.asarray(d["train"], dtype=np.int64),
            test=np.asarray(d["test"], dtype=np.int64),
            seed=int(d["seed"]),
            rule=str(d["rule"]),
        )


def per_class_split(labels: np.ndarray, train_per_class: int | float, seed: int) -> Split:
    """Split every class separately: ``train_per_class`` rows (or that fraction) train.

    Deterministic for a given ``seed``; every class keeps at least one test row.
    """
    if isinstance(train_per_class, float):
        if not 0.0 < train_per_class < 1.0:
            raise ConfigError(
                f"train fraction must lie in (0, 1), got {train_per_class}; "
                "use e.g. 0.7 or an integer count per class such as 7"
            )
    elif train_per_class < 1:
        raise ConfigError(f"train count per class must be >= 1, got {train_per_class}")
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rows = rows[rng.permutation(rows.size)]
        if isinstance(train_per_class, float):
            k = round(train_per_class * rows.size)
        else:
            k = train_per_class
        k = min(max(k, 1), rows.size - 1) if rows.size > 1 else rows.size
        train.append(rows[:k])
        test.append(rows[k:])
    rule = (
        f"{train_per_class} per class"
        if isinstance(train_per_class, int)
        else f"{train_per_class:.0%} of each class"
    )
    return Split(
        train=np.sort(np.concatenate(train)).astype(np.int64),
        test=np.sort(np.concatenate(test)).astype(np.int64),
        seed=seed,
        rule=f"train {rule}, seed {seed}",
    )


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Grey images ``(n, h, w)`` float32 in [0, 1] with int64 identity labels."""

    spec: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    split: Split
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != np.float32 or self.images.ndim != 3:
            raise DataError(
                f"images must be float32 (n, h, w), got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise DataError("labels must have one entry per image")

    kind = "image"

    @property
    def image_shape(self) -> tuple[int, int]:
        """``(h, w)`` of every image."""
        return (int(self.images.shape[1]), int(self.images.shape[2]))

    @property
    def n_classes(self) -> int:
        """Number of identities."""
        return len(self.class_names)

    def train(self) -> tuple[np.ndarray, np.ndarray]:
        """The private training images and labels."""
        return self.images[self.split.train], self.labels[self.split.train]

    def test(self) -> tuple[np.ndarray, np.ndarray]:
        """The held-out images and labels."""
        return self.images[self.split.test], self.labels[self.split.test]

    def subset(self, classes: int) -> ImageDataset:
        """The first ``classes`` identities only (for small tests); split kept."""
        keep = self.labels < classes
        old_to_new = np.cumsum(keep) - 1
        return ImageDataset(
            spec=f"{self.spec}#classes={classes}",
            images=self.images[keep],
            labels=self.labels[keep],
            class_names=self.class_names[:classes],
            split=Split(
                train=old_to_new[self.split.train[keep[self.split.train]]].astype(np.int64),
                test=old_to_new[self.split.test[keep[self.split.test]]].astype(np.int64),
                seed=self.split.seed,
                rule=self.split.rule,
            ),
            meta={**self.meta, "subset_classes": classes},
        )
