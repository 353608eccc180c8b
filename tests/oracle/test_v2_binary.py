"""The v2 client's binary tensors, against the app `mlinvert serve --protocol v2` runs:
the binary path is taken when the server lists the extension, and answers what JSON and
the Predictor answer."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest

from mlinvert.defenses import Predictor
from mlinvert.errors import BadRequest
from mlinvert.oracle import HttpOracle
from mlinvert.oracle.wire import HEADER_LENGTH, WireConfig
from mlinvert.service import ServiceSettings, Store, build_predictors, create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

X = np.random.default_rng(5).random((70, 6, 5)).astype(np.float32)
URL = "http://testserver/v2/models/faces"


@pytest.fixture
def served(tmp_path: Path, toys: ModuleType) -> dict[str, Any]:
    """The v2 app on the toy softmax; every exchange's headers recorded."""
    settings = ServiceSettings(db=tmp_path / "s.db", max_batch=32, protocol="v2")
    store = Store(settings.db)
    key, _ = store.create_key("alice")
    app = create_app(
        settings, build_predictors({"faces": toys.ToySoftmax()}, settings), store=store
    )
    seen: list[tuple[httpx.Headers, httpx.Headers]] = []  # of the infer requests

    def record(r: httpx.Response) -> None:
        if r.request.url.path.endswith("/infer"):
            seen.append((r.request.headers, r.headers))

    client = TestClient(app)
    client.event_hooks["response"] = [record]
    return {"client": client, "key": key, "seen": seen, "model": toys.ToySoftmax()}


def _oracle(served: dict[str, Any], binary: bool | None) -> HttpOracle:
    wire = WireConfig(protocol="v2", output="probabilities", binary=binary, max_batch=32)
    return HttpOracle(URL, served["key"], client=served["client"], wire=wire)


def test_binary_tensors_are_used_and_answer_as_json_and_the_predictor(
    served: dict[str, Any],
) -> None:
    binary = _oracle(served, None)  # the server lists binary_tensor_data: binary
    got = binary.query(X)  # 70 inputs: three requests of at most 32
    assert binary.info.extra["tensors"] == "binary"
    infers = served["seen"]
    assert len(infers) == 4  # the probe and three batches, each way in bytes
    assert all(HEADER_LENGTH in q and HEADER_LENGTH in a for q, a in infers)
    served["seen"].clear()
    as_json = _oracle(served, False)
    want = as_json.query(X)
    assert as_json.info.extra["tensors"] == "json"
    assert not any(HEADER_LENGTH in q or HEADER_LENGTH in a for q, a in served["seen"])
    assert got.probs is not None and want.probs is not None
    np.testing.assert_array_equal(got.probs, want.probs)
    np.testing.assert_array_equal(got.labels, want.labels)
    local = Predictor(served["model"], name="faces").predict(X, account="local")
    np.testing.assert_array_equal(got.probs, local.probs)  # FP64: the Predictor's own bits
    assert binary.n_queries == as_json.n_queries == 71  # every input, the probe's too


def test_a_server_that_lists_binary_but_refuses_it_is_spoken_to_in_json() -> None:
    """Binary refused with a 400: the oracle says so and sends JSON from then on."""
    answered: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2":
            return httpx.Response(200, json={"name": "s", "extensions": ["binary_tensor_data"]})
        if request.method == "GET":
            meta = {"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]}
            return httpx.Response(200, json={**meta, "outputs": [{"name": "p"}]})
        if HEADER_LENGTH in request.headers:
            return httpx.Response(400, json={"error": "binary tensors are not supported"})
        n = json.loads(request.content)["inputs"][0]["shape"][0]
        answered.append("json")
        out = {"name": "p", "datatype": "FP64", "shape": [n, 2], "data": [0.25, 0.75] * n}
        return httpx.Response(200, json={"outputs": [out]})

    client = httpx.Client(transport=httpx.MockTransport(server))
    oracle = HttpOracle("http://s/v2/models/m", client=client, wire=WireConfig(protocol="v2"))
    got = oracle.query(np.zeros((5, 3), np.float32))
    assert oracle.info.extra["tensors"] == "json" and answered == ["json", "json"]
    assert got.probs is not None and got.probs.tolist() == [[0.25, 0.75]] * 5
    assert oracle.n_queries == 6
    insisting = WireConfig(protocol="v2", binary=True)
    with pytest.raises(BadRequest, match="binary tensors are not supported"):
        HttpOracle("http://s/v2/models/m", client=client, wire=insisting).info  # noqa: B018
