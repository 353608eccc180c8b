"""Fixtures for the data-loader tests: tiny fake image trees (the AT&T folder, ``att_path``,
is in the top conftest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image(path: Path, size: tuple[int, int], seed: int = 0) -> None:
    """Write a random grey image of ``size`` = (h, w) (format from the suffix)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=size, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").save(path)


@pytest.fixture
def fake_att(tmp_path: Path) -> Path:
    """A 3-person AT&T-style tree (s1..s3, 10 PGMs of 92x112 each)."""
    root = tmp_path / "att"
    for person in range(1, 4):
        for k in range(1, 11):
            write_image(root / f"s{person}" / f"{k}.pgm", (112, 92), seed=person * 100 + k)
    return root


@pytest.fixture
def fake_folder(tmp_path: Path) -> Path:
    """A mixed-format one-folder-per-identity tree with differently sized images."""
    root = tmp_path / "people"
    for i, name in enumerate(("alice", "bob")):
        for k, (suffix, size) in enumerate(
            ((".png", (40, 30)), (".jpg", (64, 64)), (".gif", (20, 50)), (".pgm", (112, 92)))
        ):
            write_image(root / name / f"{k}{suffix}", size, seed=10 * i + k)
    return root
