"""What every route of one app shares: settings, store, metrics, predictors and the
request machinery, kept on ``app.state.service`` and handed to routes as a dependency."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from mlinvert.defenses.predictor import Predictor
from mlinvert.defenses.ratelimit import BucketStore, Rate
from mlinvert.service.handler import BodyBudget, PredictHandler
from mlinvert.service.metrics import Metrics
from mlinvert.service.settings import ServiceSettings
from mlinvert.service.store import Store


@dataclass(frozen=True)
class ServiceState:
    """One app's shared parts. ``account_reads`` meters ``GET /v1/account`` per account
    at ``account_rate`` (in Redis when the service has one, shared by its processes);
    ``ready_client`` is the Redis client ``/readyz`` asks (None without Redis);
    ``handler`` answers the mlinvert predictions, ``v2_handler`` the Open Inference
    Protocol's."""

    settings: ServiceSettings
    store: Store
    metrics: Metrics
    predictors: Mapping[str, Predictor]
    handler: PredictHandler
    v2_handler: PredictHandler
    bodies: BodyBudget
    account_rate: Rate
    account_reads: BucketStore
    ready_client: Any


def service_state(request: Request) -> ServiceState:
    """The state of the app serving ``request``."""
    state: ServiceState = request.app.state.service
    return state


#: The shared-state dependency of every route.
Service = Annotated[ServiceState, Depends(service_state)]
