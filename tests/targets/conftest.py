"""Fixtures for target tests: digits, quick-trained models of every face kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlinvert.data import load
from mlinvert.data.base import ImageDataset
from mlinvert.targets.training import TrainedTarget, train_target

ATT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "att_faces"


@pytest.fixture(scope="session")
def digits() -> ImageDataset:
    """scikit-learn digits (8x8), split 70/30 per class with seed 0."""
    ds = load("digits", seed=0)
    assert isinstance(ds, ImageDataset)
    return ds


@pytest.fixture(scope="session")
def att_few() -> ImageDataset:
    """The first 6 AT&T identities (skips where the data is absent)."""
    if not (ATT / "s1" / "1.pgm").is_file():
        pytest.skip("../shared/data/att_faces not present")
    ds = load(f"att:{ATT}", seed=0)
    assert isinstance(ds, ImageDataset)
    return ds.subset(6)


_CACHE: dict[str, TrainedTarget] = {}


@pytest.fixture(scope="session")
def trained(digits: ImageDataset):  # type: ignore[no-untyped-def]
    """``trained(kind)`` -> a quick-trained TrainedTarget on digits (cached per session)."""

    def get(kind: str) -> TrainedTarget:
        if kind not in _CACHE:
            _CACHE[kind] = train_target(digits, kind, seed=0, quick=True)
        return _CACHE[kind]

    return get
