"""The FastAPI prediction service, built by :func:`create_app` (no module-level app).

The route does HTTP only: authentication, body limits, decoding and the query log.
Every defence runs inside the :class:`~mlinvert.defenses.Predictor`, the same object
a :class:`~mlinvert.oracle.LocalOracle` calls. Under a rate limit, prediction answers
(200 and 429) carry ``RateLimit-Limit``, ``RateLimit-Remaining``, ``RateLimit-Reset``
and ``RateLimit-Policy`` (draft-ietf-httpapi-ratelimit-headers-06); ``GET /v1/account``
tells the caller its limit, what it may still send and whether it is blocked, without
counting as a query.
"""

from __future__ import annotations

import binascii
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import numpy as np
import orjson
import simdjson
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlinvert import __version__
from mlinvert.defenses.detector import FlagStore, HistoryStore, QueryDetector, RedisHistory
from mlinvert.defenses.predictor import Predictor
from mlinvert.defenses.ratelimit import (
    BucketStore,
    MemoryBuckets,
    RateLimiter,
    RedisBuckets,
    parse_rate,
    redis_client,
    redis_deadline,
    redis_problem,
)
from mlinvert.defenses.spec import build_guards, build_predictor
from mlinvert.errors import (
    BadRequest,
    ClientDisconnected,
    ConfigError,
    InputTooLarge,
    MlinvertError,
    QueryRejected,
    RateLimited,
    RequestTimeout,
    Unauthorized,
    Unavailable,
    UnknownModel,
    UnsupportedMediaType,
)
from mlinvert.service.errors import error_body, error_response, status_of
from mlinvert.service.metrics import Metrics
from mlinvert.service.schemas import (
    AccountInfo,
    ErrorBody,
    Health,
    ModelInfo,
    ModelList,
    PredictRequest,
    PredictResponse,
    RateLimitStatus,
    Readiness,
)
from mlinvert.service.settings import ServiceSettings
from mlinvert.service.store import Store, input_digests
from mlinvert.targets.base import Tabular, Target

log = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (400, "Undecodable request body (JSON, base64)"),
        (401, "Missing, malformed, unknown or revoked API key"),
        (403, "Account blocked"),
        (404, "Unknown model"),
        (408, "The request body did not arrive in time"),
        (413, "Batch or body over the limit"),
        (415, "Unsupported Content-Type: send application/json or application/octet-stream"),
        (422, "Input refused: wrong shape, dtype, NaN/inf, out of [0, 1], unknown field"),
        (429, "Rate limit reached; see Retry-After"),
        (503, "Busy (too many bodies in flight) or the budgets were lost; see Retry-After"),
    )
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Whole seconds to wait before sending again",
        "schema": {"type": "integer"},
    }
}
for _code in (429, 503):
    _ERRORS[_code]["headers"] = _RETRY_AFTER

#: The rate-limit fields of draft-ietf-httpapi-ratelimit-headers-06, as documented.
_RATE_HEADERS: dict[str, dict[str, Any]] = {
    name: {"description": text + " (only under a rate limit)", "schema": {"type": kind}}
    for name, text, kind in (
        ("RateLimit-Limit", "The bucket's capacity in inputs", "integer"),
        ("RateLimit-Remaining", "Inputs the account may send now", "integer"),
        (
            "RateLimit-Reset",
            "Seconds until the capacity is back; on 429 the same moment as Retry-After",
            "integer",
        ),
        ("RateLimit-Policy", "CAPACITY;w=SECONDS: the inputs refilled per window", "string"),
    )
}


