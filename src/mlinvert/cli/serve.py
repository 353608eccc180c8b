"""``mlinvert serve``: run the prediction service (FastAPI under uvicorn)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlinvert.service.settings import ServiceSettings

_Model = Annotated[
    list[str] | None,
    typer.Option("--model", help="Model folder to serve (DIR or NAME=DIR); repeatable."),
]
_Policy = Annotated[
    str | None,
    typer.Option(
        help="Output policy, e.g. full, round:2, top:3+round:2, labels. [MLINVERT_POLICY]"
    ),
]
_ModelPolicy = Annotated[
    list[str] | None,
    typer.Option("--model-policy", help="Policy for one model, NAME=SPEC (overrides --policy)."),
]
_RateLimit = Annotated[
    str | None,
    typer.Option(
        "--rate-limit", help="Per-account input budget, e.g. 2000/hour. [MLINVERT_RATE_LIMIT]"
    ),
]
_Detect = Annotated[
    str | None,
    typer.Option(
        "--detect",
        help="Query detector: flag (or block) accounts sending near-duplicate inputs, "
        "detect[:flag|block][:AFTER], e.g. detect:block:100. [MLINVERT_DETECTOR]",
    ),
]
_Db = Annotated[
    Path | None, typer.Option(help="SQLite file for accounts and the query log. [MLINVERT_DB]")
]
_Host = Annotated[
    str | None, typer.Option(help="Interface to bind (default 127.0.0.1). [MLINVERT_HOST]")
]
_Port = Annotated[int | None, typer.Option(help="TCP port (default 8000). [MLINVERT_PORT]")]
_Redis = Annotated[
    str | None,
    typer.Option(
        "--redis",
        help="Share rate limits and the detector's fingerprint history between service "
        "processes via Redis, e.g. redis://127.0.0.1:6379/0.",
    ),
]
_RedisTimeout = Annotated[
    float | None,
    typer.Option(
        "--redis-timeout",
        help="Seconds all Redis calls of one request may take together (default 2). "
        "[MLINVERT_REDIS_TIMEOUT]",
    ),
]
_RedisLoss = Annotated[
    str | None,
    typer.Option(
        "--redis-loss",
        help="When Redis comes back without its data (restarted without AOF/RDB): 'reset' "
        "(default: every budget starts full again) or 'refuse' (refuse queries, 503, until "
        "its data is restored or `mlinvert keys accept-budget-reset`). [MLINVERT_REDIS_LOSS]",
    ),
]
_LogMaxAgeDays = Annotated[
    float | None,
    typer.Option(
        "--log-max-age-days",
        help="Days the query log keeps an entry (default 90). [MLINVERT_LOG_MAX_AGE_DAYS]",
    ),
]
_LogMaxRows = Annotated[
    int | None,
    typer.Option(
        "--log-max-rows",
        help="Entries the query log keeps at most, newest first (default 10 million). "
        "[MLINVERT_LOG_MAX_ROWS]",
    ),
]
_AccountRate = Annotated[
    str | None,
    typer.Option(
        "--account-rate",
        help="How often one account may read GET /v1/account (default 60/minute; shared "
        "through Redis with --redis). [MLINVERT_ACCOUNT_RATE]",
    ),
]
_MaxBatch = Annotated[int | None, typer.Option("--max-batch", help="Largest batch (default 256).")]
_MaxBody = Annotated[
    int | None,
    typer.Option(
        "--max-body",
        help="Ceiling of any request body in bytes (default 16 MiB; each model's own limit, "
        "from its largest batch, is usually lower). [MLINVERT_MAX_BODY_BYTES]",
    ),
]
_BodyBudget = Annotated[
    int | None,
    typer.Option(
        "--body-budget",
        help="Request-body bytes all requests may hold at once; past it 503 (default 48 MiB). "
        "[MLINVERT_BODY_BUDGET_BYTES]",
    ),
]
_BodyTimeout = Annotated[
    float | None,
    typer.Option(
        "--body-timeout",
        help="Seconds a request body may take to arrive (default 30). [MLINVERT_BODY_TIMEOUT]",
    ),
]
_IdleTimeout = Annotated[
    float | None,
    typer.Option(
        "--idle-timeout",
        help="Seconds a body may pause, and an idle connection stay open (default 10). "
        "[MLINVERT_IDLE_TIMEOUT]",
    ),
]
_HeaderTimeout = Annotated[
    float | None,
    typer.Option(
        "--header-timeout",
        help="Seconds a request's headers may take to arrive, from the connection's opening "
        "or the request's first byte; then 408 and the connection is closed (default 10). "
        "[MLINVERT_HEADER_TIMEOUT]",
    ),
]
_LogSynchronous = Annotated[
    bool | None,
    typer.Option(
        "--log-synchronous/--no-log-synchronous",
        help="fsync every query-log commit (SQLite synchronous=FULL: survives a power loss) "
        "or not (NORMAL, the default: survives a crash of the service). "
        "[MLINVERT_LOG_SYNCHRONOUS=FULL|NORMAL]",
    ),
]
_Protocol = Annotated[
    str | None,
    typer.Option(
        "--protocol",
        help="mlinvert (default: the /v1 routes) or v2 (the Open Inference Protocol's /v2 "
        "routes as well, for KServe v2 / Triton clients). [MLINVERT_PROTOCOL]",
    ),
]
_LogLevel = Annotated[str, typer.Option("--log-level", help="uvicorn log level.")]


def serve_command(
    model: _Model = None,
    policy: _Policy = None,
    model_policy: _ModelPolicy = None,
    rate_limit: _RateLimit = None,
    detect: _Detect = None,
    db: _Db = None,
    host: _Host = None,
    port: _Port = None,
    redis: _Redis = None,
    redis_timeout: _RedisTimeout = None,
    redis_loss: _RedisLoss = None,
    log_max_age_days: _LogMaxAgeDays = None,
    log_max_rows: _LogMaxRows = None,
    account_rate: _AccountRate = None,
    max_batch: _MaxBatch = None,
    max_body: _MaxBody = None,
    body_budget: _BodyBudget = None,
    body_timeout: _BodyTimeout = None,
    idle_timeout: _IdleTimeout = None,
    header_timeout: _HeaderTimeout = None,
    log_synchronous: _LogSynchronous = None,
    protocol: _Protocol = None,
    log_level: _LogLevel = "warning",
) -> None:
    """Serve models over HTTP with the chosen defences; flags override MLINVERT_* variables."""
    from mlinvert.service.server import serve

    settings = ServiceSettings.from_env(
        models=tuple(model) if model else None,
        policy=policy,
        model_policies=tuple(model_policy) if model_policy else None,
        rate_limit=rate_limit,
        detector=detect,
        db=db,
        host=host,
        port=port,
        redis_url=redis,
        redis_timeout=redis_timeout,
        redis_loss=redis_loss,
        log_max_age_days=log_max_age_days,
        log_max_rows=log_max_rows,
        account_rate=account_rate,
        max_batch=max_batch,
        max_body_bytes=max_body,
        body_budget_bytes=body_budget,
        body_timeout=body_timeout,
        idle_timeout=idle_timeout,
        header_timeout=header_timeout,
        log_synchronous=None
        if log_synchronous is None
        else ("FULL" if log_synchronous else "NORMAL"),
        protocol=protocol,
    )
    serve(settings, log_level=log_level)


def register(app: typer.Typer) -> None:
    """Add ``serve`` to the CLI."""
    app.command("serve")(serve_command)


def main() -> None:
    """``python -m mlinvert.cli.serve``: the serve command alone (used by ServiceProcess)."""
    import sys

    from mlinvert.cli.common import console, setup_logging
    from mlinvert.errors import MlinvertError

    setup_logging(False)
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    register(app)
    try:
        app(prog_name="mlinvert serve")
    except MlinvertError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
