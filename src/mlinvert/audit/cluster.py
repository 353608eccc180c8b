"""The attack matrix on a Dask cluster (``--cluster local:N`` or ``tcp://HOST:PORT``).

Per defence the driver starts the service as on one machine, opens the attackers'
accounts, and sends one task per (target, attack) to the workers: each task is an
ordinary attack on its people through an :class:`~mlinvert.oracle.http.HttpOracle`
(the white-box one on the model folder), run by the same code as on one machine
(:func:`~mlinvert.audit.people.run_people`), so the records are the same. The service's
Redis-free limits live in the one service process, so every worker's queries meet the
same rate limit and detector. The driver judges each outcome as its task returns and
is the only writer of ``results.json``.

Every account's answered batches are journaled under ``journal/`` in the output folder
(:class:`~mlinvert.oracle.wrappers.Journaled`): a task whose worker is lost is re-run
by Dask from its start and replays what the service already answered instead of
asking again, so a lost worker costs no duplicated paid-for query except the batch in
flight when it died. Workers on other machines (``tcp://``) must see the output folder
at the same path (a shared file system).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlinvert.attacks.lockstep import LabelAttack
from mlinvert.attacks.presets import Preset, build_attack, search_space
from mlinvert.attacks.priors import load_prior
from mlinvert.attacks.spaces import Space
from mlinvert.audit.channels import Served, served_accounts
from mlinvert.audit.config import parse_cluster
from mlinvert.audit.context import AuditContext, AuditTarget, Event, blinding, single_threaded
from mlinvert.audit.people import Outcome, blinded_per_person, run_people
from mlinvert.audit.records import judged_record, shared_record
from mlinvert.core import Response
from mlinvert.data import load
from mlinvert.data.base import ImageDataset, Split
from mlinvert.defenses.spec import Defense, build_predictor
from mlinvert.errors import ConfigError, MlinvertError
from mlinvert.oracle.base import Oracle
from mlinvert.oracle.http import HttpOracle
from mlinvert.oracle.local import WhiteBoxOracle
from mlinvert.oracle.wrappers import Journaled, one_attacker
from mlinvert.targets.io import load as load_model

log = logging.getLogger(__name__)

#: Fault injection for the tests: ``N:MARKER`` makes the worker process that answers
#: an account's N-th live batch exit on the spot, once (the MARKER file records it).
FAULT_ENV = "MLINVERT_FAULT_EXIT_AFTER"

Group = tuple[str, AuditTarget, list[int]]


@dataclass(frozen=True, kw_only=True)
class AttackTask:
    """One (defence, target, attack) of the matrix, as a worker runs it: everything
    it needs to rebuild the attacker on another process or machine."""

    attack: str
    defense: Defense
    target: str
    folder: Path
    labels: tuple[int, ...]
    data: str
    split: Split
    seed: int
    preset: Preset
    budget: int
    prior: Path | None
    url: str | None
    keys: tuple[str, ...]
    answered_before: tuple[int, ...]
    lanes: int
    blind: float | None
    escalate: bool
    journal: Path


@contextlib.contextmanager
def open_cluster(spec: str, emit: Event) -> Iterator[Any]:
    """A Dask client on the cluster ``spec`` (a local one is started and stopped here)."""
    from distributed import Client, LocalCluster

    kind, where = parse_cluster(spec)
    with contextlib.ExitStack() as stack:
        if kind == "local":
            emit("stage", {"name": f"starting a Dask cluster of {where} worker processes"})
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=int(where),
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address="127.0.0.1:0",
                    host="127.0.0.1",
                )
            )
            client = stack.enter_context(Client(cluster))
        else:
            try:
                client = stack.enter_context(Client(str(where), timeout=30))
            except OSError as exc:
                raise ConfigError(
                    f"cannot reach the Dask scheduler {where} ({exc}); start it with "
                    "`dask scheduler` and its workers with `dask worker ADDRESS`"
                ) from None
        emit("stage", {"name": f"Dask dashboard: {client.dashboard_link}"})
        log.warning("Dask dashboard: %s", client.dashboard_link)
        yield client


def attack_on_cluster(
    ctx: AuditContext, defense: Defense, groups: list[Group], client: Any
) -> None:
    """Attack ``groups`` under ``defense`` on the cluster behind ``client``; judge and
    write each record as its task returns."""
    from distributed import as_completed

    journal = ctx.results.out / "journal" / defense.slug
    with served_accounts(ctx, defense) as served:
        todo = [
            (attack, target, people)
            for attack, target, group in groups
            if (people := _not_shared(ctx, attack, defense, target, group))
        ]
        # the tasks spread over the service replicas, one after another
        tasks = [
            _task(ctx, defense, attack, target, people, served, journal, replica=i)
            for i, (attack, target, people) in enumerate(todo)
        ]
        futures = [client.submit(run_task, t, pure=False, retries=2) for t in tasks]
        by_future = dict(zip(futures, tasks, strict=True))
        for future in as_completed(futures):
            task = by_future[future]
            target = next(t for t in ctx.targets if t.name == task.target)
            for o in future.result():
                record = judged_record(
                    ctx,
                    task.attack,
                    defense,
                    target,
                    o.label,
                    o.outcome,
                    lanes=o.lanes,
                    accounts=o.accounts,
                    blinded_up_to=o.blinded_up_to,
                )
                ctx.results.add(record)
                ctx.events("record", record)
    shutil.rmtree(journal, ignore_errors=True)  # every answer it kept is in a record now
    with contextlib.suppress(OSError):  # the last defence's: no journal is left
        journal.parent.rmdir()


def _not_shared(
    ctx: AuditContext, attack: str, defense: Defense, target: AuditTarget, people: list[int]
) -> list[int]:
    """The people still to attack: a record an earlier run provably equals is copied."""
    todo = []
    for label in people:
        shared = shared_record(ctx, attack, defense, target, label)
        if shared is None:
            todo.append(label)
        else:
            ctx.results.add(shared)
            ctx.events("record", shared)
    return todo


def _task(
    ctx: AuditContext,
    defense: Defense,
    attack: str,
    target: AuditTarget,
    labels: list[int],
    served: Served,
    journal: Path,
    *,
    replica: int,
) -> AttackTask:
    api = attack != "whitebox"
    keys = served.keys[(target.name, attack)] if api else []
    return AttackTask(
        attack=attack,
        defense=defense,
        target=target.name,
        folder=target.folder,
        labels=tuple(labels),
        data=ctx.dataset.spec,
        split=ctx.dataset.split,
        seed=ctx.config.seed,
        preset=ctx.preset,
        budget=int(ctx.results.doc["budget"]),
        prior=ctx.config.prior,
        url=served.urls[target.name][replica % len(served.urls[target.name])] if api else None,
        keys=tuple(keys),
        answered_before=tuple(served.earlier[(target.name, attack)]) if api else (),
        lanes=ctx.config.lanes if api else 1,
        blind=blinding(ctx, attack, defense),
        escalate=ctx.config.escalate,
        journal=journal / f"{target.name}-{attack}",
    )


def run_task(task: AttackTask) -> list[Outcome]:
    """Run one task on a worker: rebuild the data, the attacks and the attacker's
    oracle, attack every person, return their outcomes (judged by the driver)."""
    with single_threaded():
        dataset = dataclasses.replace(load(task.data, seed=task.seed), split=task.split)
        if not isinstance(dataset, ImageDataset):
            raise ConfigError(f"{task.data} holds no images; the cluster runs image audits")
        attacks = _attacks(task, dataset)
        outcomes: list[Outcome] = []
        if task.url is None:
            model = load_model(task.folder)
            run_people(
                attacks,
                lambda: WhiteBoxOracle(build_predictor(model, name=task.target)),
                lanes=1,
                seed=task.seed,
                budget=None,
                adapt=blinded_per_person(None, task.seed),
                done=outcomes.append,
            )
            return outcomes
        task.journal.mkdir(parents=True, exist_ok=True)
        clients = [HttpOracle(task.url, key, max_wait=0.0) for key in task.keys]
        try:
            accounts: list[Oracle] = [
                _faulty(Journaled(c, task.journal / f"account-{i + 1}.jsonl"))
                for i, c in enumerate(clients)
            ]
            base = one_attacker(
                accounts,
                escalate=task.blind if task.escalate else None,
                seed=task.seed,
                answered_before=task.answered_before,
            )
            run_people(
                attacks,
                base,
                lanes=task.lanes,
                seed=task.seed,
                budget=task.budget,
                adapt=blinded_per_person(None if task.escalate else task.blind, task.seed),
                done=outcomes.append,
                shared_blinding=task.escalate,
            )
        finally:
            for c in clients:
                c.close()
        return outcomes


def _attacks(task: AttackTask, dataset: ImageDataset) -> dict[int, LabelAttack | MlinvertError]:
    """Each person's attack, as the driver would build it (an error: not buildable)."""
    prior: Space | None = None
    if task.prior is not None:
        prior = load_prior(task.prior).space(private=dataset.train()[0], shape=dataset.image_shape)
    attacks: dict[int, LabelAttack | MlinvertError] = {}
    for label in task.labels:
        try:
            space = prior or search_space(
                dataset, label, task.preset.space, augment=task.preset.augment
            )
            attacks[label] = build_attack(
                task.attack, task.preset, task.budget, space, policy=task.defense.policy
            )
        except MlinvertError as exc:
            attacks[label] = exc
    return attacks


def _faulty(oracle: Journaled) -> Oracle:
    """``oracle``, or with :data:`FAULT_ENV` set (tests) one that exits this process
    after its N-th live batch, once."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return oracle
    count, _, marker = spec.partition(":")
    return _ExitAfter(oracle, int(count), Path(marker))


class _ExitAfter:
    """Exit the worker process on the N-th live batch (before it is answered), once."""

    def __init__(self, oracle: Journaled, after: int, marker: Path) -> None:
        self.inner, self.after, self.marker, self.live = oracle, after, marker, 0

    @property
    def info(self) -> Any:
        return self.inner.info

    @property
    def n_queries(self) -> int:
        return self.inner.n_queries

    def query(self, x: Any) -> Response:
        replayed = self.inner.replayed
        answer = self.inner.query(x)
        if self.inner.replayed == replayed:  # answered live
            self.live += 1
            if self.live >= self.after and not self.marker.exists():
                self.marker.write_text(str(os.getpid()))
                os._exit(70)
        return answer
