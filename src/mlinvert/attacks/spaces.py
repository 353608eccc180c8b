"""Search spaces for MI-Face: where the attack moves, and how a point becomes an image.

Every space is linear before clipping: ``x = clip(offset + B z, 0, 1)``. An attack
works on ``z``; gradient sources estimate the gradient with respect to ``z``.

- :class:`Pixel` – the paper's raw pixels (Fredrikson et al., CCS 2015).
- :class:`LowRes` – a coarse grid upsampled bilinearly (data free, few dimensions).
- :class:`DCT` – the ``k x k`` lowest-frequency DCT coefficients (data free).
- :class:`PCAPrior` – "eigenfaces" learned by the attacker from auxiliary public
  images of *other* people; whitened, so the prior is ``z ~ N(0, I)`` around the
  auxiliary mean face.

A space is configured without the image shape; :meth:`Space.bind` returns a copy for
one input shape (the attack calls it with the oracle's ``info.input_shape``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from scipy.fft import idctn

from mlinvert.data.base import SAME_PHOTO_RMS, close_pairs
from mlinvert.errors import ConfigError

log = logging.getLogger(__name__)


class Space:
    """A linear search space ``x = clip(offset + B z)``; ``B is None`` means identity."""

    name = "space"
    default_prior_weight = 0.0  # weight of ||z - centre||^2 / 2 when the config says None

    def __init__(self) -> None:
        self.shape: tuple[int, int] | None = None
        self._basis: np.ndarray | None = None  # (n_pixels, dim) float64
        self._offset: np.ndarray | None = None  # (n_pixels,)

    # -- set-up ---------------------------------------------------------------
    def bind(self, shape: tuple[int, ...]) -> Space:
        """This space for images of ``shape`` = (h, w) (a bound copy)."""
        if len(shape) != 2:
            raise ConfigError(
                f"{type(self).__name__} searches grey images (h, w); the target takes {shape}"
            )
        h, w = int(shape[0]), int(shape[1])
        if self.shape == (h, w):
            return self
        bound = self._copy()
        bound.shape = (h, w)
        bound._build(h, w)
        return bound

    def _copy(self) -> Space:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def _build(self, h: int, w: int) -> None:
        raise NotImplementedError

    def _need(self) -> tuple[int, int]:
        if self.shape is None:
            raise ConfigError(f"{self.name} space is not bound to an image shape; call bind()")
        return self.shape

    # -- geometry -------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Number of coordinates of ``z``."""
        h, w = self._need()
        return h * w if self._basis is None else int(self._basis.shape[1])

    @property
    def pixel_scale(self) -> float:
        """RMS pixel change for a unit step along a typical coordinate."""
        h, w = self._need()
        if self._basis is None:
            return 1.0
        return float(np.sqrt((self._basis**2).sum(axis=0).mean() / (h * w)))

    def raw(self, z: np.ndarray) -> np.ndarray:
        """``offset + B z`` before clipping, ``(n, h, w)`` for ``z`` of shape ``(n, dim)``."""
        h, w = self._need()
        z = np.atleast_2d(np.asarray(z, dtype=np.float64))
        flat = z if self._basis is None else z @ self._basis.T
        if self._offset is not None:
            flat = flat + self._offset
        return flat.reshape(z.shape[0], h, w)

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Images ``(n, h, w)`` float32 in [0, 1] for points ``z`` ``(n, dim)``."""
        return np.clip(self.raw(z), 0.0, 1.0).astype(np.float32)

    def pullback(self, z: np.ndarray, grad_x: np.ndarray) -> np.ndarray:
        """``d f / d z`` from ``d f / d x`` at ``z`` for an objective ``f`` to *maximise*.

        A clipped pixel contributes only when ascent would move it back into [0, 1]
        (so a search can leave a black or white start).
        """
        z = np.atleast_2d(np.asarray(z, dtype=np.float64))
        raw = self.raw(z).reshape(z.shape[0], -1)
        g = np.asarray(grad_x, dtype=np.float64).reshape(z.shape[0], -1)
        g = g * (((raw > 0.0) | (g > 0)) & ((raw < 1.0) | (g < 0)))
        return g if self._basis is None else g @ self._basis

    def push(self, grad_x: np.ndarray) -> np.ndarray:
        """``B^T g`` without the clip mask (for prior terms computed on the image)."""
        g = np.asarray(grad_x, dtype=np.float64).reshape(np.shape(grad_x)[0], -1)
        return g if self._basis is None else g @ self._basis

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Least-squares ``z`` whose decoding is closest to images ``x`` ``(n, h, w)``."""
        h, w = self._need()
        flat = np.asarray(x, dtype=np.float64).reshape(-1, h * w)
        if self._offset is not None:
            flat = flat - self._offset
        if self._basis is None:
            return flat
        z, *_ = np.linalg.lstsq(self._basis, flat.T, rcond=None)
        return np.asarray(z.T)

    def project(self, z: np.ndarray) -> np.ndarray:
        """Process step after each update (identity; pixel-valued spaces clip to [0, 1])."""
        return z

    def prior_center(self) -> np.ndarray:
        """The point the prior-distance term pulls towards (a flat grey image by default)."""
        h, w = self._need()
        return self.encode(np.full((1, h, w), 0.5))[0]

    def prior_sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Random points ``(n, dim)`` from the space's prior (for label-only starts)."""
        h, w = self._need()
        coarse = rng.uniform(0.0, 1.0, size=(n, max(h // 8, 2), max(w // 8, 2)))
        from skimage.transform import resize

        imgs = np.stack([resize(c, (h, w), order=1) for c in coarse])
        return self.encode(imgs)

    def to_dict(self) -> dict[str, Any]:
        """JSON form for result configs."""
        return {"name": self.name}


class Pixel(Space):
    """The raw pixels (the paper's search space): ``dim = h * w``."""

    name = "pixel"

    def _build(self, h: int, w: int) -> None:
        self._basis = None
        self._offset = None

    def project(self, z: np.ndarray) -> np.ndarray:
        """Clip the pixels to [0, 1] (the paper's Process for raw images)."""
        return np.clip(z, 0.0, 1.0)


def bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``(n_out, n_in)`` matrix of 1-d linear interpolation (align corners)."""
    m = np.zeros((n_out, n_in))
    if n_in == 1:
        m[:, 0] = 1.0
        return m
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = pos - lo
    m[np.arange(n_out), lo] = 1.0 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


class LowRes(Space):
    """A ``(h, w)`` low-resolution grid upsampled bilinearly to the input size."""

    name = "lowres"

    def __init__(self, h: int = 28, w: int = 23) -> None:
        super().__init__()
        if h < 1 or w < 1:
            raise ConfigError(f"LowRes grid must be at least 1x1, got {h}x{w}")
        self.grid = (int(h), int(w))

    def _build(self, h: int, w: int) -> None:
        gh, gw = self.grid
        if gh > h or gw > w:
            raise ConfigError(f"LowRes grid {gh}x{gw} is larger than the image {h}x{w}")
        self._basis = np.kron(bilinear_matrix(h, gh), bilinear_matrix(w, gw))
        self._offset = None

    def project(self, z: np.ndarray) -> np.ndarray:
        """Clip the grid to [0, 1] (bilinear upsampling then stays in range)."""
        return np.clip(z, 0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"name": self.name, "h": self.grid[0], "w": self.grid[1]}


def dct_basis(h: int, w: int, k: int) -> np.ndarray:
    """Orthonormal ``(h * w, k' * k'')`` columns: the lowest ``k x k`` 2-d DCT-II
    frequencies (clipped to the image size)."""
    cols = []
    for i in range(min(k, h)):
        for j in range(min(k, w)):
            coef = np.zeros((h, w))
            coef[i, j] = 1.0
            cols.append(idctn(coef, norm="ortho").ravel())
    return np.stack(cols, axis=1)


class DCT(Space):
    """The ``k x k`` lowest-frequency 2-d DCT-II coefficients (orthonormal basis).

    Columns are scaled to unit RMS per pixel, so a unit step in one coefficient is a
    cosine pattern of amplitude about 1.
    """

    name = "dct"

    def __init__(self, k: int = 16) -> None:
        super().__init__()
        if k < 1:
            raise ConfigError(f"DCT needs k >= 1 coefficients per axis, got {k}")
        self.k = int(k)

    def _build(self, h: int, w: int) -> None:
        self._basis = dct_basis(h, w, self.k) * np.sqrt(h * w)
        self._offset = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"name": self.name, "k": self.k}


class LatentBall(Space):
    """A space of whitened latent coordinates ``z ~ N(0, I)`` whose search stays inside
    the typical-set ball ``||z|| <= radius * sqrt(dim)`` (no ball when ``radius`` is
    None); ``z = 0`` is the prior's mean face. Subclasses set ``radius`` and ``dim``."""

    radius: float | None

    def project(self, z: np.ndarray) -> np.ndarray:
        """Pull ``z`` back onto the ball ``||z|| <= radius * sqrt(dim)`` (if a radius is set)."""
        if self.radius is None:
            return z
        limit = self.radius * np.sqrt(self.dim)
        norm = float(np.linalg.norm(z))
        return z if norm <= limit else z * (limit / norm)

    def prior_center(self) -> np.ndarray:
        """``z = 0``: the prior's mean face."""
        return np.zeros(self.dim)

    def prior_sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Draws from the Gaussian prior ``N(0, I)``."""
        return rng.standard_normal((n, self.dim))


class PCAPrior(LatentBall):
    """Eigenfaces from the attacker's auxiliary images of other people (whitened).

    ``aux`` ``(m, h', w')`` in [0, 1] is resized to the target's input shape when bound.
    ``z ~ N(0, I)`` is the prior; ``z = 0`` is the auxiliary mean face. ``private``
    (optional) are images the attacker must not use: binding drops the aux images that
    coincide with any of them (exact or near-exact copies, :func:`coincident`; real
    collections hold copies of one photo, filed twice), logs and counts them
    (``dropped``, in :meth:`to_dict`), so no prior holds a target's training photo and
    a benchmark cannot leak one into it by mistake.

    A few dozen eigenfaces of other people cannot draw a new person's face (on AT&T, the
    target's own photos projected into 116 eigenfaces of the other 39 people are
    recognised only 2 times in 3). ``detail = K`` adds the ``K x K`` lowest-frequency DCT
    coefficients, each scaled by its standard deviation over the auxiliary images (a
    diagonal Gaussian prior on the image spectrum, whitened like the eigenfaces), so the
    search can leave the eigenface span for smooth, face-like detail. ``radius = r``
    keeps ``||z|| <= r * sqrt(dim)`` (a draw from ``N(0, I)`` has norm about
    ``sqrt(dim)``): the attack then looks for the face the model is most sure of among
    faces as typical as the prior's, instead of an ever more extreme caricature.

    ``augment=True`` (for face photos: mirror-symmetric, tens of pixels wide) adds each
    auxiliary image's mirror image and four copies shifted by ``AUGMENT_SHIFT`` pixels
    (up, down, left, right; edges repeated): six images per public photo, so the
    eigenfaces also span a face's left-right asymmetry and small misalignments instead
    of one pose per photo (AT&T, white-box, all 40 people, 200 components: evaluation
    top-1 0.80 -> 0.88 on the softmax, 0.90 -> 0.97 on the MLP; BENCHMARKS.md). Off by
    default: a mirrored digit is not a digit, and 2 px is a quarter of an 8 x 8 image.
    """

    name = "pca"

    def __init__(
        self,
        aux: np.ndarray,
        k: int = 40,
        *,
        private: np.ndarray | None = None,
        source: str = "aux",
        detail: int = 0,
        radius: float | None = 1.0,
        augment: bool = False,
    ) -> None:
        super().__init__()
        if detail < 0:
            raise ConfigError(f"PCAPrior detail is a number of DCT frequencies >= 0, got {detail}")
        if radius is not None and not radius > 0:
            raise ConfigError(f"PCAPrior radius must be > 0 (or None), got {radius}")
        self.detail = int(detail)
        self.radius = radius
        aux = np.asarray(aux, dtype=np.float64)
        if aux.ndim != 3 or aux.shape[0] < 3:
            raise ConfigError(
                f"PCAPrior needs auxiliary images (m, h, w) with m >= 3, got {aux.shape}"
            )
        if not np.isfinite(aux).all() or aux.min() < 0.0 or aux.max() > 1.0:
            raise ConfigError("PCAPrior auxiliary images must be finite values in [0, 1]")
        if k < 1:
            raise ConfigError(f"PCAPrior needs k >= 1 components, got {k}")
        self.aux = aux
        self.k = int(k)
        self.private = None if private is None else np.asarray(private, dtype=np.float64)
        self.source = source
        self.augment = bool(augment)
        self.dropped = 0  # aux images dropped as copies of private ones (counted at bind)

    def _build(self, h: int, w: int) -> None:
        from skimage.transform import resize

        aux = self.aux
        if aux.shape[1:] != (h, w):
            aux = np.stack([resize(a, (h, w), order=1, anti_aliasing=True) for a in aux])
        if self.private is not None:
            copies = coincident(aux, self.private)
            self.dropped = int(copies.sum())
            if self.dropped:
                log.warning(
                    "PCAPrior: dropped %d of %d auxiliary images (%s): copies of private "
                    "training photos",
                    self.dropped,
                    len(aux),
                    self.source,
                )
                aux = aux[~copies]
            if len(aux) < 3:
                raise ConfigError(
                    f"PCAPrior: {len(aux)} auxiliary images ({self.source}) are left after "
                    f"dropping {self.dropped} copies of private training photos; a prior "
                    "needs 3 or more photos of other people"
                )
        if self.augment:
            aux = augment_faces(aux)
        flat = aux.reshape(aux.shape[0], -1)
        mean = flat.mean(axis=0)
        centred = flat - mean
        s, vt = _principal_axes(centred)
        k = min(self.k, int((s > 1e-8 * s[0]).sum()))
        if k < self.k:
            log.warning(
                "PCAPrior: only %d usable components from %d aux images (asked %d)",
                k,
                aux.shape[0],
                self.k,
            )
        std = s[:k] / np.sqrt(max(aux.shape[0] - 1, 1))
        basis = (vt[:k] * std[:, None]).T
        if self.detail:
            dct = dct_basis(h, w, self.detail)
            spread = (centred @ dct).std(axis=0)
            basis = np.column_stack([basis, dct * spread])
        self._basis = basis
        self._offset = mean
        self.explained = float((s[:k] ** 2).sum() / (s**2).sum())

    @property
    def default_prior_weight(self) -> float:  # type: ignore[override]
        """0 inside the ball (the radius is the prior); 0.05 (a light whitened Gaussian
        log-prior) without one."""
        return 0.0 if self.radius is not None else 0.05

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the aux images themselves are not stored)."""
        return {
            "name": self.name,
            "k": self.k,
            "n_aux": int(self.aux.shape[0]),
            "n_aux_dropped": self.dropped,
            "source": self.source,
            "detail": self.detail,
            "radius": self.radius,
            "augment": self.augment,
        }


def _principal_axes(centred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Singular values ``s`` and right singular vectors ``vt`` (rows) of ``centred``
    ``(m, d)``, largest first, zero ones dropped; from the smaller of the Gram matrix
    (m x m, few faces of many pixels) and the covariance (d x d, many small images)."""
    m, d = centred.shape
    evals, u = np.linalg.eigh(centred @ centred.T if m <= d else centred.T @ centred)
    order = np.argsort(evals)[::-1]
    s = np.sqrt(np.maximum(evals[order], 0.0))
    keep = s > 1e-8 * max(s[0], 1e-300)
    axes = u[:, order[keep]].T
    vt = axes @ centred / s[keep][:, None] if m <= d else axes
    return s[keep], vt


AUGMENT_SHIFT = 2  # pixels


def augment_faces(images: np.ndarray, shift: int = AUGMENT_SHIFT) -> np.ndarray:
    """``images`` ``(m, h, w)``, their mirror images, and copies shifted by ``shift``
    pixels up, down, left and right (edge pixels repeated): ``(6 m, h, w)``."""
    padded = np.pad(images, ((0, 0), (shift, shift), (shift, shift)), mode="edge")
    h, w = images.shape[1:]
    s = shift
    shifted = [
        padded[:, s + dy : s + dy + h, s + dx : s + dx + w]
        for dy, dx in ((-s, 0), (s, 0), (0, -s), (0, s))
    ]
    return np.concatenate([images, images[:, :, ::-1], *shifted])


def _pairs_with(aux: np.ndarray, private: np.ndarray, tol: float) -> np.ndarray:
    """Pairs ``(aux row, private row)`` of (nearly) equal images: root-mean-square pixel
    difference below ``tol``, the private images resized to the auxiliary ones' size."""
    a = np.asarray(aux, dtype=np.float64)
    p = np.asarray(private, dtype=np.float64)
    if p.shape[1:] != a.shape[1:]:
        from skimage.transform import resize

        p = np.stack([resize(im, a.shape[1:], order=1, anti_aliasing=True) for im in p])
    return close_pairs(a, p, tol=tol)


def coincident(aux: np.ndarray, private: np.ndarray, *, tol: float = SAME_PHOTO_RMS) -> np.ndarray:
    """Mask of the auxiliary images that are copies of a private image (exact or
    near-exact: root-mean-square pixel difference below ``tol``)."""
    mask = np.zeros(len(aux), dtype=bool)
    mask[_pairs_with(aux, private, tol)[:, 0]] = True
    return mask


def check_disjoint(aux: np.ndarray, private: np.ndarray, *, tol: float = 1e-3) -> None:
    """Raise ConfigError if any auxiliary image (nearly) equals a private image.

    Near-equality: root-mean-square pixel difference below ``tol``.
    """
    hit = _pairs_with(aux, private, tol)
    if hit.size:
        ai, pi = int(hit[0, 0]), int(hit[0, 1])
        raise ConfigError(
            f"auxiliary image {ai} coincides with private training image {pi}: the "
            "attacker's prior must come from other people's public images; remove the "
            "target's training photos from the auxiliary set"
        )


def load_aux(spec: str) -> np.ndarray:
    """Auxiliary (attacker-side, public) face images for a prior, ``(m, h, w)`` in [0, 1].

    ``lfw``: the 100 face crops of scikit-image's Labeled Faces in the Wild subset
    (25 x 25, shipped with scikit-image, people unrelated to any target); any other
    spec goes to :func:`mlinvert.data.load` (``folder:PATH``, ``att:PATH``, ...).
    """
    from mlinvert.data.public import PUBLIC_FACES, raw_public_faces

    if spec.strip().lower() in PUBLIC_FACES:
        return raw_public_faces(spec)
    from mlinvert.data import load

    ds = load(spec)
    images = getattr(ds, "images", None)
    if images is None:
        raise ConfigError(f"auxiliary spec {spec!r} is not an image data set")
    return np.asarray(images, dtype=np.float64)


def parse_space(
    spec: str,
    *,
    aux: np.ndarray | None = None,
    k: int = 40,
    detail: int = 0,
    radius: float | None = 1.0,
    augment: bool = False,
) -> Space:
    """Build a space from a CLI spec: ``pixel``, ``lowres:WxH`` (e.g. ``lowres:23x28`` for
    92 x 112 faces), ``dct:K``, ``pca:K`` (with ``aux`` images) or ``pca:AUX`` (an
    auxiliary image spec for :func:`load_aux`, e.g. ``pca:lfw`` or ``pca:folder:PATH``,
    with ``k`` eigenfaces). ``detail``, ``radius`` and ``augment`` go to :class:`PCAPrior`.
    """
    name, _, arg = spec.partition(":")
    name = name.strip().lower()
    try:
        if name == "pixel" and not arg:
            return Pixel()
        if name == "lowres":
            w, _, h = (arg or "23x28").lower().partition("x")
            return LowRes(int(h), int(w))
        if name == "dct":
            return DCT(int(arg or 16))
        if name == "pca":
            if arg and not arg.isdigit():
                return PCAPrior(
                    load_aux(arg),
                    k,
                    source=arg,
                    detail=detail,
                    radius=radius,
                    augment=augment,
                )
            if aux is None:
                raise ConfigError(
                    "space 'pca' needs auxiliary images of other people: pca:lfw, "
                    "pca:folder:PATH, or aux images passed by the caller"
                )
            return PCAPrior(aux, int(arg or k), detail=detail, radius=radius, augment=augment)
    except ValueError as exc:
        raise ConfigError(
            f"cannot read space spec {spec!r}: {exc}; write pixel, lowres:WxH (e.g. "
            "lowres:23x28), dct:K (K >= 1) or pca:AUX"
        ) from exc
    raise ConfigError(
        f"unknown search space {spec!r}; use pixel, lowres:WxH (e.g. lowres:23x28), dct:K "
        "or pca:AUX (auxiliary faces of other people, e.g. pca:lfw)"
    )


class DAECode(Space):
    """The paper's DAE search space: the autoencoder's code (Fredrikson et al. 2015, 5.2).

    ``model`` exposes ``encode(X) -> (n, c)``, ``decode(Z) -> (n, h, w)``,
    ``code_proba(Z)`` and ``code_gradient(Z, labels)``. :meth:`project` is the paper's
    Process: decode, non-local-means denoise, sharpen (unsharp mask), re-encode. With
    :class:`~mlinvert.attacks.gradients.Exact` the gradient is the code-level softmax's
    ``code_gradient``; black-box sources probe ``decode(z)`` through the oracle.
    """

    name = "dae"

    def __init__(self, model: Any, *, denoise: bool = True, sharpen: float = 0.5) -> None:
        super().__init__()
        for attr in ("encode", "decode", "code_proba", "code_gradient"):
            if not callable(getattr(model, attr, None)):
                raise ConfigError(
                    f"DAECode needs a denoising-autoencoder target with {attr}(); got "
                    f"{type(model).__name__} (train one with kind 'dae')"
                )
        if sharpen < 0:
            raise ConfigError(f"sharpen amount must be >= 0, got {sharpen}")
        self.model = model
        self.denoise = denoise
        self.sharpen = float(sharpen)

    def _build(self, h: int, w: int) -> None:
        code = np.asarray(self.model.encode(np.zeros((1, h, w), dtype=np.float32)))
        self._dim = int(code.shape[1])

    @property
    def dim(self) -> int:
        """Size of the code."""
        self._need()
        return self._dim

    @property
    def pixel_scale(self) -> float:
        """RMS pixel change of a unit code step, measured at the grey image's code."""
        h, w = self._need()
        z = self.encode(np.full((1, h, w), 0.5))
        e = np.zeros_like(z)
        e[0, : min(8, self._dim)] = 1.0 / np.sqrt(min(8, self._dim))
        d = self.raw(z + 0.1 * e) - self.raw(z)
        return float(np.sqrt((d**2).mean()) / 0.1) or 1.0

    def raw(self, z: np.ndarray) -> np.ndarray:
        """The decoder's image for each code."""
        z = np.atleast_2d(np.asarray(z, dtype=np.float32))
        return np.asarray(self.model.decode(z), dtype=np.float64)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """The encoder's code for each image."""
        return np.asarray(self.model.encode(np.asarray(x, dtype=np.float32)), dtype=np.float64)

    def pullback(self, z: np.ndarray, grad_x: np.ndarray) -> np.ndarray:
        """Not used: the exact gradient comes from ``code_gradient``."""
        raise ConfigError(
            "DAECode has no linear pullback; use Exact() (code_gradient) or a "
            "black-box gradient source"
        )

    def push(self, grad_x: np.ndarray) -> np.ndarray:
        """Image-space prior terms (total variation) are not available in code space."""
        raise ConfigError("tv_weight is not supported in the DAE code space; set it to 0")

    def code_estimate(self, z: np.ndarray, label: int) -> tuple[np.ndarray, np.ndarray]:
        """Code-level class probabilities and ``d p_label / d z`` at ``z``."""
        zz = np.asarray(z, dtype=np.float32)[None]
        probs = np.asarray(self.model.code_proba(zz), dtype=np.float64)[0]
        grad = np.asarray(self.model.code_gradient(zz, np.asarray([label])), dtype=np.float64)
        return probs, grad[0]

    def project(self, z: np.ndarray) -> np.ndarray:
        """Process: decode, denoise (non-local means), sharpen, re-encode."""
        from skimage.filters import gaussian, unsharp_mask
        from skimage.restoration import denoise_nl_means

        img = np.clip(self.raw(z[None])[0], 0.0, 1.0)
        if self.denoise:
            # noise level: median absolute high-pass residual (robust, no PyWavelets needed)
            sigma = float(np.median(np.abs(img - gaussian(img, sigma=1.0))) / 0.6745)
            if sigma > 0:
                img = denoise_nl_means(
                    img, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True
                )
        if self.sharpen > 0:
            img = unsharp_mask(img, radius=1.0, amount=self.sharpen)
        return self.encode(np.clip(img, 0.0, 1.0)[None])[0]

    def prior_sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Codes of random coarse images."""
        return super().prior_sample(n, rng)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"name": self.name, "denoise": self.denoise, "sharpen": self.sharpen}
