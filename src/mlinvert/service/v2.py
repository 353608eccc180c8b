"""The Open Inference Protocol (KServe v2) over the same defended Predictor.

``POST /v2/models/{name}/infer`` reads one input tensor, named ``input``, datatype
FP32 (or FP64), ``shape`` ``[n, *input_shape]``, its ``data`` flat or nested in JSON or
its bytes after the JSON header (the binary tensor data extension: the header's length
in ``Inference-Header-Content-Length``, the tensor's in ``parameters.binary_data_size``).
It answers the outputs the policy lets out: ``probabilities`` (FP64 ``[n, classes]``)
and ``confidence`` (FP64 ``[n]``, a confidence model's) unless the policy answers
labels only, and ``label`` (INT64 ``[n]``) always; each as JSON ``data`` or, when asked
(``binary_data_output``, or an output's ``binary_data``), as little-endian bytes after
the header. Refusals are ``{"error": message}``; a mlinvert 415 or 422 is a v2 400.

:class:`V2Handler` is the mlinvert handler with these hooks, so the key, body limits,
body budget, rate limit, detector, query log and metrics are the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import orjson
from starlette.responses import JSONResponse

from mlinvert.core import Response as Answer
from mlinvert.defenses.predictor import Predictor
from mlinvert.errors import BadRequest, InputTooLarge, MlinvertError, QueryRejected
from mlinvert.service.bodies import JSON_OVERHEAD, json_body_limit
from mlinvert.service.errors import error_headers, status_of
from mlinvert.service.handler import Admitted, Head, Outcome, PredictHandler
from mlinvert.service.predictors import max_batch_of

#: The request header announcing the JSON header's length (binary tensor data).
HEADER_LENGTH = "Inference-Header-Content-Length"
INFER_ROUTE = "/v2/models/{name}/infer"
#: The one version every served model has.
VERSION = "1"
INPUT = "input"
PROBS, CONFIDENCE, LABEL = "probabilities", "confidence", "label"
_DTYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
#: The scores' datatype: the Predictor's own (float64, as its policies compute them), so a
#: v2 client reads the very numbers /v1 and an in-process oracle read, in JSON as in bytes
#: (FP32 in JSON is the float32's shortest decimal, which a client reads back as another
#: double: an attack's trajectory then parts from theirs at the last bits).
SCORES = "FP64"
_REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs"})
_TENSOR_KEYS = frozenset({"name", "shape", "datatype", "data", "parameters"})


def v2_status(exc: MlinvertError) -> int:
    """The v2 status of a refusal: the mlinvert one, with 415 and 422 as 400."""
    status = status_of(exc)
    return 400 if status in (415, 422) else status


def v2_error_response(exc: MlinvertError) -> JSONResponse:
    """``{"error": message}`` with the status and headers (Retry-After, WWW-Authenticate)."""
    return JSONResponse({"error": str(exc)}, status_code=v2_status(exc), headers=error_headers(exc))


def output_specs(predictor: Predictor) -> list[dict[str, Any]]:
    """The outputs ``predictor``'s policy lets out, as model metadata lists them."""
    carries = predictor.info.carries
    specs: list[dict[str, Any]] = []
    if carries != "label":
        k = len(predictor.info.class_names)
        specs.append({"name": PROBS, "datatype": SCORES, "shape": [-1, k]})
    if carries == "confidence":
        specs.append({"name": CONFIDENCE, "datatype": SCORES, "shape": [-1]})
    specs.append({"name": LABEL, "datatype": "INT64", "shape": [-1]})
    return specs


def model_metadata(predictor: Predictor) -> dict[str, Any]:
    """``GET /v2/models/{name}``: the model's one input and its outputs."""
    return {
        "name": predictor.name,
        "versions": [VERSION],
        "platform": "mlinvert",
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, *predictor.info.input_shape]}],
        "outputs": output_specs(predictor),
    }


@dataclass(frozen=True)
class InferAsk:
    """What an infer request asks of its answer besides the batch: the ``id`` to echo,
    the outputs by name with whether each goes as binary (empty: every output, binary
    when ``binary_default``)."""

    id: str | None
    outputs: tuple[tuple[str, bool], ...]
    binary_default: bool


def header_length(text: str | None) -> int | None:
    """``Inference-Header-Content-Length``: None when absent, else its ASCII digits."""
    if text is None:
        return None
    text = text.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        raise BadRequest(
            f"{HEADER_LENGTH} {text[:40]!r} must be the JSON header's length in bytes, e.g. 120"
        )
    return int(text)


