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
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response

from mlinvert import __version__
from mlinvert.defenses.base import Guard
from mlinvert.defenses.detector import FlagStore, HistoryStore, QueryDetector, RedisHistory
from mlinvert.defenses.policies import parse_policy
from mlinvert.defenses.predictor import Predictor
from mlinvert.defenses.ratelimit import (
    BucketStore,
    MemoryBuckets,
    RateLimiter,
    RedisBuckets,
    redis_client,
)
from mlinvert.errors import (
    BadRequest,
    ConfigError,
    InputTooLarge,
    MlinvertError,
    QueryRejected,
    RateLimited,
    Unauthorized,
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
        (413, "Batch or body over the limit"),
        (415, "Unsupported Content-Type: send application/json or application/octet-stream"),
        (422, "Input refused: wrong shape, dtype, NaN/inf, out of [0, 1], unknown field"),
        (429, "Rate limit reached; see Retry-After"),
    )
}

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
    guards: list[Guard] = []
    url = settings.redis_url
    client = redis_client(url) if url else None  # one connection pool for both stores
    if settings.rate_limit is not None:
        if bucket_store is None:
            bucket_store = RedisBuckets(url, client=client) if url else MemoryBuckets()
        guards.append(RateLimiter(settings.rate_limit, bucket_store))
    image_guards = list(guards)
    if settings.detector is not None:
        history: HistoryStore | None = RedisHistory(url, client=client) if url else None
        image_guards.append(QueryDetector(settings.detector, flags, history))
    return {
        name: Predictor(
            model,
            name=name,
            policy=parse_policy(settings.policy_for(name)),
            guards=guards if isinstance(model, Tabular) else image_guards,
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
        except (ValueError, TypeError, OverflowError):
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
            raise BadRequest("binary.data is not valid base64") from None
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
    """The ``shape`` query parameter of a raw request: comma-separated sizes, e.g. ``64,112,92``."""
    if text is None or text == "":
        raise QueryRejected(
            "a raw (application/octet-stream) request needs the query parameter "
            "'shape', e.g. ?shape=64,112,92&dtype=float32"
        )
    parts = text.split(",")
    if len(parts) > 8 or not all(p.strip().isdigit() and len(p.strip()) <= 9 for p in parts):
        raise QueryRejected(
            f"shape {text[:100]!r} must be 1 to 8 comma-separated non-negative integers "
            "(n, *input_shape), e.g. 64,112,92"
        )
    return tuple(int(p) for p in parts)


def decode_raw(
    body: bytes, shape_text: str | None, dtype_text: str | None, predictor: Predictor
) -> np.ndarray:
    """A raw little-endian C-ordered array body (no copy for float32; uint8 is scaled /255)."""
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
    expected = math.prod(shape) * dtype.itemsize
    if len(body) != expected:
        raise QueryRejected(
            f"raw body holds {len(body)} bytes but shape {list(shape)} of {dtype_text} needs "
            f"{expected} (prod(shape) * {dtype.itemsize})"
        )
    array = np.frombuffer(body, dtype=dtype).reshape(shape)
    if dtype_text == "uint8":
        return array.astype(np.float32) / np.float32(255.0)
    return array


@dataclass(frozen=True)
class _Body:
    """A read request body and how it is encoded."""

    data: bytes | None
    size: int
    content_type: str
    shape: str | None
    dtype: str | None


@dataclass
class _Outcome:
    status: int
    body: bytes | None = None
    error: MlinvertError | None = None
    headers: dict[str, str] = field(default_factory=dict)


class _PredictHandler:
    """The synchronous part of a prediction request (runs in the thread pool)."""

    def __init__(self, predictors: Mapping[str, Predictor], store: Store, metrics: Metrics) -> None:
        self.predictors = predictors
        self.store = store
        self.metrics = metrics

    def __call__(
        self,
        name: str,
        key: str | None,
        key_problem: str | None,
        body: _Body,
        max_body: int,
        started: float,
    ) -> _Outcome:
        account: str | None = None
        x: np.ndarray | None = None
        n_inputs = 0
        try:
            if key_problem is not None:
                raise Unauthorized(key_problem)
            try:
                account = self.store.authenticate(key)
            except Unauthorized:
                account = self.store.key_account(key)
                raise
            predictor = self.predictors.get(name)
            if predictor is None:
                raise UnknownModel(
                    f"no model named {name!r}; served: {', '.join(sorted(self.predictors))} "
                    "(GET /v1/models lists them)"
                )
            check_content_type(body.content_type)
            if body.data is None:
                raise InputTooLarge(
                    f"request body of {body.size} bytes exceeds the limit of {max_body} bytes; "
                    "send smaller batches or the raw binary encoding"
                )
            if body.content_type == RAW_TYPE:
                x = decode_raw(body.data, body.shape, body.dtype, predictor)
            else:
                try:
                    payload = json.loads(body.data)
                except (ValueError, RecursionError):
                    raise BadRequest("request body is not valid JSON (UTF-8)") from None
                try:
                    request = PredictRequest.model_validate(payload)
                except ValidationError as exc:
                    raise QueryRejected(f"bad request body: {_validation_message(exc)}") from None
                x = decode_batch(request, predictor)
            n_inputs = int(x.shape[0]) if x.ndim else 0
            response = predictor.predict(x, account=account)
        except MlinvertError as exc:
            status = status_of(exc)
            digests = _safe_digests(x)
            self.store.log_query(
                account=account,
                model=name[:200],
                n_inputs=n_inputs,
                outcome=type(exc).__name__,
                status=status,
                detail=str(exc),
                digests=digests,
            )
            self.metrics.observe(
                model=name[:200] if name in self.predictors else "-",
                status=status,
                n_inputs=n_inputs,
                reason=type(exc).__name__,
                seconds=time.perf_counter() - started,
            )
            headers = {}
            if isinstance(exc, RateLimited) and account is not None and name in self.predictors:
                headers = rate_headers(self.predictors[name], account, exc.retry_after)
            return _Outcome(status, error=exc, headers=headers)
        assert account is not None and x is not None  # set on the success path
        self.store.log_query(
            account=account,
            model=name,
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
        body_out = json.dumps(
            {
                "model": name,
                "policy": info.policy,
                "carries": info.carries,
                "predictions": predictions,
            },
            allow_nan=False,
        ).encode()
        self.metrics.observe(
            model=name,
            status=200,
            n_inputs=n_inputs,
            reason=None,
            seconds=time.perf_counter() - started,
        )
        return _Outcome(200, body=body_out, headers=rate_headers(predictor, account))


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
    store = store if store is not None else Store(settings.db, synchronous=settings.log_synchronous)
    metrics = metrics if metrics is not None else Metrics()
    handler = _PredictHandler(predictors, store, metrics)
    max_body = settings.max_body_bytes

    app = FastAPI(
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

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body("InternalError", 500, "internal error; see the service log"),
            status_code=500,
        )

    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz() -> Health:
        """Liveness: the service answers and which models it serves."""
        return Health(status="ok", models=sorted(predictors))

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
        return account_info(store.authenticate(key))

    @app.post(
        "/v1/models/{name}/predict",
        response_model=PredictResponse,
        responses={
            **_ERRORS,
            200: {"headers": _RATE_HEADERS},
            429: {**_ERRORS[429], "headers": _RATE_HEADERS},
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
        started = time.perf_counter()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        key, key_problem = _key_from(request, bearer, api_key)
        declared = request.headers.get("content-length", "")
        size = int(declared) if declared.isdigit() else 0
        chunks: list[bytes] = []
        if size <= 8 * max_body:  # drain a moderately oversized body so the client reads 413
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > 8 * max_body:
                    break
                if size <= max_body:
                    chunks.append(chunk)
        data = (chunks[0] if len(chunks) == 1 else b"".join(chunks)) if size <= max_body else None
        body = _Body(data=data, size=size, content_type=content_type, shape=shape, dtype=dtype)
        outcome = await run_in_threadpool(handler, name, key, key_problem, body, max_body, started)
        if outcome.error is not None:
            response = error_response(outcome.error)
            response.headers.update(outcome.headers)
            return response
        return Response(outcome.body, media_type="application/json", headers=outcome.headers)

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
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
