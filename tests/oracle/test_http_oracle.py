"""HttpOracle against the in-process app (parity, batching) and a mock transport (errors)."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest

from mlinvert.defenses import Predictor, parse_policy
from mlinvert.errors import (
    BadRequest,
    Blocked,
    ConfigError,
    InputTooLarge,
    OracleError,
    QueryRejected,
    RateLimited,
    Unauthorized,
    UnknownModel,
)
from mlinvert.oracle import HttpOracle, LocalOracle, Oracle
from mlinvert.service import ServiceSettings, Store, build_predictors, create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

X = np.random.default_rng(11).random((70, 6, 5)).astype(np.float32)


def in_process(tmp_path: Path, toys: ModuleType, policy: str) -> tuple[TestClient, str]:
    settings = ServiceSettings(db=tmp_path / "s.db", policy=policy, max_batch=32)
    store = Store(settings.db)
    key, _ = store.create_key("alice")
    app = create_app(
        settings, build_predictors({"faces": toys.ToySoftmax()}, settings), store=store
    )
    return TestClient(app), key


@pytest.mark.parametrize("encoding", ["binary", "base64", "json"])
@pytest.mark.parametrize("policy", ["full", "top:3+round:3", "labels"])
def test_parity_and_batching_in_process(
    tmp_path: Path, toys: ModuleType, policy: str, encoding: str
) -> None:
    client, key = in_process(tmp_path, toys, policy)
    oracle = HttpOracle("http://testserver/v1/models/faces", key, client=client, encoding=encoding)  # type: ignore[arg-type]
    assert isinstance(oracle, Oracle)
    local = LocalOracle(Predictor(toys.ToySoftmax(), name="faces", policy=parse_policy(policy)))
    assert dataclasses.replace(oracle.info, extra={}) == local.info
    got = oracle.query(X)  # 70 inputs: three requests of at most 32
    want = local.query(X[:32]), local.query(X[32:64]), local.query(X[64:])
    assert np.array_equal(got.labels, np.concatenate([w.labels for w in want]))
    if policy == "labels":
        assert got.probs is None
    else:
        assert np.array_equal(got.probs, np.concatenate([w.probs for w in want]))  # type: ignore[misc]
    assert got.label_names == sum((w.label_names for w in want), ())  # type: ignore[misc]
    assert oracle.n_queries == local.n_queries == 70
    assert oracle.info.extra["max_batch"] == 32


def mock_oracle(
    responses: list[httpx.Response | Exception], **kwargs: object
) -> tuple[HttpOracle, list[float], list[httpx.Request]]:
    seen: list[httpx.Request] = []
    listing = {
        "models": [
            {
                "name": "m",
                "kind": "toy",
                "input_shape": [2],
                "class_names": ["a", "b"],
                "policy": "full",
                "carries": "probs",
                "max_batch": 8,
                "rate_limit": None,
            }
        ]
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json=listing)
        seen.append(request)
        item = responses.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    sleeps: list[float] = []
    oracle = HttpOracle(
        "http://svc/v1/models/m",
        "k",
        client=httpx.Client(transport=httpx.MockTransport(handler)),
        sleep=sleeps.append,
        **kwargs,
    )  # type: ignore[arg-type]
    return oracle, sleeps, seen


def ok(n: int) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "model": "m",
            "policy": "full",
            "carries": "probs",
            "predictions": [
                {"label": 1, "label_name": "b", "scores": [0.25, 0.75], "confidence": None}
            ]
            * n,
        },
    )


def error(status: int, message: str = "nope", **extra: object) -> httpx.Response:
    headers = {"Retry-After": str(extra.pop("header"))} if "header" in extra else {}
    return httpx.Response(
        status,
        headers=headers,
        json={"error": {"type": "X", "status": status, "message": message, **extra}},
    )


def test_retries_transient_failures_with_backoff() -> None:
    oracle, sleeps, seen = mock_oracle(
        [httpx.ConnectError("refused"), error(503), httpx.ReadTimeout("slow"), ok(2)],
        encoding="base64",
    )
    response = oracle.query(np.zeros((2, 2)))
    assert sleeps == [0.2, 0.4, 0.8]
    assert len(seen) == 4 and oracle.n_queries == 2
    assert np.array_equal(response.probs, [[0.25, 0.75]] * 2)  # type: ignore[arg-type]
    body = json.loads(seen[-1].content)
    assert body["binary"]["shape"] == [2, 2]
    assert seen[-1].headers["Authorization"] == "Bearer k"


def test_gives_up_after_max_retries() -> None:
    oracle, sleeps, _ = mock_oracle([httpx.ConnectError("refused")] * 3, max_retries=2)
    with pytest.raises(OracleError, match="failed after 3 attempts"):
        oracle.query(np.zeros((1, 2)))
    assert sleeps == [0.2, 0.4] and oracle.n_queries == 0


def test_waits_on_429_as_retry_after_says() -> None:
    oracle, sleeps, _ = mock_oracle([error(429, retry_after=1.5, header=2), ok(1)])
    oracle.query(np.zeros((1, 2)))
    assert sleeps == [1.5]
    oracle, sleeps, _ = mock_oracle([error(429, header=3), ok(1)])
    oracle.query(np.zeros((1, 2)))
    assert sleeps == [3.0]


def test_raises_rate_limited_past_max_wait() -> None:
    oracle, sleeps, _ = mock_oracle([error(429, "slow down", retry_after=4.0)] * 3, max_wait=9.0)
    with pytest.raises(RateLimited, match="slow down") as info:
        oracle.query(np.zeros((1, 2)))
    assert info.value.retry_after == 4.0 and sleeps == [4.0, 4.0]


def test_counts_answered_chunks_only() -> None:
    oracle, _, seen = mock_oracle([ok(8), error(422, "bad row")])
    with pytest.raises(QueryRejected, match="bad row"):
        oracle.query(np.zeros((12, 2)))
    assert oracle.n_queries == 8 and len(seen) == 2


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, BadRequest),
        (401, Unauthorized),
        (403, Blocked),
        (404, UnknownModel),
        (413, InputTooLarge),
        (422, QueryRejected),
        (500, OracleError),
    ],
)
def test_typed_errors(status: int, error_type: type[Exception]) -> None:
    oracle, _, _ = mock_oracle([error(status, "the reason")])
    with pytest.raises(error_type, match="the reason"):
        oracle.query(np.zeros((1, 2)))


def test_bad_urls_and_unknown_models() -> None:
    for url in ("ftp://x/v1/models/m", "http://x/models/m", "http://x/v1/models/"):
        with pytest.raises(ConfigError):
            HttpOracle(url, "k")
    oracle, _, _ = mock_oracle([])
    oracle.name = "other"
    with pytest.raises(UnknownModel, match="served: m"):
        _ = oracle.info
