"""The attack matrix on a Dask cluster (``--cluster local:N`` or ``tcp://HOST:PORT``).

Per defence the driver starts the service as on one machine (or, with ``--api``, reads
the deployed endpoint's URLs and the attacker's keys), and sends the people to the
workers as tasks: each task is an ordinary attack on its people through an
:class:`~mlinvert.oracle.http.HttpOracle` (the white-box one on the model folder), run by
the same code as on one machine (:func:`~mlinvert.audit.people.run_people`), so the
records are the same. The service's limits live in the one service process, or in the
Redis its replicas share, so every worker's queries meet the same rate limit and
detector. The tasks spread over the service's URLs (``--replicas N``, or the replicas
listed in ``--api URL1,URL2``) by their index. The driver judges each outcome as its task
returns and is the only writer of ``results.json``.

**What one task holds.** The records must be those of the one-machine run, and under
some defences a person's record depends on who else the attacker's account attacked:

- *Groups of people* (at most ``--group-size``, :data:`~mlinvert.audit.config.DEFAULT_GROUP_SIZE`)
  where the defence keeps no per-account state — an output policy alone (``none``,
  ``round:N``, ``top:K``, ``labels``, ``noise``), whose answer to an input never depends
  on earlier queries — and always for the white-box attack, which queries no API. Each
  group still runs a full set of lockstep lanes (at least ``--lanes`` people, so the
  records' ``lanes`` are those of one machine; fewer people than that stay in one task).
- *One task per (target, defence, attack)* under a rate limit or a query detector: their
  budget and history are per account, and the one-machine attacker spends one account's
  budget on its people in order (and moves to its next ``--accounts`` key when refused),
  so splitting those people over parallel tasks would change which people the budget
  covers and when the detector fires. Giving each group its own accounts would measure
  a bigger Sybil attacker than the audit's, not the same one.
- *One task per target for every attack* of an ``--api`` audit under a stateful
  deployed defence: there the API attacks share the attacker's keys one after another
  (the one-machine order), so the task runs them in that order on the same keys.

**Per worker process**, what every task rebuilds alike — the data set, each person's
search space (eigenface prior), the learned prior, a model folder's weights — is built
once and kept (least recently used dropped first), keyed by what determines it.

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
import functools
import hashlib
import itertools
import logging
import os
import re
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from mlinvert.attacks.lockstep import LabelAttack
from mlinvert.attacks.presets import Preset, build_attack, search_space
from mlinvert.attacks.priors import load_prior
from mlinvert.attacks.spaces import Space
from mlinvert.audit.channels import Served, deployed_accounts, served_accounts
from mlinvert.audit.config import DEFAULT_GROUP_SIZE, parse_cluster
from mlinvert.audit.context import AuditContext, AuditTarget, Event, blinding, single_threaded
from mlinvert.audit.people import Outcome, blinded_per_person, run_people
from mlinvert.audit.records import record_outcome, shared_record
from mlinvert.core import Response
from mlinvert.data import load
from mlinvert.data.base import ImageDataset, Split
from mlinvert.defenses.spec import Defense, build_predictor
from mlinvert.errors import ConfigError, MlinvertError
from mlinvert.oracle.base import Oracle
from mlinvert.oracle.http import HttpOracle
from mlinvert.oracle.local import WhiteBoxOracle
from mlinvert.oracle.wire import WireConfig
from mlinvert.oracle.wrappers import Journaled, one_attacker
from mlinvert.targets.io import load as load_model

log = logging.getLogger(__name__)

#: Fault injection for the tests: ``N:MARKER`` makes the worker process that answers
#: an account's N-th live batch exit on the spot, once (the MARKER file records it).
FAULT_ENV = "MLINVERT_FAULT_EXIT_AFTER"

Group = tuple[str, AuditTarget, list[int]]
T = TypeVar("T")


Step = tuple[str, tuple[int, ...]]


@dataclass(frozen=True, kw_only=True)
class AttackTask:
    """One task of the matrix as a worker runs it: everything it needs to rebuild the
    attacker on another process or machine. ``steps``: (attack, people) run in order on
    the same accounts (one step, except an ``--api`` audit under a stateful defence);
    ``url`` None: the white-box attack on the model folder."""

    steps: tuple[Step, ...]
    defense: Defense
    target: str
    folder: Path
    data: str
    split: Split
    seed: int
    preset: Preset
    budget: int
    prior: Path | None
    url: str | None
    wire: WireConfig | None
    keys: tuple[str, ...]
    answered_before: tuple[int, ...]
    lanes: int
    blind: float | None
    escalate: bool
    journal: Path


@dataclass(frozen=True)
class TaskDone:
    """What a task gives back: each person's outcome after its attack, and the inputs
    each of the task's keys answered (journal replays included; empty: white-box)."""

    outcomes: list[tuple[str, Outcome]]
    answered: tuple[int, ...]


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
    accounts = deployed_accounts if ctx.config.api is not None else served_accounts
    with accounts(ctx, defense) as served:
        tasks = _tasks(ctx, defense, groups, served, journal)
        futures = [client.submit(run_task, t, pure=False, retries=2) for t in tasks]
        by_future = dict(zip(futures, tasks, strict=True))
        for future in as_completed(futures):
            task = by_future[future]
            target = next(t for t in ctx.targets if t.name == task.target)
            done: TaskDone = future.result()
            for attack, o in done.outcomes:
                record_outcome(ctx, attack, defense, target, o)
            for key, n in zip(task.keys, done.answered, strict=True):
                served.spent[key] += n
    shutil.rmtree(journal, ignore_errors=True)  # every answer it kept is in a record now
    with contextlib.suppress(OSError):  # the last defence's: no journal is left
        journal.parent.rmdir()


