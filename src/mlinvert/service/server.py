"""Load model folders and run the service under uvicorn (what ``mlinvert serve`` calls)."""

from __future__ import annotations

import errno
import logging
import math
import secrets
import socket
from collections.abc import Sequence
from pathlib import Path

from mlinvert.defenses.ratelimit import (
    mark_redis_epoch,
    redis_client,
    redis_epoch,
    redis_persistence,
    redis_problem,
)
from mlinvert.errors import ConfigError
from mlinvert.service.app import create_app
from mlinvert.service.predictors import build_predictors
from mlinvert.service.protocol import header_deadline_protocol
from mlinvert.service.settings import ServiceSettings
from mlinvert.service.store import REDIS_EPOCH, Store
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


#: uvicorn's log levels (``--log-level``).
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def check_listen(host: str, port: int) -> None:
    """ConfigError unless a server can listen on ``host:port`` now (a port already in use
    or a host that is not an address of this machine), before anything says "serving"."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ConfigError(
            f"cannot listen on host {host!r} ({exc.strerror}); pass --host an address of "
            "this machine, e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"
        ) from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind(address)
        except OSError as exc:
            fix = {
                errno.EADDRINUSE: "another service listens there: stop it or pass another --port",
                errno.EADDRNOTAVAIL: f"{host} is not an address of this machine: pass "
                "--host 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)",
                errno.EACCES: "ports below 1024 need privileges: pass --port 1024 or above",
            }.get(exc.errno or 0, "pass another --host or --port")
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); {fix}") from None


def check_redis(settings: ServiceSettings, store: Store) -> None:
    """At startup: Redis answers, what it keeps across a restart, and whether it lost the
    budgets since this database last met it (its epoch key gone, see RedisBuckets).

    A Redis that keeps nothing gets a warning. With ``redis_loss="refuse"`` an
    unreachable Redis is a ConfigError, and a Redis that lost its data is left unmarked,
    so every prediction is refused (503) until it is restored or an operator runs
    ``mlinvert keys accept-budget-reset``; with ``"reset"`` the loss is logged and accepted.
    """
    url = settings.redis_url
    if url is None:
        return
    client = redis_client(url, timeout=settings.redis_timeout)
    refuse = settings.redis_loss == "refuse"
    problem = redis_problem(client)
    if problem is not None:
        if refuse:
            raise ConfigError(
                f"Redis at {url} is {problem}; start it first (with --redis-loss refuse the "
                "service does not start without the budgets it keeps)"
            )
        log.warning(
            "Redis at %s is %s; predictions are refused (429) until it answers", url, problem
        )
        return
    kept = redis_persistence(client)
    if kept is None:
        log.warning(
            "Redis at %s keeps nothing across a restart (appendonly no, no save points): a "
            "restart empties every account's rate-limit budget%s; enable AOF (appendonly yes)",
            url,
            "" if refuse else " (pass --redis-loss refuse to refuse queries instead)",
        )
    ours, theirs = store.meta(REDIS_EPOCH), redis_epoch(client)
    if theirs is None and ours is not None:
        if refuse:
            log.error(
                "Redis at %s lost its data since this service last met it: every prediction "
                "is refused (503) until its data is restored or `mlinvert keys "
                "accept-budget-reset` accepts that every budget starts full again",
                url,
            )
            return
        log.warning(
            "Redis at %s lost its data since this service last met it: every account's "
            "budget starts full again (--redis-loss reset)",
            url,
        )
    store.set_meta(REDIS_EPOCH, mark_redis_epoch(client, secrets.token_hex(8)))


def serve(settings: ServiceSettings, *, log_level: str = "warning") -> None:
    """Load ``settings.models``, build the app and run it until interrupted."""
    import uvicorn

    if log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    models = load_models(settings.models)
    for spec in settings.model_policies:
        name = spec.partition("=")[0]
        if name not in models:
            raise ConfigError(
                f"--model-policy {spec!r} names no served model; the served models are "
                f"{', '.join(models)} (the name is the folder's, or NAME in --model NAME=DIR)"
            )
    check_listen(settings.host, settings.port)
    store = settings.open_store()
    dropped = store.prune()
    if dropped:
        log.warning("dropped %d query-log entries past the retention", dropped)
    check_redis(settings, store)
    predictors = build_predictors(models, settings, flags=store)
    app = create_app(settings, predictors, store=store)
    log.warning(
        "serving %s on http://%s:%d (rate limit %s, detector %s%s)%s",
        ", ".join(f"{name} [{p.policy.name}]" for name, p in predictors.items()),
        settings.host,
        settings.port,
        settings.rate_limit or "none",
        settings.detector or "off",
        f"; shared via {settings.redis_url}" if settings.redis_url else "",
        "; Open Inference Protocol (v2) at /v2 as well" if settings.protocol == "v2" else "",
    )
    uvicorn.run(
        app,
        http=header_deadline_protocol(settings.header_timeout, app.state.metrics),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=False,
        timeout_keep_alive=math.ceil(settings.idle_timeout),
        timeout_graceful_shutdown=5,
    )
