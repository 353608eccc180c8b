"""Shared fixtures: the digits data set, the AT&T folder, the surveys (skipped when the
shared data is absent), the service tests' toy targets (loaded from their file) and a
real redis-server."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from mlinvert.data import load
from mlinvert.data.base import ImageDataset
from mlinvert.data.surveys import SurveyDataset, load_fair, load_gss, load_steak
from mlinvert.errors import ConfigError
from mlinvert.evaluation.descriptors import CACHE_ENV
from mlinvert.service.runner import RedisServer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ATT = SHARED / "att_faces"


@pytest.fixture(scope="session", autouse=True)
def descriptor_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The judge's face descriptors cached for this session only: the AT&T audits and the
    judge tests enrol the same private photos (about 35 s each time without it)."""
    folder = tmp_path_factory.mktemp("descriptors")
    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)  # the audits' subprocesses inherit it
    yield folder
    if before is None:
        del os.environ[CACHE_ENV]
    else:
        os.environ[CACHE_ENV] = before


@pytest.fixture(scope="session")
def digits() -> ImageDataset:
    """scikit-learn digits (8x8), split 70/30 per class with seed 0."""
    ds = load("digits", seed=0)
    assert isinstance(ds, ImageDataset)
    return ds


@pytest.fixture(scope="session")
def att_path() -> Path:
    """The AT&T faces folder (skips where absent)."""
    if not (ATT / "s1" / "1.pgm").is_file():
        pytest.skip("../shared/data/att_faces not present")
    return ATT


def _toys() -> ModuleType:
    name = "mlinvert_test_toys"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).parent / "service" / "toys.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def toys() -> ModuleType:
    """The module with ToySoftmax and ToyTabular."""
    return _toys()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A real redis-server on a free loopback port, one per test module."""
    try:
        server = RedisServer()
    except ConfigError as exc:
        pytest.skip(f"redis-server binary absent: {exc}")
    with server:
        yield server.url


STEAK = SHARED / "steak-survey"
GSS = SHARED / "gss"


@pytest.fixture(scope="session")
def steak_path() -> Path:
    """Folder of the steak survey."""
    if not (STEAK / "steak-risk-survey.csv").is_file():
        pytest.skip("../shared/data/steak-survey not present")
    return STEAK


@pytest.fixture(scope="session")
def gss_path() -> Path:
    """Folder of the GSS extract."""
    if not (GSS / "GSS_15235.csv").is_file():
        pytest.skip("../shared/data/gss not present")
    return GSS


@pytest.fixture(scope="session")
def steak(steak_path: Path) -> SurveyDataset:
    """The steak survey, seed 0."""
    return load_steak(str(steak_path), seed=0)


@pytest.fixture(scope="session")
def gss(gss_path: Path) -> SurveyDataset:
    """The GSS extract."""
    return load_gss(str(gss_path), seed=0)


@pytest.fixture(scope="session")
def fair() -> SurveyDataset:
    """The embedded Fair affairs survey, seed 0."""
    return load_fair(seed=0)
