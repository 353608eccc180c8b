"""The prediction service: FastAPI app factory, accounts and query log, runner."""

from mlinvert.service.app import build_predictors, create_app, decode_batch
from mlinvert.service.settings import ServiceSettings
from mlinvert.service.store import Store

__all__ = ["ServiceSettings", "Store", "build_predictors", "create_app", "decode_batch"]