def parse_infer(
    body: bytes | bytearray, length: int | None, predictor: Predictor
) -> tuple[np.ndarray, InferAsk]:
    """An infer request body (``length``: its JSON header's bytes when binary data
    follows) as the batch and what the answer should hold; BadRequest/QueryRejected
    (400) or InputTooLarge (413) saying what to fix."""
    if length is not None and length > len(body):
        raise BadRequest(f"{HEADER_LENGTH} is {length} but the body holds only {len(body)} bytes")
    header = body if length is None else body[:length]
    tail = memoryview(body)[len(header) :]
    doc = _load(header)
    unknown = sorted(set(doc) - _REQUEST_KEYS)
    if unknown:
        raise QueryRejected(
            f"unknown field(s) {unknown[:5]} in the infer request; it takes {sorted(_REQUEST_KEYS)}"
        )
    params = _object(doc.get("parameters", {}), "parameters")
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise QueryRejected("parameters.binary_data_output must be true or false")
    ident = doc.get("id")
    if ident is not None and not isinstance(ident, str):
        raise QueryRejected("id must be a string")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise QueryRejected(
            f"'inputs' must be a list of one tensor (model {predictor.name!r} takes one "
            f"input, {INPUT!r}; GET /v2/models/{predictor.name} describes it)"
        )
    x = _tensor(inputs[0], tail, predictor)
    outputs = _requested(doc.get("outputs"), predictor)
    return x, InferAsk(ident, outputs, binary_default)


def _load(header: bytes | bytearray | memoryview) -> dict[str, Any]:
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(
            f"the infer request is not valid JSON (UTF-8): {exc.msg} at byte {exc.pos}"
            + (
                f"; binary data may follow it only with {HEADER_LENGTH}"
                if "trailing" in exc.msg
                else ""
            )
        ) from None
    if not isinstance(doc, dict):
        raise QueryRejected("the infer request must be a JSON object with 'inputs'")
    return doc


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise QueryRejected(f"{where} must be a JSON object")
    return value


def _tensor(tensor: Any, tail: memoryview, predictor: Predictor) -> np.ndarray:
    """The input tensor as an array shaped as it says (its values are checked by the
    Predictor: range, finiteness, the input shape)."""
    tensor = _object(tensor, "inputs[0]")
    unknown = sorted(set(tensor) - _TENSOR_KEYS)
    if unknown:
        raise QueryRejected(f"unknown field(s) {unknown[:5]} in inputs[0]")
    if tensor.get("name") != INPUT:
        raise QueryRejected(
            f"inputs[0].name is {str(tensor.get('name'))[:40]!r}: model {predictor.name!r} "
            f"takes one input named {INPUT!r}"
        )
    dtype = _DTYPES.get(str(tensor.get("datatype")))
    if dtype is None:
        raise QueryRejected(
            f"inputs[0].datatype {str(tensor.get('datatype'))[:20]!r} is not supported: "
            f"send {' or '.join(_DTYPES)} (values in [0, 1])"
        )
    shape = _shape(tensor.get("shape"), predictor)
    count = math.prod(shape)
    size = _object(tensor.get("parameters", {}), "inputs[0].parameters").get("binary_data_size")
    if size is None:
        if len(tail):
            raise QueryRejected(
                f"{len(tail)} bytes follow the JSON header but inputs[0] has no "
                "parameters.binary_data_size"
            )
        return _json_data(tensor.get("data"), shape, count)
    if "data" in tensor:
        raise QueryRejected("inputs[0] has both 'data' and parameters.binary_data_size")
    if not isinstance(size, int) or isinstance(size, bool) or size != count * dtype.itemsize:
        raise QueryRejected(
            f"inputs[0].parameters.binary_data_size is {str(size)[:20]} but shape "
            f"{shape} of {tensor['datatype']} needs {count * dtype.itemsize} bytes"
        )
    if len(tail) != size:
        raise QueryRejected(
            f"{len(tail)} bytes follow the JSON header ({HEADER_LENGTH}) but "
            f"inputs[0].parameters.binary_data_size says {size}"
        )
    return np.frombuffer(tail, dtype=dtype).reshape(shape)


def _shape(shape: Any, predictor: Predictor) -> list[int]:
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 8
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)
    ):
        raise QueryRejected(
            f"inputs[0].shape must be 1 to 8 non-negative integers, [n, "
            f"{', '.join(map(str, predictor.info.input_shape))}] for model {predictor.name!r}"
        )
    if shape[0] == 0:
        raise QueryRejected("empty batch: send at least one input")
    limit = predictor.max_batch
    if shape[0] > limit:
        raise InputTooLarge(
            f"batch of {shape[0]} inputs exceeds the limit of {limit}; "
            "split it into smaller batches"
        )
    return shape


