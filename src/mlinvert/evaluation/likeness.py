"""Likeness: does a reconstruction look like a face, and like that person?

An evaluation classifier is easy to please (PAPER.md, "What counts as a recovered
face"): noise that carries a person's discriminative template is often "identified".
Likeness therefore multiplies two calibrated terms, each in [0, 1]:

* **identity likeness** ``a_id`` — low-pass (Gaussian, sigma relative to the image
  size) and per-image standardised, the reconstruction's correlation with its nearest
  private training photo of the target, ``s_c``, is compared with the same nearest-photo
  correlation for every other identity: ``z = (s_c - mean_k s_k) / std_k s_k`` over the
  other identities k. ``a_id = clip((z - z_floor) / (z_ref_c - z_floor), 0, 1)``.
  ``z_ref_c`` is the median z of identity c's own private training photos, each scored
  leave-one-out against the rest (the median over all photos if c has only one; at
  least ``z_floor + 0.5``): some people are less distinctive than others. ``z_floor``
  (default 1) is the contrast that still counts as nobody in particular: on AT&T, 90 %
  of photos scored against the WRONG person stay below z = 0.9. So ``a_id = 1`` means
  "as distinctly this person as a typical photo of them", 0 "no closer to this person
  than to others".
* **face likeness** ``a_face`` — the share of the image's energy (its own mean removed)
  that lies in an eigenface space learned from OTHER people: identities are split into
  seeded folds and the space used for identity c is fitted only on the private photos of
  identities outside c's fold (mean face plus the leading principal components that
  explain ``face_variance`` of their variance, at most a quarter of the pixels). Uniform
  noise spreads its energy over all pixels and lands near ``k / d``; faces land high.
  ``a_face = clip((share - share_noise) / (share_photo - share_noise), 0, 1)`` where
  ``share_photo`` is the median share of the private photos (each in the space of its
  own fold, i.e. without its own identity) and ``share_noise`` the mean share of seeded
  uniform-noise images.

``likeness = a_id * a_face``: both must be high. A flat grey image has no structure
and scores 0 on both; uniform noise scores ~0 on face likeness; a noise template that
carries the identity (high ``a_id``) still fails on face likeness. Heavy pixel noise
on a real photo also lowers face likeness (AT&T: a held-out photo + U(±0.25) noise
scores 0.54 against 0.85 clean); see BENCHMARKS.md, "Evaluation calibration".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlinvert.core import Seed, rng_from
from mlinvert.errors import ConfigError, DataError
from mlinvert.evaluation.images import (
    lowpass,
    lowpass_sigma,
    principal_components,
    standardise,
)


@dataclass(frozen=True, kw_only=True)
class LikenessConfig:
    """Settings of the likeness score (see the module docstring for the definition)."""

    n_folds: int = 5
    face_variance: float = 0.85
    max_components_fraction: float = 0.25
    n_noise_calibration: int = 32
    identity_floor_z: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.identity_floor_z < 2.0:
            raise ConfigError(
                f"identity_floor_z must lie in [0, 2) standard deviations, got "
                f"{self.identity_floor_z}"
            )
        if self.n_folds < 2:
            raise ConfigError(f"n_folds must be >= 2 (leave-identity-out), got {self.n_folds}")
        if not 0.0 < self.face_variance < 1.0:
            raise ConfigError(f"face_variance must lie in (0, 1), got {self.face_variance}")
        if not 0.0 < self.max_components_fraction <= 1.0:
            raise ConfigError(
                f"max_components_fraction must lie in (0, 1], got {self.max_components_fraction}"
            )
        if self.n_noise_calibration < 1:
            raise ConfigError(f"n_noise_calibration must be >= 1, got {self.n_noise_calibration}")


def _per_identity_max(sims: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(n, n_train) similarities -> (n, n_classes) max similarity per identity (NaN: none)."""
    filled = np.where(np.isnan(sims), -np.inf, sims)
    out = np.full((sims.shape[0], n_classes), -np.inf)
    for k in range(n_classes):
        cols = labels == k
        if np.any(cols):
            out[:, k] = filled[:, cols].max(axis=1)
    out[np.isinf(out)] = np.nan
    return out


