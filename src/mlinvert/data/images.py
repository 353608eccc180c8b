"""Face and digit image loaders: AT&T/ORL, any identity-per-folder tree, Olivetti, digits."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mlinvert.data.base import ImageDataset, copy_groups, per_class_split
from mlinvert.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".pgm", ".png", ".jpg", ".jpeg", ".gif", ".bmp")
ATT_SHAPE = (112, 92)  # (h, w)

#: How ``folder:`` fits a photo of another size or aspect ratio to ``size``: ``crop``
#: (scale to cover, cut the overflow evenly from both sides: no distortion, the default),
#: ``pad`` (scale to fit inside, fill the margins with the photo's mean grey) or
#: ``stretch`` (scale each side on its own: the aspect ratio changes).
FITS = ("crop", "pad", "stretch")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] (clipped) as 8-bit grey levels, rounded to the nearest."""
    return (np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def to_image(image: np.ndarray, *, scale: int = 1) -> Image.Image:
    """A float image in [0, 1] as a PIL grey image, enlarged ``scale`` times
    (nearest neighbour, so small images such as 8x8 digits stay sharp)."""
    arr = to_uint8(image)
    im = Image.fromarray(arr, mode="L")
    if scale > 1:
        im = im.resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.Resampling.NEAREST)
    return im


