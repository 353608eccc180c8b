"""Automated 5-way lineup: the stand-in for the paper's Mechanical Turk study.

Fredrikson et al. (CCS 2015, section 5.2) showed people a reconstruction beside five
photos and asked who it was. Here an independent matcher — neither the target nor the
evaluation model — does the picking: images have the private mean face removed, are
Gaussian-blurred (sigma relative to the image size) and standardised, and the candidate
with the highest correlation is chosen. The candidates are one held-out (test) photo of
the target and one held-out photo of each of ``size - 1`` other random identities
(seeded); chance is ``1 / size`` (20 %). A data set with fewer identities gets a
smaller lineup (logged; ``Lineup.size`` says which). Measured on AT&T, a private
training photo picks its owner's held-out photo in 89 % of such lineups.
"""

from __future__ import annotations

import logging

import numpy as np

from mlinvert.core import Seed, rng_from
from mlinvert.errors import ConfigError, DataError
from mlinvert.evaluation.images import lowpass, lowpass_sigma, standardise

log = logging.getLogger(__name__)

SAME_IMAGE_TOL = 1e-6
"""A query equal to a candidate photo (max abs diff below this) never meets itself."""


class Lineup:
    """The lineup matcher over a data set's held-out photos."""

    def __init__(self, size: int = 5) -> None:
        if size < 2:
            raise ConfigError(f"a lineup needs at least 2 candidates, got size={size}")
        self.size = size
        self.mean_: np.ndarray = np.empty((0, 0))
        self.sigma_: float = 0.0
        self.photos_: np.ndarray = np.empty((0, 0, 0))
        self.feats_: np.ndarray = np.empty((0, 0))
        self.labels_: np.ndarray = np.empty(0, dtype=np.int64)

    def fit(self, private: np.ndarray, held_out: np.ndarray, held_out_labels: np.ndarray) -> Lineup:
        """Use the private mean face and the held-out photos as the candidate pool."""
        n_ids = np.unique(held_out_labels).size
        if n_ids < 2:
            raise DataError(
                f"a lineup needs held-out photos of >= 2 identities, the data set has {n_ids}"
            )
        if n_ids < self.size:
            log.warning(
                "only %d identities have held-out photos: the lineup shrinks from %d to %d "
                "candidates (chance %.0f %%)",
                n_ids,
                self.size,
                n_ids,
                100.0 / n_ids,
            )
            self.size = n_ids
        self.mean_ = private.mean(axis=0)
        self.sigma_ = lowpass_sigma((private.shape[1], private.shape[2]))
        self.photos_ = held_out
        self.feats_ = self._features(held_out)
        self.labels_ = held_out_labels.astype(np.int64)
        return self

    def _features(self, images: np.ndarray) -> np.ndarray:
        return standardise(lowpass(images - self.mean_, self.sigma_))

    def run(self, images: np.ndarray, labels: np.ndarray, *, seed: Seed) -> np.ndarray:
        """One seeded lineup per image; True where the target's photo is picked."""
        rng = rng_from(seed)
        feats = self._features(images)
        ids = np.unique(self.labels_)
        out = np.zeros(images.shape[0], dtype=bool)
        for i in range(images.shape[0]):
            c = int(labels[i])
            own = np.flatnonzero(self.labels_ == c)
            same = np.abs(self.photos_[own] - images[i]).reshape(own.size, -1).max(axis=1)
            own = own[same > SAME_IMAGE_TOL] if np.any(same > SAME_IMAGE_TOL) else own
            if own.size == 0:
                raise DataError(f"identity {c} has no held-out photo for the lineup")
            others = rng.choice(ids[ids != c], size=self.size - 1, replace=False)
            cands = [int(rng.choice(own))]
            cands += [int(rng.choice(np.flatnonzero(self.labels_ == o))) for o in others]
            sims = self.feats_[cands] @ feats[i]
            out[i] = int(np.argmax(sims)) == 0 and sims[0] > np.max(sims[1:])
        return out