def build_predictors(
    models: Mapping[str, Target],
    settings: ServiceSettings,
    *,
    bucket_store: BucketStore | None = None,
    flags: FlagStore | None = None,
) -> dict[str, Predictor]:
    """Wrap each model in a Predictor with its policy, one rate limiter and one detector.

    One :class:`RateLimiter` serves every model, so an account has one budget; its
    buckets live in Redis when ``settings.redis_url`` is set. The clock is wall time,
    which every process sharing Redis agrees on. One :class:`QueryDetector` (when
    ``settings.detector`` is set) sees an account's inputs to every image model; it runs
    after the rate limiter, so it fingerprints only admitted batches; its fingerprint
    history lives in Redis too when ``settings.redis_url`` is set (so every process sees
    all of an account's inputs), and it records its flags in ``flags`` (the service
    passes its SQLite store, so every process sees a flag). Survey (tabular) models get
    no detector: its pixel-window fingerprints would call any two short rows of category
    codes near duplicates.
    """
    url = settings.redis_url
    # one connection pool for both stores
    client = redis_client(url, timeout=settings.redis_timeout) if url else None
    if settings.rate_limit is not None and bucket_store is None:
        bucket_store = (
            RedisBuckets(url, client=client, refuse_lost=settings.redis_loss == "refuse")
            if url
            else MemoryBuckets()
        )
    history: HistoryStore | None = None
    if settings.detector is not None and url:
        history = RedisHistory(url, client=client)
    guards = build_guards(
        settings.rate_limit, settings.detector, buckets=bucket_store, history=history, flags=flags
    )
    return {
        name: build_predictor(
            model,
            name=name,
            policy=settings.policy_for(name),
            guards=guards,
            max_batch=settings.max_batch,
            clock=time.time,
        )
        for name, model in models.items()
    }


def _limiter(predictor: Predictor) -> RateLimiter | None:
    return next((g for g in predictor.guards if isinstance(g, RateLimiter)), None)


def _max_batch(predictor: Predictor) -> int:
    limiter = _limiter(predictor)
    return predictor.max_batch if limiter is None else min(predictor.max_batch, limiter.rate.count)


def _refuses(predictor: Predictor, account: str) -> bool:
    """Whether ``predictor``'s query detector refuses ``account`` now (a standing flag)."""
    return any(
        isinstance(g, QueryDetector)
        and g.config.action == "block"
        and g.flags.flagged(account) is not None
        for g in predictor.guards
    )


def rate_headers(
    predictor: Predictor, account: str, retry_after: float | None = None
) -> dict[str, str]:
    """The RateLimit fields (draft-ietf-httpapi-ratelimit-headers-06) of ``account``'s
    bucket now, read without taking from it: its capacity, the inputs it may send, the
    seconds until it is full (``retry_after``, rounded up as Retry-After is, when a batch
    was refused) and the refill window. No fields without a rate limit, or when the
    bucket's store cannot be read (the answer then goes out without them)."""
    limiter = _limiter(predictor)
    if limiter is None:
        return {}
    try:
        allowance = limiter.allowance(account, predictor.clock())
    except RateLimited:
        return {}
    rate = limiter.rate
    reset = allowance.reset_in if retry_after is None else retry_after
    return {
        "RateLimit-Limit": str(rate.count),
        "RateLimit-Remaining": str(allowance.remaining),
        "RateLimit-Reset": str(math.ceil(reset)),
        "RateLimit-Policy": f"{rate.count};w={math.ceil(rate.period)}",
    }


def _model_info(predictor: Predictor) -> ModelInfo:
    info = predictor.info
    limiter = _limiter(predictor)
    rate = None if limiter is None else str(limiter.rate)
    detector = next((g.config.name for g in predictor.guards if isinstance(g, QueryDetector)), None)
    model = predictor.model
    return ModelInfo(
        name=info.model,
        kind=info.kind,
        input_shape=list(info.input_shape),
        class_names=list(info.class_names),
        policy=info.policy,
        carries=info.carries,
        max_batch=_max_batch(predictor),
        rate_limit=rate,
        detector=detector,
        feature_names=list(model.feature_names_) if isinstance(model, Tabular) else None,
    )


def _validation_message(exc: ValidationError) -> str:
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
    limit = predictor.max_batch
    rows = request.inputs if request.inputs is not None else request.records
    if rows is not None and len(rows) == 0:
        raise QueryRejected("empty batch: send at least one input")
    if request.inputs is not None:
        if len(request.inputs) > limit:
            raise InputTooLarge(
                f"batch of {len(request.inputs)} inputs exceeds the limit of {limit}; "
                "split it into smaller batches"
            )
        try:
            x = np.asarray(request.inputs)
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
    if request.binary is not None:
        b = request.binary
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
                f"binary.data holds {len(raw)} bytes but shape {b.shape} of {b.dtype} needs "
                f"{expected}"
            )
        array = np.frombuffer(raw, dtype=dtype).reshape(b.shape)
        if b.dtype == "uint8":
            return array.astype(np.float32) / np.float32(255.0)
        return array.astype(np.float32)
    records = request.records or []
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
        raise QueryRejected(f"bad request body: {_validation_message(exc)}") from None
    return decode_batch(request, predictor)


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
    parser = simdjson.Parser()  # one per call: a parser is not shared between threads
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
        if body.count(b"[") != sum(math.prod(shape[:k]) for k in range(len(shape))):
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


