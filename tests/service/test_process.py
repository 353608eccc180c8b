"""The real service: ``mlinvert serve`` under uvicorn in a subprocess, on loopback.

Parity with LocalOracle, rate-limit exactness under 20 concurrent clients, and two
service processes sharing one budget through a real redis-server.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from mlinvert.defenses import Predictor, RateLimiter, parse_policy
from mlinvert.errors import ConfigError, RateLimited
from mlinvert.oracle import HttpOracle, LocalOracle
from mlinvert.service import Store
from mlinvert.service.runner import RedisServer, ServiceProcess

BUDGET = 200


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A quick softmax target on the bundled digits, saved as a model folder."""
    from mlinvert.targets.io import load, save
    from mlinvert.targets.training import train_target

    from mlinvert.data import load as load_data

    trained = train_target(load_data("digits", seed=0), "softmax", seed=0, quick=True)
    folder = tmp_path_factory.mktemp("models") / "digits"
    save(trained.model, folder, card=trained.card)
    return folder, load(folder)


def inputs(model: Any, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *model.input_shape_), dtype=np.float32)


def spend(urls: list[str], keys: list[str], threads: int = 20, batch: int = 3) -> int:
    """Clients hammer the services until refused; return the inputs admitted."""
    admitted = [0] * threads
    start = threading.Barrier(threads)
    x = np.full((batch, 8, 8), 0.5, dtype=np.float32)

    def client(i: int) -> None:
        with HttpOracle(urls[i % len(urls)], keys[i % len(keys)], max_wait=0.0) as oracle:
            oracle.info  # noqa: B018 - fetch the listing before the race starts
            start.wait()
            while True:
                try:
                    oracle.query(x)
                except RateLimited:
                    break
            admitted[i] = oracle.n_queries

    pool = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)
    return sum(admitted)


@pytest.mark.parametrize(
    "policy", ["full", "top:3+round:2", "reverse-sigmoid:0.6:0.4+noise:0.01:5", "labels"]
)
def test_http_oracle_matches_local_oracle(
    tmp_path: Path, model_dir: tuple[Path, Any], policy: str
) -> None:
    folder, model = model_dir
    db = tmp_path / "service.db"
    store = Store(db)
    key, _ = store.create_key("alice")
    other, _ = store.create_key("bob")
    local = LocalOracle(
        Predictor(
            model,
            name="digits",
            policy=parse_policy(policy),
            max_batch=32,
            guards=[RateLimiter(f"{BUDGET}/hour")],
        )
    )
    with ServiceProcess(
        [f"digits={folder}"], db=db, policy=policy, rate_limit=f"{BUDGET}/hour", max_batch=32
    ) as service:
        for encoding in ("binary", "json"):
            with HttpOracle(service.model_url("digits"), key, encoding=encoding) as oracle:  # type: ignore[arg-type]
                assert oracle.info.policy == local.info.policy == parse_policy(policy).name
                assert oracle.info.class_names == local.info.class_names
                for seed, n in ((1, 1), (2, 32), (3, 7)):
                    x = inputs(model, n, seed)
                    got, want = oracle.query(x), local.query(x)
                    assert np.array_equal(got.labels, want.labels)
                    assert got.label_names == want.label_names
                    if want.probs is None:
                        assert got.probs is None
                    else:
                        assert got.probs is not None and np.array_equal(got.probs, want.probs)
                assert oracle.n_queries == 40
        assert local.n_queries == 80
        if policy == "full":  # the budget is exact under 20 concurrent clients on one key
            assert spend([service.model_url("digits")], [other]) == BUDGET - BUDGET % 3
            r = httpx.post(
                service.model_url("digits") + "/predict",
                content=b"x" * (2**27),
                headers={"X-API-Key": key},
            )
            assert r.status_code == 413
    outcomes = [q.outcome for q in store.queries("alice")]
    assert outcomes.count("ok") == 6
    if policy == "full":
        assert outcomes[-1] == "InputTooLarge"
        admitted = sum(q.n_inputs for q in store.queries("bob") if q.outcome == "ok")
        assert admitted == BUDGET - BUDGET % 3


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    try:
        server = RedisServer()
    except ConfigError as exc:
        pytest.skip(f"redis-server binary absent: {exc}")
    with server:
        yield server.url


@pytest.mark.redis
def test_two_processes_share_one_budget_through_redis(
    tmp_path: Path, model_dir: tuple[Path, Any], redis_url: str
) -> None:
    folder, _ = model_dir
    db = tmp_path / "service.db"
    key, _ = Store(db).create_key("carol")
    common: dict[str, Any] = {"db": db, "rate_limit": f"{BUDGET}/hour", "redis_url": redis_url}
    first = ServiceProcess([f"digits={folder}"], **common)
    second = ServiceProcess([f"digits={folder}"], **common)
    starting = threading.Thread(target=second.start)
    starting.start()
    with first:
        starting.join()
        try:
            urls = [first.model_url("digits"), second.model_url("digits")]
            assert spend(urls, [key]) == BUDGET - BUDGET % 3
        finally:
            second.stop()
