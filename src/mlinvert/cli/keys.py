"""``mlinvert keys``: API keys of the prediction service, and the detector's flags."""

from __future__ import annotations

import datetime as dt
import os
import secrets
from pathlib import Path

import typer

from mlinvert.cli.common import console, out
from mlinvert.errors import ConfigError
from mlinvert.service.store import Store

keys_app = typer.Typer(
    help="Manage API keys (stored only as SHA-256 hashes).", no_args_is_help=True
)

DbOption = typer.Option(None, "--db", help="The service's SQLite file. [MLINVERT_DB]")


def _store(db: Path | None, *, create: bool = False) -> Store:
    """The account database; only ``keys create`` makes a new one (a mistyped path given
    to the other commands is an error, not a fresh empty database)."""
    path = db or os.environ.get("MLINVERT_DB")
    if not path:
        raise ConfigError("no account database: pass --db PATH or set MLINVERT_DB")
    if not create and not Path(path).exists():
        raise ConfigError(
            f"no account database at {path}; check the path (the one `mlinvert serve --db` "
            f"uses), or create the first key with `mlinvert keys create NAME --db {path}`"
        )
    return Store(path)


def _when(ts: float | None) -> str:
    return "-" if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M")


@keys_app.command("create")
def create(name: str = typer.Argument(..., help="Account name."), db: Path = DbOption) -> None:
    """Create a key for account NAME and print it once (it is not stored)."""
    store = _store(db, create=True)
    key, record = store.create_key(name)
    store.close()
    out.print(key, highlight=False, soft_wrap=True)
    console.print(f"created key {record.key_id} for account {name!r}; it will not be shown again")


@keys_app.command("list")
def list_keys(db: Path = DbOption) -> None:
    """List accounts and key ids (never the keys)."""
    store = _store(db)
    records = store.list_keys()
    store.close()
    out.print(f"{'account':<24} {'key id':<10} {'created (UTC)':<17} revoked", highlight=False)
    for r in records:
        out.print(
            f"{r.account:<24} {r.key_id:<10} {_when(r.created):<17} {_when(r.revoked)}",
            highlight=False,
        )


@keys_app.command("revoke")
def revoke(
    name: str = typer.Argument(None, help="Account name or key id."),
    key_id: str = typer.Option(
        None, "--key-id", help="A key id, also one starting with '-' (--key-id=-AbC1234)."
    ),
    db: Path = DbOption,
) -> None:
    """Revoke every active key of an account, or one key by its id (a key id that starts
    with '-' goes after --key-id= or after --)."""
    if (name is None) == (key_id is None):
        raise ConfigError(
            "name the account or key to revoke: `mlinvert keys revoke NAME`, or "
            "`mlinvert keys revoke --key-id=ID` (an id may start with '-')"
        )
    target = name if key_id is None else key_id
    store = _store(db)
    try:
        count = store.revoke(target)
    finally:
        store.close()
    console.print(f"revoked {count} key(s) of {target!r}")


@keys_app.command("flags")
def list_flags(db: Path = DbOption) -> None:
    """List accounts the query detector flagged for investigation, and the evidence."""
    store = _store(db)
    records = store.flags()
    store.close()
    if not records:
        console.print("no account has been flagged")
        return
    out.print(
        f"{'account':<24} {'flagged (UTC)':<17} {'cleared (UTC)':<17} evidence", highlight=False
    )
    for r in records:
        out.print(
            f"{r.flag.account:<24} {_when(r.flag.at):<17} {_when(r.cleared):<17} {r.flag.detail}",
            highlight=False,
            soft_wrap=True,
        )


@keys_app.command("unflag")
def unflag(name: str = typer.Argument(..., help="Account name."), db: Path = DbOption) -> None:
    """Clear an account's flag after investigation (a blocked account is answered again)."""
    store = _store(db)
    try:
        store.unflag(name)
    finally:
        store.close()
    console.print(f"cleared the flag of {name!r}; the flag stays in `mlinvert keys flags`")


@keys_app.command("accept-budget-reset")
def accept_budget_reset(
    redis: str = typer.Option(
        None,
        "--redis",
        help="The service's Redis, e.g. redis://127.0.0.1:6379/0. [MLINVERT_REDIS_URL]",
    ),
    db: Path = DbOption,
) -> None:
    """After Redis lost its data: accept that every account's rate-limit budget starts
    full again. A service run with --redis-loss refuse answers queries again."""
    from mlinvert.defenses.ratelimit import mark_redis_epoch, redis_client, redis_problem
    from mlinvert.service.store import REDIS_EPOCH

    url = redis or os.environ.get("MLINVERT_REDIS_URL")
    if not url:
        raise ConfigError("no Redis: pass --redis URL (the one `mlinvert serve --redis` uses)")
    store = _store(db)
    try:
        client = redis_client(url)
        problem = redis_problem(client)
        if problem is not None:
            raise ConfigError(f"Redis at {url} is {problem}; start it first")
        store.set_meta(REDIS_EPOCH, mark_redis_epoch(client, secrets.token_hex(8), replace=True))
    finally:
        store.close()
    console.print(f"accepted: every account's budget in {url} starts full again")


def register(app: typer.Typer) -> None:
    """Add ``keys`` to the CLI."""
    app.add_typer(keys_app, name="keys")
