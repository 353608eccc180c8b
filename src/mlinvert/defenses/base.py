"""Shapes of a defence: pure output policies and stateful per-account guards."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from mlinvert.core import Carries


@runtime_checkable
class OutputPolicy(Protocol):
    """A pure, vectorised ``probs -> probs`` transform (``None`` = withhold scores).

    Shape of ART's postprocessors (``art/defences/postprocessor``), without the mixins.
    """

    @property
    def name(self) -> str:
        """The policy's spec, e.g. ``round:2`` (parse_policy(name) rebuilds it)."""
        ...

    @property
    def carries(self) -> Carries:
        """What answers under this policy carry: probs, top-k or label."""
        ...

    def __call__(self, probs: np.ndarray) -> np.ndarray | None:
        """Transform a ``(n, k)`` batch of probabilities."""
        ...


@runtime_checkable
class Guard(Protocol):
    """Stateful per-account check before and observation after each query.

    ``check`` runs before the model and raises to refuse the whole batch. A metering
    guard (the rate limiter) takes its tokens there atomically, so concurrent requests
    cannot both pass on the same budget. ``observe`` records a batch that was answered.
    """

    name: str

    def check(self, account: str, x: np.ndarray, now: float) -> None:
        """Raise (RateLimited, Blocked, ...) to refuse the batch; may meter atomically."""
        ...

    def observe(self, account: str, x: np.ndarray, now: float) -> None:
        """Record an admitted batch."""
        ...
