"""Label-only model inversion by boundary repulsion (BREP-MI style).

Kahla, Chen, Just, Jia, "Label-Only Model Inversion Attacks via Boundary Repulsion",
CVPR 2022. Adapted to a data-free or auxiliary-prior search space instead of a GAN:

1. find a start the API labels as the target (random draws from the space's prior,
   e.g. eigenface draws for :class:`~mlinvert.attacks.spaces.PCAPrior`);
2. at the current point ``z`` query ``n_directions`` points on a sphere of radius
   ``R``; step along ``-mean(u for neighbours NOT labelled as the target)`` (away from
   the class boundary), keeping the step only if the new point is still the target;
3. when every neighbour on the sphere is still the target, grow ``R``: the point sits
   deeper inside the target's region, which is what a class-representative image is.

Only labels are used. The result records how far it got (final radius, share of
neighbours still labelled as the target); ``confidence`` is NaN (none is returned).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mlinvert.attacks.base import (
    AttackResult,
    ProgressEvent,
    ProgressFn,
    Status,
    Timer,
    interruption_status,
    query_batched,
)
from mlinvert.attacks.miface import resolve_label
from mlinvert.attacks.spaces import DCT, Space
from mlinvert.core import Seed, rng_from
from mlinvert.errors import ConfigError, OracleError
from mlinvert.oracle.base import Oracle
from mlinvert.oracle.wrappers import Budgeted

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LabelOnlyConfig:
    """Settings of the boundary-repulsion search.

    ``initial_radius``/``max_radius`` in units of the space's coordinates (for a
    whitened PCA prior one unit is one standard deviation of a component);
    ``step_fraction`` the step as a share of the radius; ``radius_growth`` the factor
    applied when the whole sphere is inside the target class; ``start_samples`` the
    most prior draws spent looking for a start; ``max_norm`` keeps ``||z - centre||``
    within this multiple of ``sqrt(dim)`` (stay near the prior).
    """

    n_directions: int = 32
    initial_radius: float = 0.5
    max_radius: float = 8.0
    radius_growth: float = 1.3
    step_fraction: float = 0.5
    max_iter: int = 300
    start_samples: int = 2000
    max_norm: float = 1.5
    batch_size: int = 1000

    def __post_init__(self) -> None:
        if self.n_directions < 2 or self.max_iter < 1 or self.start_samples < 1:
            raise ConfigError(
                "LabelOnlyConfig needs n_directions >= 2, max_iter >= 1 and start_samples >= 1"
            )
        if not 0 < self.initial_radius <= self.max_radius:
            raise ConfigError(
                f"need 0 < initial_radius <= max_radius, got {self.initial_radius}, "
                f"{self.max_radius}"
            )
        if self.radius_growth <= 1.0 or not 0 < self.step_fraction <= 2.0:
            raise ConfigError("radius_growth must be > 1 and step_fraction in (0, 2]")
        if self.max_norm <= 0 or self.batch_size < 1:
            raise ConfigError("max_norm and batch_size must be positive")

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


@dataclass
class _Walk:
    """One label's boundary-repulsion walk: what it queries and where it stands."""

    oracle: Oracle  # budgeted when the run has a budget
    space: Space  # bound to the model's input shape
    batch_size: int
    center: np.ndarray
    target: int  # the class index, which is also the label the API answers
    rng: np.random.Generator
    start_queries: int
    timer: Timer
    radius: float
    z: np.ndarray | None = None  # None until a start labelled as the target is found
    inside: float = float("nan")  # share of the last sphere still labelled as the target
    iterations: int = 0
    status: Status | None = None  # None: not interrupted
    stop: str = "max_iter"
    message: str = ""

    def labels_of(self, points: np.ndarray) -> np.ndarray:
        """The API's labels of points of the search space."""
        return query_batched(self.oracle, self.space.decode(points), self.batch_size).labels

    def queries(self) -> int:
        """Queries sent so far by this walk."""
        return self.oracle.n_queries - self.start_queries


