"""Identity measures: does a reconstruction point to the right person?

* evaluation-model top-1 / top-5 (a separately trained model, not the target);
* pixel nearest neighbour: the nearest private training image in pixel space after
  per-image standardisation (model-free);
* eigenface nearest mean: low-pass images projected on the private photos' principal
  components, assigned to the nearest identity mean (the matcher that identified 92 %
  of noise-like NES reconstructions in PAPER.md — an identity measure, not likeness);
* feature distance in the evaluation model's embedding space.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from mlinvert.errors import ModelError
from mlinvert.evaluation.images import (
    lowpass,
    lowpass_sigma,
    principal_components,
    standardise,
)


@runtime_checkable
class EvalModel(Protocol):
    """What the judge needs from an evaluation model."""

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities (n, k)."""
        ...

    def embed(self, X: np.ndarray) -> np.ndarray:
        """Feature vectors (n, d)."""
        ...


class PixelNN:
    """1-nearest-neighbour identity over standardised private training images."""

    def __init__(self) -> None:
        self.train_: np.ndarray = np.empty((0, 0))
        self.labels_: np.ndarray = np.empty(0, dtype=np.int64)

    def fit(self, images: np.ndarray, labels: np.ndarray) -> PixelNN:
        """Store the standardised private images."""
        self.train_ = standardise(images)
        self.labels_ = labels.astype(np.int64)
        return self

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Label of the nearest private image (max correlation = min standardised distance)."""
        return self.labels_[np.argmax(standardise(images) @ self.train_.T, axis=1)]


class EigenNearestMean:
    """Nearest identity mean in an eigenface space of Gaussian-blurred images."""

    def __init__(self, variance: float = 0.95) -> None:
        self.variance = variance
        self.sigma_: float = 0.0
        self.mean_: np.ndarray = np.empty(0)
        self.components_: np.ndarray = np.empty((0, 0))
        self.centroids_: np.ndarray = np.empty((0, 0))

    def fit(self, images: np.ndarray, labels: np.ndarray, n_classes: int) -> EigenNearestMean:
        """Fit PCA on the blurred private photos and one centroid per identity."""
        self.sigma_ = lowpass_sigma((images.shape[1], images.shape[2]))
        flat = standardise(lowpass(images, self.sigma_))
        self.mean_ = flat.mean(axis=0)
        self.components_ = principal_components(flat - self.mean_, self.variance, flat.shape[0])
        k = self.components_.shape[0]
        proj = (flat - self.mean_) @ self.components_.T
        self.centroids_ = np.full((n_classes, k), np.inf)
        for c in range(n_classes):
            if np.any(labels == c):
                self.centroids_[c] = proj[labels == c].mean(axis=0)
        return self

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Identity whose centroid is nearest to each image's projection."""
        proj = (standardise(lowpass(images, self.sigma_)) - self.mean_) @ self.components_.T
        d2 = ((proj[:, None, :] - self.centroids_[None, :, :]) ** 2).sum(axis=2)
        return np.argmin(d2, axis=1).astype(np.int64)


def check_eval_model(model: Any, n_classes: int) -> EvalModel:
    """Check that ``model`` has ``predict_proba`` and ``embed`` and covers the classes."""
    if not isinstance(model, EvalModel):
        raise ModelError(
            f"the evaluation model must provide predict_proba(X) and embed(X); got "
            f"{type(model).__name__}. Train one with train_target(ds, 'evaluation', seed=...) "
            "or pass eval_model=None to skip the model-based measures"
        )
    classes = getattr(model, "classes_", None)
    if classes is not None and len(classes) != n_classes:
        raise ModelError(
            f"the evaluation model knows {len(classes)} classes, the data set has "
            f"{n_classes}; train it on the same data set"
        )
    return model


def topk_hits(probs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Whether each label is among the ``k`` highest-probability classes."""
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return np.any(top == labels[:, None], axis=1)


class FeatureDistance:
    """Evaluation-model embedding distance to the nearest private photo of the identity.

    Normalised by ``d_ref``: the median, over private photos, of the distance to the
    nearest private photo of a DIFFERENT identity. A value below 1 means the
    reconstruction is closer to the person than typical photos are to other people.
    """

    def __init__(self) -> None:
        self.train_: np.ndarray = np.empty((0, 0))
        self.labels_: np.ndarray = np.empty(0, dtype=np.int64)
        self.d_ref_: float = 1.0

    def fit(self, embeddings: np.ndarray, labels: np.ndarray) -> FeatureDistance:
        """Store the private embeddings and compute ``d_ref``."""
        self.train_ = np.asarray(embeddings, dtype=np.float64)
        self.labels_ = labels.astype(np.int64)
        d = _pairwise(self.train_, self.train_)
        d[labels[:, None] == labels[None, :]] = np.inf
        nearest_other = d.min(axis=1)
        finite = nearest_other[np.isfinite(nearest_other)]
        self.d_ref_ = float(np.median(finite)) if finite.size else 1.0
        if self.d_ref_ <= 0.0:
            self.d_ref_ = 1.0
        return self

    def distance(self, embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Normalised distance of each embedding to its label's nearest private photo."""
        d = _pairwise(np.asarray(embeddings, dtype=np.float64), self.train_)
        d[labels[:, None] != self.labels_[None, :]] = np.inf
        return d.min(axis=1) / self.d_ref_


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))
