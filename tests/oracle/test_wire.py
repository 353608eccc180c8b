"""Wire formats of HttpOracle: Open Inference Protocol (v2), any JSON REST API, auto.

The servers here are small httpx MockTransport handlers that answer as the protocols
say (and as MLServer's scikit-learn runtime was seen to answer); the real MLServer is
in tests/oracle/test_mlserver.py.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest

from mlinvert.attacks import LabelOnly, LabelOnlyConfig, MIFace, MIFaceConfig, parse_gradient
from mlinvert.attacks.spaces import parse_space
from mlinvert.errors import AttackError, ConfigError, OracleError, UnknownModel
from mlinvert.oracle import HttpOracle
from mlinvert.oracle.wire import WireConfig, follow, parse_path

W = np.linspace(-1.0, 1.0, 12).reshape(4, 3)  # a 3-class linear model of 2x2 inputs


def model_probs(rows: np.ndarray) -> np.ndarray:
    z = rows.reshape(len(rows), -1) @ W
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


class V2Server:
    """An Open Inference Protocol model ``m``; ``declare``: the metadata lists the input
    and a probability output (else, like MLServer's scikit-learn runtime, nothing, and
    labels unless the request names ``predict_proba``)."""

    def __init__(self, *, declare: bool = True, proba: bool = True, status: tuple[int, ...] = ()):
        self.declare = declare
        self.proba = proba
        self.status = list(status)
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[httpx.Headers] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.headers.append(request.headers)
        if path == "/v2/models/m" and request.method == "GET":
            return httpx.Response(200, json=self.metadata())
        if path == "/v2/repository/index":
            return httpx.Response(200, json=[{"name": "m", "state": "READY"}])
        if path == "/v2":  # no server metadata: JSON tensors
            return httpx.Response(404, json={"error": "not found"})
        if path != "/v2/models/m/infer":
            return httpx.Response(404, json={"error": f"Model {path.split('/')[3]} not found"})
        if self.status:
            code = self.status.pop(0)
            return httpx.Response(code, headers={"Retry-After": "0.5"}, json={"error": "busy"})
        body = json.loads(request.content)
        response = self.infer(body)
        if response.status_code == 200:  # the bodies answered
            self.bodies.append(body)
        return response

    def metadata(self) -> dict[str, Any]:
        if not self.declare:
            return {"name": "m", "versions": [], "platform": "", "inputs": [], "outputs": []}
        return {
            "name": "m",
            "platform": "onnx",
            "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}],
        }

    def infer(self, body: dict[str, Any]) -> httpx.Response:
        tensor = body["inputs"][0]
        x = np.asarray(tensor["data"], dtype=np.float64).reshape(tensor["shape"])
        p = model_probs(x)
        wanted = [o["name"] for o in body.get("outputs", [])]
        if self.declare:
            out = {"name": "probabilities", "datatype": "FP32", "shape": list(p.shape)}
            return httpx.Response(200, json={"outputs": [{**out, "data": p.ravel().tolist()}]})
        if wanted == ["predict_proba"] and not self.proba:
            return httpx.Response(400, json={"error": "predict_proba is not available"})
        if wanted == ["predict_proba"]:
            out = {"name": "predict_proba", "datatype": "FP64", "shape": list(p.shape)}
            return httpx.Response(200, json={"outputs": [{**out, "data": p.ravel().tolist()}]})
        labels = p.argmax(axis=1)
        out = {"name": "predict", "datatype": "INT64", "shape": [len(labels), 1]}
        return httpx.Response(200, json={"outputs": [{**out, "data": labels.tolist()}]})


def v2_oracle(server: Any, url: str = "http://svc/v2/models/m", **wire: Any) -> HttpOracle:
    return HttpOracle(
        url,
        None,
        client=httpx.Client(transport=httpx.MockTransport(server)),
        wire=WireConfig(protocol=wire.pop("protocol", "v2"), **wire),
        sleep=lambda s: None,
    )


def test_v2_declared_model_reads_metadata_and_counts_every_input() -> None:
    server = V2Server()
    oracle = v2_oracle(server, input_shape=(2, 2), max_batch=4)
    info = oracle.info
    assert (info.input_shape, info.carries, info.n_classes) == ((2, 2), "probs", 3)
    assert info.extra["output"] == "probabilities" and oracle.n_queries == 1  # the probe
    x = np.random.default_rng(0).random((10, 2, 2), dtype=np.float32)
    r = oracle.query(x)
    assert r.probs is not None
    np.testing.assert_allclose(r.probs, model_probs(x), atol=1e-6)
    assert oracle.n_queries == 11 and oracle.n_requests == 1 + 3  # batches of 4, 4, 2
    sent = server.bodies[-1]["inputs"][0]
    assert (sent["name"], sent["shape"], sent["datatype"]) == ("pixels", [2, 4], "FP32")
    assert server.bodies[-1]["outputs"] == [{"name": "probabilities"}]


def test_v2_mlserver_style_asks_for_predict_proba() -> None:
    server = V2Server(declare=False)
    oracle = v2_oracle(server, input_shape=(2, 2), class_names=("a", "b", "c"))
    assert oracle.info.carries == "probs" and oracle.info.extra["output"] == "predict_proba"
    assert oracle.info.class_names == ("a", "b", "c")
    assert server.bodies[0]["inputs"][0]["shape"] == [1, 4]  # flattened: scikit-learn rows
    oracle.query(np.zeros((3, 2, 2), dtype=np.float32))
    assert oracle.n_queries == 4 == sum(b["inputs"][0]["shape"][0] for b in server.bodies)


def test_v2_labels_only_endpoint_runs_label_only_and_refuses_miface() -> None:
    server = V2Server(declare=False, proba=False)
    oracle = v2_oracle(server, input_shape=(2, 2), class_names=("a", "b", "c"))
    assert oracle.info.carries == "label" and oracle.info.extra["output"] is None
    assert "outputs" not in server.bodies[-1]
    miface = MIFace(MIFaceConfig.improved(max_iter=2), gradient=parse_gradient("nes"))
    with pytest.raises(AttackError, match=r"labels only.*label-only"):
        miface.run(oracle, 0, seed=0)
    config = LabelOnlyConfig(start_samples=20, batch_size=20, max_iter=3, n_directions=4)
    attack = LabelOnly(config, space=parse_space("pixel"))
    result = attack.run(oracle, 0, seed=0, budget=200)
    sent = sum(b["inputs"][0]["shape"][0] for b in server.bodies)
    assert result.n_queries > 0 and oracle.n_queries == sent  # the probe included


def test_v2_labels_only_without_classes_says_how_to_fix() -> None:
    oracle = v2_oracle(V2Server(declare=False, proba=False), input_shape=(2, 2))
    with pytest.raises(ConfigError, match=r"labels only.*--classes"):
        _ = oracle.info


def test_v2_bad_endpoints_are_clear_errors() -> None:
    with pytest.raises(UnknownModel, match=r"no model 'other'.*served: m"):
        _ = v2_oracle(V2Server(), "http://svc/v2/models/other").info
    with pytest.raises(ConfigError, match=r"no output 'logits'.*probabilities"):
        _ = v2_oracle(V2Server(), output="logits").info
    with pytest.raises(ConfigError, match="does not declare its input shape"):
        _ = v2_oracle(V2Server(declare=False)).info
    with pytest.raises(ConfigError, match="takes inputs of shape"):
        _ = v2_oracle(V2Server(), input_shape=(3, 3)).info

    class Logits(V2Server):
        def infer(self, body: dict[str, Any]) -> httpx.Response:
            n = body["inputs"][0]["shape"][0]
            out = {"name": "probabilities", "datatype": "FP32", "shape": [n, 3]}
            return httpx.Response(200, json={"outputs": [{**out, "data": [2.0, -1.0, 0.5] * n}]})

    with pytest.raises(OracleError, match="not a probability vector"):
        _ = v2_oracle(Logits()).info


def test_v2_waits_out_a_429_and_retries_a_503() -> None:
    server = V2Server(status=(429, 503))
    oracle = v2_oracle(server)
    assert oracle.info.carries == "probs" and oracle.n_queries == 1


def test_rest_template_scores_path_and_headers() -> None:
    seen: list[httpx.Request] = []

    def api(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        rows = np.asarray(json.loads(request.content)["instances"])
        preds = [{"probabilities": p.tolist()} for p in model_probs(rows)]
        return httpx.Response(200, json={"predictions": preds})

    wire = WireConfig(
        protocol="rest",
        request='{"instances": $INPUTS, "signature": "serve"}',
        scores="predictions[*].probabilities",
        headers=WireConfig.parse_headers(["X-Token: s3cret"]),
        input_shape=(4,),
    )
    client = httpx.Client(transport=httpx.MockTransport(api))
    oracle = HttpOracle("http://svc/predict", None, client=client, wire=wire)
    x = np.random.default_rng(1).random((5, 4), dtype=np.float32)
    probs = oracle.query(x).probs
    assert probs is not None
    np.testing.assert_allclose(probs, model_probs(x), atol=1e-6)
    assert oracle.info.n_classes == 3 and oracle.n_queries == 6
    assert seen[-1].headers["X-Token"] == "s3cret" and "Authorization" not in seen[-1].headers
    assert "s3cret" not in json.dumps(wire.to_dict())
    wrong = WireConfig(**{**vars(wire), "scores": "outputs[*].probs"})
    oracle = HttpOracle("http://svc/predict", None, client=client, wire=wrong)
    with pytest.raises(OracleError, match="does not match the answer: no 'outputs'"):
        _ = oracle.info


def test_wire_config_refuses_bad_values() -> None:
    with pytest.raises(ConfigError, match="--protocol must be one of"):
        WireConfig(protocol="grpc")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs --request"):
        WireConfig(protocol="rest")
    with pytest.raises(ConfigError, match=r"no \$INPUTS"):
        WireConfig(protocol="rest", request="{}", scores="a")
    with pytest.raises(ConfigError, match="not JSON"):
        WireConfig(protocol="rest", request="{$INPUTS}", scores="a")
    with pytest.raises(ConfigError, match="not a path"):
        WireConfig(protocol="rest", request="$INPUTS", scores="a..b")
    with pytest.raises(ConfigError, match="Name: value"):
        WireConfig.parse_headers(["no colon"])
    with pytest.raises(ConfigError, match="112x92"):
        WireConfig.parse_shape("112 by 92")
    assert WireConfig.parse_shape("112x92") == (112, 92)
    assert parse_path("a[*].b[0]") == ("a", None, "b", 0)
    assert follow({"a": [{"b": [7]}, {"b": [8]}]}, parse_path("a[*].b[0]"), "") == [7, 8]


def test_auto_detects_v2_and_names_what_it_tried() -> None:
    oracle = v2_oracle(V2Server(), protocol="auto")
    assert oracle.info.extra["protocol"] == "v2" and oracle.protocol == "v2"

    def nothing(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, text="not found")

    lost = v2_oracle(nothing, "http://svc/api/predict", protocol="auto")
    with pytest.raises(OracleError, match=r"tried mlinvert \(.*\); v2 \(.*\); rest \(.*--request"):
        _ = lost.info
