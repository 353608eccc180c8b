"""Attack several labels at once through one oracle, their probe batches coalesced.

The attacks are unchanged: each label's attack runs on its own lane of a
:class:`~mlinvert.oracle.lockstep.Coalescer` (an Oracle that counts only its own
inputs), with the same seed, budget and progress callback a sequential run gives it,
so against a deterministic oracle the results equal the sequential ones while the
API sees ``lanes`` times fewer, larger requests (how many exactly depends on the attacks'
queries alone, not on thread scheduling).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from mlinvert.attacks.base import AttackResult, ProgressFn
from mlinvert.attacks.checkpoint import Checkpoint
from mlinvert.core import Seed
from mlinvert.errors import ConfigError
from mlinvert.oracle.base import Oracle
from mlinvert.oracle.lockstep import STALL_S, check_lanes, map_lanes


class LabelAttack(Protocol):
    """Anything with the common attack signature (MIFace, LabelOnly)."""

    def run(
        self,
        oracle: Oracle,
        label: int | str,
        *,
        seed: Any = None,
        budget: int | None = None,
        progress: ProgressFn | None = None,
    ) -> AttackResult:
        """Attack one label through ``oracle``."""
        ...


def run_lockstep(
    make_attack: Callable[[int], LabelAttack],
    oracle: Oracle,
    labels: list[int],
    *,
    lanes: int,
    seed: Seed = None,
    budget: int | None = None,
    progress: ProgressFn | None = None,
    checkpoint: Checkpoint | None = None,
    stop_on: tuple[str, ...] = (),
    max_wait: float | None = STALL_S,
) -> list[AttackResult]:
    """Run ``make_attack(label).run(lane, label, seed=seed, budget=budget, ...)`` for
    every label, ``lanes`` labels at a time; results in label order.

    With one lane the labels run one after another in the caller's thread on ``oracle``
    itself (a white-box oracle keeps its gradients) and the first error is raised at
    once. With more, ``seed`` must be an int or None (every label gets it; a shared
    Generator would be drawn from in a thread-dependent order), ``progress`` is called
    from the worker threads, and the first error of any label is raised once every
    started label has finished. ``checkpoint`` (attacks that take one, MIFace) gives each
    label its own file, ``checkpoint.for_label(label)``, so an interrupted run resumes
    every label where it stopped. Once a label ends with a status in ``stop_on``
    (``rate_limited``, ``blocked``: the API refuses the account), labels not yet started
    are skipped and left out of the results. ``max_wait`` is how long the lanes wait for
    one blocked on something else than its queries (:class:`~mlinvert.oracle.lockstep.Coalescer`).
    """
    check_lanes(lanes)
    if lanes > 1 and seed is not None and not isinstance(seed, int):
        raise ConfigError(
            f"run_lockstep needs an int seed (or None), got {type(seed).__name__}: labels run "
            "concurrently, so a shared Generator would not give reproducible results"
        )

    stop = threading.Event()

    def attack(label: int, lane: Oracle) -> AttackResult | None:
        if stop.is_set():
            return None
        extra: dict[str, Any] = {}
        if checkpoint is not None:
            extra["checkpoint"] = checkpoint.for_label(label)
        result = make_attack(label).run(
            lane, label, seed=seed, budget=budget, progress=progress, **extra
        )
        if result.status in stop_on:
            stop.set()
        return result

    if lanes == 1:
        done = (attack(label, oracle) for label in labels)
    else:
        futures = map_lanes(attack, labels, oracle, lanes=lanes, max_wait=max_wait)
        done = (f.result() for f in futures)
    return [r for r in done if r is not None]


__all__ = ["LabelAttack", "run_lockstep"]
