"""Labeled Faces in the Wild as the attacker's public faces: ``lfw:PATH``.

``PATH`` holds one folder per person (``<Person>/<Person>_NNNN.jpg``, any size, grey or
colour), e.g. a grey, face-cropped copy of the deep-funneled LFW release. Every photo is
read grey and resized to ``size`` = (h, w) (by default AT&T's 112 x 92; LFW crops of
140 x 171 have the same aspect ratio). Unlike ``folder:PATH``, a person with a single
photo is kept (4,069 of LFW's 5,749 people have one): the set is public data for a prior,
not a classification task, so every photo is in the ``train`` part of the split.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np

from mlinvert.data.base import ImageDataset, Split
from mlinvert.data.images import ATT_SHAPE, IMAGE_SUFFIXES, _identity_dirs, _natural_key, _read_grey
from mlinvert.errors import DataError


def load_lfw(
    path: str | Path,
    *,
    size: tuple[int, int] = ATT_SHAPE,
    exclude: Collection[str] = (),
    min_photos: int = 1,
) -> ImageDataset:
    """Every photo under ``path`` (one folder per person) as grey ``size`` images.

    ``exclude`` names people (folder names) to leave out, e.g. the people of a
    development target; ``min_photos`` keeps only people with at least that many photos.
    """
    if min_photos < 1:
        raise DataError(f"min_photos must be >= 1, got {min_photos}")
    root = Path(path)
    excluded = set(exclude)
    dirs = [d for d in _identity_dirs(root, "LFW") if d.name not in excluded]
    images: list[np.ndarray] = []
    labels: list[int] = []
    names: list[str] = []
    for d in dirs:
        files = sorted(
            (f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key
        )
        if len(files) < min_photos:
            continue
        label = len(names)
        names.append(d.name)
        for f in files:
            images.append(_read_grey(f, size))
            labels.append(label)
    if not images:
        raise DataError(
            f"no photos found under {root} (people with at least {min_photos} photos, "
            f"{len(excluded)} excluded); lfw:PATH needs one folder per person with "
            f"images in {', '.join(IMAGE_SUFFIXES)}"
        )
    y = np.asarray(labels, dtype=np.int64)
    rows = np.arange(y.size, dtype=np.int64)
    return ImageDataset(
        spec=f"lfw:{root}",
        images=np.stack(images).astype(np.float32),
        labels=y,
        class_names=tuple(names),
        split=Split(
            train=rows, test=rows[:0], seed=0, rule="public faces: every photo, no held-out"
        ),
        meta={
            "source": "Labeled Faces in the Wild (Huang et al. 2007), one folder per person",
            "root": str(root.resolve()),
            "size": list(size),
            "excluded_people": len(excluded),
            "min_photos": min_photos,
        },
    )
