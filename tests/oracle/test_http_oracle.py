"""HttpOracle against the in-process app (parity, batching) and a mock transport (errors)."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from types import ModuleType
from typing import Literal, TypedDict, Unpack

import httpx
import numpy as np
import pytest

from mlinvert.defenses import Predictor, parse_policy
from mlinvert.defenses.detector import Flag
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

#: The wire forms HttpOracle can send.
Encoding = Literal["binary", "base64", "json"]


class _Options(TypedDict, total=False):
    """The HttpOracle keywords a mock-transport test sets."""

    encoding: Encoding
    max_retries: int
    max_wait: float


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
    tmp_path: Path, toys: ModuleType, policy: str, encoding: Encoding
) -> None:
    client, key = in_process(tmp_path, toys, policy)
    oracle = HttpOracle("http://testserver/v1/models/faces", key, client=client, encoding=encoding)
    assert isinstance(oracle, Oracle)
    local = LocalOracle(Predictor(toys.ToySoftmax(), name="faces", policy=parse_policy(policy)))
    assert dataclasses.replace(oracle.info, extra={}) == local.info
    got = oracle.query(X)  # 70 inputs: three requests of at most 32
    want = local.query(X[:32]), local.query(X[32:64]), local.query(X[64:])
    assert np.array_equal(got.labels, np.concatenate([w.labels for w in want]))
    if policy == "labels":
        assert got.probs is None
    else:
        parts = [w.probs for w in want if w.probs is not None]
        assert got.probs is not None and len(parts) == len(want)
        assert np.array_equal(got.probs, np.concatenate(parts))
    names = [w.label_names for w in want if w.label_names is not None]
    assert len(names) == len(want) and got.label_names == sum(names, ())
    assert oracle.n_queries == local.n_queries == 70
    assert oracle.info.extra["max_batch"] == 32


def mock_oracle(
    responses: list[httpx.Response | Exception], name: str = "m", **options: Unpack[_Options]
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
        if request.method == "GET" and request.url.path == "/v1/models":
            return httpx.Response(200, json=listing)
        seen.append(request)
        item = responses.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    sleeps: list[float] = []
    oracle = HttpOracle(
        f"http://svc/v1/models/{name}",
        "k",
        client=httpx.Client(transport=httpx.MockTransport(handler)),
        sleep=sleeps.append,
        **options,
    )
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
    assert response.probs is not None and np.array_equal(response.probs, [[0.25, 0.75]] * 2)
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
    oracle, _, _ = mock_oracle([], name="other")
    with pytest.raises(UnknownModel, match="served: m"):
        _ = oracle.info


def test_account_and_check_key_spend_no_query(tmp_path: Path, toys: ModuleType) -> None:
    settings = ServiceSettings(
        db=tmp_path / "s.db", rate_limit="100/hour", detector="detect:block:50", max_batch=32
    )
    store = Store(settings.db)
    alice, _ = store.create_key("alice")
    mallory, _ = store.create_key("mallory")
    gone, _ = store.create_key("gone")
    store.revoke("gone")
    predictors = build_predictors({"faces": toys.ToySoftmax()}, settings, flags=store)
    client = TestClient(create_app(settings, predictors, store=store))
    url = "http://testserver/v1/models/faces"
    oracle = HttpOracle(url, alice, client=client)
    oracle.query(X[:10])
    oracle.check_key()
    account = oracle.account()
    assert (account.name, account.blocked, account.rate_limit) == ("alice", False, "100/hour")
    assert account.remaining == 90 and account.inputs_answered == 10
    assert account.reset_in == pytest.approx(360, abs=2)  # 10 inputs at 36 s each
    assert oracle.n_queries == 10 and oracle.account().remaining == 90  # nothing spent
    assert [q.n_inputs for q in store.queries()] == [10]  # nothing logged either
    # a blocked account's key is valid: check_key passes, account() says blocked
    store.flag(Flag(account="mallory", at=0.0, near_duplicates=60, inputs=60, detail="why"))
    blocked = HttpOracle(url, mallory, client=client)
    blocked.check_key()
    assert blocked.account().blocked
    with pytest.raises(Blocked):
        blocked.query(X[:1])
    for key, words in ((gone, "was revoked"), ("mli_" + "x" * 43, "unknown API key")):
        refused = HttpOracle(url, key, client=client)
        with pytest.raises(Unauthorized, match=words):
            refused.check_key()


def test_account_from_a_service_without_the_route_or_a_strange_answer() -> None:
    oracle, _, _ = mock_oracle([httpx.Response(404, json={"detail": "Not Found"})])
    with pytest.raises(OracleError, match="does not exist: the service is not"):
        oracle.check_key()
    oracle, _, _ = mock_oracle([httpx.Response(200, json={"account": "x"})])
    with pytest.raises(OracleError, match="not an account"):
        oracle.account()
    unlimited: dict[str, object] = {
        "account": "x",
        "blocked_models": [],
        "rate_limit": None,
        "inputs_answered": 3,
    }
    oracle, _, seen = mock_oracle([httpx.Response(200, json=unlimited)])
    account = oracle.account()
    assert (account.rate_limit, account.remaining, account.reset_in) == (None, None, None)
    assert seen[0].url == "http://svc/v1/account" and seen[0].headers["Authorization"] == "Bearer k"


def test_a_server_that_is_not_mlinvert_is_a_clear_error() -> None:
    # e.g. `python -m http.server` or a proxy at the --target address
    page = httpx.Response(200, text="<html>Directory listing</html>")
    oracle, _, _ = mock_oracle([page])
    with pytest.raises(OracleError, match=r"not JSON .*mlinvert serve"):
        oracle.query(np.zeros((1, 2)))
    oracle, _, _ = mock_oracle([httpx.Response(404, text="no such page")])
    with pytest.raises(UnknownModel, match=r"HTTP 404 from http://svc/.*no such page.*mlinvert"):
        oracle.query(np.zeros((1, 2)))
    oracle, _, _ = mock_oracle([httpx.Response(301)])
    moved = r"^HTTP 301 from http://svc/v1/models/m/predict\?shape=1%2C2&dtype=float32 without an"
    with pytest.raises(OracleError, match=moved):
        oracle.query(np.zeros((1, 2)))