def _reserve(size: int, raw: bool, budget: int) -> int:
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
    return min(max_body, _max_batch(predictor) * per_input + JSON_OVERHEAD)


def _too_large(size: int, *, limit: int, predictor: Predictor, raw: bool) -> InputTooLarge:
    what = (
        f"the limit of {limit} bytes"
        if raw
        else f"the limit of {limit} bytes for a JSON body to model {predictor.name!r} (its "
        f"largest batch of {_max_batch(predictor)} inputs at {JSON_BYTES_PER_NUMBER} bytes a "
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


@dataclass(frozen=True)
class _Head:
    """A prediction request before its body is read."""

    name: str
    key: str | None
    key_problem: str | None
    content_type: str
    declared: int | None  # Content-Length; None for a chunked body
    shape: str | None
    dtype: str | None
    started: float


@dataclass(frozen=True)
class _Admitted:
    """A request whose key, model, type and declared size passed: its body may be read."""

    account: str
    predictor: Predictor
    limit: int
    raw: RawSpec | None


@dataclass
class _Outcome:
    status: int
    body: bytes | None = None
    error: MlinvertError | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def response(self) -> Response:
        """The answer: the prediction, the error document, or a bare 500."""
        if self.error is not None:
            response: Response = error_response(self.error)
            response.headers.update(self.headers)
            return response
        if self.status == 500:
            return JSONResponse(
                error_body("InternalError", 500, "internal error; see the service log"),
                status_code=500,
            )
        return Response(self.body, media_type="application/json", headers=self.headers)


PREDICT_ROUTE = "/v1/models/{name}/predict"


class _PredictHandler:
    """The synchronous parts of a prediction request (they run in the thread pool):
    :meth:`admit` before the body is read, :meth:`answer` after, :meth:`refuse` for
    every refusal (logged and counted)."""

    def __init__(
        self,
        predictors: Mapping[str, Predictor],
        store: Store,
        metrics: Metrics,
        settings: ServiceSettings,
    ) -> None:
        self.predictors = predictors
        self.store = store
        self.metrics = metrics
        self.max_body = settings.max_body_bytes
        self.redis_timeout = settings.redis_timeout

    def admit(self, head: _Head) -> _Admitted | _Outcome:
        """Check the key, the model, the body type and its declared size; nothing is read."""
        account: str | None = None
        try:
            if head.key_problem is not None:
                raise Unauthorized(head.key_problem)
            try:
                account = self.store.authenticate(head.key)
            except Unauthorized:
                account = self.store.key_account(head.key)
                raise
            predictor = self.predictors.get(head.name)
            if predictor is None:
                raise UnknownModel(
                    f"no model named {_clip(head.name)!r}; served: "
                    f"{', '.join(sorted(self.predictors))} (GET /v1/models lists them)"
                )
            check_content_type(head.content_type)
            raw = None
            if head.content_type == RAW_TYPE:
                raw = raw_spec(head.shape, head.dtype, predictor)
                limit = raw.nbytes
                if limit > self.max_body:
                    raise _too_large(limit, limit=self.max_body, predictor=predictor, raw=True)
                if head.declared is not None:
                    raw.check_length(head.declared)
            else:
                limit = json_body_limit(predictor, self.max_body)
                if head.declared is not None and head.declared > limit:
                    raise _too_large(head.declared, limit=limit, predictor=predictor, raw=False)
            return _Admitted(account, predictor, limit, raw)
        except Exception as exc:
            return self.refuse(exc, head, account)

    def handle(self, head: _Head, body: bytearray | MlinvertError) -> _Outcome:
        """:meth:`admit` and :meth:`answer` a request whose body was read before its key
        was checked, or refuse it for the error that kept its body from being read."""
        admitted = self.admit(head)
        if isinstance(admitted, _Outcome):
            return admitted
        if isinstance(body, MlinvertError):
            return self.refuse(body, head, admitted.account)
        return self.answer(head, admitted, body)

    def answer(self, head: _Head, admitted: _Admitted, data: bytearray) -> _Outcome:
        """Decode the body and answer it as the predictor allows; its Redis calls (the
        rate limiter, the detector, the RateLimit fields) share one deadline."""
        with redis_deadline(self.redis_timeout):
            return self._answer(head, admitted, data)

    def _answer(self, head: _Head, admitted: _Admitted, data: bytearray) -> _Outcome:
        account, predictor = admitted.account, admitted.predictor
        x: np.ndarray | None = None
        try:
            if admitted.raw is not None:
                x = decode_raw(data, admitted.raw)
            else:
                x = decode_json(data, predictor)
            del data  # the caller's reference goes too once this returns
            response = predictor.predict(x, account=account)
            for values in (response.probs, response.confidence):
                if values is not None and not np.isfinite(values).all():  # orjson writes null
                    raise RuntimeError(f"{predictor.info.policy!r} answered NaN or infinity")
        except Exception as exc:
            return self.refuse(exc, head, account, x)
        n_inputs = int(x.shape[0])
        self.store.log_query(
            account=account,
            model=head.name,
            n_inputs=n_inputs,
            outcome="ok",
            status=200,
            digests=input_digests(x),
        )
        probs = None if response.probs is None else response.probs.tolist()
        conf = None if response.confidence is None else response.confidence.tolist()
        names = response.label_names or tuple(str(v) for v in response.labels)
        predictions = [
            {
                "label": label,
                "label_name": names[i],
                "scores": None if probs is None else probs[i],
                "confidence": None if conf is None else conf[i],
            }
            for i, label in enumerate(response.labels.tolist())
        ]
        info = predictor.info
        body_out = orjson.dumps(
            {
                "model": head.name,
                "policy": info.policy,
                "carries": info.carries,
                "predictions": predictions,
            }
        )
        self.metrics.observe(
            model=head.name,
            status=200,
            n_inputs=n_inputs,
            reason=None,
            seconds=time.perf_counter() - head.started,
        )
        return _Outcome(200, body=body_out, headers=rate_headers(predictor, account))

    def refuse(
        self,
        exc: BaseException,
        head: _Head,
        account: str | None,
        x: np.ndarray | None = None,
    ) -> _Outcome:
        """Log and count a refused request; an exception that is no MlinvertError is a
        server error (500, logged once with its traceback)."""
        error = exc if isinstance(exc, MlinvertError) else None
        if error is None:
            log.error("internal error on POST %s", PREDICT_ROUTE, exc_info=exc)
            self.metrics.server_error(PREDICT_ROUTE)
        status = 500 if error is None else status_of(error)
        reason = "InternalError" if error is None else type(error).__name__
        n_inputs = int(x.shape[0]) if x is not None and x.ndim else 0
        if account is not None:  # without a valid key: counted below, never logged
            self.store.log_query(
                account=account,
                model=_clip(head.name),
                n_inputs=n_inputs,
                outcome=reason,
                status=status,
                detail="internal error" if error is None else str(error),
                digests=_safe_digests(x),
            )
        self.metrics.observe(
            model=head.name if head.name in self.predictors else "-",
            status=status,
            n_inputs=n_inputs,
            reason=reason,
            seconds=time.perf_counter() - head.started,
        )
        headers = {}
        if isinstance(error, RateLimited) and account is not None and head.name in self.predictors:
            headers = rate_headers(self.predictors[head.name], account, error.retry_after)
        return _Outcome(status, error=error, headers=headers)


def _markdown(doc: Any) -> Any:
    """``doc`` with the docstrings' reStructuredText literals (double backticks) written
    as Markdown code (single backticks), which is what OpenAPI descriptions are."""
    if isinstance(doc, dict):
        return {
            k: v.replace("``", "`") if k == "description" and isinstance(v, str) else _markdown(v)
            for k, v in doc.items()
        }
    if isinstance(doc, list):
        return [_markdown(v) for v in doc]
    return doc


def _clip(name: str, most: int = 100) -> str:
    """A name a client sent, cut to ``most`` characters for messages and the log."""
    return name if len(name) <= most else name[:most] + "..."


def _safe_digests(x: np.ndarray | None) -> tuple[str, ...]:
    if x is None or x.dtype.kind not in "fiu" or x.ndim == 0:
        return ()
    return input_digests(x)


def _key_from(
    request: Request, bearer: HTTPAuthorizationCredentials | None, api_key: str | None
) -> tuple[str | None, str | None]:
    """The presented key, or a reason why the credentials are malformed."""
    header = request.headers.get("authorization")
    if header is not None and bearer is None:
        return None, "malformed Authorization header: expected 'Authorization: Bearer <key>'"
    if bearer is not None:
        return bearer.credentials.strip(), None
    return (api_key.strip() if api_key else None), None


def _content_length(request: Request) -> int | None:
    """The declared body length (None for a chunked body; the server checked the digits)."""
    declared = request.headers.get("content-length")
    return None if declared is None else int(declared)


def _closing(response: Response) -> Response:
    """``response``, after which the server closes the connection (its body stays unread)."""
    response.headers["Connection"] = "close"
    return response


class _BodyBudget:
    """The bytes the service holds at once for request bodies and their decoding (used
    on the event loop only). A body that alone needs the whole budget is reserved the
    whole budget, so it is read when nothing else is."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held = 0

    def take(self, n: int) -> bool:
        """Reserve ``n`` bytes, or False when they would pass the budget."""
        if self.held + n > self.budget:
            return False
        self.held += n
        return True

    def release(self, n: int) -> None:
        """Give back what :meth:`take` reserved."""
        self.held -= n


class _ServerErrors:
    """ASGI layer around the routes: an exception no handler took is logged once (with
    its traceback), counted in ``/metrics`` and answered 500. It does not travel on to
    Starlette's and uvicorn's own handlers, which would log it twice more."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            route = getattr(scope.get("route"), "path", "-")
            log.exception("internal error on %s %s", scope.get("method"), route)
            self.metrics.server_error(route)
            if not started:
                await _Outcome(500).response()(scope, receive, send)


def create_app(
    settings: ServiceSettings,
    predictors: Mapping[str, Predictor] | Sequence[Predictor],
    *,
    store: Store | None = None,
    metrics: Metrics | None = None,
) -> FastAPI:
    """Build the prediction service for ``predictors`` (a mapping or a list, keyed by name).

    The predictors share at most one :class:`RateLimiter` (an account has one budget, as
    :func:`build_predictors` makes them); ConfigError otherwise.
    """
    if not isinstance(predictors, Mapping):
        predictors = {p.name: p for p in predictors}
    predictors = dict(predictors)
    limiters = {id(lim): lim for p in predictors.values() if (lim := _limiter(p)) is not None}
    if len(limiters) > 1:
        raise ConfigError(
            f"the served models carry {len(limiters)} different rate limiters; give them one "
            "RateLimiter (one budget per account), as build_predictors does"
        )
    store = store if store is not None else settings.open_store()
    metrics = metrics if metrics is not None else Metrics()
    max_body = settings.max_body_bytes
    handler = _PredictHandler(predictors, store, metrics, settings)
    bodies = _BodyBudget(settings.body_budget_bytes)
    account_rate = parse_rate(settings.account_rate)
    account_reads = MemoryBuckets()

    app = FastAPI(
        docs_url=None,  # Swagger UI and ReDoc load their scripts from a CDN: blank offline
        redoc_url=None,
        title="mlinvert prediction service",
        version=__version__,
        description="A model behind an MLaaS-style API with output defences, API keys, "
        "rate limits and a query log.",
    )
    app.state.settings = settings
    app.state.store = store
    app.state.metrics = metrics
    app.state.predictors = predictors
    bearer_scheme = HTTPBearer(auto_error=False, description="Authorization: Bearer <key>")
    key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: <key>")

    @app.exception_handler(MlinvertError)
    async def _mlinvert_error(request: Request, exc: MlinvertError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        return JSONResponse(error_body("QueryRejected", 422, msg), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return JSONResponse(
            error_body("HTTPError", exc.status_code, str(exc.detail)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    app.add_middleware(_ServerErrors, metrics=metrics)

    @app.head("/healthz", include_in_schema=False)
    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz() -> Health:
        """Liveness: the process answers, and which models it serves. It says nothing of
        the stores a prediction needs: that is ``/readyz``."""
        return Health(status="ok", models=sorted(predictors))

    ready_client = (
        redis_client(settings.redis_url, timeout=settings.redis_timeout)
        if settings.redis_url
        else None
    )

    @app.head("/readyz", include_in_schema=False)
    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "A store cannot serve"}},
        tags=["service"],
    )
    def readyz() -> Response:
        """Readiness: whether predictions can be answered now. 200 when the account
        database and the shared store (Redis, when configured) work; 503 naming the
        store that does not (Redis unreachable, or it lost the budgets under
        ``--redis-loss refuse``)."""
        checks = {"database": store.problem() or "ok"}
        if ready_client is not None:
            with redis_deadline(settings.redis_timeout):
                problem = redis_problem(ready_client, need_epoch=settings.redis_loss == "refuse")
            checks["redis"] = problem or "ok"
        ready = all(v == "ok" for v in checks.values())
        doc = Readiness(status="ready" if ready else "unready", checks=checks)
        return JSONResponse(doc.model_dump(), status_code=200 if ready else 503)

    @app.get("/docs", response_class=PlainTextResponse, include_in_schema=False)
    def docs() -> PlainTextResponse:
        return PlainTextResponse(
            "This service serves no interactive API page (Swagger UI would load its scripts "
            "from a CDN). Its OpenAPI document is GET /openapi.json: open it in any OpenAPI "
            "viewer, e.g. a locally installed Swagger UI or Redocly.\n"
        )

    @app.get("/metrics", response_class=PlainTextResponse, tags=["service"])
    def prometheus() -> PlainTextResponse:
        """Prometheus text metrics: requests, inputs, rejections by reason, latency."""
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=ModelList, tags=["models"])
    def list_models() -> ModelList:
        """Every served model: kind, input shape, classes, the active policy and limits."""
        return ModelList(models=[_model_info(p) for p in predictors.values()])

    def account_info(account: str) -> AccountInfo:
        rate = None
        limited = next(
            ((p, lim) for p in predictors.values() if (lim := _limiter(p)) is not None), None
        )
        if limited is not None:
            predictor, limiter = limited
            allowance = limiter.allowance(account, predictor.clock())
            rate = RateLimitStatus(
                limit=str(limiter.rate),
                capacity=limiter.rate.count,
                remaining=allowance.remaining,
                refill_in=round(allowance.refill_in, 3),
                reset_in=round(allowance.reset_in, 3),
            )
        blocked = sorted(name for name, p in predictors.items() if _refuses(p, account))
        return AccountInfo(
            account=account,
            status="blocked" if blocked else "active",
            blocked_models=blocked,
            rate_limit=rate,
            inputs_answered=store.answered(account),
        )

    @app.get(
        "/v1/account",
        response_model=AccountInfo,
        responses={code: _ERRORS[code] for code in (401, 429)},
        tags=["account"],
    )
    def account(
        request: Request,
        bearer: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
        api_key: str | None = Depends(key_scheme),
    ) -> AccountInfo:
        """The calling account: its rate limit and what it may still send, the inputs
        answered so far, and whether the query detector blocks it.

        Not a query: nothing is spent, logged or shown to the detector. 401 for a
        missing, malformed, unknown or revoked key, as for a prediction; 429 only when
        the rate limiter's store cannot be read.
        """
        key, key_problem = _key_from(request, bearer, api_key)
        if key_problem is not None:
            raise Unauthorized(key_problem)
        account = store.authenticate(key)
        asked = account_reads.take(account, 1, account_rate, time.monotonic())
        if not asked.allowed:
            raise RateLimited(
                f"GET /v1/account answers an account at most {account_rate}; retry after "
                f"{asked.retry_after:.1f} s (predictions carry the same fields in their "
                "RateLimit headers)",
                retry_after=asked.retry_after,
            )
        with redis_deadline(settings.redis_timeout):
            return account_info(account)

    @app.post(
        "/v1/models/{name}/predict",
        response_model=PredictResponse,
        responses={
            **_ERRORS,
            200: {"headers": _RATE_HEADERS},
            429: {**_ERRORS[429], "headers": {**_RETRY_AFTER, **_RATE_HEADERS}},
        },
        tags=["models"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
                    RAW_TYPE: {
                        "schema": {
                            "type": "string",
                            "format": "binary",
                            "description": "Raw C-ordered little-endian array bytes, "
                            "prod(shape) * itemsize long; shape and dtype in the query",
                        }
                    },
                },
            }
        },
    )
    async def predict(
        name: str,
        request: Request,
        bearer: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
        api_key: str | None = Depends(key_scheme),
        shape: str | None = Query(
            None,
            description="raw form only: comma-separated (n, *input_shape), e.g. 64,112,92",
        ),
        dtype: str | None = Query(
            None, description="raw form only: float32 (values in [0, 1]) or uint8 (/255)"
        ),
    ) -> Response:
        """Answer a batch as the policy allows.

        JSON body (``inputs``, ``binary`` base64 or ``records``), or the raw form:
        ``Content-Type: application/octet-stream`` with the array bytes and the query
        parameters ``shape`` and ``dtype``.
        """
        key, key_problem = _key_from(request, bearer, api_key)
        head = _Head(
            name=name,
            key=key,
            key_problem=key_problem,
            content_type=request.headers.get("content-type", "").split(";")[0].strip().lower(),
            declared=_content_length(request),
            shape=shape,
            dtype=dtype,
            started=time.perf_counter(),
        )
        if head.declared is not None and head.declared <= min(SMALL_BODY, max_body):
            reserve = _reserve(head.declared, head.content_type == RAW_TYPE, bodies.budget)
            if bodies.take(reserve):
                try:
                    return await _small(request, head, head.declared)
                finally:
                    bodies.release(reserve)
        admitted = await run_in_threadpool(handler.admit, head)
        if isinstance(admitted, _Outcome):  # refused before its body was read
            return await _unread(request, head, admitted.response())
        size = admitted.limit if head.declared is None else head.declared
        reserve = _reserve(size, admitted.raw is not None, bodies.budget)
        if not bodies.take(reserve):
            busy = Unavailable(
                f"the service holds {bodies.held} bytes for request bodies; this one "
                f"({size} bytes, {reserve} to decode) would pass its budget of "
                f"{bodies.budget}: retry in a second",
                retry_after=1.0,
            )
            outcome = await run_in_threadpool(handler.refuse, busy, head, admitted.account)
            return await _unread(request, head, outcome.response())
        try:
            try:
                data = await read_body(
                    request.receive,
                    admitted.limit,
                    timeout=settings.body_timeout,
                    idle=settings.idle_timeout,
                    too_large=partial(
                        _too_large,
                        limit=admitted.limit,
                        predictor=admitted.predictor,
                        raw=admitted.raw is not None,
                    ),
                )
            except MlinvertError as exc:
                outcome = await run_in_threadpool(handler.refuse, exc, head, admitted.account)
                return _closing(outcome.response())
            outcome = await run_in_threadpool(handler.answer, head, admitted, data)
            del data
        finally:
            bodies.release(reserve)
        return outcome.response()

    async def _small(request: Request, head: _Head, declared: int) -> Response:
        """A request whose declared body is small: read first (as a refused body would be
        drained), then admitted and answered in one thread-pool hop, not two."""
        try:
            data = await read_body(
                request.receive,
                declared,
                timeout=settings.body_timeout,
                idle=settings.idle_timeout,
                too_large=lambda size: InputTooLarge(
                    f"request body of {size} bytes is longer than its Content-Length"
                ),
            )
        except MlinvertError as exc:
            outcome = await run_in_threadpool(handler.handle, head, exc)
            return _closing(outcome.response())
        outcome = await run_in_threadpool(handler.handle, head, data)
        del data
        return outcome.response()

    async def _unread(request: Request, head: _Head, response: Response) -> Response:
        """Drain (drop) a refused request's body so the client reads the refusal, when it
        is declared within ``max_body_bytes``; otherwise close the connection after the
        answer (the body is never read)."""
        if head.declared == 0:
            return response
        if head.declared is not None and head.declared <= max_body:
            try:
                await read_body(
                    request.receive,
                    max_body,
                    timeout=settings.body_timeout,
                    idle=settings.idle_timeout,
                    too_large=lambda size: InputTooLarge(f"{size} bytes"),
                    keep=False,
                )
                return response
            except MlinvertError:
                pass
        return _closing(response)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            extra = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(extra.pop("$defs", {}))
            components["PredictRequest"] = extra
            app.openapi_schema = _markdown(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
