"""Public face images for pre-training a private model's features at no privacy cost.

Differentially private training spends its budget on every stage that reads the private
data; features learned from *public* data are free (Tramèr & Boneh, "Differentially
Private Learning Needs Better Features (or Much More Data)", ICLR 2021; Abadi et al.,
CCS 2016, used a public PCA projection). The sets here ship with an installed library,
so no download is needed and no private image can be among them.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from mlinvert.errors import ConfigError

#: Public face sets by name: what each one is (for model cards).
PUBLIC_FACES: dict[str, str] = {
    "lfw": (
        "scikit-image data.lfw_subset(): its first 100 images, 25x25 grey face crops from "
        "Labeled Faces in the Wild (images 100-199, non-faces, are not used); people "
        "unrelated to the private data"
    ),
}


def check_public_faces(name: object) -> str:
    """``name`` normalised; ConfigError naming the available sets otherwise."""
    if not isinstance(name, str) or name.strip().lower() not in PUBLIC_FACES:
        raise ConfigError(
            f"unknown public face set {name!r}; available (shipped offline): "
            f"{', '.join(PUBLIC_FACES)}"
        )
    return name.strip().lower()


def raw_public_faces(name: str) -> np.ndarray:
    """The public face set ``name`` at its own size: float64 ``(m, h, w)`` in [0, 1]
    (also the attacker's public prior, :func:`mlinvert.attacks.spaces.load_aux`)."""
    name = check_public_faces(name)
    if name == "lfw":
        from skimage.data import lfw_subset

        return np.asarray(lfw_subset()[:100], dtype=np.float64)
    raise ConfigError(f"unknown public face set {name!r}")  # pragma: no cover


@lru_cache(maxsize=4)
def _resized(name: str, shape: tuple[int, int]) -> np.ndarray:
    from skimage.transform import resize

    faces = raw_public_faces(name)
    out = np.stack([resize(im, shape, order=1, anti_aliasing=True) for im in faces])
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    out.setflags(write=False)
    return out


def public_faces(name: str, shape: tuple[int, int]) -> np.ndarray:
    """The public face set ``name`` resized to ``shape`` ``(h, w)`` (bilinear, aspect not
    kept): float32 ``(m, h, w)`` in [0, 1], read-only (cached)."""
    h, w = (int(v) for v in shape)
    if h < 1 or w < 1:
        raise ConfigError(f"public faces need a shape of positive sides, got {shape!r}")
    return _resized(check_public_faces(name), (h, w))
