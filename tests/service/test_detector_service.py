"""The query detector in the real service: ``mlinvert serve --detect``, flags in SQLite,
403 for a blocked account, ``mlinvert keys flags`` / ``unflag`` for the investigator."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import typer
from processes import started
from typer.testing import CliRunner

from mlinvert.cli import keys as keys_cli
from mlinvert.defenses.detector import Flag, QueryDetector
from mlinvert.errors import Blocked, ConfigError
from mlinvert.oracle import HttpOracle
from mlinvert.service import ServiceSettings, Store
from mlinvert.service.runner import RedisServer, ServiceProcess

SHAPE = (8, 8)  # the saved toy softmax's input (conftest.model_dir)


def _cli() -> typer.Typer:
    app = typer.Typer()
    keys_cli.register(app)

    @app.callback()
    def _root() -> None:
        """Root so that ``keys`` stays a sub-command."""

    return app


def _probes(n: int, seed: int) -> np.ndarray:
    """An attacker's probes: one input (values mid-bin) plus steps far below a bin."""
    rng = np.random.default_rng(seed)
    base = (rng.integers(0, 5, SHAPE) * 0.2 + 0.1).astype(np.float32)
    return (base + rng.uniform(-0.05, 0.05, (n, *SHAPE))).astype(np.float32)


def test_store_keeps_flags_and_their_history(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    flag = Flag(account="mallory", at=5.0, near_duplicates=120, inputs=130, detail="why")
    store.flag(flag)
    store.flag(Flag(account="mallory", at=9.0, near_duplicates=1, inputs=2, detail="again"))
    assert store.flagged("mallory") == flag  # a standing flag is not overwritten
    assert store.flagged("alice") is None
    assert store.unflag("mallory") == 1
    assert store.flagged("mallory") is None
    with pytest.raises(ConfigError, match="not flagged"):
        store.unflag("mallory")
    store.flag(Flag(account="mallory", at=20.0, near_duplicates=3, inputs=4, detail="later"))
    history = store.flags()
    assert [(r.flag.at, r.cleared is None) for r in history] == [(5.0, False), (20.0, True)]


def test_settings_validate_the_detector_spec(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="detect"):
        ServiceSettings(db=tmp_path / "s.db", detector="detect:sometimes")
    env = {"MLINVERT_DB": str(tmp_path / "s.db"), "MLINVERT_DETECTOR": "detect:block:50"}
    assert ServiceSettings.from_env(env).detector == "detect:block:50"


def test_blocked_account_gets_403_until_an_operator_unflags_it(
    tmp_path: Path, model_dir: tuple[Path, Any]
) -> None:
    folder, _ = model_dir
    db = tmp_path / "service.db"
    store = Store(db)
    alice, _ = store.create_key("alice")
    mallory, _ = store.create_key("mallory")
    runner = CliRunner()
    with ServiceProcess([f"faces={folder}"], db=db, detector="detect:block:30") as service:
        url = service.model_url("faces")
        with HttpOracle(url, alice) as honest, HttpOracle(url, mallory) as attacker:
            assert honest.info.extra.get("detector") == "detect:block:30"
            rng = np.random.default_rng(1)
            for _ in range(10):  # 100 different inputs: an honest client is never flagged
                honest.query(rng.random((10, *SHAPE), dtype=np.float32))
            probes = _probes(40, seed=2)
            for i in range(3):  # 9 + 10 + 10 near duplicates: still answered
                attacker.query(probes[10 * i : 10 * i + 10])
            with pytest.raises(Blocked, match="keys unflag mallory"):
                attacker.query(probes[30:])  # crosses 30
            with pytest.raises(Blocked):
                attacker.query(rng.random((1, *SHAPE), dtype=np.float32))
            honest.query(rng.random((5, *SHAPE), dtype=np.float32))
            assert honest.n_queries == 105 and attacker.n_queries == 30

            flag = store.flagged("mallory")  # written by the service process
            assert flag is not None and flag.near_duplicates == 39 and flag.inputs == 40
            assert store.flagged("alice") is None
            listed = runner.invoke(_cli(), ["keys", "flags", "--db", str(db)])
            assert listed.exit_code == 0 and "mallory" in listed.stdout
            assert "39 of the 40 inputs" in listed.stdout and "alice" not in listed.stdout
            cleared = runner.invoke(_cli(), ["keys", "unflag", "mallory", "--db", str(db)])
            assert cleared.exit_code == 0, cleared.output
            attacker.query(probes[:5])  # answered again; counting restarts
            twice = runner.invoke(_cli(), ["keys", "unflag", "mallory", "--db", str(db)])
            assert isinstance(twice.exception, ConfigError)
    log = [(q.outcome, q.status) for q in store.queries("mallory")]
    assert log == [("ok", 200)] * 3 + [("Blocked", 403)] * 2 + [("ok", 200)]


def _first_refusal(oracles: list[HttpOracle] | list[QueryDetector], batches: list[Any]) -> int:
    """Send the batches in turn to the oracles (or detectors) round robin; the index of
    the first batch refused as Blocked (len(batches) when none is)."""
    for i, batch in enumerate(batches):
        target = oracles[i % len(oracles)]
        try:
            if isinstance(target, QueryDetector):
                target.check("mallory", batch, float(i))
            else:
                target.query(batch)
        except Blocked:
            return i
    return len(batches)


@pytest.mark.redis
def test_two_processes_on_one_redis_flag_an_attacker_as_one_process_would(
    tmp_path: Path, model_dir: tuple[Path, Any], redis_url: str
) -> None:
    """An attacker alternating its batches between two service processes is refused at
    the batch one process alone refuses it (the fingerprints are shared through Redis);
    without Redis each process sees half the probes and refuses much later."""
    folder, _ = model_dir
    spec = "detect:block:30"
    batches = [_probes(80, seed=5)[10 * i : 10 * i + 10] for i in range(8)]
    alone = QueryDetector(spec)
    expected = _first_refusal([alone], batches)
    want = alone.flags.flagged("mallory")
    assert expected == 3 and want is not None and (want.near_duplicates, want.inputs) == (39, 40)

    keys, services = {}, {}
    for shared in (True, False):  # one database per pair; all four processes start at once
        db = tmp_path / f"service-{shared}.db"
        keys[shared] = Store(db).create_key("mallory")[0]
        url = redis_url if shared else None
        services[shared] = [
            ServiceProcess([f"faces={folder}"], db=db, detector=spec, redis_url=url)
            for _ in range(2)
        ]
    found = {}
    with started(*services[True], *services[False]), ExitStack() as clients:
        for shared, pair in services.items():
            oracles = [
                clients.enter_context(HttpOracle(s.model_url("faces"), keys[shared])) for s in pair
            ]
            refused = _first_refusal(oracles, batches)
            found[shared] = (refused, Store(tmp_path / f"service-{shared}.db").flagged("mallory"))
    refused, flag = found[True]
    assert refused == expected and flag is not None
    assert (flag.near_duplicates, flag.inputs) == (want.near_duplicates, want.inputs)
    refused, flag = found[False]  # the control: per-process histories
    assert refused == 6 and flag is not None and flag.inputs == 40  # 70 inputs sent in all


@pytest.mark.redis
def test_redis_down_refuses_with_429_not_500(tmp_path: Path, model_dir: tuple[Path, Any]) -> None:
    folder, _ = model_dir
    db = tmp_path / "service.db"
    store = Store(db)
    key, _ = store.create_key("alice")
    try:
        redis_server = RedisServer()
    except ConfigError as exc:
        pytest.skip(f"redis-server binary absent: {exc}")
    rng = np.random.default_rng(0)
    body = rng.random((3, *SHAPE), dtype=np.float32).tobytes()
    params = {"shape": f"3,{SHAPE[0]},{SHAPE[1]}", "dtype": "float32"}
    headers = {"X-API-Key": key, "Content-Type": "application/octet-stream"}
    with (
        redis_server,
        ServiceProcess(
            [f"faces={folder}"], db=db, detector="detect:block:30", redis_url=redis_server.url
        ) as service,
    ):
        url = service.model_url("faces") + "/predict"
        assert httpx.post(url, content=body, params=params, headers=headers).status_code == 200
        redis_server.stop()
        r = httpx.post(url, content=body, params=params, headers=headers)
        log = service.log()
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    error = r.json()["error"]
    assert error["type"] == "RateLimited"
    assert "detector's history store (Redis) is unreachable" in error["message"]
    assert "Traceback" not in log
    assert [q.status for q in store.queries("alice")] == [200, 429]
