"""The service in process: routes, encodings, the error table and the query log."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from mlinvert.service import Store
from mlinvert.service.store import input_digests

X = np.random.default_rng(3).random((4, 6, 5)).astype(np.float32)


def binary(x: np.ndarray, dtype: str = "float32") -> dict[str, Any]:
    arr = x.astype("<f4") if dtype == "float32" else x
    return {
        "binary": {
            "dtype": dtype,
            "shape": list(x.shape),
            "data": base64.b64encode(arr.tobytes()).decode(),
        }
    }


def test_listing_health_metrics_openapi(
    make_client: Callable[..., Any], store: Store, api_key: str
) -> None:
    client = make_client(store, policy="top:2+round:3", rate_limit="1000/hour", max_batch=16)
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert models["faces"]["input_shape"] == [6, 5]
    assert models["faces"]["policy"] == "top:2+round:3"
    assert models["faces"]["carries"] == "top-k"
    assert models["faces"]["max_batch"] == 16
    assert models["faces"]["rate_limit"] == "1000/hour"
    assert models["survey"]["feature_names"] == ["age", "color"]
    assert client.get("/healthz").json() == {"status": "ok", "models": ["faces", "survey"]}
    assert client.head("/healthz").status_code == 200
    assert client.get("/readyz").json() == {"status": "ready", "checks": {"database": "ok"}}
    client.post(
        "/v1/models/faces/predict", json={"inputs": X.tolist()}, headers={"X-API-Key": api_key}
    )
    client.post("/v1/models/faces/predict", json={"inputs": X.tolist()})
    text = client.get("/metrics").text
    assert 'mlinvert_requests_total{model="faces",status="200"} 1' in text
    assert 'mlinvert_inputs_total{model="faces"} 4' in text
    assert 'mlinvert_rejections_total{reason="Unauthorized"} 1' in text
    assert "mlinvert_request_latency_seconds_count 2" in text
    spec = client.get("/openapi.json").json()
    assert "PredictRequest" in spec["components"]["schemas"]
    assert set(spec["paths"]) == {
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/account",
        "/v1/models",
        "/v1/models/{name}/predict",
    }


def test_json_binary_and_uint8_agree(
    make_client: Callable[..., Any], store: Store, api_key: str
) -> None:
    client = make_client(store, policy="round:4")
    headers = {"Authorization": f"Bearer {api_key}"}
    as_json = client.post("/v1/models/faces/predict", json={"inputs": X.tolist()}, headers=headers)
    as_bin = client.post("/v1/models/faces/predict", json=binary(X), headers=headers)
    assert as_json.status_code == as_bin.status_code == 200
    assert as_json.json() == as_bin.json()
    pred = as_json.json()["predictions"][0]
    assert pred["label_name"] == f"s{pred['label'] + 1}"
    assert len(pred["scores"]) == 5 and pred["confidence"] is None
    pixels = (X * 255).round().astype(np.uint8)
    as_u8 = client.post("/v1/models/faces/predict", json=binary(pixels, "uint8"), headers=headers)
    as_f = client.post(
        "/v1/models/faces/predict",
        json=binary(pixels.astype(np.float32) / np.float32(255)),
        headers=headers,
    )
    assert as_u8.json() == as_f.json()
    logged = store.queries("alice")
    assert [q.outcome for q in logged] == ["ok"] * 4
    assert logged[0].digests == logged[1].digests == input_digests(X)


def test_survey_records_with_confidence(
    make_client: Callable[..., Any], store: Store, api_key: str
) -> None:
    client = make_client(store, policy="round:2")
    r = client.post(
        "/v1/models/survey/predict",
        headers={"X-API-Key": api_key},
        json={"records": [{"age": 20, "color": "green"}, {"age": 90, "color": "red"}]},
    )
    assert r.status_code == 200
    preds = r.json()["predictions"]
    assert [p["label_name"] for p in preds] == ["no", "yes"]
    assert all(
        0 < p["confidence"] < 1 and round(p["confidence"], 2) == p["confidence"] for p in preds
    )
    assert r.json()["carries"] == "confidence"


def test_labels_only_policy_answers_no_scores(
    make_client: Callable[..., Any], store: Store, api_key: str
) -> None:
    client = make_client(store, policy="labels")
    r = client.post("/v1/models/faces/predict", json=binary(X), headers={"X-API-Key": api_key})
    assert all(p["scores"] is None for p in r.json()["predictions"])


NAN = [[[float("nan")] * 5] * 6]
BAD_INPUTS = [
    # (model, body, status, error type, words in the message)
    ("faces", {"inputs": np.zeros((2, 5, 6)).tolist()}, 422, "QueryRejected", "shape (n, 6, 5)"),
    ("faces", {"inputs": [[["a"] * 5] * 6]}, 422, "QueryRejected", "numbers, got strings"),
    ("faces", {"inputs": [[[True] * 5] * 6]}, 422, "QueryRejected", "booleans"),
    ("faces", {"inputs": [[[0.1] * 5] * 6, [[0.1] * 4] * 6]}, 422, "QueryRejected", "ragged"),
    ("faces", {"inputs": NAN}, 400, "BadRequest", "NaN and Infinity are not JSON"),
    ("faces", {"inputs": [[[-1e309] * 5] * 6]}, 400, "BadRequest", "NaN and Infinity are not JSON"),
    ("faces", binary(np.full((1, 6, 5), np.inf)), 422, "QueryRejected", "NaN or infinity"),
    ("faces", {"inputs": [[[1.5] * 5] * 6]}, 422, "QueryRejected", "[0, 1]"),
    ("faces", {"inputs": [[[1e300] * 5] * 6]}, 422, "QueryRejected", "[0, 1], got values in"),
    ("faces", {"inputs": [[[-0.1] * 5] * 6]}, 422, "QueryRejected", "[0, 1]"),
    ("faces", {"inputs": []}, 422, "QueryRejected", "empty batch"),
    (
        "faces",
        {"binary": {"dtype": "float64", "shape": [1, 6, 5], "data": ""}},
        422,
        "QueryRejected",
        "binary.dtype",
    ),
    (
        "faces",
        {"binary": {"dtype": "float32", "shape": [1, 6, 5], "data": "AAAA"}},
        422,
        "QueryRejected",
        "needs 120",
    ),
    (
        "faces",
        {"binary": {"dtype": "float32", "shape": [1, 6, 5], "data": "%%%"}},
        400,
        "BadRequest",
        "base64",
    ),
    ("faces", {"records": [{"age": 3, "color": "red"}]}, 422, "QueryRejected", "not 'records'"),
    ("faces", {"inputs": [], "records": []}, 422, "QueryRejected", "exactly one"),
    ("faces", {"pixels": []}, 422, "QueryRejected", "pixels: Extra inputs"),
    ("faces", {"inputs": np.zeros((33, 6, 5)).tolist()}, 413, "InputTooLarge", "limit of 32"),
    ("faces", binary(np.zeros((40, 6, 5))), 413, "InputTooLarge", "limit of 32"),
    ("survey", {"records": [{"age": 3, "colour": "red"}]}, 422, "QueryRejected", "'colour'"),
    ("survey", {"records": [{"age": 3, "color": "pink"}]}, 422, "QueryRejected", "'pink'"),
    ("survey", {"records": [{"age": "old", "color": "red"}]}, 422, "QueryRejected", "'age'"),
    ("survey", {"records": [{"color": "red"}]}, 422, "QueryRejected", "missing field 'age'"),
    ("survey", {"inputs": [[0.5, 1.0, 1.0, 0.0]]}, 422, "QueryRejected", "one-hot"),
    ("nobody", {"inputs": X.tolist()}, 404, "UnknownModel", "no model named 'nobody'"),
]


@pytest.mark.parametrize(("model", "body", "status", "kind", "words"), BAD_INPUTS)
def test_bad_input_gets_its_4xx_and_is_logged(
    make_client: Callable[..., Any],
    store: Store,
    api_key: str,
    model: str,
    body: dict[str, Any],
    status: int,
    kind: str,
    words: str,
) -> None:
    client = make_client(store)
    r = client.post(
        f"/v1/models/{model}/predict", content=json.dumps(body), headers={"X-API-Key": api_key}
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == kind and error["status"] == status
    assert words in error["message"]
    (entry,) = store.queries()
    assert (entry.account, entry.model, entry.outcome, entry.status) == (
        "alice",
        model,
        kind,
        status,
    )
    assert words in entry.detail


@pytest.mark.parametrize(
    ("headers", "words", "account"),
    [
        ({}, "no API key", None),
        ({"X-API-Key": "secret"}, "malformed API key", None),
        ({"Authorization": "Basic YWxhZGRpbjpvcGVu"}, "malformed Authorization", None),
        ({"Authorization": "Bearer mli_" + "A" * 43}, "unknown API key", None),
        ({"X-API-Key": "REVOKED"}, "was revoked", "mallory"),
    ],
)
def test_bad_keys_get_401_and_are_counted(
    make_client: Callable[..., Any],
    store: Store,
    headers: dict[str, str],
    words: str,
    account: str | None,
) -> None:
    if headers.get("X-API-Key") == "REVOKED":
        key, _ = store.create_key("mallory")
        store.revoke("mallory")
        headers = {"X-API-Key": key}
    client = make_client(store)
    r = client.post("/v1/models/faces/predict", json={"inputs": X.tolist()}, headers=headers)
    assert r.status_code == 401
    assert words in r.json()["error"]["message"]
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    # a revoked key's account is known: logged; without a valid key: only counted
    logged = [(q.account, q.outcome, q.status) for q in store.queries()]
    assert logged == ([(account, "Unauthorized", 401)] if account else [])
    assert 'mlinvert_rejections_total{reason="Unauthorized"} 1' in client.get("/metrics").text


def test_oversized_and_malformed_bodies(
    make_client: Callable[..., Any], store: Store, api_key: str
) -> None:
    client = make_client(store, max_body_bytes=4096)
    headers = {"X-API-Key": api_key}
    r = client.post("/v1/models/faces/predict", content=b"[" * 5000, headers=headers)
    assert r.status_code == 413 and "exceeds the limit of 4096 bytes" in r.text
    r = client.post("/v1/models/faces/predict", content=b"{not json", headers=headers)
    assert r.status_code == 400 and "not valid JSON" in r.text
    r = client.post("/v1/models/faces/predict", content=b"[" * 3000, headers=headers)
    assert r.status_code == 400
    r = client.post("/v1/models/faces/predict", content=b"\xff\xfe", headers=headers)
    assert r.status_code == 400
    assert [q.status for q in store.queries()] == [413, 400, 400, 400]


def test_rate_limit_answers_429_with_retry_after(
    make_client: Callable[..., Any], store: Store, api_key: str
) -> None:
    client = make_client(store, rate_limit="10/hour")
    headers = {"X-API-Key": api_key}
    assert client.post("/v1/models/faces/predict", json=binary(X), headers=headers).is_success
    assert client.post("/v1/models/faces/predict", json=binary(X), headers=headers).is_success
    r = client.post("/v1/models/faces/predict", json=binary(X), headers=headers)
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) == pytest.approx(2 * 360, abs=2)
    assert r.json()["error"]["retry_after"] == pytest.approx(720, abs=2)
    assert [q.outcome for q in store.queries("alice")] == ["ok", "ok", "RateLimited"]
    assert store.queries("alice")[-1].digests == input_digests(X)
    r = client.post("/v1/models/faces/predict", json=binary(np.zeros((11, 6, 5))), headers=headers)
    assert r.status_code == 413 and "burst of 10" in r.text


def test_unknown_routes_answer_json(make_client: Callable[..., Any], store: Store) -> None:
    client = make_client(store)
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["status"] == 404
    r = client.get("/v1/models/faces/predict")
    assert r.status_code == 405


def test_small_hardening_items(make_client: Callable[..., Any], store: Store, api_key: str) -> None:
    client = make_client(store)
    headers = {"X-API-Key": api_key}
    mallory, _ = store.create_key("mallory")
    store.revoke("mallory")
    revoked = client.post(
        "/v1/models/faces/predict", json=binary(X), headers={"X-API-Key": mallory}
    )
    assert revoked.status_code == 401 and "mallory" not in revoked.text  # names no account
    deep = b'{"inputs": ' + b"[" * 990 + b"0.5" + b"]" * 990 + b"}"  # valid JSON
    r = client.post("/v1/models/faces/predict", content=deep, headers=headers)
    assert r.status_code == 422 and "deeper than 64 levels" in r.text and "not valid" not in r.text
    lines = binary(X)
    data = lines["binary"]["data"]
    lines["binary"]["data"] = "\n".join(data[i : i + 76] for i in range(0, len(data), 76))
    r = client.post("/v1/models/faces/predict", json=lines, headers=headers)
    assert r.status_code == 400 and "line breaks" in r.text
    docs = client.get("/docs")
    assert docs.status_code == 200 and "GET /openapi.json" in docs.text
    assert client.get("/redoc").status_code == 404


def test_openapi_is_markdown_typed_with_examples_and_retry_after(
    make_client: Callable[..., Any], store: Store
) -> None:
    spec = make_client(store).get("/openapi.json").json()
    assert "``" not in json.dumps(spec)
    request = spec["components"]["schemas"]["PredictRequest"]
    assert request["examples"] and request["properties"]["inputs"]["anyOf"][0]["items"]["anyOf"]
    responses = spec["paths"]["/v1/models/{name}/predict"]["post"]["responses"]
    assert "Retry-After" in responses["429"]["headers"]
    assert "Retry-After" in responses["503"]["headers"]
    assert "Retry-After" in spec["paths"]["/v1/account"]["get"]["responses"]["429"]["headers"]
