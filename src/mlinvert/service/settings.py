"""Service settings: flags or ``MLINVERT_*`` environment variables, validated once."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlinvert.defenses.detector import parse_detector
from mlinvert.defenses.policies import parse_policy
from mlinvert.defenses.ratelimit import parse_rate
from mlinvert.errors import ConfigError

if TYPE_CHECKING:
    from mlinvert.service.store import Store

ENV_PREFIX = "MLINVERT_"
#: What ``protocol`` may be: the mlinvert routes alone, or the v2 routes beside them.
PROTOCOLS = ("mlinvert", "v2")
#: Accepted spellings of ``log_synchronous`` and the SQLite mode each means.
_SYNCHRONOUS = {
    **dict.fromkeys(("full", "1", "true", "yes", "on"), "FULL"),
    **dict.fromkeys(("normal", "0", "false", "no", "off"), "NORMAL"),
}

#: The numeric fields and the type their environment variable is read as.
_NUMBERS: dict[str, type[int] | type[float]] = {
    "max_batch": int,
    "max_body_bytes": int,
    "body_budget_bytes": int,
    "port": int,
    "body_timeout": float,
    "idle_timeout": float,
    "header_timeout": float,
    "redis_timeout": float,
    "log_max_age_days": float,
    "log_max_rows": int,
}


@dataclass(frozen=True, kw_only=True)
class ServiceSettings:
    """Everything the prediction service needs besides its models.

    Environment names are ``MLINVERT_`` + the upper-cased field: ``MLINVERT_DB``,
    ``MLINVERT_POLICY``, ``MLINVERT_RATE_LIMIT``, ``MLINVERT_DETECTOR``, ``MLINVERT_REDIS_URL``,
    ``MLINVERT_MAX_BATCH``, ``MLINVERT_MAX_BODY_BYTES``, ``MLINVERT_BODY_BUDGET_BYTES``,
    ``MLINVERT_BODY_TIMEOUT``, ``MLINVERT_IDLE_TIMEOUT``, ``MLINVERT_HEADER_TIMEOUT``,
    ``MLINVERT_REDIS_TIMEOUT``,
    ``MLINVERT_REDIS_LOSS``, ``MLINVERT_LOG_MAX_AGE_DAYS``, ``MLINVERT_LOG_MAX_ROWS``,
    ``MLINVERT_ACCOUNT_RATE``, ``MLINVERT_HOST``,
    ``MLINVERT_PORT``, ``MLINVERT_LOG_SYNCHRONOUS``, ``MLINVERT_PROTOCOL``,
    ``MLINVERT_MODELS`` (model folders,
    ``NAME=DIR`` or ``DIR``, separated by ``os.pathsep``), ``MLINVERT_MODEL_POLICIES``
    (``NAME=SPEC`` overriding ``policy`` for one model, separated by ``,``).

    ``log_synchronous`` (flag ``--log-synchronous/--no-log-synchronous``; the variable
    takes ``FULL``/``NORMAL`` or a boolean word) is SQLite's ``synchronous`` for the
    query log (WAL mode):
    ``NORMAL`` (default) commits without an fsync per request; a committed entry survives
    a crash of the service process, and only the last commits before a power loss or OS
    crash may be lost. ``FULL`` fsyncs every commit (durable against power loss too,
    0.4-7 ms per request on this machine's disk).

    Request bodies: a body is read only after its key, model and declared size passed.
    ``max_body_bytes`` is the ceiling of any one body (each model's own limit, from its
    largest batch and input size, is usually far lower); ``body_budget_bytes`` bounds
    what every request together may hold at once for its body and its decoding (3x the
    size of a JSON body, 1x a raw one; a request that would pass it is answered 503 with
    Retry-After, unread); a body must arrive within ``body_timeout``
    seconds with no pause over ``idle_timeout`` seconds (408 otherwise; a pause is caught
    within the timeout's last quarter, see ``read_body``), and an idle
    keep-alive connection is closed after ``idle_timeout`` seconds. A connection whose
    request headers are not complete ``header_timeout`` seconds after it opened (or
    after a later request's first byte) is answered 408 and closed (slowloris; counted
    in ``/metrics``).

    Redis: every Redis call of one request shares one deadline, ``redis_timeout``
    seconds (a frozen Redis refuses a request after it, never per call). A Redis
    restarted without persistence comes back empty; ``redis_loss`` says what then:
    ``reset`` (default) lets every budget start full again, ``refuse`` refuses every
    prediction (503) until Redis's data is restored or an operator runs
    ``mlinvert keys accept-budget-reset``.

    The query log keeps ``log_max_age_days`` days (default 90) and at most
    ``log_max_rows`` entries (default 10 million, about 1-2 GB); requests without a
    valid key are counted in ``/metrics``, not logged. ``GET /v1/account`` answers each
    account at most ``account_rate`` (default 60/minute; with ``redis_url`` one limit
    shared by every process on that Redis, refused as predictions are when Redis cannot
    be reached or lost its data).

    ``protocol``: ``mlinvert`` (default) serves the ``/v1`` routes; ``v2`` serves the
    Open Inference Protocol's ``/v2`` routes as well (beside, not instead of, ``/v1``:
    keys, accounts, ``/healthz`` and ``/metrics`` stay where they are).
    """

    db: Path
    policy: str = "full"
    rate_limit: str | None = None
    detector: str | None = None
    redis_url: str | None = None
    max_batch: int = 256
    max_body_bytes: int = 16 * 2**20
    body_budget_bytes: int = 48 * 2**20
    body_timeout: float = 30.0
    idle_timeout: float = 10.0
    header_timeout: float = 10.0
    redis_timeout: float = 2.0
    redis_loss: str = "reset"
    log_max_age_days: float = 90.0
    log_max_rows: int = 10_000_000
    account_rate: str = "60/minute"
    host: str = "127.0.0.1"
    port: int = 8000
    models: tuple[str, ...] = ()
    model_policies: tuple[str, ...] = ()
    log_synchronous: str = "NORMAL"
    protocol: str = "mlinvert"

    def __post_init__(self) -> None:
        object.__setattr__(self, "db", Path(self.db))
        parse_policy(self.policy)
        if self.rate_limit is not None:
            parse_rate(self.rate_limit)
        parse_rate(self.account_rate)
        if self.log_max_rows < 1:
            raise ConfigError(f"log_max_rows must be >= 1, got {self.log_max_rows}")
        if self.detector is not None:
            parse_detector(self.detector)
        if self.redis_url is not None and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ConfigError(
                f"redis URL {self.redis_url!r} must start with redis://, rediss:// or unix://, "
                "e.g. redis://127.0.0.1:6379/0"
            )
        for spec in self.model_policies:
            name, sep, policy = spec.partition("=")
            if not sep or not name:
                raise ConfigError(f"model policy {spec!r}: write NAME=SPEC, e.g. faces=round:2")
            parse_policy(policy)
        mode = _SYNCHRONOUS.get(str(self.log_synchronous).strip().lower())
        if mode is None:
            raise ConfigError(
                f"log_synchronous must be FULL (or 1/true/yes/on) or NORMAL (or 0/false/no/off), "
                f"got {self.log_synchronous!r}"
            )
        object.__setattr__(self, "log_synchronous", mode)
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.body_budget_bytes < self.max_body_bytes:
            raise ConfigError(
                f"body_budget_bytes ({self.body_budget_bytes}) must be at least max_body_bytes "
                f"({self.max_body_bytes}), or the largest body could never be read"
            )
        if self.redis_loss not in ("reset", "refuse"):
            raise ConfigError(
                f"redis_loss must be 'reset' (budgets start full again after Redis loses its "
                f"data) or 'refuse' (refuse queries until it is restored), got {self.redis_loss!r}"
            )
        for name in (
            "body_timeout",
            "idle_timeout",
            "header_timeout",
            "redis_timeout",
            "log_max_age_days",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a number of seconds > 0, got {value!r}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                f"protocol must be 'mlinvert' (the /v1 routes) or 'v2' (the Open Inference "
                f"Protocol's /v2 routes as well), got {self.protocol!r}"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> ServiceSettings:
        """Read ``MLINVERT_*`` variables; keyword ``overrides`` (flags) win when not None."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            if f.name in _NUMBERS:
                kind = _NUMBERS[f.name]
                try:
                    values[f.name] = kind(raw)
                except ValueError:
                    raise ConfigError(
                        f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not "
                        + ("an integer" if kind is int else "a number")
                    ) from None
            elif f.name == "models":
                values[f.name] = tuple(p for p in raw.split(os.pathsep) if p)
            elif f.name == "model_policies":
                values[f.name] = tuple(p.strip() for p in raw.split(",") if p.strip())
            else:
                values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "db" not in values:
            raise ConfigError(
                "the service needs an account database: pass --db PATH or set MLINVERT_DB"
            )
        return cls(**values)

    def open_store(self) -> Store:
        """The account database and query log, with this retention."""
        from mlinvert.service.store import Store

        return Store(
            self.db,
            synchronous=self.log_synchronous,
            max_age=self.log_max_age_days * 86400.0,
            max_rows=self.log_max_rows,
        )

    def policy_for(self, model: str) -> str:
        """The policy spec of ``model``: its override, else ``policy``."""
        for spec in self.model_policies:
            name, _, policy = spec.partition("=")
            if name == model:
                return policy
        return self.policy
