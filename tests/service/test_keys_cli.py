"""``mlinvert keys``: create prints the key once, list never shows it, revoke works."""

from __future__ import annotations

from pathlib import Path

import typer
from typer.testing import CliRunner

from mlinvert.cli import keys
from mlinvert.errors import ConfigError, Unauthorized
from mlinvert.service import Store
from mlinvert.service.store import KEY_PATTERN


def cli() -> typer.Typer:
    app = typer.Typer()
    keys.register(app)

    @app.callback()
    def _root() -> None:
        """Root so that ``keys`` stays a sub-command."""

    return app


def test_create_list_revoke(tmp_path: Path) -> None:
    db = tmp_path / "accounts.db"
    runner = CliRunner()
    created = runner.invoke(cli(), ["keys", "create", "alice", "--db", str(db)])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip().splitlines()[0]
    assert KEY_PATTERN.match(key)
    assert Store(db).authenticate(key) == "alice"

    listed = runner.invoke(cli(), ["keys", "list"], env={"MLINVERT_DB": str(db)})
    assert listed.exit_code == 0
    assert "alice" in listed.stdout and key[4:12] in listed.stdout
    assert key not in listed.stdout and key not in db.read_bytes().decode("latin-1")

    revoked = runner.invoke(cli(), ["keys", "revoke", "alice", "--db", str(db)])
    assert revoked.exit_code == 0
    store = Store(db)
    try:
        store.authenticate(key)
    except Unauthorized as exc:
        assert "revoked" in str(exc)
    else:
        raise AssertionError("a revoked key still authenticates")
    again = runner.invoke(cli(), ["keys", "revoke", "alice", "--db", str(db)])
    assert isinstance(again.exception, ConfigError)


def test_bad_names_and_missing_db(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(cli(), ["keys", "create", "no spaces", "--db", str(tmp_path / "a.db")])
    assert isinstance(bad.exception, ConfigError)
    missing = runner.invoke(cli(), ["keys", "list"], env={"MLINVERT_DB": ""})
    assert isinstance(missing.exception, ConfigError) and "--db" in str(missing.exception)
