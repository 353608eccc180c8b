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
        cfg = self.config
        info = oracle.info
        target = resolve_label(label, info.class_names)
        target_value = target  # the API's labels are class indices 0 .. n-1
        space = self.space.bind(info.input_shape)
        rng = rng_from(seed)
        if budget is not None:
            oracle = Budgeted(oracle, budget)
        start_q = oracle.n_queries
        timer = Timer()
        center = space.prior_center()
        z: np.ndarray | None = None
        radius = cfg.initial_radius
        inside = float("nan")
        it = 0
        status: Status | None = None
        message = ""
        stop = "max_iter"

        def labels_of(points: np.ndarray) -> np.ndarray:
            return query_batched(oracle, space.decode(points), cfg.batch_size).labels

        try:
            drawn = 0
            while z is None and drawn < cfg.start_samples:
                n = min(cfg.batch_size, cfg.start_samples - drawn)
                cand = center + space.prior_sample(n, rng)
                hits = np.flatnonzero(labels_of(cand) == target_value)
                drawn += n
                if hits.size:
                    z = self._limit(cand[hits[0]], center)
            if z is None:
                status, stop = "failed", "no_start"
                message = (
                    f"none of {drawn} prior draws was labelled {info.class_names[target]!r}; "
                    "use a better prior (PCAPrior with auxiliary faces) or more start_samples"
                )
            while z is not None and it < cfg.max_iter:
                u = rng.standard_normal((cfg.n_directions, z.size))
                u /= np.linalg.norm(u, axis=1, keepdims=True)
                same = labels_of(z + radius * u) == target_value
                inside = float(same.mean())
                it += 1
                if progress is not None:
                    progress(
                        ProgressEvent(
                            label=target,
                            iteration=it,
                            n_queries=oracle.n_queries - start_q,
                            confidence=inside,
                            best_confidence=radius,
                            elapsed_s=timer(),
                        )
                    )
                if same.all():
                    if radius * cfg.radius_growth > cfg.max_radius:
                        stop = "max_radius"
                        break
                    radius *= cfg.radius_growth
                    continue
                direction = -u[~same].mean(axis=0)
                direction /= np.linalg.norm(direction) + 1e-12
                cand = self._limit(z + cfg.step_fraction * radius * direction, center)
                if labels_of(cand[None])[0] == target_value:
                    z = cand
                else:
                    radius = max(radius / cfg.radius_growth, 1e-3)
        except OracleError as exc:
            status = interruption_status(exc)
            if status is None:
                raise
            message, stop = str(exc), status
        if status is None:
            status = "succeeded"
        found = z is not None
        recon = space.decode((z if z is not None else center)[None])
        n_q = oracle.n_queries - start_q
        per = {
            "label": target,
            "name": info.class_names[target],
            "status": status,
            "stop": stop,
            "iterations": it,
            "n_queries": n_q,
            "elapsed_s": timer(),
            "start_found": found,
            "radius": radius if found else 0.0,
            "inside_share": inside,
            "message": message,
        }
        log.info(
            "label-only %s: %s, radius %.3g, %d queries",
            info.class_names[target],
            stop,
            per["radius"],
            n_q,
        )
        return AttackResult(
            attack=self.name,
            reconstructions=recon,
            labels=np.asarray([target]),
            class_names=tuple(info.class_names),
            confidence=np.asarray([np.nan]),
            per_label=[per],
            n_queries=n_q,
            elapsed_s=timer(),
            seed=seed if isinstance(seed, int) else None,
            config=self.describe(),
            status=status,
        )
