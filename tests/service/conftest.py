"""Fixtures for the service tests: toy targets, an account database, an in-process app."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

with warnings.catch_warnings():  # starlette warns that its TestClient will move to httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient
from toys import ToySoftmax, ToyTabular

from mlinvert.service import ServiceSettings, Store, build_predictors, create_app


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "service.db")
    yield s
    s.close()


@pytest.fixture
def api_key(store: Store) -> str:
    key, _ = store.create_key("alice")
    return key


def _make_client(
    store: Store,
    *,
    policy: str = "full",
    rate_limit: str | None = None,
    max_batch: int = 32,
    max_body_bytes: int = 2**20,
) -> TestClient:
    """A test client on the in-process ASGI app (no sockets)."""
    settings = ServiceSettings(
        db=store.path,
        policy=policy,
        rate_limit=rate_limit,
        max_batch=max_batch,
        max_body_bytes=max_body_bytes,
    )
    predictors = build_predictors({"faces": ToySoftmax(), "survey": ToyTabular()}, settings)
    app = create_app(settings, predictors, store=store)
    return TestClient(app)


@pytest.fixture
def make_client() -> Callable[..., TestClient]:
    """Factory: ``make_client(store, policy=..., rate_limit=..., max_batch=..., ...)``."""
    return _make_client


#: Input shape of the saved toy softmax (``model_dir``).
TOY_SHAPE = (8, 8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A small softmax target (the real torch class) on synthetic 8x8 images, saved."""
    from mlinvert.targets.io import load, save
    from mlinvert.targets.torch_models import SoftmaxConfig, SoftmaxRegression

    rng = np.random.default_rng(0)
    centres = rng.random((5, *TOY_SHAPE), dtype=np.float32)
    y = np.repeat(np.arange(5), 12)
    X = np.clip(centres[y] + rng.normal(0, 0.1, (60, *TOY_SHAPE)), 0, 1).astype(np.float32)
    model = SoftmaxRegression(SoftmaxConfig(seed=0, max_iter=20)).fit(
        X, y, class_names=tuple(f"s{i}" for i in range(5))
    )
    folder = tmp_path_factory.mktemp("models") / "toy-softmax"
    save(model, folder)
    return folder, load(folder)
