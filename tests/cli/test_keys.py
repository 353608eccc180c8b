"""``mlinvert keys``: create prints the key once, list never shows it, revoke works."""

from __future__ import annotations

from pathlib import Path

import pytest
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


@pytest.mark.parametrize(
    "args",
    [["list"], ["flags"], ["revoke", "alice"], ["unflag", "alice"]],
)
def test_a_mistyped_db_is_an_error_not_a_new_empty_database(
    args: list[str], tmp_path: Path
) -> None:
    db = tmp_path / "typo.db"
    result = CliRunner().invoke(cli(), ["keys", *args, "--db", str(db)])
    assert isinstance(result.exception, ConfigError)
    assert "no account database at" in str(result.exception) and "keys create" in str(
        result.exception
    )
    assert not db.exists()


@pytest.mark.parametrize(
    ("db", "message"),
    [
        ("folder", "is a folder"),
        ("text", "not a usable account database"),
        ("/proc/no/such.db", "cannot open the account database"),
    ],
)
def test_a_db_that_cannot_be_a_database_is_one_clear_error(
    db: str, message: str, tmp_path: Path
) -> None:
    paths = {"folder": tmp_path, "text": tmp_path / "notes.txt"}
    (tmp_path / "notes.txt").write_text("not SQLite\n")
    path = paths.get(db, Path(db))
    result = CliRunner().invoke(cli(), ["keys", "create", "alice", "--db", str(path)])
    assert isinstance(result.exception, ConfigError)
    assert message in str(result.exception)
    assert (tmp_path / "notes.txt").read_text() == "not SQLite\n"


def test_a_key_id_starting_with_a_dash_can_be_revoked(tmp_path: Path) -> None:
    db = tmp_path / "accounts.db"
    store = Store(db)
    while True:  # key ids are random: make keys until one starts with '-'
        key, record = store.create_key("dash")
        if record.key_id.startswith("-"):
            break
    other, _ = store.create_key("dash")
    runner = CliRunner()
    result = runner.invoke(cli(), ["keys", "revoke", f"--key-id={record.key_id}", "--db", str(db)])
    assert result.exit_code == 0, result.output
    with pytest.raises(Unauthorized, match="revoked"):
        store.authenticate(key)
    assert store.authenticate(other) == "dash"  # only that key
    neither = runner.invoke(cli(), ["keys", "revoke", "--db", str(db)])
    assert isinstance(neither.exception, ConfigError) and "--key-id" in str(neither.exception)


def test_the_database_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    db = tmp_path / "accounts.db"
    store = Store(db)
    store.create_key("alice")
    store.log_query(account="alice", model="m", n_inputs=1, outcome="ok", status=200)
    files = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in files if f.exists()}
    store.close()
    assert modes[db.name] == "0o600" and set(modes.values()) == {"0o600"}, modes
