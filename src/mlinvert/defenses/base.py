"""Shapes of a defence: pure output policies and stateful per-account guards."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from mlinvert.oracle.base import Carries


@runtime_checkable
class OutputPolicy(Protocol):
    """A pure, vectorised ``probs -> probs`` transform (``None`` = withhold scores).

    Shape of ART's postprocessors (``art/defences/postprocessor``), without the mixins.
    """

    name: str
    carries: Carries

    def __call__(self, probs: np.ndarray) -> np.ndarray | None:
        """Transform a ``(n, k)`` batch of probabilities."""
        ...


@runtime_checkable
class Guard(Protocol):
    """Stateful per-account check before and observation after each query."""

    name: str

    def check(self, account: str, x: np.ndarray, now: float) -> None:
        """Raise (RateLimited, Blocked, ...) to refuse the batch; must not consume."""
        ...

    def observe(self, account: str, x: np.ndarray, now: float) -> None:
        """Record an admitted batch."""
        ...