def _json_data(data: Any, shape: list[int], count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise QueryRejected("inputs[0].data must be a list of numbers (flat or nested)")
    try:
        x = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise QueryRejected(
            "inputs[0].data is ragged or not numbers: send the numbers flat (row-major) "
            "or nested as the shape says"
        ) from None
    if x.dtype.kind not in "fiu":
        raise QueryRejected("inputs[0].data must hold numbers only")
    if x.size != count:
        raise QueryRejected(
            f"inputs[0].data holds {x.size} numbers but shape {shape} needs {count}"
        )
    return x.reshape(shape)


def _requested(outputs: Any, predictor: Predictor) -> tuple[tuple[str, bool], ...]:
    """The outputs asked for by name (each with ``parameters.binary_data``)."""
    if outputs is None:
        return ()
    names = [spec["name"] for spec in output_specs(predictor)]
    if not isinstance(outputs, list):
        raise QueryRejected(f"'outputs' must be a list of {{'name': ...}}, names {names}")
    asked: list[tuple[str, bool]] = []
    for i, out in enumerate(outputs):
        out = _object(out, f"outputs[{i}]")
        name, params = out.get("name"), _object(out.get("parameters", {}), "parameters")
        if name not in names or name in dict(asked):
            raise QueryRejected(
                f"outputs[{i}].name {str(name)[:40]!r} is not an output of model "
                f"{predictor.name!r} under its policy, or asked twice: it answers {names}"
            )
        if "classification" in params:
            raise QueryRejected("the classification extension is not supported; ask 'label'")
        binary = params.get("binary_data", False)
        if not isinstance(binary, bool):
            raise QueryRejected(f"outputs[{i}].parameters.binary_data must be true or false")
        asked.append((str(name), binary))
    return tuple(asked)


def encode_infer(name: str, response: Answer, ask: InferAsk) -> Outcome:
    """The infer answer: the asked outputs as JSON data, or as bytes after the header."""
    tensors: dict[str, np.ndarray] = {}
    if response.probs is not None:
        tensors[PROBS] = np.ascontiguousarray(response.probs, dtype=_DTYPES[SCORES])
    if response.confidence is not None:
        tensors[CONFIDENCE] = np.ascontiguousarray(response.confidence, dtype=_DTYPES[SCORES])
    tensors[LABEL] = np.ascontiguousarray(response.labels, dtype="<i8")
    wanted = ask.outputs or tuple((n, ask.binary_default) for n in tensors)
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for out_name, binary in wanted:
        array = tensors[out_name]
        out: dict[str, Any] = {
            "name": out_name,
            "datatype": "INT64" if out_name == LABEL else SCORES,
            "shape": list(array.shape),
        }
        if binary:
            chunks.append(array.tobytes())
            out["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            out["data"] = array.ravel()
        outputs.append(out)
    doc: dict[str, Any] = {"model_name": name, "model_version": VERSION, "outputs": outputs}
    if ask.id is not None:
        doc["id"] = ask.id
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return Outcome(200, body=header)
    return Outcome(
        200,
        body=b"".join([header, *chunks]),
        headers={HEADER_LENGTH: str(len(header))},
        media_type="application/octet-stream",
    )


def v2_too_large(size: int, *, limit: int, predictor: Predictor, binary: bool) -> InputTooLarge:
    """The refusal of an infer body over ``limit`` bytes."""
    fix = "send smaller batches" + (
        "" if binary else f" or the binary tensor data extension ({HEADER_LENGTH})"
    )
    return InputTooLarge(
        f"request body of {size} bytes exceeds the limit of {limit} bytes for an infer "
        f"request to model {predictor.name!r} (its largest batch of "
        f"{max_batch_of(predictor)} inputs); {fix}"
    )


class V2Handler(PredictHandler):
    """:class:`PredictHandler` speaking the Open Inference Protocol."""

    route = INFER_ROUTE
    render = staticmethod(v2_error_response)

    def limits(self, head: Head, predictor: Predictor) -> tuple[int, None]:
        """JSON: the mlinvert JSON limit; binary: 8 bytes a number (FP64) plus the header."""
        length = header_length(head.header_length)
        if length is None:
            limit = json_body_limit(predictor, self.max_body)
        else:
            numbers = max_batch_of(predictor) * math.prod(predictor.model.input_shape_)
            limit = min(self.max_body, JSON_OVERHEAD + numbers * 8)
        if head.declared is not None and head.declared > limit:
            raise v2_too_large(
                head.declared, limit=limit, predictor=predictor, binary=length is not None
            )
        return limit, None

    def raw_body(self, head: Head) -> bool:
        """A binary body (its tensor bytes need no decoding room)."""
        return head.header_length is not None

    def body_too_large(self, head: Head, admitted: Admitted) -> partial[InputTooLarge]:
        """The error for a body that runs past ``admitted.limit`` while it is read."""
        return partial(
            v2_too_large,
            limit=admitted.limit,
            predictor=admitted.predictor,
            binary=self.raw_body(head),
        )

    def decode(self, data: bytearray, admitted: Admitted, head: Head) -> tuple[np.ndarray, Any]:
        """The batch of an infer request and what its answer should hold."""
        return parse_infer(data, header_length(head.header_length), admitted.predictor)

    def encode(self, head: Head, predictor: Predictor, response: Answer, asked: Any) -> Outcome:
        """The infer answer (see :func:`encode_infer`)."""
        return encode_infer(head.name, response, asked)

    def status(self, error: MlinvertError) -> int:
        """The v2 status of a refusal (see :func:`v2_status`)."""
        return v2_status(error)
