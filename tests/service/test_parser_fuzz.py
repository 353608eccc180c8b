"""Hypothesis over every parser of a prediction request: the raw ``shape`` and ``dtype``
parameters, raw bytes, JSON bodies (any bytes, any JSON, near-valid batches) and the
whole route. Each either decodes or refuses with an MlinvertError (a 4xx), never more."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import simdjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from toys import ToySoftmax, ToyTabular

from mlinvert.defenses import Predictor, parse_policy
from mlinvert.errors import MlinvertError
from mlinvert.service import Store, bodies
from mlinvert.service.bodies import (
    decode_json,
    decode_raw,
    inputs_array,
    parse_raw_shape,
    raw_spec,
)

FUZZ = settings(max_examples=300, deadline=None, database=None, derandomize=True)
FACES = Predictor(ToySoftmax(), name="faces", policy=parse_policy("full"), max_batch=8)
SURVEY = Predictor(ToyTabular(), name="survey", policy=parse_policy("full"), max_batch=8)

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
numbers = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 0.5, 1e300, -0.0, 5e-324]),
)
sizes = st.sampled_from(["1", "6", "5", "0", "8", "9", "30", "999999999", "²", "٥", " 6", "-1", ""])
shapes = st.lists(sizes, max_size=10).map(",".join) | st.text(max_size=20)
dtypes = st.sampled_from(["float32", "uint8", "float64", "", "FLOAT32", "int8"]) | st.text(
    max_size=8
)


def decoded_or_refused(decode: Callable[[], np.ndarray]) -> None:
    try:
        x = decode()
    except MlinvertError:
        return
    assert isinstance(x, np.ndarray)


@FUZZ
@given(text=shapes)
def test_raw_shape_parses_or_is_refused(text: str) -> None:
    try:
        shape = parse_raw_shape(text)
    except MlinvertError:
        return
    assert all(isinstance(n, int) and n >= 0 for n in shape) and 1 <= len(shape) <= 8


@FUZZ
@given(shape=shapes, dtype=dtypes, body=st.binary(max_size=300))
def test_raw_requests_decode_or_are_refused(shape: str, dtype: str, body: bytes) -> None:
    def decode() -> np.ndarray:
        x = decode_raw(body, raw_spec(shape, dtype, FACES))
        return FACES.validate(x)

    decoded_or_refused(decode)


@FUZZ
@given(body=st.binary(max_size=200))
def test_any_bytes_as_json_decode_or_are_refused(body: bytes) -> None:
    decoded_or_refused(lambda: FACES.validate(decode_json(body, FACES)))


@FUZZ
@given(doc=st.dictionaries(st.sampled_from(["inputs", "binary", "records", "x"]), json_values))
def test_any_json_document_decodes_or_is_refused(doc: dict[str, Any]) -> None:
    body = json.dumps(doc).encode()
    decoded_or_refused(lambda: FACES.validate(decode_json(body, FACES)))
    decoded_or_refused(lambda: SURVEY.validate(decode_json(body, SURVEY)))


@FUZZ
@given(
    x=arrays(
        np.float64,
        array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4),
        elements=st.floats(allow_nan=False, allow_infinity=False),
    ),
    ints=st.booleans(),
    indent=st.sampled_from([None, 1]),
)
def test_the_fast_inputs_path_reads_every_regular_array_as_the_general_path(
    x: np.ndarray, ints: bool, indent: int | None
) -> None:
    values = x.clip(-(2**53), 2**53).round().astype(np.int64) if ints else x
    body = json.dumps({"inputs": values.tolist()}, indent=indent).encode()
    fast = inputs_array(body, FACES.max_batch)
    assert fast is not None and fast.dtype == np.float64
    assert np.array_equal(fast, np.asarray(json.loads(body)["inputs"], dtype=np.float64))


@FUZZ
@given(doc=st.dictionaries(st.sampled_from(["inputs", "binary", "x"]), json_values, min_size=1))
def test_the_fast_inputs_path_reads_the_general_paths_array_or_declines(
    doc: dict[str, Any],
) -> None:
    body = json.dumps(doc).encode()
    fast = inputs_array(body, FACES.max_batch)
    if fast is not None:  # the general path must make the same array of it
        general = np.asarray(json.loads(body)["inputs"])
        assert general.dtype.kind in "fiu" and general.dtype != np.bool_
        assert np.array_equal(fast, general.astype(np.float64))


@pytest.mark.parametrize(
    "body",
    [
        b'{"inputs": [[0.1, [0.2]]]}',  # a leaf list holding a one-number list
        b'{"inputs": [[0.1], [0.2, 0.3]]}',  # ragged
        b'{"inputs": [[1, 2], 3]}',  # a number beside a list
        b'{"inputs": [[[1]], [2]]}',
        b'{"inputs": [[], []]}',
        b'{"inputs": [true, 0.5]}',
        b'{"inputs": ["0.5"]}',
        b'{"inputs": [NaN]}',
        b'{"inputs": [1e400]}',
        b'{"inputs": [1], "inputs": [2]}',  # a repeated key: the general path decides
        b'{"inputs": [1], "binary": null}',  # another field: the general path refuses it
        b'{"inputs": [0, 0, 0, 0, 0, 0, 0, 0, 0]}',  # over the batch limit of 8
        b'{"inputs": 0.5}',
        b"[0.5]",
        b'{"inputs": ' + b"[" * 9 + b"0.5" + b"]" * 9 + b"}",  # 9 dimensions
    ],
)
def test_the_fast_inputs_path_declines_what_it_cannot_read_exactly(body: bytes) -> None:
    assert inputs_array(body, FACES.max_batch) is None
    decoded_or_refused(lambda: FACES.validate(decode_json(body, FACES)))


@FUZZ
@given(
    n=st.integers(0, 9),
    rows=st.integers(5, 7),
    cols=st.integers(4, 6),
    value=numbers,
    dtype=st.sampled_from(["float32", "uint8", "int16"]),
    cut=st.integers(-3, 3),
    form=st.sampled_from(["inputs", "binary"]),
)
def test_near_valid_batches_decode_or_are_refused(
    n: int, rows: int, cols: int, value: float, dtype: str, cut: int, form: str
) -> None:
    if form == "inputs":
        doc: dict[str, Any] = {"inputs": [[[value] * cols] * rows] * n}
    else:
        raw = np.zeros(n * rows * cols, dtype="<f4" if dtype != "uint8" else np.uint8).tobytes()
        raw = raw[: max(0, len(raw) + cut)]
        doc = {
            "binary": {
                "dtype": dtype,
                "shape": [n, rows, cols],
                "data": base64.b64encode(raw).decode(),
            }
        }
    body = json.dumps(doc).encode()
    decoded_or_refused(lambda: FACES.validate(decode_json(body, FACES)))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_route_never_answers_5xx(
    make_client: Callable[..., Any], store: Store, api_key: str
) -> None:
    client = make_client(store, max_batch=8, max_body_bytes=4096)
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
        content_type=st.sampled_from(
            ["application/json", "application/octet-stream", "", "text/plain"]
        ),
        shape=shapes,
        dtype=dtypes,
        body=st.binary(max_size=300)
        | json_values.map(lambda v: json.dumps({"inputs": v}).encode()),
        keyed=st.booleans(),
    )
    def run(
        model: str, content_type: str, shape: str, dtype: str, body: bytes, keyed: bool
    ) -> None:
        headers = {"X-API-Key": api_key} if keyed else {}
        if content_type:
            headers["Content-Type"] = content_type
        r = client.post(
            f"/v1/models/{model}/predict",
            content=body,
            params={"shape": shape, "dtype": dtype},
            headers=headers,
        )
        seen.add(r.status_code)
        assert r.status_code < 500, r.text
        assert r.json()["error"]["status"] == r.status_code if r.status_code >= 400 else True

    run()
    assert {400, 401, 404, 415, 422} <= seen, seen  # every refusal was reached
    assert "mlinvert_server_errors_total{" not in client.get("/metrics").text


def test_the_kept_parser_is_reused_and_a_busy_one_is_not_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[object] = []
    real = simdjson.Parser

    def counted() -> simdjson.Parser:
        made.append(1)
        return real()

    monkeypatch.setattr(simdjson, "Parser", counted)
    body = json.dumps({"inputs": [[0.25, 0.5], [1, 0]]}).encode()
    for bad in (b'{"inputs": [[0.1, [0.2]]]}', b"{", body):  # declined, broken, read
        inputs_array(bad, FACES.max_batch)
    fast = inputs_array(body, FACES.max_batch)
    assert fast is not None and fast.tolist() == [[0.25, 0.5], [1.0, 0.0]]
    assert made == []  # every body above went through the one kept parser
    _, lock = bodies._PARSER
    with lock:  # another request is parsing: this one does not wait, it makes its own
        busy = inputs_array(body, FACES.max_batch)
    assert busy is not None and busy.tolist() == fast.tolist() and made == [1]
