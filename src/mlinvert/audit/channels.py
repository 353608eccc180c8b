"""How the API attacker reaches the model under a defence: in process, through a
service the audit starts, or through an API already deployed; its accounts and keys."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from mlinvert.audit.context import AuditContext, blinding
from mlinvert.defenses.spec import Defense, build_predictor
from mlinvert.oracle.http import HttpOracle, key_fingerprint
from mlinvert.oracle.local import LocalOracle
from mlinvert.oracle.wrappers import one_attacker
from mlinvert.service.runner import RedisServer, ServiceProcess
from mlinvert.service.store import Store

#: Environment of the service subprocess: one math thread (see :func:`single_threaded`).
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@contextlib.contextmanager
def oracles_under(ctx: AuditContext, defense: Defense) -> Iterator[dict[tuple[str, str], Any]]:
    """Oracles per (target, attack) for ``defense``: HTTP service or in process.

    Every API attack gets its own fresh account (API key); the white-box attacker gets
    the model itself (no API, so no output policy and no rate limit apply).
    """
    if ctx.config.api is not None:
        with deployed_oracles(ctx, defense) as deployed:
            yield deployed
        return
    api_attacks = [a for a in ctx.config.attacks if a != "whitebox"]
    if ctx.config.in_process or not api_attacks:
        with _in_process(ctx, defense, api_attacks) as local:
            yield local
        return

    with served_accounts(ctx, defense) as served:
        clients = {
            (name, a): [HttpOracle(served.urls[name][0], key, max_wait=0.0) for key in keys]
            for (name, a), keys in served.keys.items()
        }
        try:
            yield {
                (name, a): _many(ctx, defense, a, accounts, served.earlier[(name, a)])
                for (name, a), accounts in clients.items()
            }
        finally:
            for accounts in clients.values():
                for client in accounts:
                    client.close()


@dataclass(frozen=True)
class Served:
    """The service the audit started for one defence, as an attacker knows it: the URLs
    of each target's model (one per service replica), the API keys of each (target,
    attack), and what each key answered before (in an earlier run this one resumes, see
    ``Rotating``); ``spent`` collects the inputs each key answered in the cluster's tasks."""

    urls: dict[str, tuple[str, ...]]
    keys: dict[tuple[str, str], list[str]]
    earlier: dict[tuple[str, str], list[int]]
    spent: Counter[str] = field(default_factory=Counter)


@contextlib.contextmanager
def served_accounts(ctx: AuditContext, defense: Defense) -> Iterator[Served]:
    """Run ``mlinvert serve`` with ``defense`` (its query log on the RAM disk, copied to
    ``service/DEFENCE.sqlite3`` afterwards) and open the attackers' accounts on it; the
    detector's flags are noted in the results when it stops."""
    api_attacks = [a for a in ctx.config.attacks if a != "whitebox"]
    ctx.events("stage", {"name": f"starting the service with defence {defense.name}"})
    final_db = ctx.results.out / "service" / f"{defense.slug}.sqlite3"
    with ram_query_log(final_db, carry_on=ctx.config.resume) as db:
        with contextlib.closing(Store(db)) as store:
            answered = _answered_per_account(store)
            names = {
                (t.name, a): [
                    account_name(defense, t.name, a, i) for i in range(ctx.config.accounts)
                ]
                for t in ctx.targets
                for a in api_attacks
            }
            keys = {k: [store.create_key(n)[0] for n in ns] for k, ns in names.items()}
        try:
            with _replicas(ctx, defense, db) as services:
                processes = [s.process for s in services]
                ctx.api_alive = lambda: all(p is not None and p.poll() is None for p in processes)
                try:
                    yield Served(
                        urls={
                            t.name: tuple(s.model_url(t.name) for s in services)
                            for t in ctx.targets
                        },
                        keys=keys,
                        earlier={k: [answered.get(n, 0) for n in ns] for k, ns in names.items()},
                    )
                finally:
                    ctx.api_alive = lambda: True
        finally:
            if defense.detector is not None:
                with contextlib.closing(Store(db)) as store:  # the service keeps its flags
                    _note_flags(ctx, defense, api_attacks, store)


