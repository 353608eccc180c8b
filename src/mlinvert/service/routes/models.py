"""``GET /v1/models``: what every served model is and which limits apply."""

from __future__ import annotations

from fastapi import APIRouter

from mlinvert.defenses.detector import QueryDetector
from mlinvert.defenses.predictor import Predictor
from mlinvert.service.predictors import limiter_of, max_batch_of
from mlinvert.service.schemas import ModelInfo, ModelList
from mlinvert.service.state import Service
from mlinvert.targets.base import Tabular

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList)
def list_models(service: Service) -> ModelList:
    """Every served model: kind, input shape, classes, the active policy and limits."""
    return ModelList(models=[model_info(p) for p in service.predictors.values()])


def model_info(predictor: Predictor) -> ModelInfo:
    """What ``GET /v1/models`` says of ``predictor``."""
    info = predictor.info
    limiter = limiter_of(predictor)
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
        max_batch=max_batch_of(predictor),
        rate_limit=rate,
        detector=detector,
        feature_names=list(model.feature_names_) if isinstance(model, Tabular) else None,
    )
