"""The raw binary request form: application/octet-stream bytes, shape and dtype in the query."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from mlinvert.service import Store
from mlinvert.service.store import input_digests

X = np.random.default_rng(5).random((4, 6, 5)).astype(np.float32)
RAW = {"Content-Type": "application/octet-stream"}


def post_raw(
    client: Any, body: bytes, params: dict[str, str], key: str, model: str = "faces"
) -> Any:
    return client.post(
        f"/v1/models/{model}/predict",
        content=body,
        params=params,
        headers={**RAW, "X-API-Key": key},
    )


def test_raw_float32_and_uint8_match_json(
    make_client: Callable[..., Any], store: Store, api_key: str
) -> None:
    client = make_client(store, policy="round:4")
    as_json = client.post(
        "/v1/models/faces/predict", json={"inputs": X.tolist()}, headers={"X-API-Key": api_key}
    )
    as_raw = post_raw(
        client, X.astype("<f4").tobytes(), {"shape": "4,6,5", "dtype": "float32"}, api_key
    )
    assert as_json.status_code == as_raw.status_code == 200, as_raw.text
    assert as_raw.json() == as_json.json()
    assert len(as_raw.json()["predictions"]) == 4
    pixels = (X * 255).round().astype(np.uint8)
    as_u8 = post_raw(client, pixels.tobytes(), {"shape": "4,6,5", "dtype": "uint8"}, api_key)
    scaled = pixels.astype(np.float32) / np.float32(255)
    as_f = client.post(
        "/v1/models/faces/predict", json={"inputs": scaled.tolist()}, headers={"X-API-Key": api_key}
    )
    assert as_u8.status_code == 200 and as_u8.json() == as_f.json()
    logged = store.queries("alice")
    assert [q.outcome for q in logged] == ["ok"] * 4
    assert logged[0].digests == logged[1].digests == input_digests(X)
    assert logged[2].digests == logged[3].digests == input_digests(scaled)


ONE = np.zeros((1, 6, 5), dtype="<f4").tobytes()
BAD_RAW = [
    (ONE[:-4], {"shape": "1,6,5", "dtype": "float32"}, 422, "holds 116 bytes", "needs 120"),
    (ONE + b"\0", {"shape": "1,6,5", "dtype": "float32"}, 422, "holds 121 bytes", "needs 120"),
    (ONE, {"shape": "1,6,5", "dtype": "float64"}, 422, "dtype 'float64'", "float32"),
    (ONE, {"shape": "1,6,5"}, 422, "dtype None", "uint8"),
    (ONE, {"dtype": "float32"}, 422, "needs the query parameter 'shape'", "shape="),
    (ONE, {"shape": "1,6,x", "dtype": "float32"}, 422, "comma-separated", "'1,6,x'"),
    (ONE, {"shape": "1,-6,5", "dtype": "float32"}, 422, "comma-separated", "non-negative"),
    (ONE, {"shape": "1,5,6", "dtype": "float32"}, 422, "shape (n, 6, 5)", "expects"),
    (ONE, {"shape": "1,30", "dtype": "float32"}, 422, "shape (n, 6, 5)", "expects"),
    (b"", {"shape": "0,6,5", "dtype": "float32"}, 422, "empty batch", "at least one"),
    (ONE * 40, {"shape": "40,6,5", "dtype": "float32"}, 413, "limit of 32", "split"),
    (b"\0" * 2**20 + ONE, {"shape": "1,6,5", "dtype": "float32"}, 422, "needs 120", ""),
    (ONE, {"shape": "1,6,\u00b2", "dtype": "float32"}, 422, "comma-separated", "ASCII digits"),
    (ONE, {"shape": "1,6,\u0665", "dtype": "float32"}, 422, "comma-separated", "ASCII digits"),
    (ONE, {"shape": "1,9999,9999", "dtype": "float32"}, 413, "exceeds the limit", "smaller"),
    (b"\0\0\x80\x7f" * 30, {"shape": "1,6,5", "dtype": "float32"}, 422, "inf", ""),
]


@pytest.mark.parametrize(("body", "params", "status", "words", "more"), BAD_RAW)
def test_bad_raw_input_gets_its_4xx_and_is_logged(
    make_client: Callable[..., Any],
    store: Store,
    api_key: str,
    body: bytes,
    params: dict[str, str],
    status: int,
    words: str,
    more: str,
) -> None:
    client = make_client(store)
    r = post_raw(client, body, params, api_key)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["status"] == status
    assert words in error["message"] and more in error["message"], error["message"]
    (entry,) = store.queries()
    assert (entry.account, entry.model, entry.status) == ("alice", "faces", status)


def test_raw_form_on_a_tabular_model_is_refused(
    make_client: Callable[..., Any], store: Store, api_key: str
) -> None:
    client = make_client(store)
    r = post_raw(client, b"\0" * 16, {"shape": "1,4", "dtype": "float32"}, api_key, "survey")
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "QueryRejected"


def test_openapi_documents_both_content_types(
    make_client: Callable[..., Any], store: Store
) -> None:
    spec = make_client(store).get("/openapi.json").json()
    op = spec["paths"]["/v1/models/{name}/predict"]["post"]
    assert set(op["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    assert {"shape", "dtype"} <= {p["name"] for p in op["parameters"]}
