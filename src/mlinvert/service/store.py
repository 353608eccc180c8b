"""Accounts, hashed API keys and the durable per-account query log (SQLite, WAL).

Keys are ``mli_`` + 43 URL-safe characters (256 random bits); only their SHA-256 is
stored, so the database never holds a usable key. Every prediction request of a known
account, admitted or refused, is logged with its outcome and a digest per input: the
record an investigator (or the query detector) reads later. Requests without a valid
key are only counted (in ``/metrics``): anyone could fill the log with them. The log
keeps ``max_age`` seconds and at most ``max_rows`` rows (pruned every
:data:`PRUNE_EVERY` entries); the inputs answered per account are a counter, kept
beyond the log's retention.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import blake3
import numpy as np

from mlinvert.defenses.detector import Flag
from mlinvert.errors import ConfigError, Unauthorized

KEY_PATTERN = re.compile(r"^mli_[A-Za-z0-9_-]{43}$")
#: The query log is pruned once every this many entries (and when the service starts).
PRUNE_EVERY = 1000
#: The ``meta`` entry holding the Redis epoch the service last met (see RedisBuckets).
REDIS_EPOCH = "redis_epoch"
#: How the query log's digests identify inputs now (see :func:`input_digests`).
DIGEST = "blake3/128"
#: How the rows logged before BLAKE3 were digested (their ``digest`` column's default).
LEGACY_DIGEST = "sha256/128"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS keys (
    id INTEGER PRIMARY KEY,
    account TEXT NOT NULL,
    key_id TEXT NOT NULL UNIQUE,
    key_hash TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    revoked REAL
);
CREATE INDEX IF NOT EXISTS keys_account ON keys(account);
CREATE TABLE IF NOT EXISTS queries (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    account TEXT,
    model TEXT,
    n_inputs INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    status INTEGER NOT NULL,
    detail TEXT NOT NULL,
    digests TEXT NOT NULL,
    digest TEXT NOT NULL DEFAULT '{LEGACY_DIGEST}'
);
CREATE INDEX IF NOT EXISTS queries_account_ts ON queries(account, ts);
CREATE INDEX IF NOT EXISTS queries_ts ON queries(ts);
CREATE TABLE IF NOT EXISTS answered (
    account TEXT PRIMARY KEY,
    inputs INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS flags (
    id INTEGER PRIMARY KEY,
    account TEXT NOT NULL,
    ts REAL NOT NULL,
    near_duplicates INTEGER NOT NULL,
    inputs INTEGER NOT NULL,
    detail TEXT NOT NULL,
    cleared REAL
);
CREATE INDEX IF NOT EXISTS flags_account ON flags(account);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class KeyRecord:
    """One API key as stored (never the key itself)."""

    account: str
    key_id: str
    created: float
    revoked: float | None


@dataclass(frozen=True)
class FlagRecord:
    """One flag the query detector raised, and when an operator cleared it."""

    flag: Flag
    cleared: float | None


@dataclass(frozen=True)
class QueryRecord:
    """One logged prediction request."""

    ts: float
    account: str | None
    model: str | None
    n_inputs: int
    outcome: str
    status: int
    detail: str
    digests: tuple[str, ...]
    #: How ``digests`` were made: :data:`DIGEST`, or :data:`LEGACY_DIGEST` for old rows.
    digest: str = DIGEST


def hash_key(key: str) -> str:
    """SHA-256 hex digest of an API key (keys are high-entropy, so no salt is needed)."""
    return hashlib.sha256(key.encode()).hexdigest()


def input_digests(x: np.ndarray) -> tuple[str, ...]:
    """One 128-bit digest per input row (:data:`DIGEST`): BLAKE3 of its float32 bytes,
    cut to 32 hex digits.

    What the digests are for: an investigator asks whether an account sent a given
    input (hash it, look it up), or how many times each distinct input was sent (the
    cluster test counts (account, digest) pairs); the query detector keeps its own
    fingerprints. So they must identify inputs even against the client that chose them:
    a hostile client controls every byte of its inputs, and with a non-cryptographic
    hash (xxHash's XXH3-128 is 0.1 ms for a batch of 64 AT&T faces) it could craft two
    different inputs that the log shows as one, or an input the log shows as someone
    else's. BLAKE3 is collision-resistant like SHA-256 (truncated to 128 bits: about
    2^64 work for a collision, as before) and 2.5-3x faster here (0.6-0.8 vs 2.0 ms for
    64 AT&T faces, 41 KB each, with SHA-256 on the CPU's SHA extensions; BENCHMARKS.md,
    "Issue 21, last pass"). They are computed on the request's thread, before the log
    commit and the answer: hashing on a second thread during the prediction would hide
    under a millisecond, and only while a core is idle. Rows are hashed through slices of
    one memoryview (no copy per row). Rows logged before BLAKE3 keep their SHA-256/128
    digests (``QueryRecord.digest`` says which).
    """
    if x.ndim == 0 or x.shape[0] == 0:
        return ()
    with np.errstate(over="ignore", invalid="ignore"):  # refused inputs may not fit float32
        rows = np.ascontiguousarray(x.reshape(x.shape[0], -1), dtype="<f4")
    view = memoryview(rows.reshape(-1).view(np.uint8).data)  # flat bytes, sliced per row
    step = rows.shape[1] * 4
    return tuple(
        blake3.blake3(view[i * step : (i + 1) * step]).hexdigest(16) for i in range(rows.shape[0])
    )


def _create(conn: sqlite3.Connection) -> None:
    """Create the tables, or bring a database from an older version up to date: count
    its log into ``answered`` once, mark its rows' digests as SHA-256/128."""
    counted = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'answered'"
    ).fetchone()
    columns = {row[1] for row in conn.execute("PRAGMA table_info(queries)")}
    conn.executescript(_SCHEMA)
    if counted is None:  # a database from before the counter: count its log once
        conn.execute(
            "INSERT OR IGNORE INTO answered(account, inputs) SELECT account, "
            "SUM(n_inputs) FROM queries WHERE outcome = 'ok' AND account IS NOT NULL "
            "GROUP BY account"
        )
    if columns and "digest" not in columns:  # a log from before BLAKE3: SHA-256 digests
        conn.execute(
            f"ALTER TABLE queries ADD COLUMN digest TEXT NOT NULL DEFAULT '{LEGACY_DIGEST}'"
        )


