"""Shared fixtures: the service tests' toy targets, loaded from their file."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from mlinvert.errors import ConfigError
from mlinvert.service.runner import RedisServer


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
