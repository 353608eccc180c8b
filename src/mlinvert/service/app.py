"""The FastAPI prediction service, built by :func:`create_app` (no module-level app).

The routes do HTTP only: authentication, body limits, decoding and the query log.
Every defence runs inside the :class:`~mlinvert.defenses.Predictor`, the same object
a :class:`~mlinvert.oracle.LocalOracle` calls. Under a rate limit, prediction answers
(200 and 429) carry ``RateLimit-Limit``, ``RateLimit-Remaining``, ``RateLimit-Reset``
and ``RateLimit-Policy`` (draft-ietf-httpapi-ratelimit-headers-06); ``GET /v1/account``
tells the caller its limit, what it may still send and whether it is blocked, without
counting as a query.

The routes live in :mod:`mlinvert.service.routes`, the body decoding in
:mod:`mlinvert.service.bodies`, the thread-pool side of a prediction in
:mod:`mlinvert.service.handler`; this module assembles them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from mlinvert import __version__
from mlinvert.defenses.predictor import Predictor
from mlinvert.defenses.ratelimit import (
    BucketStore,
    MemoryBuckets,
    RedisBuckets,
    parse_rate,
    redis_client,
)
from mlinvert.errors import ConfigError, MlinvertError
from mlinvert.service.errors import error_body, error_response
from mlinvert.service.handler import BodyBudget, PredictHandler
from mlinvert.service.metrics import Metrics
from mlinvert.service.middleware import ServerErrors
from mlinvert.service.openapi import openapi_document
from mlinvert.service.predictors import build_predictors, limiter_of
from mlinvert.service.routes import account, health, models, ops, predict, v2
from mlinvert.service.settings import ServiceSettings
from mlinvert.service.state import ServiceState
from mlinvert.service.store import Store
from mlinvert.service.v2 import V2Handler

__all__ = ["build_predictors", "create_app"]


def create_app(
    settings: ServiceSettings,
    predictors: Mapping[str, Predictor] | Sequence[Predictor],
    *,
    store: Store | None = None,
    metrics: Metrics | None = None,
) -> FastAPI:
    """Build the prediction service for ``predictors`` (a mapping or a list, keyed by name).

    The predictors share at most one :class:`RateLimiter` (an account has one budget, as
    :func:`build_predictors` makes them); ConfigError otherwise. With
    ``settings.protocol == "v2"`` the Open Inference Protocol's routes (``/v2/...``) are
    served as well, on the same Predictors, keys, limits, query log and metrics.
    """
    if not isinstance(predictors, Mapping):
        predictors = {p.name: p for p in predictors}
    predictors = dict(predictors)
    limiters = {id(lim): lim for p in predictors.values() if (lim := limiter_of(p)) is not None}
    if len(limiters) > 1:
        raise ConfigError(
            f"the served models carry {len(limiters)} different rate limiters; give them one "
            "RateLimiter (one budget per account), as build_predictors does"
        )
    store = store if store is not None else settings.open_store()
    metrics = metrics if metrics is not None else Metrics()
    client = (
        redis_client(settings.redis_url, timeout=settings.redis_timeout)
        if settings.redis_url
        else None
    )
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
    app.state.service = ServiceState(
        settings=settings,
        store=store,
        metrics=metrics,
        predictors=predictors,
        handler=PredictHandler(predictors, store, metrics, settings),
        v2_handler=V2Handler(predictors, store, metrics, settings),
        bodies=BodyBudget(settings.body_budget_bytes),
        account_rate=parse_rate(settings.account_rate),
        account_reads=account_reads(settings, client),
        ready_client=client,
    )
    _add_error_handlers(app, settings)
    app.add_middleware(ServerErrors, metrics=metrics)
    for module in (health, ops, models, account, predict):
        app.include_router(module.router)
    if settings.protocol == "v2":  # beside the mlinvert routes, not instead of them
        app.include_router(v2.router)
    app.openapi = partial(openapi_document, app)  # type: ignore[method-assign]
    return app


def account_reads(settings: ServiceSettings, client: Any) -> BucketStore:
    """Where ``GET /v1/account``'s per-account limit keeps its buckets: in Redis when
    the service has one (every process behind it shares the limit, and refuses, as the
    prediction budgets do, when Redis cannot be reached or lost its data under
    ``--redis-loss refuse``), else in this process."""
    if client is None or settings.redis_url is None:
        return MemoryBuckets()
    return RedisBuckets(
        settings.redis_url,
        prefix="mlinvert:account-reads:",
        client=client,
        refuse_lost=settings.redis_loss == "refuse",
    )


def _add_error_handlers(app: FastAPI, settings: ServiceSettings) -> None:
    """Every refusal as the one JSON error document (see :mod:`mlinvert.service.errors`);
    an unknown path or method under ``/v2`` as the Open Inference Protocol's."""

    @app.exception_handler(MlinvertError)
    async def _mlinvert_error(request: Request, exc: MlinvertError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        return JSONResponse(error_body("QueryRejected", 422, msg), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        v2 = settings.protocol == "v2" and request.url.path.split("/")[1] == "v2"
        return JSONResponse(
            {"error": str(exc.detail)}  # a v2 client reads the error's message here
            if v2
            else error_body("HTTPError", exc.status_code, str(exc.detail)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )
