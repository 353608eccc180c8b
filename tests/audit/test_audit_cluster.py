"""The attack matrix on a real Dask cluster: the same records as on one machine, and a
worker lost in the middle of a task costs no duplicated query."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mlinvert.audit.cluster import FAULT_ENV
from mlinvert.audit.config import AuditConfig, parse_cluster
from mlinvert.errors import ConfigError
from mlinvert.service import Store

pytest.importorskip("distributed")

#: A small digits audit: one target, two people, the API attacks under two defences.
ARGS = [
    "--targets",
    "softmax",
    "--labels",
    "2",
    "--budget",
    "240",
    "--quick",
    "--seed",
    "1",
    "--defenses",
    "none,round:2",
]


def test_cluster_specs_and_what_they_cannot_be_combined_with(tmp_path: Path) -> None:
    assert parse_cluster("local:2") == ("local", 2)
    assert parse_cluster("tcp://10.0.0.5:8786") == ("tcp", "tcp://10.0.0.5:8786")
    for bad in ("local:0", "local:x", "tcp://host", "10.0.0.5:8786", ""):
        with pytest.raises(ConfigError, match="local:N"):
            parse_cluster(bad)
    with pytest.raises(ConfigError, match="--cluster"):
        AuditConfig(out=tmp_path, replicas=2)
    with pytest.raises(ConfigError, match="between 1 and"):
        AuditConfig(out=tmp_path, cluster="local:2", replicas=0)
    with pytest.raises(ConfigError, match="drop --in-process"):
        AuditConfig(out=tmp_path, cluster="local:2", in_process=True)
    with pytest.raises(ConfigError, match="drop --cluster"):
        AuditConfig(
            out=tmp_path,
            cluster="local:2",
            api="http://127.0.0.1:1/v1/models/m",
            api_keys=("k",),
            data="digits",
            attacks=("blackbox",),
        )


def _audit(out: Path, *extra: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "mlinvert", "audit", "--out", str(out), *ARGS, *extra],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads((out / "results.json").read_text()))


def _records(doc: dict[str, Any]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Records by key, without wall-clock text (seconds; a rate limit's refill)."""
    out = {}
    for r in doc["records"]:
        kept = {k: v for k, v in r.items() if k != "seconds"}
        if isinstance(kept.get("error"), str):
            kept["error"] = re.sub(r"retry after [0-9.]+ s|[0-9]+ left", "T", kept["error"])
        out[(r["attack"], r["defense"], r["target_model"], r["label"])] = kept
    return out


def _sent(out: Path) -> Counter[tuple[str, str]]:
    """Every input the services answered, as (account, digest) with multiplicity."""
    sent: Counter[tuple[str, str]] = Counter()
    for db in sorted((out / "service").glob("*.sqlite3")):
        store = Store(db)
        try:
            for q in store.queries():
                if q.status == 200:
                    sent.update((str(q.account), d) for d in q.digests)
        finally:
            store.close()
    return sent


@pytest.mark.redis
@pytest.mark.timeout(1200)  # two audits and a Dask cluster; slow on a loaded machine
def test_a_cluster_gives_the_records_of_one_machine_even_when_a_worker_dies(
    tmp_path: Path,
) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary absent (Debian package redis-server)")
    alone = _audit(tmp_path / "alone")
    marker = tmp_path / "worker-died"
    # the worker answering an account's 3rd live batch exits on the spot (once); Dask
    # re-runs its task on a worker that replays the journal, then goes on live
    # two service processes per defence behind one Redis (their shared limits)
    on_cluster = _audit(
        tmp_path / "cluster",
        "--cluster",
        "local:2",
        "--replicas",
        "2",
        env={FAULT_ENV: f"3:{marker}"},
    )
    assert marker.exists(), "no worker was killed: the fault was not injected"
    assert on_cluster["status"] == "complete"
    assert _records(on_cluster) == _records(alone)
    assert len(_records(alone)) == 12  # 3 attacks x 2 defences x 2 people
    assert {r["status"] for r in alone["records"]} >= {"succeeded"}
    # no input was answered twice because of the lost worker: the services answered the
    # same inputs, as often, as on one machine
    assert _sent(tmp_path / "cluster") == _sent(tmp_path / "alone")
    assert not (tmp_path / "cluster" / "journal").exists()  # cleared once recorded
