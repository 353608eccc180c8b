"""The attack matrix on a real Dask cluster: the same records as on one machine, and a
worker lost in the middle of a task costs no duplicated query; an ``--api`` audit spread
over two service replicas behind one Redis gives the records of one machine too."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

import httpx
import pytest

from mlinvert.audit.channels import ONE_THREAD_ENV
from mlinvert.audit.cluster import FAULT_ENV, comparable, plan_tasks, split_people
from mlinvert.audit.config import AuditConfig, parse_cluster
from mlinvert.errors import ConfigError
from mlinvert.service import Store
from mlinvert.service.runner import RedisServer, ServiceProcess

pytest.importorskip("distributed")

#: A small digits audit's people, budget and seed.
PEOPLE = ["--labels", "2", "--budget", "240", "--quick", "--seed", "1"]
#: A rate limit that runs out within the audit and refills less than one query during
#: the test (so its records do not depend on the time taken).
RATE = "300/30d"
#: One target, every attack under an output policy alone (the cluster may split its
#: people into groups of one) and under a rate limit shared by an attack's people (one
#: task), one person at a time.
ARGS = [*PEOPLE, "--targets", "softmax", "--defenses", f"none,round:2+rate:{RATE}"]
ARGS += ["--lanes", "1"]


class _Api(TypedDict):
    """AuditConfig's keywords of an --api audit."""

    api_keys: tuple[str, ...]
    data: str
    attacks: tuple[str, ...]


class _Plan(TypedDict):
    """plan_tasks' keywords besides the defence's."""

    lanes: int
    group_size: int


class _Served(TypedDict):
    """ServiceProcess's keywords shared by the two replicas."""

    db: Path
    policy: str
    env: Mapping[str, str]


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
    api: _Api = {"api_keys": ("k",), "data": "digits", "attacks": ("blackbox",)}
    one, other = "http://127.0.0.1:1/v1/models/m", "http://127.0.0.1:2/v1/models/m"
    on_cluster = AuditConfig(out=tmp_path, cluster="local:2", api=f"{one}, {other}", **api)
    assert on_cluster.api_urls == (one, other)
    with pytest.raises(ConfigError, match="give --cluster"):
        AuditConfig(out=tmp_path, api=f"{one},{other}", **api)
    with pytest.raises(ConfigError, match="different models"):
        AuditConfig(out=tmp_path, cluster="local:2", api=f"{one},{other}x", **api)
    with pytest.raises(ConfigError, match="twice"):
        AuditConfig(out=tmp_path, cluster="local:2", api=f"{one},{one}", **api)
    with pytest.raises(ConfigError, match="replicas' URLs"):
        AuditConfig(out=tmp_path, cluster="local:2", replicas=2, api=one, **api)
    for size in (0, 4):  # not a size, or without a cluster
        with pytest.raises(ConfigError, match="--group-size"):
            AuditConfig(out=tmp_path, group_size=size, cluster=None if size else "local:2")


def test_tasks_split_people_only_where_the_defence_keeps_no_account_state() -> None:
    people = tuple(range(10))
    # groups of at most about the size, each a full set of lanes, consecutive, all people
    assert split_people(people, size=3, lanes=1, split=True) == [
        (0, 1),
        (2, 3, 4),
        (5, 6),
        (7, 8, 9),
    ]
    assert split_people(people, size=3, lanes=4, split=True) == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]
    assert split_people(people, size=3, lanes=8, split=True) == [people]
    assert split_people(people, size=3, lanes=1, split=False) == [people]
    todo: list[tuple[str, str, tuple[int, ...]]] = [
        (a, "t", (0, 1, 2, 3)) for a in ("blackbox", "label-only", "whitebox")
    ]
    whole = [("t", ((a, (0, 1, 2, 3)),)) for a in ("blackbox", "label-only")]
    halves = [("t", (("whitebox", (0, 1)),)), ("t", (("whitebox", (2, 3)),))]
    plan: _Plan = {"lanes": 2, "group_size": 2}
    # a rate limit or detector: an API attack's people stay with its account(s)
    assert plan_tasks(todo, stateful=True, shared_keys=False, **plan) == [
        *whole,
        *halves,
    ]
    # ... and with --api's keys shared by the attacks, one task runs them in order
    assert plan_tasks(todo[:2], stateful=True, shared_keys=True, **plan) == [
        ("t", (("blackbox", (0, 1, 2, 3)), ("label-only", (0, 1, 2, 3))))
    ]
    assert plan_tasks(todo, stateful=False, shared_keys=True, **plan) == [
        ("t", ((a, half),))
        for half in ((0, 1), (2, 3))  # the same people's tasks together
        for a in ("blackbox", "label-only", "whitebox")
    ]