class Store:
    """The service database: one SQLite file in WAL mode, safe across threads and processes."""

    def __init__(
        self,
        path: Path | str,
        *,
        synchronous: str = "FULL",
        max_age: float | None = None,
        max_rows: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.max_age = max_age
        self.max_rows = max_rows
        self._logged = 0
        if synchronous not in ("OFF", "NORMAL", "FULL"):
            raise ConfigError(f"synchronous must be OFF, NORMAL or FULL, got {synchronous!r}")
        if self.path.is_dir():
            raise ConfigError(
                f"the account database {self.path} is a folder; pass a file path, e.g. "
                f"{self.path / 'service.db'}"
            )
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # owner-only: it holds the key hashes and the query log (SQLite gives its -wal
            # and -shm files the database file's mode)
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            self._conn = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=30.0
            )
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(
                f"cannot open the account database {self.path} ({exc}); pass a path where "
                "a SQLite file can be written"
            ) from None
        try:
            with self._lock:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute(f"PRAGMA synchronous={synchronous}")
                self._conn.execute("PRAGMA busy_timeout=30000")
                _create(self._conn)
        except sqlite3.Error as exc:
            self._conn.close()
            raise ConfigError(
                f"{self.path} is not a usable account database ({exc}); pass the service's "
                "SQLite file, or a new path to create one"
            ) from None

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def problem(self) -> str | None:
        """Why the database cannot serve now (None when a read works)."""
        try:
            with self._lock:
                self._conn.execute("SELECT 1 FROM keys LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            return f"cannot read {self.path} ({exc})"
        return None

    def meta(self, name: str) -> str | None:
        """A value the service keeps about itself (e.g. ``redis_epoch``), or None."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, name: str, value: str) -> None:
        """Keep ``value`` under ``name``."""
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO meta(name, value) VALUES (?, ?)", (name, value))

    # accounts -----------------------------------------------------------------
    def create_key(self, account: str) -> tuple[str, KeyRecord]:
        """Create a key for ``account`` (the account appears with its first key).

        Returns the key (shown once, never stored) and its record.
        """
        if not _NAME_PATTERN.match(account):
            raise ConfigError(
                f"account name {account!r} must be 1-128 characters of letters, digits, "
                "'_', '.', '@' or '-', starting with a letter or digit"
            )
        key = "mli_" + secrets.token_urlsafe(32)
        record = KeyRecord(account=account, key_id=key[4:12], created=time.time(), revoked=None)
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO keys(account, key_id, key_hash, created) VALUES (?, ?, ?, ?)",
                (account, record.key_id, hash_key(key), record.created),
            )
        return key, record

    def list_keys(self) -> list[KeyRecord]:
        """Every key ever created, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT account, key_id, created, revoked FROM keys ORDER BY id"
            ).fetchall()
        return [KeyRecord(*row) for row in rows]

    def revoke(self, name: str) -> int:
        """Revoke every active key of account ``name``, or the key whose id is ``name``.

        Returns how many keys were revoked; ConfigError if none matched.
        """
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE keys SET revoked = ? WHERE revoked IS NULL AND (account = ? OR key_id = ?)",
                (time.time(), name, name),
            )
            count = cur.rowcount
        if count == 0:
            raise ConfigError(
                f"no active key for account or key id {name!r}; see `mlinvert keys list`"
            )
        return count

    def authenticate(self, key: str | None) -> str:
        """Return the account of a valid, active key or raise Unauthorized saying why."""
        if not key:
            raise Unauthorized(
                "no API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>' "
                "(create one with `mlinvert keys create NAME`)"
            )
        if not KEY_PATTERN.match(key):
            raise Unauthorized(
                "malformed API key: expected 'mli_' followed by 43 URL-safe characters"
            )
        with self._lock:
            row = self._conn.execute(
                "SELECT account, revoked FROM keys WHERE key_hash = ?", (hash_key(key),)
            ).fetchone()
        if row is None:
            raise Unauthorized(
                "unknown API key: check it or create one with `mlinvert keys create`"
            )
        if row[1] is not None:
            raise Unauthorized(
                f"the API key {key[:12]}... was revoked; ask the service's operator for a new one"
            )
        return str(row[0])

    def key_account(self, key: str | None) -> str | None:
        """The account a (possibly revoked) key belongs to, for logging refusals."""
        if not key or not KEY_PATTERN.match(key):
            return None
        with self._lock:
            row = self._conn.execute(
                "SELECT account FROM keys WHERE key_hash = ?", (hash_key(key),)
            ).fetchone()
        return None if row is None else str(row[0])

    # flags (the query detector's FlagStore) ------------------------------------
    def flag(self, flag: Flag) -> None:
        """Record ``flag`` unless the account already has a standing one (atomic)."""
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO flags(account, ts, near_duplicates, inputs, detail) "
                "SELECT ?, ?, ?, ?, ? WHERE NOT EXISTS "
                "(SELECT 1 FROM flags WHERE account = ? AND cleared IS NULL)",
                (
                    flag.account,
                    flag.at,
                    flag.near_duplicates,
                    flag.inputs,
                    flag.detail[:2000],
                    flag.account,
                ),
            )

    def flagged(self, account: str) -> Flag | None:
        """The account's standing (not cleared) flag, or None."""
        with self._lock:
            row = self._conn.execute(
                "SELECT account, ts, near_duplicates, inputs, detail FROM flags "
                "WHERE account = ? AND cleared IS NULL",
                (account,),
            ).fetchone()
        return None if row is None else Flag(*row)

    def unflag(self, account: str) -> int:
        """Clear the account's standing flag (kept in the history); ConfigError if none."""
        with self._tx() as conn:
            count = conn.execute(
                "UPDATE flags SET cleared = ? WHERE account = ? AND cleared IS NULL",
                (time.time(), account),
            ).rowcount
        if count == 0:
            raise ConfigError(f"account {account!r} is not flagged; see `mlinvert keys flags`")
        return count

    def flags(self) -> list[FlagRecord]:
        """Every flag ever raised, oldest first, with when it was cleared."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT account, ts, near_duplicates, inputs, detail, cleared FROM flags "
                "ORDER BY id"
            ).fetchall()
        return [FlagRecord(Flag(*r[:5]), r[5]) for r in rows]

    # query log ----------------------------------------------------------------
    def log_query(
        self,
        *,
        account: str | None,
        model: str | None,
        n_inputs: int,
        outcome: str,
        status: int,
        detail: str = "",
        digests: Sequence[str] = (),
        ts: float | None = None,
    ) -> None:
        """Append one request to the query log (committed before the answer leaves); an
        answered one adds its inputs to the account's counter in the same transaction."""
        with self._tx() as conn:
            if outcome == "ok" and account is not None:
                conn.execute(
                    "INSERT INTO answered(account, inputs) VALUES (?, ?) ON CONFLICT(account) "
                    "DO UPDATE SET inputs = inputs + excluded.inputs",
                    (account, n_inputs),
                )
            conn.execute(
                "INSERT INTO queries(ts, account, model, n_inputs, outcome, status, detail,"
                " digests, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    time.time() if ts is None else ts,
                    account,
                    model,
                    n_inputs,
                    outcome,
                    status,
                    detail[:2000],
                    " ".join(digests),
                    DIGEST,
                ),
            )
            self._logged += 1
            due = self._logged % PRUNE_EVERY == 0
        if due:
            self.prune()

    def prune(self, now: float | None = None) -> int:
        """Drop log entries older than ``max_age`` seconds, then all but the newest
        ``max_rows``; the number dropped."""
        now = time.time() if now is None else now
        dropped = 0
        with self._tx() as conn:
            if self.max_age is not None:
                dropped += conn.execute(
                    "DELETE FROM queries WHERE ts < ?", (now - self.max_age,)
                ).rowcount
            if self.max_rows is not None:
                dropped += conn.execute(
                    "DELETE FROM queries WHERE id <= (SELECT MAX(id) FROM queries) - ?",
                    (self.max_rows,),
                ).rowcount
        return dropped

    def answered(self, account: str) -> int:
        """Inputs answered to ``account`` so far (a counter: one row read, whatever the
        size of the log, and kept when old log entries are pruned)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT inputs FROM answered WHERE account = ?", (account,)
            ).fetchone()
        return 0 if row is None else int(row[0])

    def queries(self, account: str | None = None, *, limit: int | None = None) -> list[QueryRecord]:
        """Logged requests, oldest first (of one account if given; the last ``limit``)."""
        sql = (
            "SELECT ts, account, model, n_inputs, outcome, status, detail, digests, digest "
            "FROM queries"
        )
        args: list[object] = []
        if account is not None:
            sql += " WHERE account = ?"
            args.append(account)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        return [
            QueryRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], tuple(r[7].split()), r[8])
            for r in reversed(rows)
        ]
