"""The attack matrix: every (defence, target, attack, person) not yet recorded."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from mlinvert.attacks.presets import build_attack, search_space
from mlinvert.audit.channels import oracles_under
from mlinvert.audit.context import AuditContext, AuditTarget, blinding
from mlinvert.audit.records import judged_record, shared_record
from mlinvert.audit.results import Record
from mlinvert.defenses.predictor import Predictor
from mlinvert.defenses.spec import Defense
from mlinvert.errors import MlinvertError
from mlinvert.oracle.local import WhiteBoxOracle
from mlinvert.oracle.lockstep import map_lanes
from mlinvert.oracle.wrappers import Blinded, largest_blinding


def attack_matrix(ctx: AuditContext) -> None:
    """Every (defence, target, attack, person) not yet in the results: attack, record."""
    config, results, emit = ctx.config, ctx.results, ctx.events
    targets, defenses, labels = ctx.targets, ctx.defenses, ctx.labels
    plan = [
        (a, d.name, t.name, lab)
        for d in defenses
        for t in targets
        for a in config.attacks
        for lab in labels
    ]
    done = sum(1 for k in plan if k in results.done)
    emit("plan", {"total": len(plan), "done": done})
    for defense in defenses:
        todo = [k for k in plan if k[1] == defense.name and k not in results.done]
        if not todo:
            continue
        with oracles_under(ctx, defense) as oracles:
            for (attack, target_name), group in itertools.groupby(todo, key=lambda k: (k[0], k[2])):
                target = next(t for t in targets if t.name == target_name)
                people = [k[3] for k in group]
                if attack != "whitebox" and config.lanes > 1:
                    _attack_lanes(ctx, attack, defense, target, people, oracles)
                    continue
                for label in people:
                    record = _attack_one(ctx, attack, defense, target, label, oracles)
                    results.add(record)
                    emit("record", record)


def _build_attack(ctx: AuditContext, attack: str, label: int, defense: Defense) -> Any:
    if ctx.prior is None and label not in ctx.spaces:  # bound once per person, then reused
        ctx.spaces[label] = search_space(
            ctx.dataset, label, ctx.preset.space, augment=ctx.preset.augment
        )
    space = ctx.prior if ctx.prior is not None else ctx.spaces[label]
    budget = int(ctx.results.doc["budget"])
    return build_attack(attack, ctx.preset, budget, space, policy=defense.policy)


def _attack_one(
    ctx: AuditContext,
    attack: str,
    defense: Defense,
    target: AuditTarget,
    label: int,
    oracles: dict[tuple[str, str], Any],
) -> Record:
    """Run one attack on one person under one defence and judge it: one record."""
    shared = shared_record(ctx, attack, defense, target, label)
    if shared is not None:
        return shared
    base: Any = None  # the API attacker's account(s)
    if attack == "whitebox":
        oracle: Any = WhiteBoxOracle(Predictor(target.model, name=target.name))
    else:
        base = oracles[(target.name, attack)]
        oracle = _adapted(ctx, attack, defense, base, label)
    budget = _budget(ctx, attack)
    try:
        outcome: Any = _build_attack(ctx, attack, label, defense).run(
            oracle, label, seed=ctx.config.seed, budget=budget, progress=_progress(ctx, budget)
        )
    except MlinvertError as exc:
        outcome = exc
    accounts = None if base is None else getattr(base, "accounts_used", 1)
    return judged_record(
        ctx,
        attack,
        defense,
        target,
        label,
        outcome,
        lanes=1,
        accounts=accounts,
        blinded_up_to=largest_blinding(oracle),
    )


def _attack_lanes(
    ctx: AuditContext,
    attack: str,
    defense: Defense,
    target: AuditTarget,
    labels: list[int],
    oracles: dict[tuple[str, str], Any],
) -> None:
    """Attack ``labels`` through one API oracle, ``config.lanes`` people at a time.

    Each person's attack runs unchanged on its own lane of a
    :class:`~mlinvert.oracle.lockstep.Coalescer` (exact per-person query counts; the
    probes of all running people share each request). Records are judged, written and
    reported in this thread as each person finishes.
    """

    todo = []
    for label in labels:
        shared = shared_record(ctx, attack, defense, target, label)
        if shared is None:
            todo.append(label)
        else:
            ctx.results.add(shared)
            ctx.events("record", shared)
    budget = _budget(ctx, attack)
    attacks = {}  # built here, not in the lanes: the search spaces are cached in ctx
    for label in todo:
        try:
            attacks[label] = _build_attack(ctx, attack, label, defense)
        except MlinvertError as exc:
            record = judged_record(ctx, attack, defense, target, label, exc, lanes=1)
            ctx.results.add(record)
            ctx.events("record", record)
    todo = [label for label in todo if label in attacks]
    if not todo:
        return
    lanes = min(ctx.config.lanes, len(todo))
    accounts = oracles[(target.name, attack)]
    adapted: dict[int, Any] = {}

    def work(label: int, lane: Any) -> Any:
        adapted[label] = _adapted(ctx, attack, defense, lane, label)
        try:
            return attacks[label].run(
                adapted[label],
                label,
                seed=ctx.config.seed,
                budget=budget,
                progress=_progress(ctx, budget),
            )
        except MlinvertError as exc:
            return exc

    def done(label: int, future: Future[Any]) -> None:
        record = judged_record(
            ctx,
            attack,
            defense,
            target,
            label,
            future.result(),
            lanes=lanes,
            accounts=getattr(accounts, "accounts_used", 1),
            blinded_up_to=largest_blinding(accounts if ctx.config.escalate else adapted.get(label)),
        )
        ctx.results.add(record)
        ctx.events("record", record)

    map_lanes(work, todo, oracles[(target.name, attack)], lanes=lanes, on_done=done)


def _adapted(ctx: AuditContext, attack: str, defense: Defense, oracle: Any, label: int) -> Any:
    """``oracle`` as the attacker uses it under ``defense``: blinded against a detector
    (per person; with ``config.escalate`` the accounts blind instead, see :func:`_many`)."""

    amplitude = blinding(ctx, attack, defense)
    if amplitude is None or ctx.config.escalate:
        return oracle
    return Blinded(oracle, amplitude, seed=np.random.default_rng([ctx.config.seed, label]))


def _budget(ctx: AuditContext, attack: str) -> int | None:
    """Queries per person: the API attacks' budget; the white-box attacker pays none."""
    return None if attack == "whitebox" else int(ctx.results.doc["budget"])


def _progress(ctx: AuditContext, budget: int | None) -> Callable[[Any], None]:
    def progress(ev: Any) -> None:
        ctx.events(
            "attack_progress",
            {"queries": ev.n_queries, "budget": budget, "confidence": ev.best_confidence},
        )

    return progress
