"""Request bodies of a prediction: reading them within limits, and decoding the JSON
form (``inputs``, ``binary`` base64 or ``records``) and the raw form (array bytes with
``shape`` and ``dtype`` query parameters) into the array a model takes."""

from __future__ import annotations

import binascii
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import orjson
import simdjson
from pydantic import ValidationError
from starlette.types import Receive

from mlinvert.defenses.predictor import Predictor
from mlinvert.errors import (
    BadRequest,
    ClientDisconnected,
    InputTooLarge,
    MlinvertError,
    QueryRejected,
    RequestTimeout,
    UnsupportedMediaType,
)
from mlinvert.service.predictors import max_batch_of
from mlinvert.service.schemas import BinaryArray, NestedNumbers, PredictRequest, Scalar
from mlinvert.targets.base import Tabular


def validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def decode_batch(request: PredictRequest, predictor: Predictor) -> np.ndarray:
    """Turn one of ``inputs`` / ``binary`` / ``records`` into the array the model takes."""
    given = [f for f in ("inputs", "binary", "records") if getattr(request, f) is not None]
    if len(given) != 1:
        raise QueryRejected(
            "send exactly one of 'inputs' (nested lists), 'binary' (base64 array with dtype "
            f"and shape) or 'records' (survey records); got {given or 'none'}"
        )
    rows = request.inputs if request.inputs is not None else request.records
    if rows is not None and len(rows) == 0:
        raise QueryRejected("empty batch: send at least one input")
    if request.inputs is not None:
        return _decode_inputs(request.inputs, predictor)
    if request.binary is not None:
        return _decode_binary(request.binary, predictor)
    return _decode_records(request.records or [], predictor)


def _decode_inputs(inputs: NestedNumbers, predictor: Predictor) -> np.ndarray:
    limit = predictor.max_batch
    if len(inputs) > limit:
        raise InputTooLarge(
            f"batch of {len(inputs)} inputs exceeds the limit of {limit}; "
            "split it into smaller batches"
        )
    try:
        x = np.asarray(inputs)
    except (ValueError, TypeError, OverflowError) as exc:
        if "maximum number of dimension" in str(exc):
            raise QueryRejected(
                "inputs are lists nested deeper than 64 levels; every input must be "
                f"nested lists of numbers shaped {tuple(predictor.model.input_shape_)}"
            ) from None
        raise QueryRejected(
            "inputs are ragged or not numbers: every input must be nested lists of numbers "
            f"shaped {tuple(predictor.model.input_shape_)}"
        ) from None
    if x.dtype.kind not in "fiu":
        what = {"b": "booleans", "U": "strings", "S": "strings"}.get(
            x.dtype.kind, "values that are not all numbers"
        )
        raise QueryRejected(f"inputs must be numbers, got {what}")
    return x


def _decode_binary(b: BinaryArray, predictor: Predictor) -> np.ndarray:
    limit = predictor.max_batch
    if b.shape[0] > limit:
        raise InputTooLarge(
            f"batch of {b.shape[0]} inputs exceeds the limit of {limit}; "
            "split it into smaller batches"
        )
    try:
        # bytes decode about twice as fast as str in CPython's binascii
        raw = binascii.a2b_base64(b.data.encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError):
        hint = (
            ": it holds line breaks or spaces; send it on one line (base64.b64encode, "
            "not base64.encodebytes)"
            if any(c in b.data for c in "\n\r \t")
            else ""
        )
        raise BadRequest(f"binary.data is not valid base64{hint}") from None
    dtype = np.dtype("<f4") if b.dtype == "float32" else np.dtype(np.uint8)
    expected = math.prod(b.shape) * dtype.itemsize
    if len(raw) != expected:
        raise QueryRejected(
            f"binary.data holds {len(raw)} bytes but shape {b.shape} of {b.dtype} needs {expected}"
        )
    array = np.frombuffer(raw, dtype=dtype).reshape(b.shape)
    if b.dtype == "uint8":
        return array.astype(np.float32) / np.float32(255.0)
    return array.astype(np.float32)


