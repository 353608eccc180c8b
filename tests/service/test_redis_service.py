"""The service and its Redis: one deadline per request, readiness vs liveness, what a
Redis that lost its data does under --redis-loss reset and refuse, the persistence check."""

from __future__ import annotations

import base64
import logging
import os
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypedDict

import httpx
import numpy as np
import pytest
import redis
from processes import started
from toys import ToySoftmax
from typer.testing import CliRunner

from mlinvert.defenses.ratelimit import Rate, RedisBuckets, redis_client, redis_deadline
from mlinvert.errors import ConfigError, RateLimited
from mlinvert.service import ServiceSettings, Store, build_predictors, create_app
from mlinvert.service.runner import RedisServer, ServiceProcess, free_port
from mlinvert.service.server import check_redis

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.redis
BODY = {
    "binary": {
        "dtype": "float32",
        "shape": [2, 6, 5],
        "data": base64.b64encode(np.full((2, 6, 5), 0.5, "<f4").tobytes()).decode(),
    }
}


@pytest.fixture
def server() -> Iterator[RedisServer]:
    try:
        server = RedisServer()
    except ConfigError as exc:
        pytest.skip(f"redis-server binary absent: {exc}")
    with server:
        yield server


class _RedisSettings(TypedDict):
    redis_url: str
    redis_loss: str


def client_for(store: Store, **settings: Any) -> TestClient:
    config = ServiceSettings(db=store.path, rate_limit="100/hour", **settings)
    predictors = build_predictors({"faces": ToySoftmax()}, config, flags=store)
    return TestClient(create_app(config, predictors, store=store))


def predict(client: TestClient, key: str) -> Any:
    return client.post("/v1/models/faces/predict", json=BODY, headers={"X-API-Key": key})


def test_calls_after_a_failed_one_or_past_the_deadline_are_not_tried(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    buckets = RedisBuckets(server.url, client=redis_client(server.url, timeout=0.3))
    rate = Rate(count=10, period=60.0)
    with redis_deadline(0.0), pytest.raises(RateLimited, match="unreachable"):
        buckets.take("alice", 1, rate, 0.0)
    assert "not tried: the request's Redis deadline passed" in caplog.text
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)  # a frozen Redis
    try:
        with redis_deadline(60.0) as deadline:
            with pytest.raises(RateLimited, match="TimeoutError"):
                buckets.take("alice", 1, rate, 0.0)
            assert deadline.failed == "an earlier Redis call failed (TimeoutError)"
            caplog.clear()
            with pytest.raises(RateLimited):
                buckets.peek("alice", rate, 0.0)
            assert "not tried: an earlier Redis call failed" in caplog.text  # no second wait
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    with redis_deadline(60.0):
        assert buckets.take("alice", 1, rate, 0.0).allowed  # a fresh request tries again


def test_a_frozen_redis_refuses_without_rate_fields_and_makes_the_service_unready(
    server: RedisServer, store: Store, api_key: str
) -> None:
    client = client_for(store, redis_url=server.url, redis_timeout=0.3)
    ok = predict(client, api_key)
    assert ok.status_code == 200 and ok.headers["RateLimit-Remaining"] == "98"
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "redis": "ok"}}
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        r = predict(client, api_key)
        unready = client.get("/readyz")
        alive = client.get("/healthz"), client.head("/healthz")
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    assert r.status_code == 429 and "store is unreachable" in r.json()["error"]["message"]
    assert not [h for h in r.headers if h.lower().startswith("ratelimit-")]
    assert unready.status_code == 503 and unready.json()["status"] == "unready"
    assert unready.json()["checks"]["redis"].startswith("unreachable (TimeoutError")
    assert [a.status_code for a in alive] == [200, 200]  # liveness is not readiness