@contextlib.contextmanager
def _replicas(ctx: AuditContext, defense: Defense, db: Path) -> Iterator[list[ServiceProcess]]:
    """``config.replicas`` service processes serving the targets under ``defense``, one
    query log; several share a throw-away Redis (their rate limits and detector history)."""
    with contextlib.ExitStack() as stack:
        redis = None
        if ctx.config.replicas > 1:
            redis = stack.enter_context(RedisServer()).url
        services = [
            stack.enter_context(
                ServiceProcess(
                    [f"{t.name}={t.folder}" for t in ctx.targets],
                    db=db,
                    policy=defense.policy,
                    rate_limit=defense.rate,
                    detector=defense.detector,
                    redis_url=redis,
                    env=ONE_THREAD_ENV,
                )
            )
            for _ in range(ctx.config.replicas)
        ]
        yield services


@contextlib.contextmanager
def deployed_oracles(ctx: AuditContext, defense: Defense) -> Iterator[dict[tuple[str, str], Any]]:
    """Oracles per (target, attack) on the deployed API: the attacker's keys
    (``ctx.api_oracles``, shared by the attacks as one real attacker's are), rotated
    through like ``--accounts`` (a key the service refused earlier is moved past)."""
    (target,) = ctx.targets
    api_attacks = [a for a in ctx.config.attacks if a != "whitebox"]
    with _deployed_keys(ctx, Counter()) as before:
        yield {
            (target.name, a): _many(ctx, defense, a, ctx.api_oracles, before) for a in api_attacks
        }


@contextlib.contextmanager
def deployed_accounts(ctx: AuditContext, defense: Defense) -> Iterator[Served]:
    """The deployed API as a cluster's tasks reach it: its URLs (``--api``, its replicas),
    the attacker's keys shared by the API attacks, and what each key answered before a
    task opens it (earlier runs, and this run's served-accuracy measurement);
    what the tasks report in ``spent`` is added to ``deployment.answered``."""
    (target,) = ctx.targets
    api_attacks = [a for a in ctx.config.attacks if a != "whitebox"]
    keys = list(ctx.config.api_keys)
    spent: Counter[str] = Counter()
    with _deployed_keys(ctx, spent) as before:
        so_far = [n + o.n_queries for n, o in zip(before, ctx.api_oracles, strict=True)]
        yield Served(
            urls={target.name: ctx.config.api_urls},
            keys={(target.name, a): keys for a in api_attacks},
            earlier={(target.name, a): so_far for a in api_attacks},
            spent=spent,
        )


@contextlib.contextmanager
def _deployed_keys(ctx: AuditContext, spent: Counter[str]) -> Iterator[list[int]]:
    """What each of the attacker's keys answered in earlier runs (``deployment.answered``);
    afterwards that, plus what its oracle in ``ctx.api_oracles`` counted and what the
    cluster's tasks report in ``spent``, is written back."""
    first = ctx.api_oracles[0]
    ctx.api_alive = lambda: reachable(first)
    answered = ctx.results.doc["deployment"]["answered"]
    prints = [key_fingerprint(k) for k in ctx.config.api_keys]
    before = [int(answered.get(p, 0)) for p in prints]
    try:
        yield before
    finally:
        ctx.api_alive = lambda: True
        for key, p, n, oracle in zip(
            ctx.config.api_keys, prints, before, ctx.api_oracles, strict=True
        ):
            answered[p] = n + oracle.n_queries + spent[key]
        ctx.results.save()