def _tasks(
    ctx: AuditContext, defense: Defense, groups: list[Group], served: Served, journal: Path
) -> list[AttackTask]:
    """The tasks of ``groups`` under ``defense`` (see the module's docstring)."""
    todo = [
        (attack, target, tuple(left))
        for attack, target, group in groups
        if (left := _not_shared(ctx, attack, defense, target, group))
    ]
    units = plan_tasks(
        todo,
        stateful=defense.rate is not None or defense.detector is not None,
        shared_keys=ctx.config.api is not None,
        lanes=ctx.config.lanes,
        group_size=ctx.config.group_size or DEFAULT_GROUP_SIZE,
    )
    # the tasks spread over the service's URLs (its replicas), one after another
    return [
        _task(ctx, defense, target, steps, served, journal, replica=i)
        for i, (target, steps) in enumerate(units)
    ]


def plan_tasks(
    todo: list[tuple[str, T, tuple[int, ...]]],
    *,
    stateful: bool,
    shared_keys: bool,
    lanes: int,
    group_size: int,
) -> list[tuple[T, tuple[Step, ...]]]:
    """The tasks of one defence's ``todo`` (attack, target, people), as (target, steps).

    ``stateful``: the defence keeps per-account state (a rate limit, a detector);
    ``shared_keys``: the API attacks share the attacker's keys (``--api``). Where the
    people may be split (see the module's docstring), groups of
    :func:`split_people`; else one task per (target, attack), or per target with every
    attack in order when the attacks share the keys. The tasks go by their first person
    (stable), so the attacks on the same people reach the workers together.
    """
    if stateful and shared_keys:
        targets: list[T] = []
        for _, t, _ in todo:
            if t not in targets:
                targets.append(t)
        return [(t, tuple((a, p) for a, u, p in todo if u == t)) for t in targets]
    units: list[tuple[T, tuple[Step, ...]]] = []
    for attack, target, people in todo:
        whitebox = attack == "whitebox"
        for part in split_people(
            people,
            size=group_size,
            lanes=1 if whitebox else lanes,
            split=whitebox or not stateful,
        ):
            units.append((target, ((attack, part),)))
    # the same people's tasks one after another: a worker keeps their search spaces
    return sorted(units, key=lambda unit: unit[1][0][1][0])


