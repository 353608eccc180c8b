"""The shared vocabulary every room speaks: seeds, and what an API answers.

The bottom of the layer order (``docs/architecture.md``): it imports nothing of the
package, so data, targets, defences, oracles and attacks can all name a
:class:`Response` or an :class:`OracleInfo` without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Seed = int | np.random.Generator | None

Carries = Literal["probs", "top-k", "confidence", "label"]


def rng_from(seed: Seed) -> np.random.Generator:
    """Return a generator for ``seed`` (an int, an existing generator, or None)."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


@dataclass(frozen=True)
class OracleInfo:
    """What the API tells its callers about a model and its answers.

    ``score_step`` is the granularity of the returned scores (``round:2`` answers in
    steps of 0.01; 0.0 when they are not rounded): the attacker reads it here, as a
    client reads an API's documentation, instead of parsing the defender's policy.
    """

    model: str
    kind: str
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    carries: Carries
    policy: str = "full"
    score_step: float = 0.0
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
