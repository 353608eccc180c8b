"""Image helpers shared by the face measures: checks, low-pass, standardising, PNG grids.

Filter sizes are relative to the image size so the same code serves 112x92 AT&T faces
and 8x8 digits: the low-pass sigma is ``LOWPASS_FRACTION`` of the shorter side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import wraps
from typing import ParamSpec, TypeVar

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter
from threadpoolctl import threadpool_limits

from mlinvert.data.images import to_uint8
from mlinvert.errors import DataError

LOWPASS_FRACTION = 0.03
"""Gaussian low-pass sigma as a fraction of the shorter image side (AT&T: 2.8 px)."""

MIN_SIGMA = 0.5
"""Smallest low-pass sigma in pixels (8x8 digits use this)."""

FLAT_STD = 1e-6
"""An image whose pixel standard deviation is below this is flat (no structure)."""


P = ParamSpec("P")
R = TypeVar("R")


def one_blas_thread(func: Callable[P, R]) -> Callable[P, R]:
    """Run ``func`` with BLAS limited to one thread.

    The measures do many small matrix products; on a busy shared machine a
    multi-threaded BLAS spins and was measured 50-100x slower (11 s instead of 0.1 s).
    """

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with threadpool_limits(limits=1, user_api="blas"):
            return func(*args, **kwargs)

    return wrapper


def check_batch(
    images: np.ndarray, labels: np.ndarray, shape: tuple[int, int], n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``images`` (n, h, w) in the data set's ``shape`` and ``labels`` (n,).

    Returns float32 images and int64 labels; raises :class:`DataError` naming the
    expected form on any mismatch (wrong rank or size, NaN, labels out of range).
    """
    x = np.asarray(images)
    y = np.asarray(labels)
    if x.ndim == 2 and x.shape == shape:
        raise DataError(
            f"expected a batch of images (n, {shape[0]}, {shape[1]}), got one image of shape "
            f"{x.shape}; wrap it as images[None]"
        )
    if x.ndim != 3 or tuple(x.shape[1:]) != shape:
        raise DataError(
            f"expected images of shape (n, {shape[0]}, {shape[1]}) for this data set, got "
            f"{x.shape}; reconstructions must have the target's input shape"
        )
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"images must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DataError(
            "images must be finite, got NaN or infinite values; clip them to [0, 1] first"
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"expected labels of shape ({x.shape[0]},), one per image, got {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels must be integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise DataError(
            f"labels must lie in [0, {n_classes - 1}] (the data set's identities), got "
            f"values from {int(y.min())} to {int(y.max())}"
        )
    return x, y


def lowpass_sigma(shape: tuple[int, int]) -> float:
    """The low-pass Gaussian sigma (pixels) for images of ``shape``."""
    return max(MIN_SIGMA, LOWPASS_FRACTION * min(shape))


def lowpass(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-blur every image of a (n, h, w) batch with ``sigma`` pixels."""
    return np.asarray(
        gaussian_filter(images.astype(np.float32), sigma=(0.0, sigma, sigma), mode="nearest"),
        dtype=np.float32,
    )


def standardise(images: np.ndarray) -> np.ndarray:
    """Flatten to (n, d), remove each image's mean and scale it to unit norm.

    Flat images (std below :data:`FLAT_STD`) become all-zero rows, so every
    correlation with them is 0.
    """
    flat = images.reshape(images.shape[0], -1).astype(np.float64)
    flat = flat - flat.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(flat, axis=1, keepdims=True)
    flat_rows = norm[:, 0] < FLAT_STD * np.sqrt(flat.shape[1])
    norm[flat_rows] = 1.0
    out = flat / norm
    out[flat_rows] = 0.0
    return out


def image_grid(
    rows: Sequence[Sequence[np.ndarray]],
    *,
    scale: int = 2,
    pad: int = 4,
    row_titles: Sequence[str] | None = None,
    col_titles: Sequence[str] | None = None,
) -> Image.Image:
    """Lay out equally shaped grey [0, 1] images as a grid (PIL, mode ``L``).

    ``rows[i][j]`` is the image in row i, column j; each is scaled up ``scale`` times
    with nearest-neighbour resampling so small images (8x8 digits) stay visible.
    Optional titles are drawn above each column and left of each row.
    """
    if not rows or not rows[0]:
        raise DataError("image_grid needs at least one row with at least one image")
    h, w = np.asarray(rows[0][0]).shape
    n_cols = max(len(r) for r in rows)
    cell_h, cell_w = h * scale, w * scale
    left = 0 if row_titles is None else 8 * max((len(t) for t in row_titles), default=0) + pad
    top = 0 if col_titles is None else 14
    width = left + n_cols * (cell_w + pad) + pad
    height = top + len(rows) * (cell_h + pad) + pad
    canvas = Image.new("L", (width, height), color=255)
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        y0 = top + pad + i * (cell_h + pad)
        if row_titles is not None and i < len(row_titles):
            draw.text((2, y0 + cell_h // 2 - 5), row_titles[i], fill=0)
        for j, img in enumerate(row):
            arr = np.asarray(img)
            if arr.shape != (h, w):
                raise DataError(
                    f"image_grid needs equally shaped images; got {arr.shape} beside {(h, w)}"
                )
            tile = Image.fromarray(to_uint8(arr), mode="L").resize(
                (cell_w, cell_h), Image.Resampling.NEAREST
            )
            canvas.paste(tile, (left + pad + j * (cell_w + pad), y0))
    if col_titles is not None:
        for j, title in enumerate(col_titles[:n_cols]):
            draw.text((left + pad + j * (cell_w + pad), 1), title, fill=0)
    return canvas


def principal_components(centred: np.ndarray, variance: float, max_k: int) -> np.ndarray:
    """Leading principal directions (k, d) of centred rows explaining ``variance``.

    Uses the (n, n) Gram matrix, which is far cheaper than an SVD when there are fewer
    images than pixels (AT&T: 280 x 10304). At least one and at most ``max_k`` rows.
    """
    n, d = centred.shape
    if n <= d:
        evals, evecs = np.linalg.eigh(centred @ centred.T)
        order = np.argsort(evals)[::-1]
        evals = np.clip(evals[order], 0.0, None)
        keep = evals > evals[0] * 1e-10 if evals[0] > 0 else np.zeros(n, dtype=bool)
        dirs = (evecs[:, order][:, keep].T @ centred) / np.sqrt(evals[keep])[:, None]
        energy = evals[keep]
    else:
        evals, evecs = np.linalg.eigh(centred.T @ centred)
        order = np.argsort(evals)[::-1]
        energy = np.clip(evals[order], 0.0, None)
        dirs = evecs[:, order].T
    total = float(energy.sum())
    if total <= 0.0 or dirs.shape[0] == 0:
        return np.zeros((1, d))
    k = int(np.searchsorted(np.cumsum(energy) / total, variance) + 1)
    return dirs[: max(1, min(k, max_k, dirs.shape[0]))]