class LabelOnly:
    """Label-only inversion (BREP-MI, Kahla et al., CVPR 2022) in a search space."""

    name = "label-only"

    def __init__(
        self, config: LabelOnlyConfig | None = None, *, space: Space | None = None
    ) -> None:
        self.config = config if config is not None else LabelOnlyConfig()
        self.space = space if space is not None else DCT(8)

    def describe(self) -> dict[str, Any]:
        """Config and space as one JSON-able dict."""
        return {**self.config.to_dict(), "space": self.space.to_dict()}

    def _limit(self, z: np.ndarray, center: np.ndarray) -> np.ndarray:
        cap = self.config.max_norm * np.sqrt(z.size)
        d = z - center
        n = float(np.linalg.norm(d))
        return z if n <= cap else center + d * (cap / n)

    def run(
        self,
        oracle: Oracle,
        label: int | str,
        *,
        seed: Seed = None,
        budget: int | None = None,
        progress: ProgressFn | None = None,
    ) -> AttackResult:
        """Search for an image deep inside ``label``'s region using labels only."""
        info = oracle.info
        target = resolve_label(label, info.class_names)
        space = self.space.bind(info.input_shape)
        rng = rng_from(seed)
        if budget is not None:
            oracle = Budgeted(oracle, budget)
        walk = _Walk(
            oracle=oracle,
            space=space,
            batch_size=self.config.batch_size,
            center=space.prior_center(),
            target=target,
            rng=rng,
            start_queries=oracle.n_queries,
            timer=Timer(),
            radius=self.config.initial_radius,
        )
        try:
            self._find_start(walk)
            self._repel(walk, progress)
        except OracleError as exc:
            walk.status = interruption_status(exc)
            if walk.status is None:
                raise
            walk.message, walk.stop = str(exc), walk.status
        return self._result(walk, seed)

    def _find_start(self, walk: _Walk) -> None:
        """Draw from the space's prior until the API labels a draw as the target."""
        cfg = self.config
        drawn = 0
        while walk.z is None and drawn < cfg.start_samples:
            n = min(cfg.batch_size, cfg.start_samples - drawn)
            cand = walk.center + walk.space.prior_sample(n, walk.rng)
            hits = np.flatnonzero(walk.labels_of(cand) == walk.target)
            drawn += n
            if hits.size:
                walk.z = self._limit(cand[hits[0]], walk.center)
        if walk.z is None:
            name = walk.oracle.info.class_names[walk.target]
            walk.status, walk.stop = "failed", "no_start"
            walk.message = (
                f"none of {drawn} prior draws was labelled {name!r}; "
                "use a better prior (PCAPrior with auxiliary faces) or more start_samples"
            )

    def _repel(self, walk: _Walk, progress: ProgressFn | None) -> None:
        """Step away from the neighbours on the sphere that left the class; grow the
        sphere while all of it stays inside (until ``max_iter`` or ``max_radius``)."""
        cfg = self.config
        while walk.z is not None and walk.iterations < cfg.max_iter:
            z = walk.z
            u = walk.rng.standard_normal((cfg.n_directions, z.size))
            u /= np.linalg.norm(u, axis=1, keepdims=True)
            same = walk.labels_of(z + walk.radius * u) == walk.target
            walk.inside = float(same.mean())
            walk.iterations += 1
            if progress is not None:
                progress(
                    ProgressEvent(
                        label=walk.target,
                        iteration=walk.iterations,
                        n_queries=walk.queries(),
                        confidence=walk.inside,
                        best_confidence=walk.radius,
                        elapsed_s=walk.timer(),
                    )
                )
            if same.all():
                if walk.radius * cfg.radius_growth > cfg.max_radius:
                    walk.stop = "max_radius"
                    break
                walk.radius *= cfg.radius_growth
                continue
            direction = -u[~same].mean(axis=0)
            direction /= np.linalg.norm(direction) + 1e-12
            cand = self._limit(z + cfg.step_fraction * walk.radius * direction, walk.center)
            if walk.labels_of(cand[None])[0] == walk.target:
                walk.z = cand
            else:
                walk.radius = max(walk.radius / cfg.radius_growth, 1e-3)

    def _result(self, walk: _Walk, seed: Seed) -> AttackResult:
        """The label's AttackResult: the deepest point found (the prior centre if none)."""
        status: Status = walk.status or "succeeded"
        found = walk.z is not None
        recon = walk.space.decode((walk.z if walk.z is not None else walk.center)[None])
        n_q = walk.queries()
        class_names = walk.oracle.info.class_names
        per = {
            "label": walk.target,
            "name": class_names[walk.target],
            "status": status,
            "stop": walk.stop,
            "iterations": walk.iterations,
            "n_queries": n_q,
            "elapsed_s": walk.timer(),
            "start_found": found,
            "radius": walk.radius if found else 0.0,
            "inside_share": walk.inside,
            "message": walk.message,
        }
        log.info(
            "label-only %s: %s, radius %.3g, %d queries",
            class_names[walk.target],
            walk.stop,
            per["radius"],
            n_q,
        )
        return AttackResult(
            attack=self.name,
            reconstructions=recon,
            labels=np.asarray([walk.target]),
            class_names=tuple(class_names),
            confidence=np.asarray([np.nan]),
            per_label=[per],
            n_queries=n_q,
            elapsed_s=walk.timer(),
            seed=seed if isinstance(seed, int) else None,
            config=self.describe(),
            status=status,
        )
