"""The prediction service: FastAPI app factory, accounts and query log, runner."""

from mlinvert.service.app import create_app
from mlinvert.service.bodies import decode_batch
from mlinvert.service.predictors import build_predictors
from mlinvert.service.settings import ServiceSettings
from mlinvert.service.store import Store

__all__ = ["ServiceSettings", "Store", "build_predictors", "create_app", "decode_batch"]
