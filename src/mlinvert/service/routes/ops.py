"""``/metrics`` (Prometheus) and ``/docs`` (a note: no interactive page offline)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import PlainTextResponse

from mlinvert.service.state import Service

router = APIRouter()


@router.get("/docs", response_class=PlainTextResponse, include_in_schema=False)
def docs() -> PlainTextResponse:
    return PlainTextResponse(
        "This service serves no interactive API page (Swagger UI would load its scripts "
        "from a CDN). Its OpenAPI document is GET /openapi.json: open it in any OpenAPI "
        "viewer, e.g. a locally installed Swagger UI or Redocly.\n"
    )


@router.get("/metrics", response_class=PlainTextResponse, tags=["service"])
def prometheus(service: Service) -> PlainTextResponse:
    """Prometheus text metrics: requests, inputs, rejections by reason, latency."""
    return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")
