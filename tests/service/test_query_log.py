"""The query log: retention by age and size, the answered counter (and its backfill
from an older database), the digests (and an older log's), long names cut short, and
GET /v1/account's own limit."""

from __future__ import annotations

import sqlite3
import time
import warnings
from pathlib import Path

import blake3
import numpy as np
import pytest
from toys import ToySoftmax

import mlinvert.service.store as store_module
from mlinvert.service import ServiceSettings, Store, build_predictors, create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


def log(store: Store, n: int, *, ts: float, account: str = "alice", ok: bool = True) -> None:
    for _ in range(n):
        store.log_query(
            account=account,
            model="faces",
            n_inputs=2,
            outcome="ok" if ok else "RateLimited",
            status=200 if ok else 429,
            ts=ts,
        )


def test_the_log_keeps_its_age_and_size_and_the_counter_keeps_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "PRUNE_EVERY", 10)
    store = Store(tmp_path / "s.db", max_age=3600.0, max_rows=6)
    now = time.time()
    log(store, 4, ts=now - 7200)  # older than an hour
    log(store, 5, ts=now)
    assert len(store.queries()) == 9  # not pruned yet: the 10th entry prunes
    log(store, 1, ts=now, ok=False)
    kept = store.queries()
    assert len(kept) == 6 and all(q.ts == now for q in kept)
    assert store.answered("alice") == 18  # 9 answered batches of 2, pruned or not
    assert store.prune(now + 7200) == 6 and store.queries() == []
    store.close()


def test_a_database_from_before_the_counter_is_counted_once(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    store = Store(path)
    log(store, 3, ts=time.time())
    log(store, 2, ts=time.time(), account="bob", ok=False)
    store.close()
    with sqlite3.connect(path) as conn:  # what a database written before the counter holds
        conn.execute("DROP TABLE answered")
    reopened = Store(path)
    assert (reopened.answered("alice"), reopened.answered("bob")) == (6, 0)
    reopened.close()
    assert Store(path).answered("alice") == 6  # counted once, not at every opening


def test_digests_are_blake3_and_an_older_log_says_its_rows_are_sha256(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((3, 6, 5), dtype=np.float32)
    expected = tuple(blake3.blake3(row.tobytes()).hexdigest()[:32] for row in x)
    assert store_module.input_digests(x) == expected
    assert store_module.input_digests(x.astype(np.float64)) == expected  # as float32 bytes
    path = tmp_path / "old.db"
    Store(path).close()
    with sqlite3.connect(path) as conn:  # a log written before BLAKE3: no digest column
        conn.execute("ALTER TABLE queries DROP COLUMN digest")
        conn.execute(
            "INSERT INTO queries(ts, account, model, n_inputs, outcome, status, detail, "
            "digests) VALUES (1, 'alice', 'faces', 1, 'ok', 200, '', 'ab')"
        )
    store = Store(path)
    store.log_query(
        account="alice", model="faces", n_inputs=3, outcome="ok", status=200, digests=expected
    )
    old, new = store.queries()
    assert (old.digest, old.digests) == ("sha256/128", ("ab",))
    assert (new.digest, new.digests) == ("blake3/128", expected)
    store.close()
    assert [q.digest for q in Store(path).queries()] == ["sha256/128", "blake3/128"]


def test_long_model_names_are_cut_short_in_the_log_and_the_answer(
    store: Store, api_key: str
) -> None:
    settings = ServiceSettings(db=store.path)
    client = TestClient(create_app(settings, build_predictors({"faces": ToySoftmax()}, settings)))
    name = "m" * 5000
    r = client.post(
        f"/v1/models/{name}/predict", json={"inputs": []}, headers={"X-API-Key": api_key}
    )
    assert r.status_code == 404 and len(r.text) < 400
    (entry,) = store.queries()
    assert entry.model == "m" * 100 + "..." and len(entry.detail) < 300


def test_account_reads_have_their_own_limit(store: Store, api_key: str) -> None:
    settings = ServiceSettings(db=store.path, account_rate="3/minute")
    client = TestClient(create_app(settings, build_predictors({"faces": ToySoftmax()}, settings)))
    statuses = [
        client.get("/v1/account", headers={"X-API-Key": api_key}).status_code for _ in range(4)
    ]
    assert statuses == [200, 200, 200, 429]
    r = client.get("/v1/account", headers={"X-API-Key": api_key})
    assert "at most 3/minute" in r.json()["error"]["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 20
    other, _ = store.create_key("bob")
    assert client.get("/v1/account", headers={"X-API-Key": other}).status_code == 200  # per key
    x = np.full((1, 6, 5), 0.5).tolist()
    ok = client.post("/v1/models/faces/predict", json={"inputs": x}, headers={"X-API-Key": api_key})
    assert ok.status_code == 200  # predictions are not limited by it
