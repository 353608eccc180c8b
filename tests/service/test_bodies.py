"""Hostile request bodies, driven through the ASGI app itself: what the service reads of
a body before it refuses it, the body cap, the timeouts, a client that leaves, the body
budget and internal errors (logged once, counted, answered 500)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import numpy as np
import pytest
from toys import ToySoftmax, ToyTabular

from mlinvert.service import ServiceSettings, Store, build_predictors, create_app

Receive = Callable[[], Awaitable[dict[str, Any]]]
HUGE = 60 * 2**20
ROW = json.dumps({"inputs": np.full((1, 6, 5), 0.5).tolist()}).encode()


def make_app(store: Store, **overrides: Any) -> Any:
    settings = ServiceSettings(
        **{"db": store.path, "max_batch": 8, "max_body_bytes": 2**20, **overrides}
    )
    predictors = build_predictors({"faces": ToySoftmax(), "survey": ToyTabular()}, settings)
    return create_app(settings, predictors, store=store)


class Body:
    """An ASGI receive that hands out ``chunks`` and counts what the app took."""

    def __init__(self, chunks: list[bytes] | None = None, *, endless: bytes = b"") -> None:
        self.chunks = list(chunks or [])
        self.endless = endless
        self.taken = 0

    async def __call__(self) -> dict[str, Any]:
        self.taken += 1
        if self.endless:
            return {"type": "http.request", "body": self.endless, "more_body": True}
        chunk = self.chunks.pop(0) if self.chunks else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks)}


async def call(
    app: Any, receive: Receive, headers: dict[str, str], query: str = ""
) -> tuple[int, dict[str, str], dict[str, Any]]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/models/faces/predict",
        "raw_path": b"/v1/models/faces/predict",
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    answer = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], answer, json.loads(body)


@pytest.mark.parametrize("with_key", [False, True])
def test_a_huge_declared_body_is_refused_unread(store: Store, api_key: str, with_key: bool) -> None:
    app = make_app(store)
    body = Body(endless=b"0.1," * 16384)
    headers = {"content-length": str(HUGE), "content-type": "application/json"}
    if with_key:
        headers["x-api-key"] = api_key
    status, answer, doc = asyncio.run(call(app, body, headers))
    assert body.taken == 0  # not one byte read
    assert status == (413 if with_key else 401)
    assert answer["connection"] == "close"
    if with_key:
        assert (
            "limit of" in doc["error"]["message"] and "raw binary form" in doc["error"]["message"]
        )


def test_a_refused_small_body_is_drained_so_the_connection_stays_usable(
    store: Store,
) -> None:
    body = Body([ROW[:10], ROW[10:]])
    status, answer, _ = asyncio.run(call(make_app(store), body, {"content-length": str(len(ROW))}))
    assert status == 401 and body.taken == 2 and "connection" not in answer


def test_a_chunked_body_is_read_only_up_to_the_models_limit(store: Store, api_key: str) -> None:
    chunk = b" " * 65536
    body = Body(endless=chunk)  # no Content-Length, never ends
    status, answer, doc = asyncio.run(call(make_app(store), body, {"x-api-key": api_key}))
    limit = 8 * 30 * 24 + 64 * 1024  # max_batch x 30 numbers x 24 bytes + 64 KiB
    assert status == 413 and f"limit of {limit} bytes" in doc["error"]["message"]
    assert body.taken == limit // len(chunk) + 1
    assert answer["connection"] == "close"
    assert store.queries()[-1].outcome == "InputTooLarge"


def test_a_raw_body_must_declare_the_length_its_shape_needs(store: Store, api_key: str) -> None:
    body = Body(endless=b"\0" * 4096)
    headers = {
        "x-api-key": api_key,
        "content-type": "application/octet-stream",
        "content-length": str(2**21),
    }
    status, _, doc = asyncio.run(call(make_app(store), body, headers, "shape=2,6,5&dtype=float32"))
    assert status == 422 and "holds 2097152 bytes but shape [2, 6, 5]" in doc["error"]["message"]
    assert body.taken == 0


def test_a_stalled_body_gets_408(store: Store, api_key: str) -> None:
    async def stalls() -> dict[str, Any]:
        await asyncio.Event().wait()  # never set: the client sends nothing more
        raise AssertionError("unreachable")

    app = make_app(store, idle_timeout=0.05)
    status, answer, doc = asyncio.run(
        call(app, stalls, {"x-api-key": api_key, "content-length": "100"})
    )
    assert status == 408 and "did not arrive in time" in doc["error"]["message"]
    assert answer["connection"] == "close"
    assert store.queries()[-1].status == 408


def test_a_client_that_leaves_mid_body_is_no_internal_error(
    store: Store, api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    messages: Iterator[dict[str, Any]] = iter(
        [
            {"type": "http.request", "body": ROW[:20], "more_body": True},
            {"type": "http.disconnect"},
        ]
    )

    async def leaves() -> dict[str, Any]:
        return next(messages)

    app = make_app(store)
    with caplog.at_level(logging.INFO):
        status, _, _ = asyncio.run(
            call(app, leaves, {"x-api-key": api_key, "content-length": str(len(ROW))})
        )
    assert status == 499
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert store.queries()[-1].outcome == "ClientDisconnected"
    metrics = app.state.metrics.render()
    assert 'mlinvert_rejections_total{reason="ClientDisconnected"} 1' in metrics
    assert "mlinvert_server_errors_total{" not in metrics


def test_bodies_past_the_budget_get_503_drained(store: Store, api_key: str) -> None:
    app = make_app(store, max_body_bytes=50_000, body_budget_bytes=100_000)
    first_reading = asyncio.Event()
    let_go = asyncio.Event()

    async def holds() -> dict[str, Any]:
        first_reading.set()
        await let_go.wait()
        return {"type": "http.disconnect"}

    async def scenario() -> tuple[Any, ...]:
        headers = {"x-api-key": api_key, "content-length": "20000"}
        first = asyncio.create_task(call(app, holds, headers))
        await first_reading.wait()  # 3 x 20 kB for the first JSON body and its decoding
        second = Body([b" " * 20000])
        busy = await call(app, second, headers)
        fits = await call(app, Body([ROW]), {"x-api-key": api_key, "content-length": str(len(ROW))})
        let_go.set()
        return busy, second.taken, fits, await first

    (status, answer, doc), taken, fits, first = asyncio.run(scenario())
    assert status == 503 and answer["retry-after"] == "1"
    assert taken == 1 and "connection" not in answer  # drained, not kept: the client reads it
    assert "budget" in doc["error"]["message"]
    assert fits[0] == 200 and first[0] == 499


class Broken(ToySoftmax):
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        raise RuntimeError("a bug")


class NaNs(ToySoftmax):
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.full((X.shape[0], 5), np.nan)


@pytest.mark.parametrize("model", [Broken(), NaNs()], ids=["raises", "answers NaN"])
def test_an_internal_error_is_logged_once_counted_and_in_the_query_log(
    store: Store, api_key: str, caplog: pytest.LogCaptureFixture, model: ToySoftmax
) -> None:
    settings = ServiceSettings(db=store.path)
    app = create_app(settings, build_predictors({"faces": model}, settings), store=store)
    with caplog.at_level(logging.INFO):
        status, _, doc = asyncio.run(
            call(app, Body([ROW]), {"x-api-key": api_key, "content-length": str(len(ROW))})
        )
    assert status == 500 and doc["error"]["type"] == "InternalError"
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    assert store.queries()[-1].outcome == "InternalError"
    text = app.state.metrics.render()
    assert 'mlinvert_server_errors_total{route="/v1/models/{name}/predict"} 1' in text
    assert 'mlinvert_requests_total{model="faces",status="500"} 1' in text


def test_an_error_outside_the_predict_route_is_logged_once_and_counted(
    store: Store, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    app = make_app(store)
    predictor = app.state.predictors["faces"]
    monkeypatch.setattr(type(predictor), "info", property(lambda self: 1 / 0))
    with caplog.at_level(logging.INFO):
        r = TestClient(app).get("/v1/models")
    assert r.status_code == 500 and r.json()["error"]["type"] == "InternalError"
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    assert 'mlinvert_server_errors_total{route="/v1/models"} 1' in app.state.metrics.render()


@pytest.mark.parametrize(("rows", "hops"), [(1, 1), (8, 2)])
def test_a_small_body_takes_one_thread_pool_hop_a_large_one_two(
    store: Store, api_key: str, monkeypatch: pytest.MonkeyPatch, rows: int, hops: int
) -> None:
    """A body declared within SMALL_BODY is read first and admitted and answered in one
    hop; a larger one is admitted (its key checked) before it is read."""
    from mlinvert.service.routes import predict as service_app

    calls: list[str] = []
    hop = service_app.run_in_threadpool

    async def counted(func: Callable[..., Any], *args: Any) -> Any:
        calls.append(func.__name__)
        return await hop(func, *args)

    monkeypatch.setattr(service_app, "run_in_threadpool", counted)
    monkeypatch.setattr(service_app, "SMALL_BODY", len(ROW))
    doc = json.dumps({"inputs": np.full((rows, 6, 5), 0.5).tolist()}).encode()
    headers = {"x-api-key": api_key, "content-length": str(len(doc))}
    status, _, answer = asyncio.run(call(make_app(store), Body([doc]), headers))
    assert status == 200 and len(answer["predictions"]) == rows
    assert calls == (["handle"] if hops == 1 else ["admit", "answer"])
