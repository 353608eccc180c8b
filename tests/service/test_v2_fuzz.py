"""Hypothesis over the Open Inference Protocol's infer body: any bytes, any JSON,
near-valid tensors in JSON and binary form, and the whole route. Each either decodes
(and the Predictor checks it) or is refused with an MlinvertError (a 4xx), never more;
every refusal over HTTP is ``{"error": message}``."""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from toys import ToySoftmax, ToyTabular

from mlinvert.defenses import Predictor, parse_policy
from mlinvert.errors import MlinvertError
from mlinvert.service import ServiceSettings, Store, build_predictors, create_app
from mlinvert.service.v2 import parse_infer
from mlinvert.targets.base import Target

with warnings.catch_warnings():  # starlette warns that its TestClient will move to httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

FUZZ = settings(max_examples=300, deadline=None, database=None, derandomize=True)
FACES = Predictor(ToySoftmax(), name="faces", policy=parse_policy("full"), max_batch=8)
LABELS = Predictor(ToySoftmax(), name="labels", policy=parse_policy("labels"), max_batch=8)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=40,
)
fields = st.sampled_from(["id", "parameters", "inputs", "outputs", "x"])
tensor_fields = st.sampled_from(["name", "shape", "datatype", "data", "parameters", "y"])
lengths = st.none() | st.integers(0, 400)


def decoded_or_refused(body: bytes, length: int | None, predictor: Predictor = FACES) -> None:
    try:
        x, ask = parse_infer(body, length, predictor)
        predictor.validate(x)
    except MlinvertError:
        return
    assert isinstance(x, np.ndarray) and x.shape[0] <= predictor.max_batch
    assert all(name in ("probabilities", "label") for name, _ in ask.outputs)


@FUZZ
@given(body=st.binary(max_size=300), length=lengths)
def test_any_bytes_decode_or_are_refused(body: bytes, length: int | None) -> None:
    decoded_or_refused(body, length)


@FUZZ
@given(
    doc=st.dictionaries(fields, json_values),
    tensor=st.dictionaries(tensor_fields, json_values),
    outputs=json_values,
)
def test_any_json_document_decodes_or_is_refused(
    doc: dict[str, Any], tensor: dict[str, Any], outputs: Any
) -> None:
    decoded_or_refused(json.dumps(doc).encode(), None)
    doc = {**doc, "inputs": [tensor], "outputs": outputs}
    decoded_or_refused(json.dumps(doc).encode(), None)
    decoded_or_refused(json.dumps(doc).encode(), None, LABELS)


@FUZZ
@given(
    n=st.integers(0, 9),
    rows=st.integers(5, 7),
    value=st.sampled_from([0, 1, 0.5, 1e300, -0.0, 5e-324, True, "0.5", None]),
    datatype=st.sampled_from(["FP32", "FP64", "INT32", "BYTES", "fp32"]),
    binary=st.booleans(),
    cut=st.integers(-5, 5),
    size_cut=st.sampled_from([0, 0, 1, -4]),
    outputs=st.lists(
        st.sampled_from(["label", "probabilities", "confidence", "label", 3]), max_size=3
    ),
    out_binary=st.sampled_from([True, False, None, "yes"]),
    nested=st.booleans(),
)
def test_near_valid_tensors_decode_or_are_refused(
    n: int,
    rows: int,
    value: Any,
    datatype: str,
    binary: bool,
    cut: int,
    size_cut: int,
    outputs: list[Any],
    out_binary: Any,
    nested: bool,
) -> None:
    shape = [n, rows, 5]
    tensor: dict[str, Any] = {"name": "input", "shape": shape, "datatype": datatype}
    tail = b""
    if binary:
        itemsize = 8 if datatype == "FP64" else 4
        tail = np.zeros(n * rows * 5 * itemsize, np.uint8).tobytes()
        tensor["parameters"] = {"binary_data_size": len(tail) + size_cut}
        tail = tail[: max(0, len(tail) + cut)]
    else:
        data = [[[value] * 5] * rows] * n if nested else [value] * (n * rows * 5 + cut)
        tensor["data"] = data
    asked = [{"name": o, "parameters": {"binary_data": out_binary}} for o in outputs]
    header = json.dumps({"inputs": [tensor], "outputs": asked}).encode()
    decoded_or_refused(header + tail, len(header) if binary else None)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_infer_route_never_answers_5xx(store: Store, api_key: str) -> None:
    config = ServiceSettings(
        db=store.path, protocol="v2", max_batch=8, max_body_bytes=4096, rate_limit="50/minute"
    )
    models: dict[str, Target] = {"faces": ToySoftmax(), "survey": ToyTabular()}
    client = TestClient(create_app(config, build_predictors(models, config), store=store))
    seen: set[int] = set()

    @settings(
        max_examples=250,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        model=st.sampled_from(["faces", "survey", "nobody", "x" * 300]),
        body=st.binary(max_size=300)
        | json_values.map(
            lambda v: json.dumps(
                {"inputs": [{"name": "input", "shape": [1, 6, 5], "datatype": "FP32", "data": v}]}
            ).encode()
        ),
        length=st.none()
        | st.sampled_from([b"0", b"12", b"299", b"99999", b"x", b"-1", b"1e3", "²".encode()]),
        keyed=st.booleans(),
    )
    def run(model: str, body: bytes, length: bytes | None, keyed: bool) -> None:
        headers: dict[str, str | bytes] = {"X-API-Key": api_key} if keyed else {}
        if length is not None:
            headers["Inference-Header-Content-Length"] = length
        r = client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
        seen.add(r.status_code)
        assert r.status_code < 500, r.text
        if r.status_code >= 400:
            assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)

    run()
    assert {400, 401, 404} <= seen, seen  # every refusal was reached
    assert "mlinvert_server_errors_total{" not in client.get("/metrics").text
