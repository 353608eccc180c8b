"""Data sets selected by a spec string everywhere on the CLI.

==================  =====================================================================
``att:PATH``        AT&T/ORL faces (``s1..s40/1..10.pgm``), split 7 train / 3 test per person
``folder:PATH``     any one-folder-per-identity image tree, grey, fitted to ``size``;
                    ``folder:PATH?size=H,W&fit=crop|pad|stretch`` (default 112,92, crop)
``lfw:PATH``        public faces, one folder per person (all photos, grey, resized)
``olivetti``        scikit-learn's Olivetti faces from its local cache (no download here)
``digits``          scikit-learn's bundled digits: the embedded default image set
``steak:PATH``      FiveThirtyEight steak survey (sensitive: ever cheated)
``gss:PATH``        GSS extract folder or file (sensitive: ``xmovie``; target ``hapmar``)
``fair``            statsmodels' bundled Fair affairs survey: the embedded default survey
==================  =====================================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlinvert.data.base import ImageDataset, Split, per_class_split
from mlinvert.data.images import FITS, load_att, load_digits, load_folder, load_olivetti
from mlinvert.errors import DataError

if TYPE_CHECKING:
    from mlinvert.data.surveys import SurveyDataset

    Dataset = ImageDataset | SurveyDataset

SPECS = (
    "att:PATH",
    "folder:PATH",
    "lfw:PATH",
    "olivetti",
    "digits",
    "steak:PATH",
    "gss:PATH",
    "fair",
)


def load(
    spec: str, *, seed: int = 0, size: tuple[int, int] | None = None
) -> ImageDataset | SurveyDataset:
    """Load the data set named by ``spec`` (see the module docstring for the forms)."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    needs_path = {"att", "folder", "lfw", "steak", "gss"}
    if kind in needs_path and not arg:
        raise DataError(f"data spec {spec!r} needs a path: write {kind}:PATH")
    if kind == "att":
        return load_att(arg, seed=seed)
    if kind == "folder":
        path, options = _folder_options(arg, size)
        return load_folder(path, seed=seed, **options)
    if kind == "lfw":
        from mlinvert.data.lfw import load_lfw

        return load_lfw(arg) if size is None else load_lfw(arg, size=size)
    if kind == "olivetti":
        return load_olivetti(data_home=arg or None, seed=seed)
    if kind == "digits":
        return load_digits(seed=seed)
    if kind in {"steak", "gss", "fair"}:
        from mlinvert.data import surveys

        if kind == "steak":
            return surveys.load_steak(arg, seed=seed)
        if kind == "gss":
            return surveys.load_gss(arg, seed=seed)
        return surveys.load_fair(seed=seed)
    raise DataError(f"unknown data spec {spec!r}; use one of: {', '.join(SPECS)}")


def _folder_options(arg: str, size: tuple[int, int] | None) -> tuple[str, dict[str, Any]]:
    """``PATH?size=H,W&fit=F`` split into the path and load_folder's keywords (``size``,
    given by the caller, must agree with the spec's)."""
    path, _, query = arg.partition("?")
    options: dict[str, Any] = {} if size is None else {"size": tuple(size)}
    for part in filter(None, query.split("&")):
        key, _, value = part.partition("=")
        key = key.strip().lower()
        if key == "size":
            try:
                h, w = (int(v) for v in value.replace("x", ",").split(","))
            except ValueError:
                raise DataError(
                    f"folder size {value!r} is not H,W in pixels; write e.g. "
                    f"folder:{path}?size=112,92"
                ) from None
            if size is not None and (h, w) != tuple(size):
                raise DataError(
                    f"folder spec says size={h},{w} but {tuple(size)} was asked; give the size once"
                )
            options["size"] = (h, w)
        elif key == "fit":
            options["fit"] = value.strip().lower()
        else:
            raise DataError(
                f"unknown folder option {key!r}; write folder:{path}?size=H,W&fit={'|'.join(FITS)}"
            )
    return path, options


__all__ = [
    "SPECS",
    "ImageDataset",
    "Split",
    "load",
    "load_att",
    "load_digits",
    "load_folder",
    "load_olivetti",
    "per_class_split",
]