def _decode_records(records: list[dict[str, Scalar]], predictor: Predictor) -> np.ndarray:
    limit = predictor.max_batch
    model = predictor.model
    if not isinstance(model, Tabular):
        raise QueryRejected(
            f"model {predictor.name!r} ({model.kind}) takes arrays: send 'inputs' or 'binary', "
            "not 'records'"
        )
    if len(records) > limit:
        raise InputTooLarge(
            f"batch of {len(records)} records exceeds the limit of {limit}; "
            "split it into smaller batches"
        )
    try:
        return np.asarray(model.encode_records(list(records)))
    except MlinvertError:
        raise
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise QueryRejected(f"records could not be encoded: {exc}") from None


RAW_TYPE = "application/octet-stream"
JSON_TYPE = "application/json"


def check_content_type(content_type: str) -> None:
    """Refuse a body type the service does not read (a missing Content-Type is JSON).

    ``content_type`` is the lower-cased media type without parameters.
    """
    if content_type in ("", JSON_TYPE, RAW_TYPE):
        return
    raise UnsupportedMediaType(
        f"Content-Type {content_type[:100]!r} is not supported: send {JSON_TYPE} (a body "
        f"with 'inputs', 'binary' or 'records') or {RAW_TYPE} (raw array bytes with the "
        "query parameters shape and dtype)"
    )


_RAW_DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "uint8": np.dtype(np.uint8)}


def parse_raw_shape(text: str | None) -> tuple[int, ...]:
    """The ``shape`` query parameter of a raw request: comma-separated sizes, e.g. ``64,112,92``.

    Only ASCII digits count (``str.isdigit`` also takes superscripts such as ``²``, which
    ``int`` then refuses).
    """
    if text is None or text == "":
        raise QueryRejected(
            "a raw (application/octet-stream) request needs the query parameter "
            "'shape', e.g. ?shape=64,112,92&dtype=float32"
        )
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > 8 or not all(_SIZE.fullmatch(p) for p in parts):
        raise QueryRejected(
            f"shape {text[:100]!r} must be 1 to 8 comma-separated non-negative integers "
            "(n, *input_shape) in ASCII digits, e.g. 64,112,92"
        )
    return tuple(int(p) for p in parts)


_SIZE = re.compile(r"[0-9]{1,9}")


@dataclass(frozen=True)
class RawSpec:
    """What a raw request's query parameters announce: the array's shape and dtype."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def nbytes(self) -> int:
        """The body length the shape and dtype need."""
        return math.prod(self.shape) * self.dtype.itemsize

    def check_length(self, size: int) -> None:
        """QueryRejected unless a body of ``size`` bytes is the array announced."""
        if size != self.nbytes:
            raise QueryRejected(
                f"raw body holds {size} bytes but shape {list(self.shape)} of "
                f"{self.dtype.name} needs {self.nbytes} (prod(shape) * {self.dtype.itemsize})"
            )


def raw_spec(shape_text: str | None, dtype_text: str | None, predictor: Predictor) -> RawSpec:
    """Check a raw request's ``shape`` and ``dtype`` parameters (before its body is read)."""
    dtype = _RAW_DTYPES.get(dtype_text or "")
    if dtype is None:
        raise QueryRejected(
            f"dtype {dtype_text!r} is not supported for a raw request: pass the query "
            "parameter dtype=float32 (values in [0, 1]) or dtype=uint8 (pixels, divided by 255)"
        )
    shape = parse_raw_shape(shape_text)
    limit = predictor.max_batch
    if shape[0] > limit:
        raise InputTooLarge(
            f"batch of {shape[0]} inputs exceeds the limit of {limit}; "
            "split it into smaller batches"
        )
    if shape[0] == 0:
        raise QueryRejected("empty batch: send at least one input")
    return RawSpec(shape, dtype)


def decode_raw(body: bytes | bytearray, spec: RawSpec) -> np.ndarray:
    """A raw little-endian C-ordered array body (no copy for float32; uint8 is scaled /255)."""
    spec.check_length(len(body))
    array = np.frombuffer(body, dtype=spec.dtype).reshape(spec.shape)
    if spec.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0)
    return array


