"""Data containers shared by every loader: float32 in [0, 1], int64 labels, names; the
search for copies of one photo (exact or near-exact) that a split keeps on one side."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlinvert.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: Two images whose pixels differ by less than this root-mean-square (in [0, 1] units,
#: about 5 grey levels of 255) are copies of one photo (re-saved, re-encoded, resized).
#: Distinct photos differ far more: on AT&T, two photos of one person taken moments
#: apart differ by 0.048 at least, on the digits by 0.041.
SAME_PHOTO_RMS = 0.02


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


def _thumbnails(images: np.ndarray) -> np.ndarray:
    """Block means of ``images`` ``(n, h, w)`` (blocks of about 1/16 of a side), scaled so
    that the squared distance of two thumbnails is at most their images' mean squared
    difference (Jensen: a block's squared mean difference <= its mean squared one)."""
    n, h, w = images.shape
    bh, bw = max(h // 16, 1), max(w // 16, 1)
    th, tw = h // bh, w // bw
    blocks = images[:, : th * bh, : tw * bw].reshape(n, th, bh, tw, bw).mean(axis=(2, 4))
    return blocks.reshape(n, -1) * np.sqrt(bh * bw / (h * w))


def close_pairs(
    a: np.ndarray, b: np.ndarray | None = None, *, tol: float = SAME_PHOTO_RMS
) -> np.ndarray:
    """Index pairs ``(i, j)`` of images ``a[i]``, ``b[j]`` (same ``(h, w)``) whose
    root-mean-square pixel difference is below ``tol``; without ``b``, pairs ``i < j``
    within ``a``. Thumbnails rule out most pairs, the survivors are compared pixel by
    pixel, so tens of thousands of photos take seconds."""
    a = np.asarray(a, dtype=np.float64)
    other = a if b is None else np.asarray(b, dtype=np.float64)
    if a.shape[1:] != other.shape[1:]:
        raise DataError(f"cannot compare images of shape {a.shape[1:]} with {other.shape[1:]}")
    if a.shape[0] == 0 or other.shape[0] == 0:
        return np.zeros((0, 2), dtype=np.int64)
    ta, tb = _thumbnails(a), _thumbnails(other)
    na, nb = (ta**2).sum(axis=1), (tb**2).sum(axis=1)
    found: list[np.ndarray] = []
    chunk = 512
    for start in range(0, len(ta), chunk):
        d2 = (
            na[start : start + chunk, None] + nb[None, :] - 2.0 * (ta[start : start + chunk] @ tb.T)
        )
        i, j = np.nonzero(d2 < tol**2 + 1e-9)  # candidates; rounding on the safe side
        i = i + start
        keep = i < j if b is None else np.ones(i.shape, dtype=bool)
        for ii, jj in zip(i[keep], j[keep], strict=True):
            if np.sqrt(np.mean((a[ii] - other[jj]) ** 2)) < tol:
                found.append(np.array([ii, jj], dtype=np.int64))
    return np.stack(found) if found else np.zeros((0, 2), dtype=np.int64)


def copy_groups(images: np.ndarray, *, tol: float = SAME_PHOTO_RMS) -> list[list[int]]:
    """Groups (sorted row lists, two rows or more, in order of their first row) of images
    that are copies of one photo: exact or near-exact (:func:`close_pairs`), joined
    transitively."""
    parent = list(range(len(images)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in close_pairs(images, tol=tol).tolist():
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(len(images)):
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def per_class_split(
    labels: np.ndarray,
    train_per_class: int | float,
    seed: int,
    *,
    copies: Sequence[Sequence[int]] = (),
) -> Split:
    """Split every class separately: ``train_per_class`` rows (or that fraction) train.

    Deterministic for a given ``seed``; every class keeps at least one test row. Rows in
    one group of ``copies`` (:func:`copy_groups`: copies of one photo) go to the same
    side, so a held-out photo is never a private one; without copies the split is the
    plain row split.
    """
    if isinstance(train_per_class, float):
        if not 0.0 < train_per_class < 1.0:
            raise ConfigError(
                f"train fraction must lie in (0, 1), got {train_per_class}; "
                "use e.g. 0.7 or an integer count per class such as 7"
            )
    elif train_per_class < 1:
        raise ConfigError(f"train count per class must be >= 1, got {train_per_class}")
    unit = np.arange(labels.size)  # a row's group: the first row of its photo's copies
    for group in copies:
        unit[list(group)] = min(group)
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        photos = np.unique(unit[rows])  # == rows without copies: the plain row split
        photos = photos[rng.permutation(photos.size)]
        if isinstance(train_per_class, float):
            k = round(train_per_class * rows.size)
        else:
            k = train_per_class
        # whole photos (with their copies) until k rows; one photo at least on each side
        taken = np.cumsum([np.count_nonzero(unit[rows] == p) for p in photos])
        n = int(np.searchsorted(taken, k)) + 1 if k > 0 else 1
        n = min(max(n, 1), photos.size - 1) if photos.size > 1 else photos.size
        private = np.isin(unit[rows], photos[:n])
        train.append(rows[private])
        test.append(rows[~private])
    rule = (
        f"{train_per_class} per class"
        if isinstance(train_per_class, int)
        else f"{train_per_class:.0%} of each class"
    )
    extra = sum(len(g) - 1 for g in copies)
    kept = f", {extra} copies of another photo kept on its side" if extra else ""
    return Split(
        train=np.sort(np.concatenate(train)).astype(np.int64),
        test=np.sort(np.concatenate(test)).astype(np.int64),
        seed=seed,
        rule=f"train {rule}{kept}, seed {seed}",
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
