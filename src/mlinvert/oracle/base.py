"""The Oracle protocol: the only thing an attack sees of a target.

``query(x)`` takes a batch ``x`` of float32 in [0, 1] shaped ``(n, *info.input_shape)``
and returns a :class:`Response`. ``n_queries`` counts inputs (one per row), counted in
exactly one place per oracle implementation; wrappers delegate the count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

Carries = Literal["probs", "top-k", "confidence", "label"]


@dataclass(frozen=True)
class OracleInfo:
    """What the API tells its callers about a model and its answers."""

    model: str
    kind: str
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    carries: Carries
    policy: str = "full"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)


@dataclass(frozen=True, eq=False)
class Response:
    """Answers for one batch.

    ``labels`` int64 ``(n,)`` always; ``probs`` float64 ``(n, k)`` as the output policy
    allows (zeros where a top-k policy withheld a class) or ``None`` for labels only;
    ``confidence`` ``(n,)`` for models that answer one confidence per row (trees);
    ``label_names`` the class name of each label, when the answering side knows it.
    """

    labels: np.ndarray
    probs: np.ndarray | None = None
    confidence: np.ndarray | None = None
    label_names: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


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
