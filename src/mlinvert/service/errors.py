"""The one table mapping MlinvertError classes to HTTP status codes, and the JSON body."""

from __future__ import annotations

import math

from starlette.responses import JSONResponse

from mlinvert.errors import (
    BadRequest,
    Blocked,
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

#: First match wins, so subclasses come before their bases.
ERROR_TABLE: tuple[tuple[type[MlinvertError], int], ...] = (
    (Unauthorized, 401),
    (Blocked, 403),
    (UnknownModel, 404),
    (InputTooLarge, 413),
    (UnsupportedMediaType, 415),
    (RequestTimeout, 408),
    (ClientDisconnected, 499),  # nginx's "client closed request"; nobody reads it
    (BadRequest, 400),
    (QueryRejected, 422),
    (RateLimited, 429),
    (Unavailable, 503),
    (ConfigError, 422),
    (MlinvertError, 422),
)


def status_of(exc: MlinvertError) -> int:
    """The HTTP status code for an error (see ERROR_TABLE)."""
    for cls, status in ERROR_TABLE:
        if isinstance(exc, cls):
            return status
    return 422  # pragma: no cover - MlinvertError is the last row


def error_body(kind: str, status: int, message: str) -> dict[str, object]:
    """The JSON error document every 4xx/5xx answer carries."""
    return {"error": {"type": kind, "status": status, "message": message}}


def error_response(exc: MlinvertError) -> JSONResponse:
    """JSON error response for ``exc``; 429 and 503 carry ``Retry-After`` (whole seconds)."""
    status = status_of(exc)
    body = error_body(type(exc).__name__, status, str(exc))
    if isinstance(exc, RateLimited | Unavailable):
        body["error"]["retry_after"] = exc.retry_after  # type: ignore[index]
    return JSONResponse(body, status_code=status, headers=error_headers(exc))


def error_headers(exc: MlinvertError) -> dict[str, str]:
    """``Retry-After`` (whole seconds) of a 429 or 503; ``WWW-Authenticate`` of a 401."""
    headers = {}
    if isinstance(exc, RateLimited | Unavailable):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="mlinvert"'
    return headers