def split_people(
    people: tuple[int, ...], *, size: int, lanes: int, split: bool
) -> list[tuple[int, ...]]:
    """``people`` in consecutive groups of at most about ``size``, each of at least
    ``lanes`` people (so each runs a full set of lockstep lanes); one group when not
    ``split`` or when there are too few people."""
    count = -(-len(people) // size) if split else 1
    if lanes > 1:
        count = min(count, len(people) // lanes)
    count = max(count, 1)
    bounds = [len(people) * i // count for i in range(count + 1)]
    return [people[a:b] for a, b in itertools.pairwise(bounds)]


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
    target: AuditTarget,
    steps: tuple[Step, ...],
    served: Served,
    journal: Path,
    *,
    replica: int,
) -> AttackTask:
    attack = steps[0][0]
    api = attack != "whitebox"
    urls = served.urls[target.name]
    wire = ctx.api_oracles[0].wire_config if ctx.api_oracles else None
    name = "+".join(a for a, _ in steps)
    return AttackTask(
        steps=steps,
        defense=defense,
        target=target.name,
        folder=target.folder,
        data=ctx.dataset.spec,
        split=ctx.dataset.split,
        seed=ctx.config.seed,
        preset=ctx.preset,
        budget=int(ctx.results.doc["budget"]),
        prior=ctx.config.prior,
        url=urls[replica % len(urls)] if api else None,
        wire=wire,
        keys=tuple(served.keys[(target.name, attack)]) if api else (),
        answered_before=tuple(served.earlier[(target.name, attack)]) if api else (),
        lanes=ctx.config.lanes if api else 1,
        blind=blinding(ctx, attack, defense),
        escalate=ctx.config.escalate,
        journal=journal / f"{target.name}-{name}-{steps[0][1][0]}",
    )


def run_task(task: AttackTask) -> TaskDone:
    """Run one task on a worker: rebuild (or take from this process's cache) the data,
    the attacks and the attacker's oracle, attack every person, return their outcomes
    (judged by the driver)."""
    with single_threaded():
        dataset = _dataset(task.data, task.seed, task.split)
        outcomes: list[tuple[str, Outcome]] = []
        if task.url is None:
            ((attack, labels),) = task.steps
            model = _cached(
                _BUILT, ("model", *_stamp(task.folder)), lambda: load_model(task.folder)
            )
            run_people(
                _attacks(task, attack, labels, dataset),
                lambda: WhiteBoxOracle(build_predictor(model, name=task.target)),
                lanes=1,
                seed=task.seed,
                budget=None,
                adapt=blinded_per_person(None, task.seed),
                done=lambda o: outcomes.append((attack, o)),
            )
            return TaskDone(outcomes, ())
        task.journal.mkdir(parents=True, exist_ok=True)
        retries = 3 if task.wire is None else 2  # as on one machine (--api: 2)
        clients = [
            HttpOracle(task.url, key, wire=task.wire, max_wait=0.0, max_retries=retries)
            for key in task.keys
        ]
        try:
            journaled = [
                Journaled(c, task.journal / f"account-{i + 1}.jsonl") for i, c in enumerate(clients)
            ]
            accounts = [_faulty(j) for j in journaled]
            for attack, labels in task.steps:
                _api_step(task, attack, _attacks(task, attack, labels, dataset), accounts, outcomes)
            return TaskDone(outcomes, tuple(j.n_queries for j in journaled))
        finally:
            for c in clients:
                c.close()


def _api_step(
    task: AttackTask,
    attack: str,
    attacks: dict[int, LabelAttack | MlinvertError],
    accounts: list[Oracle],
    outcomes: list[tuple[str, Outcome]],
) -> None:
    """One API attack of ``task`` on its people through the attacker's ``accounts``."""
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
        done=lambda o: outcomes.append((attack, o)),
        shared_blinding=task.escalate,
    )


def _attacks(
    task: AttackTask, attack: str, labels: tuple[int, ...], dataset: ImageDataset
) -> dict[int, LabelAttack | MlinvertError]:
    """Each person's attack, as the driver would build it (an error: not buildable)."""
    data = _data_key(task.data, task.seed, task.split)
    prior: Space | None = None
    if task.prior is not None:
        path = task.prior
        prior = _cached(
            _BUILT,
            ("prior", *_stamp(path), *data),
            lambda: load_prior(path).space(private=dataset.train()[0], shape=dataset.image_shape),
        )
    attacks: dict[int, LabelAttack | MlinvertError] = {}
    space_spec, augment = task.preset.space, task.preset.augment
    for label in labels:
        try:
            space = prior or _cached(
                _SPACES,
                ("space", *data, label, space_spec, augment),
                functools.partial(search_space, dataset, label, space_spec, augment=augment),
            )
            attacks[label] = build_attack(
                attack, task.preset, task.budget, space, policy=task.defense.policy
            )
        except MlinvertError as exc:
            attacks[label] = exc
    return attacks


# ------------------------------------------------------------------ per-worker cache
class _Lru:
    """At most ``size`` built objects of one worker process, by key; the least recently
    used one is dropped first. Thread-safe (a worker may run several tasks at once)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[Hashable, Any] = OrderedDict()
        self.lock = threading.Lock()


#: Data sets, model weights and learned priors (a few per audit).
_BUILT = _Lru(8)
#: Each person's search space (an eigenface prior: a few MB at AT&T's size).
_SPACES = _Lru(64)


def _cached(cache: _Lru, key: Hashable, build: Callable[[], T]) -> T:
    """``cache``'s object for ``key``, built by ``build`` the first time."""
    with cache.lock:
        if key in cache.items:
            cache.items.move_to_end(key)
            return cast(T, cache.items[key])
        made = build()
        cache.items[key] = made
        while len(cache.items) > cache.size:
            cache.items.popitem(last=False)
        return made


def _data_key(spec: str, seed: int, split: Split) -> tuple[str, int, str]:
    """What determines a task's data set: its spec, seed and private/held-out split."""
    digest = hashlib.sha256(split.train.tobytes() + b"|" + split.test.tobytes()).hexdigest()
    return spec, seed, digest


def _dataset(spec: str, seed: int, split: Split) -> ImageDataset:
    """The task's data set, loaded once per worker process."""

    def build() -> ImageDataset:
        dataset = dataclasses.replace(load(spec, seed=seed), split=split)
        if not isinstance(dataset, ImageDataset):
            raise ConfigError(f"{spec} holds no images; the cluster runs image audits")
        return dataset

    return _cached(_BUILT, ("data", *_data_key(spec, seed, split)), build)


def _stamp(path: Path) -> tuple[str, int]:
    """A folder or file and its newest modification time (a retrained model: new key)."""
    files = [path, *path.rglob("*")] if path.is_dir() else [path]
    return str(path.resolve()), max((f.stat().st_mtime_ns for f in files if f.exists()), default=0)


def comparable(doc: dict[str, Any]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The records of a ``results.json`` document by (attack, defence, target, person),
    without what depends on the wall clock (``seconds``; a rate limit's "retry after N s
    / N left" text): what a cluster run shares with the one-machine run."""
    out = {}
    for r in doc["records"]:
        kept = {k: v for k, v in r.items() if k != "seconds"}
        if isinstance(kept.get("error"), str):
            kept["error"] = re.sub(r"retry after [0-9.]+ s|[0-9]+ left", "T", kept["error"])
        out[(r["attack"], r["defense"], r["target_model"], r["label"])] = kept
    return out


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
