"""Reference points every face result is shown beside (PAPER.md, "What counts as a
recovered face"): a flat grey image, uniform noise, a noise template, the target's own
held-out photo, and the average of the target's private photos (``private_mean``: the
"average face" a perfect inversion of a confidence score would approach — the upper
reference for a reconstruction that is not any single photo).

The **noise template** imitates what black-box NES reconstructions looked like in the
planning probe: images a person calls pure noise that still carry the model's
discriminative template for the person. It is built from the private data only:
``t_c = mean(private photos of c) - mean(all private photos)``, stretched so
``max |t_c| = 1``, and the image is ``clip(0.5 + TEMPLATE_AMPLITUDE * t_c + u, 0, 1)``
with white noise ``u ~ U(-NOISE_AMPLITUDE, NOISE_AMPLITUDE)`` per pixel. The white noise
dominates every pixel (it has several times the template's energy), so the image looks
like noise, while the template survives any low-pass filter and points to the right
person — a blurred-eigenface matcher identifies it, as it identified the NES noise.
A likeness score must keep it low.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from mlinvert.core import Seed, rng_from
from mlinvert.errors import DataError

GREY_LEVEL = 0.5
TEMPLATE_AMPLITUDE = 0.3
NOISE_AMPLITUDE = 0.5
REFERENCE_NAMES = ("grey", "uniform_noise", "noise_template", "held_out_photo", "private_mean")


def grey(n: int, shape: tuple[int, int]) -> np.ndarray:
    """``n`` flat mid-grey images."""
    return np.full((n, *shape), GREY_LEVEL, dtype=np.float32)


def uniform_noise(n: int, shape: tuple[int, int], *, seed: Seed) -> np.ndarray:
    """``n`` images of independent U(0, 1) pixels."""
    return rng_from(seed).random((n, *shape)).astype(np.float32)


def class_means(private: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, h, w) mean of each identity's private photos (its "average face")."""
    out = np.zeros((n_classes, *private.shape[1:]), dtype=np.float64)
    for c in range(n_classes):
        rows = labels == c
        if not np.any(rows):
            raise DataError(f"identity {c} has no private training photo")
        out[c] = private[rows].mean(axis=0)
    return out


def identity_templates(means: np.ndarray, private: np.ndarray) -> np.ndarray:
    """(n_classes, h, w) stretched difference of each identity's mean (``class_means``)
    from the mean of all private photos."""
    diff = means - private.mean(axis=0)
    peak = np.abs(diff).reshape(diff.shape[0], -1).max(axis=1)
    return diff / np.where(peak > 0, peak, 1.0)[:, None, None]


def noise_template(templates: np.ndarray, labels: np.ndarray, *, seed: Seed) -> np.ndarray:
    """One noise-template image per label (see the module docstring)."""
    rng = rng_from(seed)
    t = templates[labels]
    u = rng.uniform(-NOISE_AMPLITUDE, NOISE_AMPLITUDE, size=t.shape)
    return np.clip(GREY_LEVEL + TEMPLATE_AMPLITUDE * t + u, 0.0, 1.0).astype(np.float32)


def held_out_photo(
    held_out: np.ndarray, held_out_labels: np.ndarray, labels: np.ndarray, *, seed: Seed
) -> np.ndarray:
    """A seeded choice of one held-out (test) photo of each label's identity."""
    rng = rng_from(seed)
    out = np.empty((labels.size, *held_out.shape[1:]), dtype=np.float32)
    for i, c in enumerate(labels):
        rows = np.flatnonzero(held_out_labels == c)
        if rows.size == 0:
            raise DataError(f"identity {int(c)} has no held-out photo")
        out[i] = held_out[int(rng.choice(rows))]
    return out


def blurred(images: np.ndarray, sigma: float) -> np.ndarray:
    """``images`` (n, h, w) each low-passed by a Gaussian of ``sigma`` pixels."""
    return np.stack([gaussian_filter(im.astype(np.float64), sigma) for im in images]).astype(
        np.float32
    )


def private_mean(means: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each label's average private photo (rows of :func:`class_means`)."""
    return means[labels].astype(np.float32)