def reachable(oracle: Any) -> bool:
    """Whether the deployed API still answers its model listing."""

    try:
        return httpx.get(f"{oracle.root}/v1/models", timeout=10.0).status_code < 500
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def _in_process(
    ctx: AuditContext, defense: Defense, api_attacks: list[str]
) -> Iterator[dict[tuple[str, str], Any]]:
    """In-process oracles through the same Predictor the service would build, one account
    per target, attack and ``--accounts`` slot, as over HTTP."""
    guards = defense.guards()  # one set for every model, as in the service
    oracles: dict[tuple[str, str], Any] = {}
    for t in ctx.targets:
        predictor = build_predictor(t.model, name=t.name, policy=defense.policy, guards=guards)
        for a in api_attacks:
            accounts = [
                LocalOracle(predictor, account=account_name(defense, t.name, a, i))
                for i in range(ctx.config.accounts)
            ]
            oracles[(t.name, a)] = _many(ctx, defense, a, accounts)
    try:
        yield oracles
    finally:
        if guards.detector is not None:
            _note_flags(ctx, defense, api_attacks, guards.detector.flags)


def _answered_per_account(store: Any) -> dict[str, int]:
    """Inputs the service answered per account so far (an earlier run's, when resumed)."""
    out: dict[str, int] = {}
    for q in store.queries():
        if q.status == 200:
            out[str(q.account)] = out.get(str(q.account), 0) + q.n_inputs
    return out


def account_name(defense: Defense, target: str, attack: str, i: int = 0) -> str:
    """The ``i``-th API account of one attack on one target under ``defense``."""
    return f"audit-{defense.slug}-{target}-{attack}" + (f"-{i + 1}" if i else "")


def _many(
    ctx: AuditContext,
    defense: Defense,
    attack: str,
    accounts: list[Any],
    answered_before: Sequence[int] = (),
) -> Any:
    """One attacker's oracle over its accounts: the only one, a Rotating over them, or
    with ``config.escalate`` against a detector the blinding Sybil
    (:func:`~mlinvert.oracle.wrappers.escalating`). ``answered_before``: what each
    account answered in an earlier run this one resumes (see ``Rotating``)."""

    amplitude = blinding(ctx, attack, defense)
    return one_attacker(
        accounts,
        escalate=amplitude if ctx.config.escalate else None,
        seed=ctx.config.seed,
        answered_before=answered_before,
    )


def _note_flags(ctx: AuditContext, defense: Defense, attacks: list[str], flags: Any) -> None:
    """Record in ``detector_flags`` whether the detector flagged each attack's accounts
    (``flags``: a :class:`~mlinvert.defenses.detector.FlagStore`): the first account's
    flag and how many were flagged; a flag an earlier, resumed run recorded is kept."""
    mine = ctx.results.doc.setdefault("detector_flags", {}).setdefault(defense.name, {})
    for t in ctx.targets:
        row = mine.setdefault(t.name, {})
        for a in attacks:
            found = [
                f
                for i in range(ctx.config.accounts)
                if (f := flags.flagged(account_name(defense, t.name, a, i))) is not None
            ]
            if found:
                row[a] = {
                    "inputs": found[0].inputs,
                    "near_duplicates": found[0].near_duplicates,
                    "accounts_flagged": len(found),
                }
            else:
                row.setdefault(a, None)
    ctx.results.save()


@contextlib.contextmanager
def ram_query_log(final_db: Path, *, carry_on: bool = False) -> Iterator[Path]:
    """A path for the service's query log on the RAM disk, copied to ``final_db`` after.

    The service logs every query; on a RAM disk that costs no fsync per request
    (measured: 17 instead of 25 ms per request). ``carry_on`` (a resumed audit) starts
    from the database ``final_db`` already holds — the earlier run's query log, accounts
    and detector flags — so the copy back adds to it instead of replacing it.
    """
    final_db.parent.mkdir(parents=True, exist_ok=True)
    ram = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix="mlinvert-audit-", dir=ram if ram.is_dir() else None))
    db = work / final_db.name
    if carry_on:
        _copy_sqlite(final_db, db)
    try:
        yield db
    finally:
        _copy_sqlite(db, final_db)
        shutil.rmtree(work, ignore_errors=True)


def _copy_sqlite(src: Path, dst: Path) -> None:
    """Copy an SQLite database consistently (WAL included) with the backup API."""
    if not src.exists():
        return
    with (
        contextlib.closing(sqlite3.connect(src)) as a,
        contextlib.closing(sqlite3.connect(dst)) as b,
    ):
        a.backup(b)
