"""Load model folders and run the service under uvicorn (what ``mlinvert serve`` calls)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from mlinvert.errors import ConfigError
from mlinvert.service.app import build_predictors, create_app
from mlinvert.service.settings import ServiceSettings
from mlinvert.service.store import Store
from mlinvert.targets.base import Target

log = logging.getLogger(__name__)


def parse_model_spec(spec: str) -> tuple[str, Path]:
    """``NAME=DIR`` or ``DIR`` (the name is then the folder's name)."""
    name, sep, folder = spec.partition("=")
    if not sep:
        folder, name = spec, Path(spec.rstrip("/")).name
    if not name or not folder:
        raise ConfigError(f"model spec {spec!r}: write DIR or NAME=DIR")
    if not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(f"model name {name!r} may hold only letters, digits, '-', '_' and '.'")
    return name, Path(folder)


def load_models(specs: Sequence[str]) -> dict[str, Target]:
    """Load each model folder with :func:`mlinvert.targets.io.load`."""
    from mlinvert.targets.io import load

    if not specs:
        raise ConfigError("no model to serve: pass --model DIR (or set MLINVERT_MODELS)")
    models: dict[str, Target] = {}
    for spec in specs:
        name, folder = parse_model_spec(spec)
        if name in models:
            raise ConfigError(f"two models named {name!r}; use NAME=DIR to rename one")
        models[name] = load(folder)
    return models


def serve(settings: ServiceSettings, *, log_level: str = "warning") -> None:
    """Load ``settings.models``, build the app and run it until interrupted."""
    import uvicorn

    store = Store(settings.db, synchronous=settings.log_synchronous)
    predictors = build_predictors(load_models(settings.models), settings, flags=store)
    app = create_app(settings, predictors, store=store)
    log.warning(
        "serving %s on http://%s:%d (rate limit %s, detector %s%s)",
        ", ".join(f"{name} [{p.policy.name}]" for name, p in predictors.items()),
        settings.host,
        settings.port,
        settings.rate_limit or "none",
        settings.detector or "off",
        f"; shared via {settings.redis_url}" if settings.redis_url else "",
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
