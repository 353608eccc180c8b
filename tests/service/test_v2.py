"""``mlinvert serve --protocol v2`` under uvicorn on loopback, spoken to by a real
Open Inference Protocol client (``tritonclient[http]``): metadata, JSON and binary
tensors, a labels-only policy, keys, the rate limit, malformed tensors, and the
query log and metrics every inference goes through."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from mlinvert.defenses import Predictor, parse_policy
from mlinvert.service import Store
from mlinvert.service.runner import ServiceProcess
from mlinvert.service.store import input_digests

SHAPE = (8, 8)
BUDGET = 40
#: The budget comes back over 30 days: no refill admits a batch during the test.
RATE = f"{BUDGET}/30d"
ACCOUNTS = ("meta", "json", "binary", "labels", "keys", "limited", "malformed", "logged")


@pytest.fixture(scope="module")
def served(
    model_dir: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServiceProcess, Store, dict[str, str]]]:
    """One service: model ``full`` (scores) and ``labels`` (labels only), a key per test."""
    folder, _ = model_dir
    db = tmp_path_factory.mktemp("v2") / "service.db"
    store = Store(db)
    keys = {name: store.create_key(name)[0] for name in ACCOUNTS}
    with ServiceProcess(
        [f"full={folder}", f"labels={folder}"],
        db=db,
        model_policies={"labels": "labels"},
        rate_limit=RATE,
        max_batch=32,
        protocol="v2",
    ) as service:
        yield service, store, keys
    store.close()


def client(service: ServiceProcess) -> Any:
    return httpclient.InferenceServerClient(url=f"{service.host}:{service.port}")


def tensor(x: np.ndarray, *, binary: bool, name: str = "input", dtype: str = "FP32") -> Any:
    t = httpclient.InferInput(name, list(x.shape), dtype)
    t.set_data_from_numpy(x, binary_data=binary)
    return t


def batch(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_health_and_metadata(served: tuple[ServiceProcess, Store, dict[str, str]]) -> None:
    service, _, _ = served
    c = client(service)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("full") and not c.is_model_ready("nobody")
    assert "binary_tensor_data" in c.get_server_metadata()["extensions"]
    meta = c.get_model_metadata("full")
    assert meta["platform"] == "mlinvert" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8, 8]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("probabilities", "FP64", [-1, 5]),
        ("label", "INT64", [-1]),
    ]
    labels_only = c.get_model_metadata("labels")
    assert [o["name"] for o in labels_only["outputs"]] == ["label"]
    with pytest.raises(InferenceServerException) as err:
        c.get_model_metadata("nobody")
    assert err.value.status() == "404" and "served: full, labels" in err.value.message()


@pytest.mark.parametrize("binary", [False, True])
def test_infer_answers_as_the_predictor_does(
    served: tuple[ServiceProcess, Store, dict[str, str]], model_dir: tuple[Path, Any], binary: bool
) -> None:
    """JSON and binary tensors, in and out, give what the same Predictor answers."""
    service, _, keys = served
    x = batch(5, seed=int(binary))
    outputs = [
        httpclient.InferRequestedOutput("label", binary_data=binary),
        httpclient.InferRequestedOutput("probabilities", binary_data=binary),
    ]
    key = keys["binary" if binary else "json"]
    result = client(service).infer(
        "full", [tensor(x, binary=binary)], outputs=outputs, request_id="r-7", headers=bearer(key)
    )
    expected = Predictor(model_dir[1], name="full", policy=parse_policy("full")).predict(
        x, account="local"
    )
    answer = result.get_response()
    assert answer["id"] == "r-7" and answer["model_name"] == "full"
    assert [o["name"] for o in answer["outputs"]] == ["label", "probabilities"]
    assert all(("parameters" in o) == binary for o in answer["outputs"])
    probs = result.as_numpy("probabilities")
    # the Predictor's own float64 scores, bit for bit (as /v1 and in process answer them)
    assert probs.dtype == np.float64 and probs.shape == (5, 5)
    np.testing.assert_array_equal(probs, expected.probs)
    assert result.as_numpy("label").tolist() == expected.labels.tolist()


def test_without_outputs_every_output_comes_binary(
    served: tuple[ServiceProcess, Store, dict[str, str]],
) -> None:
    service, _, keys = served
    result = client(service).infer(
        "full", [tensor(batch(2, 3), binary=True)], headers={"X-API-Key": keys["binary"]}
    )
    answer = result.get_response()
    assert [o["name"] for o in answer["outputs"]] == ["probabilities", "label"]
    assert all("data" not in o for o in answer["outputs"])
    assert result.as_numpy("label").dtype == np.int64


def test_a_labels_only_policy_answers_labels_only(
    served: tuple[ServiceProcess, Store, dict[str, str]], model_dir: tuple[Path, Any]
) -> None:
    service, _, keys = served
    x = batch(4, seed=4)
    c = client(service)
    result = c.infer("labels", [tensor(x, binary=False)], headers=bearer(keys["labels"]))
    assert [o["name"] for o in result.get_response()["outputs"]] == ["label"]
    assert result.as_numpy("probabilities") is None
    assert result.as_numpy("label").tolist() == model_dir[1].predict(x).tolist()
    with pytest.raises(InferenceServerException) as err:
        c.infer(
            "labels",
            [tensor(x, binary=True)],
            outputs=[httpclient.InferRequestedOutput("probabilities")],
            headers=bearer(keys["labels"]),
        )
    assert err.value.status() == "400" and "it answers ['label']" in err.value.message()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer mli_" + "A" * 43},
        {"X-API-Key": "not-a-key"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
)
def test_a_missing_or_wrong_key_is_401(
    served: tuple[ServiceProcess, Store, dict[str, str]], headers: dict[str, str]
) -> None:
    service, store, _ = served
    before = len(store.queries())
    with pytest.raises(InferenceServerException) as err:
        client(service).infer("full", [tensor(batch(1, 5), binary=True)], headers=headers)
    assert err.value.status() == "401" and "key" in err.value.message().lower()
    assert len(store.queries()) == before  # without a valid key: counted, never logged


def test_over_the_rate_limit_is_429_with_retry_after(
    served: tuple[ServiceProcess, Store, dict[str, str]],
) -> None:
    service, _, keys = served
    c = client(service)
    x = batch(30, seed=6)
    c.infer("full", [tensor(x, binary=True)], headers=bearer(keys["limited"]))
    with pytest.raises(InferenceServerException) as err:
        c.infer("full", [tensor(x, binary=True)], headers=bearer(keys["limited"]))
    assert err.value.status() == "429" and "rate limit" in err.value.message()
    doc = {"inputs": [{"name": "input", "shape": [30, 8, 8], "datatype": "FP32"}]}
    doc["inputs"][0]["data"] = x.ravel().tolist()
    r = httpx.post(f"{service.url}/v2/models/full/infer", json=doc, headers=bearer(keys["limited"]))
    assert r.status_code == 429 and set(r.json()) == {"error"}
    assert int(r.headers["Retry-After"]) >= 1
    assert r.headers["RateLimit-Remaining"] == str(BUDGET - 30)


@pytest.mark.parametrize(
    ("tensor_doc", "says"),
    [
        ({"datatype": "FP32", "shape": [2, 8, 8], "data": [0.5] * 100}, "holds 100 numbers"),
        ({"datatype": "BYTES", "shape": [1, 8, 8], "data": ["a"] * 64}, "datatype 'BYTES'"),
        ({"datatype": "FP32", "shape": [1, 8], "data": [0.5] * 8}, "expects a batch of shape"),
        ({"datatype": "FP32", "shape": [1, 8, 8], "data": [[0.5, "x"]] * 32}, "numbers only"),
        ({"datatype": "FP32", "shape": "1,8,8", "data": [0.5] * 64}, "shape must be"),
        ({"datatype": "FP32", "shape": [1, 8, 8], "data": [2.0] * 64}, "[0, 1]"),
        ({"datatype": "FP32", "shape": [0, 8, 8], "data": []}, "empty batch"),
    ],
)
def test_a_malformed_tensor_is_a_clear_400(
    served: tuple[ServiceProcess, Store, dict[str, str]], tensor_doc: dict[str, Any], says: str
) -> None:
    service, _, keys = served
    doc = {"inputs": [{"name": "input", **tensor_doc}]}
    r = httpx.post(
        f"{service.url}/v2/models/full/infer", json=doc, headers=bearer(keys["malformed"])
    )
    assert r.status_code == 400 and says in r.json()["error"], r.text


def test_a_malformed_tensor_from_the_client_is_a_clear_400(
    served: tuple[ServiceProcess, Store, dict[str, str]],
) -> None:
    service, _, keys = served
    c = client(service)
    for t, says in [
        (tensor(batch(1, 7), binary=True, name="pixels"), "one input named 'input'"),
        (tensor(np.zeros((1, 8, 8), np.int32), binary=True, dtype="INT32"), "'INT32'"),
    ]:
        with pytest.raises(InferenceServerException) as err:
            c.infer("full", [t], headers=bearer(keys["malformed"]))
        assert err.value.status() == "400" and says in err.value.message()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 256},
                }
            ]
        }
    ).encode()
    r = httpx.post(
        f"{service.url}/v2/models/full/infer",
        content=header + bytes(100),
        headers={**bearer(keys["malformed"]), "Inference-Header-Content-Length": str(len(header))},
    )
    assert r.status_code == 400 and "100 bytes follow the JSON header" in r.json()["error"]


def _inputs_total(service: ServiceProcess) -> int:
    text = httpx.get(f"{service.url}/metrics").text
    found = re.search(r'^mlinvert_inputs_total\{model="full"\} (\d+)', text, re.MULTILINE)
    return 0 if found is None else int(found.group(1))


def test_each_inference_is_logged_per_input_and_counted(
    served: tuple[ServiceProcess, Store, dict[str, str]],
) -> None:
    service, store, keys = served
    c = client(service)
    counted = _inputs_total(service)
    x, y = batch(3, seed=8), batch(4, seed=9)
    c.infer("full", [tensor(x, binary=False)], headers=bearer(keys["logged"]))
    c.infer("full", [tensor(y, binary=True)], headers={"X-API-Key": keys["logged"]})
    rows = store.queries("logged")
    assert [(q.model, q.n_inputs, q.outcome, q.status) for q in rows] == [
        ("full", 3, "ok", 200),
        ("full", 4, "ok", 200),
    ]
    assert [q.digests for q in rows] == [input_digests(x), input_digests(y)]
    assert store.answered("logged") == 7
    assert _inputs_total(service) == counted + 7


def test_the_protocol_setting_and_what_each_value_serves(tmp_path: Path) -> None:
    """The default serves no /v2 route and the same OpenAPI paths as before; v2 adds
    the /v2 routes beside /v1 (MLINVERT_PROTOCOL or --protocol); anything else is refused."""
    from fastapi.testclient import TestClient
    from toys import ToySoftmax

    from mlinvert.errors import ConfigError
    from mlinvert.service import ServiceSettings, build_predictors, create_app

    def app(protocol: str | None) -> TestClient:
        env = {} if protocol is None else {"MLINVERT_PROTOCOL": protocol}
        config = ServiceSettings.from_env(env, db=tmp_path / f"{protocol}.db")
        assert config.protocol == (protocol or "mlinvert")
        return TestClient(create_app(config, build_predictors({"faces": ToySoftmax()}, config)))

    default, v2 = app(None), app("v2")
    assert default.get("/v2/health/live").status_code == 404
    assert v2.get("/v2/health/live").json() == {"live": True}
    assert v2.get("/healthz").status_code == 200  # the mlinvert routes stay
    for path in ("/v2/nothing", "/v2/models/faces/infer"):  # no route; GET on a POST route
        r = v2.get(path)
        assert r.status_code in (404, 405) and set(r.json()) == {"error"}
    assert default.get("/v2/nothing").json()["error"]["status"] == 404
    paths = {p for p in default.get("/openapi.json").json()["paths"]}
    v2_paths = set(v2.get("/openapi.json").json()["paths"])
    assert not any(p.startswith("/v2") for p in paths)
    assert v2_paths - paths == {
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{name}",
        "/v2/models/{name}/ready",
        "/v2/models/{name}/infer",
    }
    with pytest.raises(ConfigError, match="protocol must be 'mlinvert'"):
        ServiceSettings(db=tmp_path / "x.db", protocol="grpc")


def test_the_query_detector_blocks_a_v2_client_as_a_v1_one(
    tmp_path: Path, model_dir: tuple[Path, Any]
) -> None:
    """Near-duplicate probes over v2 are refused at the batch that crosses the detector's
    count (403, ``{"error"}``), and the flag holds on /v1 too: one Predictor, one detector."""
    from fastapi.testclient import TestClient

    from mlinvert.service import ServiceSettings, build_predictors, create_app

    config = ServiceSettings(db=tmp_path / "s.db", protocol="v2", detector="detect:block:30")
    store = config.open_store()
    key, _ = store.create_key("mallory")
    app = create_app(
        config, build_predictors({"faces": model_dir[1]}, config, flags=store), store=store
    )
    rng = np.random.default_rng(2)
    base = (rng.integers(0, 5, SHAPE) * 0.2 + 0.1).astype(np.float32)
    probes = (base + rng.uniform(-0.05, 0.05, (40, *SHAPE))).astype(np.float32)
    client = TestClient(app, headers=bearer(key))
    statuses = []
    for i in range(4):
        doc = {"inputs": [{"name": "input", "shape": [10, 8, 8], "datatype": "FP32"}]}
        doc["inputs"][0]["data"] = probes[10 * i : 10 * i + 10].ravel().tolist()
        r = client.post("/v2/models/faces/infer", json=doc)
        statuses.append(r.status_code)
    assert statuses == [200, 200, 200, 403] and "unflag" in r.json()["error"]
    v1 = client.post("/v1/models/faces/predict", json={"inputs": probes[:1].tolist()})
    assert v1.status_code == 403
    assert [q.status for q in store.queries("mallory")] == [200, 200, 200, 403, 403]
