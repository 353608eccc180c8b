"""``/healthz`` (liveness) and ``/readyz`` (readiness)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import JSONResponse, Response

from mlinvert.defenses.ratelimit import redis_deadline, redis_problem
from mlinvert.service.schemas import Health, Readiness
from mlinvert.service.state import Service, ServiceState

router = APIRouter(tags=["service"])


@router.head("/healthz", include_in_schema=False)
@router.get("/healthz", response_model=Health)
def healthz(service: Service) -> Health:
    """Liveness: the process answers, and which models it serves. It says nothing of
    the stores a prediction needs: that is ``/readyz``."""
    return Health(status="ok", models=sorted(service.predictors))


@router.head("/readyz", include_in_schema=False)
@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "A store cannot serve"}},
)
def readyz(service: Service) -> Response:
    """Readiness: whether predictions can be answered now. 200 when the account
    database and the shared store (Redis, when configured) work; 503 naming the
    store that does not (Redis unreachable, or it lost the budgets under
    ``--redis-loss refuse``)."""
    checks = readiness(service)
    ready = all(v == "ok" for v in checks.values())
    doc = Readiness(status="ready" if ready else "unready", checks=checks)
    return JSONResponse(doc.model_dump(), status_code=200 if ready else 503)


def readiness(service: ServiceState) -> dict[str, str]:
    """Each store a prediction needs: ``ok``, or what is wrong with it."""
    settings = service.settings
    checks = {"database": service.store.problem() or "ok"}
    if service.ready_client is not None:
        with redis_deadline(settings.redis_timeout):
            problem = redis_problem(
                service.ready_client, need_epoch=settings.redis_loss == "refuse"
            )
        checks["redis"] = problem or "ok"
    return checks