def decode_json(body: bytes | bytearray, predictor: Predictor) -> np.ndarray:
    """A JSON body (``inputs``, ``binary`` or ``records``) as the array the model takes.

    The common body, ``{"inputs": ...}`` holding one regular array of numbers, is read
    by :func:`inputs_array` without a Python float per number; any other body, and every
    body it declines, is parsed by orjson into Python objects, checked field by field
    and refused with a message that says what is wrong.
    """
    fast = inputs_array(body, predictor.max_batch)
    if fast is not None:
        return fast
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        why = exc.msg
        if "depth limit" in why:
            why = "nested deeper than 1024 levels"
        elif bytes(body[exc.pos : exc.pos + 9]).startswith((b"NaN", b"Infinity", b"-Infinity")):
            why = "NaN and Infinity are not JSON numbers (send finite values in [0, 1])"
        raise BadRequest(
            f"request body is not valid JSON (UTF-8): {why} at byte {exc.pos}"
        ) from None
    try:
        request = PredictRequest.model_validate(payload)
    except ValidationError as exc:
        raise QueryRejected(f"bad request body: {validation_message(exc)}") from None
    return decode_batch(request, predictor)


#: One simdjson parser kept for the process (with its lock): a parser reused keeps the
#: buffers it grew for the largest body so far (about 1.2x that body; at most the JSON
#: body limit, e.g. 19 MB for 64 AT&T faces), where a new one allocates and faults them
#: in for every body (8-16 ms of the 30-40 ms a 13 MB body takes to parse, measured).
#: A request that finds it busy parses with a parser of its own.
_PARSER = (simdjson.Parser(), threading.Lock())


def inputs_array(body: bytes | bytearray, max_batch: int) -> np.ndarray | None:
    """``body``'s ``inputs`` as a float64 array when the body is exactly
    ``{"inputs": A}`` with ``A`` a regular array of 1 to 8 dimensions (every list at one
    depth equally long, no list empty) of at most ``max_batch`` inputs, all of whose
    leaves are JSON numbers within float64; None for anything else, which
    :func:`decode_json` then parses and refuses as it always has.

    simdjson parses the text in C and copies the numbers straight into one buffer (at
    batch 64 of 112x92 images, 13 MB as ``json.dumps`` writes it: about 33 ms where
    orjson's lists and ``np.asarray`` take about 115 ms). The lists are checked level by
    level, the leaves only as lists (their numbers stay in C). A leaf list holding a
    one-number list would pass every length and ``as_buffer`` would flatten it, so the
    body's ``[`` are counted too: with one key and no strings among the numbers, a
    regular array of shape ``(d1, ..., dk)`` has exactly ``1 + d1 + ... + d1...d(k-1)``.
    """
    parser, lock = _PARSER
    if not lock.acquire(blocking=False):
        return _inputs_array(simdjson.Parser(), body, max_batch)
    try:
        return _inputs_array(parser, body, max_batch)
    finally:
        lock.release()


def _inputs_array(
    parser: simdjson.Parser, body: bytes | bytearray, max_batch: int
) -> np.ndarray | None:
    """:func:`inputs_array` with ``parser`` (every document of it released on return, so
    that it can parse again)."""
    try:
        doc = parser.parse(body)
        if not isinstance(doc, simdjson.Object) or list(doc.keys()) != ["inputs"]:
            return None
        inputs = doc["inputs"]
        if not isinstance(inputs, simdjson.Array) or not 0 < len(inputs) <= max_batch:
            return None
        shape: list[int] = []
        node: Any = inputs
        while isinstance(node, simdjson.Array):
            if len(node) == 0 or len(shape) == 8:  # deeper: the general path says why
                return None
            shape.append(len(node))
            node = node[0]
        level: list[Any] = [inputs]
        for size in shape[:-1]:
            if any(len(a) != size for a in level):
                return None
            level = [child for a in level for child in a]
            if not all(isinstance(a, simdjson.Array) for a in level):
                return None
        if any(len(a) != shape[-1] for a in level):
            return None
        # '[' counted by removing them: memchr-fast, 3 ms for 13 MB where count() takes 8
        # (a copy of the body for a moment, less than the orjson path's Python floats)
        brackets = len(body) - len(body.replace(b"[", b""))
        if brackets != sum(math.prod(shape[:k]) for k in range(len(shape))):
            return None
        numbers = inputs.as_buffer(of_type="d")  # TypeError for a leaf that is no number
    except (ValueError, TypeError, RuntimeError):  # not JSON, too deep, a number too large
        return None
    return np.frombuffer(numbers, dtype=np.float64).reshape(shape)


