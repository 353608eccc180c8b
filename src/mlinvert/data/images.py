"""Face and digit image loaders: AT&T/ORL, any identity-per-folder tree, Olivetti, digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mlinvert.data.base import ImageDataset, per_class_split
from mlinvert.errors import DataError

IMAGE_SUFFIXES = (".pgm", ".png", ".jpg", ".jpeg", ".gif", ".bmp")
ATT_SHAPE = (112, 92)  # (h, w)


def _read_grey(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """Read one image as float32 grey in [0, 1]; resize to ``size`` = (h, w) if given."""
    try:
        with Image.open(path) as im:
            im.load()
            grey = im.convert("L")
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(
            f"cannot read image {path}: {exc}. Replace or remove the file; "
            f"supported formats: {', '.join(IMAGE_SUFFIXES)}"
        ) from exc
    if size is not None and grey.size != (size[1], size[0]):
        grey = grey.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(grey, dtype=np.float32) / 255.0


def _identity_dirs(root: Path, what: str) -> list[Path]:
    if not root.exists():
        raise DataError(
            f"{what} folder {root} does not exist; pass the path of a folder that holds "
            "one sub-folder per identity (for AT&T: s1 .. s40)"
        )
    if not root.is_dir():
        raise DataError(
            f"{what} path {root} is a file; pass the folder that holds the identity sub-folders"
        )
    dirs = sorted((p for p in root.iterdir() if p.is_dir()), key=_natural_key)
    if len(dirs) < 2:
        raise DataError(
            f"{what} folder {root} holds {len(dirs)} identity sub-folders; at least 2 are "
            "needed (one sub-folder per person, images inside)"
        )
    return dirs


def _natural_key(p: Path) -> tuple[str, int, str]:
    stem = p.stem if p.is_file() else p.name
    digits = "".join(ch for ch in stem if ch.isdigit())
    prefix = stem.rstrip("0123456789")
    return (prefix, int(digits) if digits else -1, stem)


def load_att(path: str | Path, *, seed: int = 0, train_per_class: int | float = 7) -> ImageDataset:
    """Load the AT&T/ORL layout ``s1..s40/1..10.pgm`` (92x112 grey), split 7/3 per person.

    Every image must be 92 x 112; a different size is an error (use ``folder:`` to
    load a tree of other sizes with resizing).
    """
    root = Path(path)
    dirs = _identity_dirs(root, "AT&T")
    images: list[np.ndarray] = []
    labels: list[int] = []
    names: list[str] = []
    for label, d in enumerate(dirs):
        files = sorted(d.glob("*.pgm"), key=_natural_key)
        if not files:
            raise DataError(
                f"AT&T identity folder {d} has no .pgm images; the AT&T layout is "
                "s<N>/<k>.pgm — use folder:PATH for other image formats"
            )
        for f in files:
            img = _read_grey(f, None)
            if img.shape != ATT_SHAPE:
                raise DataError(
                    f"{f} is {img.shape[1]}x{img.shape[0]} px, AT&T images are 92x112; "
                    "use folder:PATH (which resizes) for differently sized images"
                )
            images.append(img)
            labels.append(label)
        names.append(d.name)
    y = np.asarray(labels, dtype=np.int64)
    return ImageDataset(
        spec=f"att:{root}",
        images=np.stack(images).astype(np.float32),
        labels=y,
        class_names=tuple(names),
        split=per_class_split(y, train_per_class, seed),
        meta={
            "source": "AT&T Laboratories Cambridge (Samaria & Harter 1994)",
            "root": str(root.resolve()),
        },
    )


def load_folder(
    path: str | Path,
    *,
    size: tuple[int, int] = ATT_SHAPE,
    seed: int = 0,
    train_per_class: int | float = 0.7,
) -> ImageDataset:
    """Load any one-folder-per-identity tree (PGM/PNG/JPG/GIF) as grey ``size`` = (h, w)."""
    root = Path(path)
    dirs = _identity_dirs(root, "image")
    images: list[np.ndarray] = []
    labels: list[int] = []
    names: list[str] = []
    for d in dirs:
        files = sorted(
            (f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key
        )
        if len(files) < 2:
            raise DataError(
                f"identity folder {d} holds {len(files)} images; each identity needs at "
                f"least 2 (one to train, one to test) in {', '.join(IMAGE_SUFFIXES)}"
            )
        label = len(names)
        names.append(d.name)
        for f in files:
            images.append(_read_grey(f, size))
            labels.append(label)
    y = np.asarray(labels, dtype=np.int64)
    return ImageDataset(
        spec=f"folder:{root}",
        images=np.stack(images).astype(np.float32),
        labels=y,
        class_names=tuple(names),
        split=per_class_split(y, train_per_class, seed),
        meta={"root": str(root.resolve()), "size": list(size)},
    )


def load_olivetti(
    *, data_home: str | Path | None = None, seed: int = 0, train_per_class: int | float = 7
) -> ImageDataset:
    """scikit-learn's Olivetti faces (64x64) through its own fetch/cache; no download here."""
    from sklearn.datasets import fetch_olivetti_faces

    try:
        bunch = fetch_olivetti_faces(
            data_home=None if data_home is None else str(data_home), download_if_missing=False
        )
    except OSError as exc:
        raise DataError(
            "Olivetti faces are not in scikit-learn's cache and this machine cannot download "
            "them. Put olivetti_py3.pkz into the scikit-learn data home "
            "(see sklearn.datasets.get_data_home(), or set SCIKIT_LEARN_DATA), or use "
            "att:PATH with the AT&T folder, which holds the same people at 92x112"
        ) from exc
    images = np.asarray(bunch.images, dtype=np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    return ImageDataset(
        spec="olivetti",
        images=images,
        labels=y,
        class_names=tuple(f"s{i + 1}" for i in range(int(y.max()) + 1)),
        split=per_class_split(y, train_per_class, seed),
        meta={"source": "sklearn.datasets.fetch_olivetti_faces"},
    )


def load_digits(*, seed: int = 0, train_per_class: int | float = 0.7) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits: the embedded default (no files needed)."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / 16.0).clip(0.0, 1.0)
    y = np.asarray(bunch.target, dtype=np.int64)
    return ImageDataset(
        spec="digits",
        images=images.astype(np.float32),
        labels=y,
        class_names=tuple(str(i) for i in range(10)),
        split=per_class_split(y, train_per_class, seed),
        meta={"source": "sklearn.datasets.load_digits (UCI optical digits)"},
    )
