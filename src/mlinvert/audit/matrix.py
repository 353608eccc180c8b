"""The attack matrix: every (defence, target, attack, person) not yet recorded."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from typing import Any

from mlinvert.attacks.lockstep import LabelAttack
from mlinvert.attacks.presets import build_attack, search_space
from mlinvert.audit.channels import oracles_under
from mlinvert.audit.cluster import attack_on_cluster, open_cluster
from mlinvert.audit.context import AuditContext, AuditTarget, blinding
from mlinvert.audit.people import Outcome, blinded_per_person, run_people
from mlinvert.audit.records import judged_record, shared_record
from mlinvert.defenses.spec import Defense, build_predictor
from mlinvert.errors import MlinvertError
from mlinvert.oracle.local import WhiteBoxOracle


def attack_matrix(ctx: AuditContext) -> None:
    """Every (defence, target, attack, person) not yet in the results: attack, record."""
    config, results, emit = ctx.config, ctx.results, ctx.events
    plan = [
        (a, d.name, t.name, lab)
        for d in ctx.defenses
        for t in ctx.targets
        for a in config.attacks
        for lab in ctx.labels
    ]
    done = sum(1 for k in plan if k in results.done)
    emit("plan", {"total": len(plan), "done": done})
    with contextlib.ExitStack() as stack:
        client = None
        if config.cluster is not None and done < len(plan):
            client = stack.enter_context(open_cluster(config.cluster, emit))
        for defense in ctx.defenses:
            todo = [k for k in plan if k[1] == defense.name and k not in results.done]
            if not todo:
                continue
            groups = [
                (attack, next(t for t in ctx.targets if t.name == name), [k[3] for k in group])
                for (attack, name), group in itertools.groupby(todo, key=lambda k: (k[0], k[2]))
            ]
            if client is not None:
                attack_on_cluster(ctx, defense, groups, client)
                continue
            with oracles_under(ctx, defense) as oracles:
                for attack, target, people in groups:
                    _attack_group(ctx, attack, defense, target, people, oracles)


def _attack_group(
    ctx: AuditContext,
    attack: str,
    defense: Defense,
    target: AuditTarget,
    labels: list[int],
    oracles: dict[tuple[str, str], Any],
) -> None:
    """Attack ``labels`` with ``attack`` on ``target`` under ``defense``; judge, write and
    report each record in this thread as each person finishes.

    The API attacks run ``config.lanes`` people at a time on the lanes of one
    :class:`~mlinvert.oracle.lockstep.Coalescer` (exact per-person query counts; the
    probes of all running people share each request); the white-box attack one by one.
    A record an earlier run provably equals is copied instead (:func:`shared_record`).
    """
    attacks: dict[int, LabelAttack | MlinvertError] = {}
    for label in labels:
        shared = shared_record(ctx, attack, defense, target, label)
        if shared is not None:
            ctx.results.add(shared)
            ctx.events("record", shared)
            continue
        try:  # built here, not in the lanes: the search spaces are cached in ctx
            attacks[label] = _build_attack(ctx, attack, label, defense)
        except MlinvertError as exc:
            attacks[label] = exc
    budget = _budget(ctx, attack)

    def record(o: Outcome) -> None:
        judged = judged_record(
            ctx,
            attack,
            defense,
            target,
            o.label,
            o.outcome,
            lanes=o.lanes,
            accounts=o.accounts,
            blinded_up_to=o.blinded_up_to,
        )
        ctx.results.add(judged)
        ctx.events("record", judged)

    if attack == "whitebox":
        model = target.model
        run_people(
            attacks,
            lambda: WhiteBoxOracle(build_predictor(model, name=target.name)),
            lanes=1,
            seed=ctx.config.seed,
            budget=None,
            adapt=blinded_per_person(None, ctx.config.seed),
            done=record,
            progress=_progress(ctx, budget),
        )
        return
    amplitude = blinding(ctx, attack, defense)
    run_people(
        attacks,
        oracles[(target.name, attack)],
        lanes=ctx.config.lanes,
        seed=ctx.config.seed,
        budget=budget,
        adapt=blinded_per_person(None if ctx.config.escalate else amplitude, ctx.config.seed),
        done=record,
        progress=_progress(ctx, budget),
        shared_blinding=ctx.config.escalate,
    )


def _build_attack(ctx: AuditContext, attack: str, label: int, defense: Defense) -> Any:
    if ctx.prior is None and label not in ctx.spaces:  # bound once per person, then reused
        ctx.spaces[label] = search_space(
            ctx.dataset, label, ctx.preset.space, augment=ctx.preset.augment
        )
    space = ctx.prior if ctx.prior is not None else ctx.spaces[label]
    budget = int(ctx.results.doc["budget"])
    return build_attack(attack, ctx.preset, budget, space, policy=defense.policy)


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