#: Bytes the JSON form may spend per number: a float32 written out in full as Python
#: writes it ("0.0039215686274509803", 21 characters) and ", " (base64 needs under 6).
JSON_BYTES_PER_NUMBER = 24
#: Bytes a survey record may spend per feature besides the feature's name.
RECORD_BYTES_PER_FEATURE = 128
#: Room for the JSON document around the numbers (field names, brackets, whitespace).
JSON_OVERHEAD = 64 * 1024
#: The memory a JSON body takes while it is decoded, in multiples of its size: its
#: numbers as Python floats (32 bytes each with the list's pointer, for 10-20 bytes of
#: text) and then as one array; the body budget reserves this much for a JSON body.
JSON_EXPANSION = 3
#: A body declared this small is read before its key is checked, so that the request
#: takes one thread-pool hop instead of two (a refused body declared within
#: ``max_body_bytes`` is read anyway, to be drained).
SMALL_BODY = 256 * 1024


def reserve(size: int, raw: bool, budget: int) -> int:
    """What the body budget holds for a body of ``size`` bytes: its size, and for JSON
    what decoding costs too (its numbers may become Python floats first)."""
    return min(budget, size * (1 if raw else JSON_EXPANSION))


def json_body_limit(predictor: Predictor, max_body: int) -> int:
    """The largest JSON body a request to ``predictor`` may send: its largest batch of
    inputs at 24 bytes a number, or of survey records, plus 64 KiB; at most ``max_body``."""
    model = predictor.model
    per_input = math.prod(model.input_shape_) * JSON_BYTES_PER_NUMBER
    if isinstance(model, Tabular):
        per_input = max(
            per_input, sum(len(n) + RECORD_BYTES_PER_FEATURE for n in model.feature_names_)
        )
    return min(max_body, max_batch_of(predictor) * per_input + JSON_OVERHEAD)


def too_large(size: int, *, limit: int, predictor: Predictor, raw: bool) -> InputTooLarge:
    what = (
        f"the limit of {limit} bytes"
        if raw
        else f"the limit of {limit} bytes for a JSON body to model {predictor.name!r} (its "
        f"largest batch of {max_batch_of(predictor)} inputs at {JSON_BYTES_PER_NUMBER} bytes a "
        "number)"
    )
    fix = "send smaller batches" + ("" if raw else f" or the raw binary form ({RAW_TYPE})")
    return InputTooLarge(f"request body of {size} bytes exceeds {what}; {fix}")


async def read_body(
    receive: Receive,
    limit: int,
    *,
    timeout: float,
    idle: float,
    too_large: Callable[[int], InputTooLarge],
    keep: bool = True,
) -> bytearray:
    """A request body, read chunk by chunk and never held past ``limit`` bytes.

    ``too_large(size)`` (the bytes read) is raised past ``limit``; RequestTimeout when
    the body takes over ``timeout`` seconds or pauses over ``idle`` seconds;
    ClientDisconnected when the client leaves. A pause is caught between ``idle`` and
    3/4 of it after the last part (the timer is moved on only once a quarter of ``idle``
    has passed: moving it costs about as much as a part of 64 KiB).
    With ``keep=False`` the chunks are dropped as they come (the body is drained).
    """
    deadline = anyio.current_time() + timeout
    body = bytearray()
    size = 0
    more = True
    # one cancel scope for the whole body, its deadline moved on as parts come (no task
    # per part; an anyio scope, as Starlette runs the route inside anyio task groups)
    with anyio.CancelScope(deadline=min(deadline, anyio.current_time() + idle)) as window:
        while more:
            message = await receive()
            moved = min(deadline, anyio.current_time() + idle)
            if moved - window.deadline > idle / 4:
                window.deadline = moved
            if message["type"] == "http.disconnect":
                raise ClientDisconnected(f"the client closed the connection after {size} bytes")
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            size += len(chunk)
            if size > limit:
                raise too_large(size)
            if keep:
                body += chunk
    if window.cancelled_caught:
        raise RequestTimeout(
            f"the request body did not arrive in time ({size} bytes read; the service "
            f"waits {timeout:g} s for a body and {idle:g} s for each part of it); send it "
            "at once"
        )
    return body
