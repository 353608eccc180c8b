"""The lfw:PATH spec: public faces, one folder per person, every photo kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlinvert.data import load
from mlinvert.data.base import ImageDataset
from mlinvert.data.lfw import load_lfw
from mlinvert.errors import DataError


def _people(root: Path, counts: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, size=(171, 140), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i + 1:04d}.jpg")
    return root


def test_every_photo_resized_people_with_one_photo_kept(tmp_path: Path) -> None:
    root = _people(tmp_path / "lfw", {"Ann_A": 3, "Bob_B": 1, "Cy_C": 2})
    ds = load(f"lfw:{root}", size=(56, 46))
    assert isinstance(ds, ImageDataset)
    assert ds.images.shape == (6, 56, 46) and ds.class_names == ("Ann_A", "Bob_B", "Cy_C")
    assert ds.images.dtype == np.float32 and 0.0 <= ds.images.min() <= ds.images.max() <= 1.0
    assert ds.split.train.size == 6 and ds.split.test.size == 0
    assert load_lfw(root).image_shape == (112, 92)  # AT&T's size by default
    kept = load_lfw(root, exclude={"Ann_A"}, min_photos=2)
    assert kept.class_names == ("Cy_C",) and kept.meta["excluded_people"] == 1


def test_no_photo_left_and_no_path_are_clear_errors(tmp_path: Path) -> None:
    root = _people(tmp_path / "lfw", {"Ann_A": 1, "Bob_B": 1})
    with pytest.raises(DataError, match="no photos found"):
        load_lfw(root, min_photos=2)
    with pytest.raises(DataError, match="needs a path"):
        load("lfw:")