def _contrast(per_id: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """z-score of the target identity's similarity among the other identities'."""
    n, k = per_id.shape
    z = np.zeros(n)
    for i in range(n):
        own = per_id[i, labels[i]]
        mask = np.ones(k, dtype=bool)
        mask[labels[i]] = False
        others = per_id[i, mask]
        others = others[np.isfinite(others)]
        if not np.isfinite(own) or others.size < 2:
            continue
        z[i] = (own - others.mean()) / max(float(others.std()), 1e-6)
    return z


class IdentityLikeness:
    """Low-pass correlation to the target's private photos relative to other people's."""

    def __init__(self, floor_z: float = 1.0) -> None:
        self.floor_z = floor_z
        self.sigma_: float = 0.0
        self.train_: np.ndarray = np.empty((0, 0))
        self.train_labels_: np.ndarray = np.empty(0, dtype=np.int64)
        self.n_classes_: int = 0
        self.z_ref_: float = 1.0
        self.z_ref_per_id_: np.ndarray = np.empty(0)

    def fit(self, images: np.ndarray, labels: np.ndarray, n_classes: int) -> IdentityLikeness:
        """Learn from the private training photos and calibrate ``z_ref`` per identity."""
        self.sigma_ = lowpass_sigma((images.shape[1], images.shape[2]))
        self.train_ = standardise(lowpass(images, self.sigma_))
        self.train_labels_ = labels.astype(np.int64)
        self.n_classes_ = n_classes
        sims = self.train_ @ self.train_.T
        np.fill_diagonal(sims, np.nan)  # leave-one-out: a photo is not its own neighbour
        z = _contrast(_per_identity_max(sims, labels, n_classes), labels)
        z_ok = z[z != 0.0]
        self.z_ref_ = float(np.median(z_ok)) if z_ok.size else 0.0
        if self.z_ref_ <= self.floor_z:
            raise DataError(
                "cannot calibrate identity likeness: private photos are not distinctly closer "
                f"to their own identity (median z {self.z_ref_:.2f} <= {self.floor_z}); the "
                "data set needs >= 2 photos per identity that resemble each other"
            )
        per_id = np.full(n_classes, self.z_ref_)
        for c in range(n_classes):
            own = z[(labels == c) & (z != 0.0)]
            if own.size:
                per_id[c] = float(np.median(own))
        self.z_ref_per_id_ = np.maximum(per_id, self.floor_z + 0.5)
        return self

    def zscores(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Raw contrast z of each image to its label's private photos (0 for flat images)."""
        feats = standardise(lowpass(images, self.sigma_))
        sims = feats @ self.train_.T
        z = _contrast(_per_identity_max(sims, self.train_labels_, self.n_classes_), labels)
        z[~np.any(feats != 0.0, axis=1)] = 0.0
        return z

    def score(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """``clip((z - z_floor) / (z_ref_c - z_floor), 0, 1)`` per image."""
        z = self.zscores(images, labels)
        ref = self.z_ref_per_id_[labels]
        return np.clip((z - self.floor_z) / (ref - self.floor_z), 0.0, 1.0)


def _face_basis(flat: np.ndarray, variance: float, max_k: int) -> np.ndarray:
    """Orthonormal (d, k+1) basis: the mean face plus the leading principal components."""
    mean = flat.mean(axis=0)
    comps = principal_components(flat - mean, variance, max_k)
    q, _ = np.linalg.qr(np.column_stack([mean, comps.T]))
    return q


class FaceLikeness:
    """Share of an image's energy inside an eigenface space learned from other people."""

    def __init__(self, config: LikenessConfig) -> None:
        self.config = config
        self.fold_of_: np.ndarray = np.empty(0, dtype=np.int64)
        self.bases_: list[np.ndarray] = []
        self.share_photo_: float = 1.0
        self.share_noise_: float = 0.0

    def fit(
        self, images: np.ndarray, labels: np.ndarray, n_classes: int, *, seed: Seed
    ) -> FaceLikeness:
        """Fit one leave-fold-out eigenface space per fold and calibrate both shares."""
        rng = rng_from(seed)
        n_folds = min(self.config.n_folds, n_classes)
        if n_folds < 2:
            raise DataError("face likeness needs at least 2 identities (leave-identity-out)")
        order = rng.permutation(n_classes)
        self.fold_of_ = np.empty(n_classes, dtype=np.int64)
        self.fold_of_[order] = np.arange(n_classes) % n_folds
        flat = standardise(images)
        d = flat.shape[1]
        max_k = max(1, int(self.config.max_components_fraction * d) - 1)
        self.bases_ = []
        for f in range(n_folds):
            outside = self.fold_of_[labels] != f
            self.bases_.append(_face_basis(flat[outside], self.config.face_variance, max_k))
        self.share_photo_ = float(np.median(self.shares(images, labels)))
        noise = rng.random((self.config.n_noise_calibration, *images.shape[1:]))
        noise_labels = np.asarray(rng.integers(0, n_classes, size=noise.shape[0]))
        self.share_noise_ = float(np.mean(self.shares(noise.astype(np.float32), noise_labels)))
        if self.share_photo_ <= self.share_noise_:
            raise DataError(
                "cannot calibrate face likeness: private photos are no more face-like than "
                "uniform noise in an eigenface space of other identities; the data set is too "
                "small or too varied"
            )
        return self

    def shares(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Energy share (0 for flat images) of each image in its label's fold space."""
        flat = standardise(images)
        out = np.zeros(flat.shape[0])
        folds = self.fold_of_[labels]
        for f, basis in enumerate(self.bases_):
            rows = folds == f
            if np.any(rows):
                proj = flat[rows] @ basis
                out[rows] = np.sum(proj**2, axis=1)  # rows have unit norm (or are 0)
        return out

    def score(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Calibrated face likeness in [0, 1] per image."""
        s = self.shares(images, labels)
        return np.clip((s - self.share_noise_) / (self.share_photo_ - self.share_noise_), 0.0, 1.0)
