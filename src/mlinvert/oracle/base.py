"""The Oracle protocol: the only thing an attack sees of a target.

``query(x)`` takes a batch ``x`` of float32 in [0, 1] shaped ``(n, *info.input_shape)``
and returns a :class:`Response`. ``n_queries`` counts inputs (one per row), counted in
exactly one place per oracle implementation; wrappers delegate the count.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from mlinvert.core import OracleInfo, Response


@runtime_checkable
class Oracle(Protocol):
    """Anything that answers prediction queries: local, over HTTP, or wrapped."""

    @property
    def info(self) -> OracleInfo:
        """Shape, classes and what the answers carry."""
        ...

    @property
    def n_queries(self) -> int:
        """Inputs answered so far (one per row)."""
        ...

    def query(self, x: np.ndarray) -> Response:
        """Answer a batch."""
        ...


@runtime_checkable
class GradientOracle(Oracle, Protocol):
    """Opt-in white-box access: only a local differentiable target provides it."""

    def class_gradient(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Gradient of ``p_label(x)`` w.r.t. ``x``; same shape as ``x``."""
        ...
