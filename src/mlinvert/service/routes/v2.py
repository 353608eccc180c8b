"""The Open Inference Protocol (KServe v2) routes, served with ``--protocol v2``:
health, server and model metadata, model readiness and ``infer`` (see
:mod:`mlinvert.service.v2`). Metadata needs no key, as ``GET /v1/models``; ``infer``
takes the same key as a prediction."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from mlinvert import __version__
from mlinvert.defenses.predictor import Predictor
from mlinvert.errors import UnknownModel
from mlinvert.service.auth import ApiKey
from mlinvert.service.handler import clip
from mlinvert.service.routes.health import readiness
from mlinvert.service.routes.predict import answer, head_of
from mlinvert.service.state import Service, ServiceState
from mlinvert.service.v2 import HEADER_LENGTH, model_metadata, v2_error_response

router = APIRouter(prefix="/v2", tags=["v2"])


@router.get("")
def server_metadata() -> dict[str, Any]:
    """The server: its name, version and protocol extensions."""
    return {"name": "mlinvert", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/health/live")
def live() -> dict[str, bool]:
    """Liveness: the process answers."""
    return {"live": True}


@router.get("/health/ready")
def ready(service: Service) -> Response:
    """Readiness: 200 when the account database and Redis (when configured) work;
    503 with ``error`` naming the store that does not."""
    checks = readiness(service)
    problems = [f"{store}: {v}" for store, v in checks.items() if v != "ok"]
    if problems:
        return JSONResponse({"ready": False, "error": "; ".join(problems)}, status_code=503)
    return JSONResponse({"ready": True})


@router.get("/models/{name}")
def metadata(name: str, service: Service) -> Response:
    """The model's input (``input``, FP32, ``[-1, *input_shape]``) and the outputs its
    policy lets out."""
    found = _predictor(service, name)
    if isinstance(found, Response):
        return found
    return JSONResponse(model_metadata(found))


@router.get("/models/{name}/ready")
def model_ready(name: str, service: Service) -> Response:
    """200 when the model is served (404 otherwise)."""
    found = _predictor(service, name)
    if isinstance(found, Response):
        return found
    return JSONResponse({"name": name, "ready": True})


@router.post("/models/{name}/infer")
async def infer(name: str, request: Request, key: ApiKey, service: Service) -> Response:
    """Answer one input tensor as the model's policy allows: JSON ``data`` or binary
    tensor data (``Inference-Header-Content-Length``); outputs by name, each as JSON or
    binary (``binary_data_output``)."""
    head = head_of(request, name, key, header_length=request.headers.get(HEADER_LENGTH))
    return await answer(service, service.v2_handler, request, head)


def _predictor(service: ServiceState, name: str) -> Predictor | Response:
    predictor = service.predictors.get(name)
    if predictor is not None:
        return predictor
    return v2_error_response(
        UnknownModel(
            f"no model named {clip(name)!r}; served: {', '.join(sorted(service.predictors))}"
        )
    )
