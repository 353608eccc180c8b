"""``POST /v1/models/{name}/predict``: the event-loop side of a prediction (body
limits, the body budget, reading the body); the rest runs in the thread pool
(:class:`~mlinvert.service.handler.PredictHandler`)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from mlinvert.errors import InputTooLarge, MlinvertError, Unavailable
from mlinvert.service.auth import ApiKey, PresentedKey
from mlinvert.service.bodies import SMALL_BODY, read_body, reserve
from mlinvert.service.handler import Head, Outcome, PredictHandler
from mlinvert.service.openapi import PREDICT_BODY, PREDICT_RESPONSES
from mlinvert.service.schemas import PredictResponse
from mlinvert.service.state import Service, ServiceState

router = APIRouter(tags=["models"])


@router.post(
    "/v1/models/{name}/predict",
    response_model=PredictResponse,
    responses=PREDICT_RESPONSES,
    openapi_extra=PREDICT_BODY,
)
async def predict(
    name: str,
    request: Request,
    key: ApiKey,
    service: Service,
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
    head = head_of(request, name, key, shape=shape, dtype=dtype)
    return await answer(service, service.handler, request, head)


def head_of(request: Request, name: str, key: PresentedKey, **extra: str | None) -> Head:
    """The request's :class:`Head` (its body not read yet), as every route builds it;
    ``extra``: the route's own fields (the raw form's shape and dtype, v2's header length)."""
    return Head(
        name=name,
        key=key.key,
        key_problem=key.problem,
        content_type=request.headers.get("content-type", "").split(";")[0].strip().lower(),
        declared=content_length(request),
        started=time.perf_counter(),
        **extra,
    )


async def answer(
    service: ServiceState, handler: PredictHandler, request: Request, head: Head
) -> Response:
    """Admit, read and answer the request ``head`` announces, within the body limits;
    ``handler`` speaks the protocol of the route."""
    bodies = service.bodies
    if head.declared is not None and head.declared <= min(
        SMALL_BODY, service.settings.max_body_bytes
    ):
        reserved = reserve(head.declared, handler.raw_body(head), bodies.budget)
        if bodies.take(reserved):
            try:
                return await _small(service, handler, request, head, head.declared)
            finally:
                bodies.release(reserved)
    admitted = await run_in_threadpool(handler.admit, head)
    if isinstance(admitted, Outcome):  # refused before its body was read
        return await _unread(service, request, head, admitted.response())
    size = admitted.limit if head.declared is None else head.declared
    reserved = reserve(size, handler.raw_body(head), bodies.budget)
    if not bodies.take(reserved):
        busy = Unavailable(
            f"the service holds {bodies.held} bytes for request bodies; this one "
            f"({size} bytes, {reserved} to decode) would pass its budget of "
            f"{bodies.budget}: retry in a second",
            retry_after=1.0,
        )
        outcome = await run_in_threadpool(handler.refuse, busy, head, admitted.account)
        return await _unread(service, request, head, outcome.response())
    try:
        try:
            data = await read_body(
                request.receive,
                admitted.limit,
                timeout=service.settings.body_timeout,
                idle=service.settings.idle_timeout,
                too_large=handler.body_too_large(head, admitted),
            )
        except MlinvertError as exc:
            outcome = await run_in_threadpool(handler.refuse, exc, head, admitted.account)
            return closing(outcome.response())
        outcome = await run_in_threadpool(handler.answer, head, admitted, data)
        del data
    finally:
        bodies.release(reserved)
    return outcome.response()


async def _small(
    service: ServiceState, handler: PredictHandler, request: Request, head: Head, declared: int
) -> Response:
    """A request whose declared body is small: read first (as a refused body would be
    drained), then admitted and answered in one thread-pool hop, not two."""
    try:
        data = await read_body(
            request.receive,
            declared,
            timeout=service.settings.body_timeout,
            idle=service.settings.idle_timeout,
            too_large=lambda size: InputTooLarge(
                f"request body of {size} bytes is longer than its Content-Length"
            ),
        )
    except MlinvertError as exc:
        outcome = await run_in_threadpool(handler.handle, head, exc)
        return closing(outcome.response())
    outcome = await run_in_threadpool(handler.handle, head, data)
    del data
    return outcome.response()


async def _unread(
    service: ServiceState, request: Request, head: Head, response: Response
) -> Response:
    """Drain (drop) a refused request's body so the client reads the refusal, when it
    is declared within ``max_body_bytes``; otherwise close the connection after the
    answer (the body is never read)."""
    if head.declared == 0:
        return response
    max_body = service.settings.max_body_bytes
    if head.declared is not None and head.declared <= max_body:
        try:
            await read_body(
                request.receive,
                max_body,
                timeout=service.settings.body_timeout,
                idle=service.settings.idle_timeout,
                too_large=lambda size: InputTooLarge(f"{size} bytes"),
                keep=False,
            )
            return response
        except MlinvertError:
            pass
    return closing(response)


def content_length(request: Request) -> int | None:
    """The declared body length (None for a chunked body; the server checked the digits)."""
    declared = request.headers.get("content-length")
    return None if declared is None else int(declared)


def closing(response: Response) -> Response:
    """``response``, after which the server closes the connection (its body stays unread)."""
    response.headers["Connection"] = "close"
    return response
