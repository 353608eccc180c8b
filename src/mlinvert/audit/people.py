"""One attacker's people: their attacks run one after another, or several at once on
the lanes of one API oracle. The audit's driver runs them here, and so does a cluster
worker (``audit/cluster.py``), so both give the same outcomes."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlinvert.attacks.base import AttackResult, ProgressEvent
from mlinvert.attacks.lockstep import LabelAttack
from mlinvert.errors import MlinvertError
from mlinvert.oracle.base import Oracle
from mlinvert.oracle.lockstep import Lane, map_lanes
from mlinvert.oracle.wrappers import Blinded, largest_blinding

Adapt = Callable[[int, Oracle], Oracle]
Progress = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class Outcome:
    """What one person's attack gave, before it is judged: its result (or the error it
    raised), how many people it ran beside, the API accounts the attacker had opened
    (None: white-box), the largest blinding noise its probes carried, and how many
    shared requests went without a lane while it ran (lockstep's stall valve)."""

    label: int
    outcome: AttackResult | MlinvertError
    lanes: int
    accounts: int | None = None
    blinded_up_to: float | None = None
    stalled: int = 0


def blinded_per_person(amplitude: float | None, seed: int) -> Adapt:
    """The attacker's oracle for one person: blinded with fresh noise of ``amplitude``
    (a generator seeded by ``seed`` and the person), or as it is when None."""

    def adapt(label: int, oracle: Oracle) -> Oracle:
        if amplitude is None:
            return oracle
        return Blinded(oracle, amplitude, seed=np.random.default_rng([seed, label]))

    return adapt


def run_people(
    attacks: dict[int, LabelAttack | MlinvertError],
    base: Oracle | Callable[[], Oracle],
    *,
    lanes: int,
    seed: int,
    budget: int | None,
    adapt: Adapt,
    done: Callable[[Outcome], None],
    progress: Progress | None = None,
    shared_blinding: bool = False,
) -> None:
    """Run every person's attack (an error in ``attacks``: the attack could not be
    built) and report each :class:`Outcome` to ``done`` as it ends.

    ``base`` is the API attacker's oracle (its accounts), or for the white-box attacker a
    factory of a fresh oracle over the model per person. With ``lanes`` > 1 the API
    attacks run ``lanes`` at a time, their probes in one request per step
    (:func:`~mlinvert.oracle.lockstep.map_lanes`); ``adapt`` turns the base oracle into
    one person's (query blinding). ``shared_blinding``: the accounts blind, not the
    people (the escalating attacker), so the largest noise is read from ``base``.
    """
    if callable(base) or lanes <= 1:
        for label, attack in attacks.items():
            oracle = base() if callable(base) else adapt(label, base)
            outcome = (
                attack
                if isinstance(attack, MlinvertError)
                else _run(attack, oracle, label, seed, None if callable(base) else budget, progress)
            )
            accounts = None if callable(base) else getattr(base, "accounts_used", 1)
            done(Outcome(label, outcome, 1, accounts, largest_blinding(oracle)))
        return
    runnable = {}
    for label, attack in attacks.items():
        if isinstance(attack, MlinvertError):
            done(Outcome(label, attack, 1))
        else:
            runnable[label] = attack
    if not runnable:
        return
    lanes = min(lanes, len(runnable))
    adapted: dict[int, Oracle] = {}
    lanes_of: dict[int, Lane] = {}

    def work(label: int, lane: Lane) -> AttackResult | MlinvertError:
        lanes_of[label] = lane
        adapted[label] = adapt(label, lane)
        return _run(runnable[label], adapted[label], label, seed, budget, progress)

    def finished(label: int, future: Future[AttackResult | MlinvertError]) -> None:
        blinded = largest_blinding(base if shared_blinding else adapted.get(label))
        accounts = getattr(base, "accounts_used", 1)
        lane = lanes_of.get(label)
        stalled = 0 if lane is None else lane.stalled
        done(Outcome(label, future.result(), lanes, accounts, blinded, stalled))

    map_lanes(work, list(runnable), base, lanes=lanes, on_done=finished)


def _run(
    attack: LabelAttack,
    oracle: Oracle,
    label: int,
    seed: int,
    budget: int | None,
    progress: Progress | None,
) -> AttackResult | MlinvertError:
    try:
        result: Any = attack.run(oracle, label, seed=seed, budget=budget, progress=progress)
    except MlinvertError as exc:
        return exc
    return result