def _audit(out: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "mlinvert", "audit", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads((out / "results.json").read_text()))


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The small digits audit on one machine: its folder and results."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary absent (Debian package redis-server)")
    out = tmp_path_factory.mktemp("cluster") / "alone"
    return out, _audit(out, *ARGS)


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
    alone: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    alone_out, one_machine = alone
    marker = tmp_path / "worker-died"
    # the worker answering an account's 3rd live batch exits on the spot (once); Dask
    # re-runs its task on a worker that replays the journal, then goes on live
    # two service processes per defence behind one Redis (their shared limits); the
    # people in groups of one (a task per person under these output policies)
    on_cluster = _audit(
        tmp_path / "cluster",
        *ARGS,
        "--cluster",
        "local:2",
        "--replicas",
        "2",
        "--group-size",
        "1",
        env={FAULT_ENV: f"3:{marker}"},
    )
    assert marker.exists(), "no worker was killed: the fault was not injected"
    assert on_cluster["status"] == "complete"
    assert comparable(on_cluster) == comparable(one_machine)
    assert len(comparable(one_machine)) == 12  # 3 attacks x 2 defences x 2 people
    statuses = Counter((r["defense"], r["status"]) for r in one_machine["records"])
    assert statuses[("none", "succeeded")] > 0
    # the second person met the limit the first one's queries left: order matters there
    assert statuses[(f"round:2+rate:{RATE}", "rate_limited")] > 0, statuses
    # no input was answered twice because of the lost worker: the services answered the
    # same inputs, as often, as on one machine
    assert _sent(tmp_path / "cluster") == _sent(alone_out)
    assert not (tmp_path / "cluster" / "journal").exists()  # cleared once recorded


def _inputs_answered(service: ServiceProcess) -> int:
    """What the service's metrics count as inputs answered."""
    text = httpx.get(f"{service.url}/metrics", timeout=10.0).text
    return sum(int(float(n)) for n in re.findall(r"^mlinvert_inputs_total\S* (\S+)$", text, re.M))


@pytest.mark.redis
@pytest.mark.timeout(1200)  # two audits and a Dask cluster; slow on a loaded machine
def test_an_api_audit_spread_over_two_replicas_gives_the_records_of_one_machine(
    alone: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    model = alone[0] / "models" / "softmax"  # the model the one-machine audit trained
    db = tmp_path / "service.sqlite3"
    store = Store(db)
    keys = {who: store.create_key(who)[0] for who in ("one-machine", "cluster")}
    store.close()
    served: _Served = {"db": db, "policy": "round:2", "env": ONE_THREAD_ENV}
    with (
        RedisServer() as redis,
        ServiceProcess([f"digits={model}"], redis_url=redis.url, **served) as first,
        ServiceProcess([f"digits={model}"], redis_url=redis.url, **served) as second,
    ):
        replicas = (first, second)
        deployed = [*PEOPLE, "--data", "digits", "--model", str(model)]
        one_machine = _audit(
            tmp_path / "alone",
            *deployed,
            "--api",
            first.model_url("digits"),
            "--api-key",
            keys["one-machine"],
        )
        before = [_inputs_answered(r) for r in replicas]
        spread = _audit(
            tmp_path / "cluster",
            *deployed,
            "--api",
            ",".join(r.model_url("digits") for r in replicas),
            "--api-key",
            keys["cluster"],
            "--cluster",
            "local:2",
        )
        answered = [_inputs_answered(r) - n for r, n in zip(replicas, before, strict=True)]
    assert spread["status"] == "complete"
    assert comparable(spread) == comparable(one_machine)
    assert len(comparable(one_machine)) == 4  # 2 API attacks x 2 people
    assert all(n > 0 for n in answered), answered  # both replicas answered the cluster
    # the same inputs through the cluster's key as through one machine's, none twice
    store = Store(db)
    try:
        sent = {who: Counter[str]() for who in keys}
        for q in store.queries():
            if q.status == 200:
                sent[str(q.account)].update(q.digests)
    finally:
        store.close()
    assert sent["cluster"] == sent["one-machine"]
    assert sum(answered) == sent["cluster"].total()
    # the inputs each key answered (for a later --resume) count the workers' queries
    assert list(spread["deployment"]["answered"].values()) == [sent["cluster"].total()]


@pytest.mark.timeout(600)  # two audits and a Dask cluster
def test_an_api_audit_under_a_rate_limit_runs_its_attacks_in_order_on_the_same_keys(
    alone: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    model = alone[0] / "models" / "softmax"
    db = tmp_path / "service.sqlite3"
    store = Store(db)
    keys = {who: [store.create_key(f"{who}-{i}")[0] for i in (1, 2)] for who in ("one", "two")}
    store.close()
    deployed = [*PEOPLE, "--data", "digits", "--model", str(model)]
    # the deployed API advertises its limit, which the audit reads back: one a day (a
    # 30-day period is advertised as 2.592e+06s, which the rate parser does not read)
    with ServiceProcess(
        [f"digits={model}"], db=db, policy="round:2", rate_limit="300/day", env=ONE_THREAD_ENV
    ) as service:
        url = service.model_url("digits")
        runs = [
            _audit(tmp_path / who, *deployed, "--api", url, "--api-key", ",".join(keys[who]), *more)
            for who, more in (("one", []), ("two", ["--cluster", "local:1"]))
        ]
    # the same records (but for the account named in a refusal), the same use of each key
    one, two = (
        {k: json.dumps(r).replace("two-", "one-") for k, r in comparable(d).items()} for d in runs
    )
    assert one == two
    statuses = {r["status"] for r in runs[0]["records"]}
    assert "rate_limited" in statuses, statuses  # the black-box attack spent the keys first
    assert [list(d["deployment"]["answered"].values()) for d in runs] == [
        list(runs[0]["deployment"]["answered"].values())
    ] * 2
