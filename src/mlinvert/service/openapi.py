"""The OpenAPI document: the documented error answers and headers, and the document
itself (the prediction body's schema added, descriptions written as Markdown)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from mlinvert.service.bodies import RAW_TYPE
from mlinvert.service.schemas import ErrorBody, PredictRequest

ERRORS: dict[int | str, dict[str, Any]] = {
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
RETRY_AFTER = {
    "Retry-After": {
        "description": "Whole seconds to wait before sending again",
        "schema": {"type": "integer"},
    }
}
for _code in (429, 503):
    ERRORS[_code]["headers"] = RETRY_AFTER

#: The rate-limit fields of draft-ietf-httpapi-ratelimit-headers-06, as documented.
RATE_HEADERS: dict[str, dict[str, Any]] = {
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


#: The documented answers of ``POST /v1/models/{name}/predict``.
PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {"headers": RATE_HEADERS},
    429: {**ERRORS[429], "headers": {**RETRY_AFTER, **RATE_HEADERS}},
}
#: The two request bodies ``POST /v1/models/{name}/predict`` reads.
PREDICT_BODY: dict[str, Any] = {
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
}


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """``app``'s OpenAPI document, built once: the routes' schema plus ``PredictRequest``
    (read by hand from the body, so FastAPI does not see it)."""
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
