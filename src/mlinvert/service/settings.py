"""Service settings: flags or ``MLINVERT_*`` environment variables, validated once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mlinvert.defenses.detector import parse_detector
from mlinvert.defenses.policies import parse_policy
from mlinvert.defenses.ratelimit import parse_rate
from mlinvert.errors import ConfigError

ENV_PREFIX = "MLINVERT_"
#: Accepted spellings of ``log_synchronous`` and the SQLite mode each means.
_SYNCHRONOUS = {
    **dict.fromkeys(("full", "1", "true", "yes", "on"), "FULL"),
    **dict.fromkeys(("normal", "0", "false", "no", "off"), "NORMAL"),
}


@dataclass(frozen=True, kw_only=True)
class ServiceSettings:
    """Everything the prediction service needs besides its models.

    Environment names are ``MLINVERT_`` + the upper-cased field: ``MLINVERT_DB``,
    ``MLINVERT_POLICY``, ``MLINVERT_RATE_LIMIT``, ``MLINVERT_DETECTOR``, ``MLINVERT_REDIS_URL``,
    ``MLINVERT_MAX_BATCH``, ``MLINVERT_MAX_BODY_BYTES``, ``MLINVERT_HOST``,
    ``MLINVERT_PORT``, ``MLINVERT_LOG_SYNCHRONOUS``, ``MLINVERT_MODELS`` (model folders,
    ``NAME=DIR`` or ``DIR``, separated by ``os.pathsep``), ``MLINVERT_MODEL_POLICIES``
    (``NAME=SPEC`` overriding ``policy`` for one model, separated by ``,``).

    ``log_synchronous`` (flag ``--log-synchronous/--no-log-synchronous``; the variable
    takes ``FULL``/``NORMAL`` or a boolean word) is SQLite's ``synchronous`` for the
    query log (WAL mode):
    ``NORMAL`` (default) commits without an fsync per request; a committed entry survives
    a crash of the service process, and only the last commits before a power loss or OS
    crash may be lost. ``FULL`` fsyncs every commit (durable against power loss too,
    0.4-7 ms per request on this machine's disk).
    """

    db: Path
    policy: str = "full"
    rate_limit: str | None = None
    detector: str | None = None
    redis_url: str | None = None
    max_batch: int = 256
    max_body_bytes: int = 64 * 2**20
    host: str = "127.0.0.1"
    port: int = 8000
    models: tuple[str, ...] = ()
    model_policies: tuple[str, ...] = ()
    log_synchronous: str = "NORMAL"

    def __post_init__(self) -> None:
        object.__setattr__(self, "db", Path(self.db))
        parse_policy(self.policy)
        if self.rate_limit is not None:
            parse_rate(self.rate_limit)
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
            if f.name in ("max_batch", "max_body_bytes", "port"):
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise ConfigError(
                        f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not an integer"
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

    def policy_for(self, model: str) -> str:
        """The policy spec of ``model``: its override, else ``policy``."""
        for spec in self.model_policies:
            name, _, policy = spec.partition("=")
            if name == model:
                return policy
        return self.policy
