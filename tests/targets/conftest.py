"""Fixtures for target tests: a few AT&T people, quick-trained models of every face kind
(on ``digits``, from the top conftest)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from mlinvert.data import load
from mlinvert.data.base import ImageDataset
from mlinvert.targets.training import TrainedTarget, train_target


@pytest.fixture(scope="session")
def att_few(att_path: Path) -> ImageDataset:
    """The first 6 AT&T identities (skips where the data is absent)."""
    ds = load(f"att:{att_path}", seed=0)
    assert isinstance(ds, ImageDataset)
    return ds.subset(6)


#: The ``trained`` fixture: a kind -> its quick-trained TrainedTarget on digits.
Trained = Callable[[str], TrainedTarget]

_CACHE: dict[str, TrainedTarget] = {}


@pytest.fixture(scope="session")
def trained(digits: ImageDataset) -> Trained:
    """``trained(kind)`` -> a quick-trained TrainedTarget on digits (cached per session)."""

    def get(kind: str) -> TrainedTarget:
        if kind not in _CACHE:
            _CACHE[kind] = train_target(digits, kind, seed=0, quick=True)
        return _CACHE[kind]

    return get