def save_png(path: str | Path, image: np.ndarray | Image.Image, *, scale: int = 1) -> Path:
    """Write ``image`` (a float array in [0, 1], or a PIL image) as a PNG at ``path``,
    creating the folder; returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    im = image if isinstance(image, Image.Image) else to_image(image, scale=scale)
    im.save(p, format="PNG")
    return p


def _hidden(p: Path) -> bool:
    """Dot files and folders (``.DS_Store``, macOS ``._x.jpg`` twins, ``.thumbnails``)."""
    return p.name.startswith(".")


def _grey(im: Image.Image) -> Image.Image:
    """``im`` (first frame, EXIF rotation applied) as 8-bit grey: colour by luma (ITU-R
    601), transparency over white, 16-bit and float images scaled, not clipped."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 1.0 if im.mode == "F" and a.max() <= 1.0 else 255.0 if a.max() <= 255 else 65535.0
        return Image.fromarray(np.rint(np.clip(a / top, 0.0, 1.0) * 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("L")
    return im.convert("L")


def _listed(items: list[str], most: int, sep: str) -> str:
    """The first ``most`` of ``items`` joined by ``sep``, and how many more there are."""
    more = len(items) - most
    return sep.join(items[:most]) + (f"{sep.rstrip()} and {more} more" if more > 0 else "")


def _read_grey(path: Path, size: tuple[int, int] | None, fit: str = "stretch") -> np.ndarray:
    """Read one image as float32 grey in [0, 1], fitted to ``size`` = (h, w) if given
    (``fit``: one of FITS)."""
    try:
        with Image.open(path) as im:
            im.load()
            grey = _grey(im)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"cannot read image {path}: {exc}. Replace or remove the file; "
            f"supported formats: {', '.join(IMAGE_SUFFIXES)}"
        ) from exc
    if size is not None and grey.size != (size[1], size[0]):
        target = (size[1], size[0])
        bilinear = Image.Resampling.BILINEAR
        if fit == "crop":
            grey = ImageOps.fit(grey, target, method=bilinear)
        elif fit == "pad":
            mean = round(float(np.asarray(grey, dtype=np.float64).mean()))
            grey = ImageOps.pad(grey, target, method=bilinear, color=mean)
        else:
            grey = grey.resize(target, bilinear)
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
    dirs = sorted((p for p in root.iterdir() if p.is_dir() and not _hidden(p)), key=_natural_key)
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


def _read_all(
    files: list[Path], root: Path, size: tuple[int, int] | None, fit: str
) -> list[np.ndarray]:
    """Every file read (:func:`_read_grey`); the unreadable ones all named in one
    DataError, so one pass over the folder finds them."""
    images: list[np.ndarray] = []
    bad: list[str] = []
    for f in files:
        try:
            images.append(_read_grey(f, size, fit))
        except DataError as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            bad.append(f"{f.relative_to(root)} ({cause})")
    if bad:
        shown = _listed(bad, 5, "; ")
        raise DataError(
            f"cannot read image{'s' if len(bad) > 1 else ''} under {root}: {shown}. Replace "
            f"or remove {'them' if len(bad) > 1 else 'it'}; supported formats: "
            f"{', '.join(IMAGE_SUFFIXES)}"
        )
    return images


def _with_copies(
    spec: str,
    images: np.ndarray,
    labels: np.ndarray,
    names: tuple[str, ...],
    files: list[Path],
    root: Path,
    split: tuple[int | float, int],
    meta: dict[str, Any],
    groups: list[list[int]],
) -> ImageDataset:
    """The data set with its copies of one photo (``groups``, :func:`copy_groups`)
    reported (a warning, ``meta["copies"]``) and kept on one side of the split
    (``split`` = train per class, seed)."""
    if groups:
        exact = [all(np.array_equal(images[g[0]], images[i]) for i in g[1:]) for g in groups]
        people = [sorted({names[labels[i]] for i in g}) for g in groups]
        rel = [[str(files[i].relative_to(root)) for i in g] for g in groups]
        meta = {
            **meta,
            "copies": [
                {"files": f, "exact": e, "people": p}
                for f, e, p in zip(rel, exact, people, strict=True)
            ],
        }
        n_exact = sum(len(g) - 1 for g, e in zip(groups, exact, strict=True) if e)
        n_all = sum(len(g) - 1 for g in groups)
        mixed = sum(len(p) > 1 for p in people)
        log.warning(
            "%s: %d photos are copies of another (%d exact, %d near-exact): %s%s; each "
            "photo's copies stay on one side of the split%s",
            spec,
            n_all,
            n_exact,
            n_all - n_exact,
            "; ".join(" = ".join(f) for f in rel[:3]),
            f"; and {len(groups) - 3} more groups" if len(groups) > 3 else "",
            f"; {mixed} under two people's names (check the labels)" if mixed else "",
        )
    return ImageDataset(
        spec=spec,
        images=images,
        labels=labels,
        class_names=names,
        split=per_class_split(labels, split[0], split[1], copies=groups),
        meta=meta,
    )


def load_att(path: str | Path, *, seed: int = 0, train_per_class: int | float = 7) -> ImageDataset:
    """Load the AT&T/ORL layout ``s1..s40/1..10.pgm`` (92x112 grey), split 7/3 per person.

    Every image must be 92 x 112; a different size is an error (use ``folder:`` to
    load a tree of other sizes with resizing). Copies of one photo are kept on one side
    of the split (:func:`copy_groups`).
    """
    root = Path(path)
    dirs = _identity_dirs(root, "AT&T")
    files: list[Path] = []
    labels: list[int] = []
    names: list[str] = []
    for label, d in enumerate(dirs):
        found = sorted((f for f in d.glob("*.pgm") if not _hidden(f)), key=_natural_key)
        if not found:
            raise DataError(
                f"AT&T identity folder {d} has no .pgm images; the AT&T layout is "
                "s<N>/<k>.pgm — use folder:PATH for other image formats"
            )
        files += found
        labels += [label] * len(found)
        names.append(d.name)
    images = _read_all(files, root, None, "stretch")
    for f, img in zip(files, images, strict=True):
        if img.shape != ATT_SHAPE:
            raise DataError(
                f"{f} is {img.shape[1]}x{img.shape[0]} px, AT&T images are 92x112; "
                "use folder:PATH (which resizes) for differently sized images"
            )
    stacked = np.stack(images).astype(np.float32)
    return _with_copies(
        f"att:{root}",
        stacked,
        np.asarray(labels, dtype=np.int64),
        tuple(names),
        files,
        root,
        (train_per_class, seed),
        {
            "source": "AT&T Laboratories Cambridge (Samaria & Harter 1994)",
            "root": str(root.resolve()),
        },
        copy_groups(stacked),
    )


def folder_spec(root: str | Path, size: tuple[int, int], fit: str) -> str:
    """The spec that loads ``root`` again exactly so: ``folder:ROOT?size=H,W&fit=FIT``."""
    return f"folder:{root}?size={size[0]},{size[1]}&fit={fit}"


def load_folder(
    path: str | Path,
    *,
    size: tuple[int, int] = ATT_SHAPE,
    fit: str = "crop",
    seed: int = 0,
    train_per_class: int | float = 0.7,
) -> ImageDataset:
    """Load any one-folder-per-identity tree as grey ``size`` = (h, w) images.

    Photos come as they are: PGM/PNG/JPEG/GIF/BMP (first frame), colour or grey, any
    size and aspect ratio, fitted to ``size`` by ``fit`` (:data:`FITS`); hidden files and
    folders are skipped and other files ignored. Refused in one line, before any
    training: unreadable images (all named), fewer than 2 people, and people with fewer
    than 2 distinct photos (copies of one photo count once; one photo must train, one
    be held out). Copies of one photo are reported and kept on one side of the split.
    The spec (:func:`folder_spec`) records ``size`` and ``fit``.
    """
    if fit not in FITS:
        raise DataError(f"unknown fit {fit!r} for folder images; use one of: {', '.join(FITS)}")
    h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise DataError(f"folder images need a size of positive sides (H,W), got {size!r}")
    root = Path(path)
    dirs = _identity_dirs(root, "image")
    files: list[Path] = []
    labels: list[int] = []
    ignored = 0
    for label, d in enumerate(dirs):
        entries = [f for f in d.iterdir() if f.is_file() and not _hidden(f)]
        found = sorted((f for f in entries if f.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
        ignored += len(entries) - len(found)
        files += found
        labels += [label] * len(found)
    names = tuple(d.name for d in dirs)
    images = _read_all(files, root, (h, w), fit)
    y = np.asarray(labels, dtype=np.int64)
    stacked = np.stack(images).astype(np.float32) if images else np.zeros((0, h, w), np.float32)
    groups = copy_groups(stacked)
    distinct = np.bincount(y, minlength=len(names)) - np.bincount(
        y[[i for g in groups for i in g[1:]]], minlength=len(names)
    )
    few = [f"{names[c]} ({distinct[c]})" for c in range(len(names)) if distinct[c] < 2]
    if few:
        shown = _listed(few, 8, ", ")
        raise DataError(
            f"{len(few)} of {len(names)} people under {root} have fewer than 2 distinct "
            f"photos (one to train, one to hold out; copies count once): {shown}. Add "
            f"photos ({', '.join(IMAGE_SUFFIXES)}) or move those folders out of {root}"
        )
    return _with_copies(
        folder_spec(root, (h, w), fit),
        stacked,
        y,
        names,
        files,
        root,
        (train_per_class, seed),
        {"root": str(root.resolve()), "size": [h, w], "fit": fit, "ignored_files": ignored},
        groups,
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