def test_refuse_mode_refuses_a_redis_that_lost_its_data_until_an_operator_accepts(
    server: RedisServer, store: Store, api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    from mlinvert.cli import keys

    settings: _RedisSettings = {"redis_url": server.url, "redis_loss": "refuse"}
    check_redis(ServiceSettings(db=store.path, **settings), store)  # the first start marks
    client = client_for(store, **settings)
    assert predict(client, api_key).status_code == 200
    redis.Redis.from_url(server.url).flushall()  # what a restart without persistence leaves
    r = predict(client, api_key)
    assert r.status_code == 503 and r.headers["Retry-After"] == "60"
    assert "lost the budgets" in r.json()["error"]["message"]
    account = client.get("/v1/account", headers={"X-API-Key": api_key})
    assert account.status_code == 503 and "lost the budgets" in account.text
    assert "lost its data" in client.get("/readyz").json()["checks"]["redis"]
    with caplog.at_level(logging.WARNING):
        check_redis(ServiceSettings(db=store.path, **settings), store)  # a service restart
    assert "every prediction is refused" in caplog.text
    assert predict(client, api_key).status_code == 503  # restarting accepted nothing
    app = keys.keys_app
    result = CliRunner().invoke(
        app, ["accept-budget-reset", "--redis", server.url, "--db", str(store.path)]
    )
    assert result.exit_code == 0, result.output
    assert predict(client, api_key).status_code == 200
    assert client.get("/readyz").status_code == 200


def test_two_processes_on_one_redis_share_the_account_read_limit(
    server: RedisServer, store: Store, api_key: str, model_dir: tuple[Path, Any]
) -> None:
    """GET /v1/account's limit is one per account across the processes behind one Redis
    (3/minute: the 4th read is refused, whichever process gets it), and a frozen Redis
    refuses the read (fail closed) instead of answering it unmetered."""
    folder, _ = model_dir
    pair = [
        ServiceProcess(
            [f"faces={folder}"], db=store.path, redis_url=server.url, account_rate="3/minute"
        )
        for _ in range(2)
    ]
    headers = {"X-API-Key": api_key}
    with started(*pair), httpx.Client(timeout=30.0, headers=headers) as http:
        reads = [http.get(f"{pair[i % 2].url}/v1/account") for i in range(4)]
        assert [r.status_code for r in reads] == [200, 200, 200, 429]
        assert "at most 3/minute" in reads[3].json()["error"]["message"]
        other, _ = store.create_key("bob")
        bobs = http.get(f"{pair[1].url}/v1/account", headers={"X-API-Key": other})
        assert bobs.status_code == 200  # the limit is per account
    client = client_for(store, redis_url=server.url, redis_timeout=0.3)
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        frozen = client.get("/v1/account", headers={"X-API-Key": other})
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    assert frozen.status_code == 429 and frozen.headers["Retry-After"] == "1"
    assert "store is unreachable (TimeoutError); the request was refused" in frozen.text


def test_reset_mode_warns_of_no_persistence_and_accepts_a_loss(
    server: RedisServer, store: Store, api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = ServiceSettings(db=store.path, redis_url=server.url)
    with caplog.at_level(logging.WARNING):
        check_redis(settings, store)
    assert "keeps nothing across a restart" in caplog.text
    client = client_for(store, redis_url=server.url)
    assert predict(client, api_key).headers["RateLimit-Remaining"] == "98"
    plain = redis.Redis.from_url(server.url)
    plain.flushall()
    plain.config_set("save", "3600 1")  # RDB snapshots
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_redis(settings, store)
    assert "keeps nothing" not in caplog.text and "starts full again" in caplog.text
    assert predict(client, api_key).headers["RateLimit-Remaining"] == "98"  # a fresh budget


def test_refuse_mode_does_not_start_without_redis(store: Store) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(ConfigError, match="does not start without the budgets"):
        check_redis(ServiceSettings(db=store.path, redis_url=url, redis_loss="refuse"), store)
    check_redis(ServiceSettings(db=store.path, redis_url=url), store)  # reset mode: a warning
