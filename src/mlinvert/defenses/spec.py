"""A defence written as text, and the one builder of a defended Predictor.

``Defense.parse("round:2+rate:500/hour+detect:block")`` reads a row of the defence
matrix; :func:`build_guards` makes the guards one service shares across its models (one
rate budget and one detector history per account), and :func:`build_predictor` wraps a
model with its output policy and those guards. The HTTP service, the audit and the
attack CLI all build their Predictors here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from mlinvert.defenses.base import Guard
from mlinvert.defenses.detector import (
    FlagStore,
    HistoryStore,
    QueryDetector,
    parse_detector,
)
from mlinvert.defenses.policies import parse_policy
from mlinvert.defenses.predictor import Predictor
from mlinvert.defenses.ratelimit import BucketStore, RateLimiter, parse_rate
from mlinvert.errors import ConfigError
from mlinvert.targets.base import Tabular, Target


@dataclass(frozen=True, kw_only=True)
class Defense:
    """One row of the defence matrix: an output policy, a rate limit, a query detector.

    ``name`` is the spec the user wrote (``none``, ``round:2``, ``rate:500/hour``,
    ``detect:block``, ``round:2+rate:500/hour``); ``policy`` is a
    :func:`~mlinvert.defenses.policies.parse_policy` spec, ``rate`` a
    :func:`~mlinvert.defenses.ratelimit.parse_rate` spec or ``None``, ``detector`` a
    :func:`~mlinvert.defenses.detector.parse_detector` spec or ``None``.
    """

    name: str
    policy: str = "full"
    rate: str | None = None
    detector: str | None = None

    @classmethod
    def parse(cls, spec: str) -> Defense:
        """Parse POLICY parts, ``rate:N/PERIOD`` and ``detect[:ACTION][:AFTER]`` joined by +."""
        spec = spec.strip()
        if not spec:
            raise ConfigError(
                "empty defence spec; use e.g. none, round:2, labels, rate:500/hour, detect:block"
            )
        policy_parts, rate, detector = [], None, None
        for part in spec.split("+"):
            part = part.strip()
            if part.startswith("rate:"):
                if rate is not None:
                    raise ConfigError(f"defence {spec!r} has two rate limits; keep one")
                rate = part.removeprefix("rate:")
                parse_rate(rate)
            elif part.startswith("detect"):
                if detector is not None:
                    raise ConfigError(f"defence {spec!r} has two detectors; keep one")
                detector = parse_detector(part).name
            elif part not in ("none", "full"):
                policy_parts.append(part)
        policy = "+".join(policy_parts) or "full"
        parse_policy(policy)
        return cls(name=spec, policy=policy, rate=rate, detector=detector)

    def guards(self) -> Guards:
        """Fresh in-memory guards for this row (one set for every model it serves)."""
        return build_guards(self.rate, self.detector)

    @property
    def slug(self) -> str:
        """File-name-safe form of ``name``."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.name)


@dataclass(frozen=True)
class Guards:
    """The guards one service shares across its models, in the order they run: the rate
    limit, then the query detector (so it fingerprints only admitted batches)."""

    limiter: RateLimiter | None = None
    detector: QueryDetector | None = None

    def for_model(self, model: Target) -> list[Guard]:
        """The guards that apply to ``model``. Survey (tabular) models get no detector:
        its pixel-window fingerprints would call any two short rows of category codes near
        duplicates."""
        guards: list[Guard] = [] if self.limiter is None else [self.limiter]
        if self.detector is not None and not isinstance(model, Tabular):
            guards.append(self.detector)
        return guards


def build_guards(
    rate: str | None,
    detector: str | None,
    *,
    buckets: BucketStore | None = None,
    history: HistoryStore | None = None,
    flags: FlagStore | None = None,
) -> Guards:
    """The guards for a ``rate`` limit and a ``detector`` spec (either None: absent),
    keeping their state in the given stores (None: in this process's memory)."""
    return Guards(
        limiter=None if rate is None else RateLimiter(rate, buckets),
        detector=None if detector is None else QueryDetector(detector, flags, history),
    )


def build_predictor(
    model: Target,
    *,
    name: str,
    policy: str = "full",
    guards: Guards | None = None,
    max_batch: int = 1024,
    clock: Callable[[], float] = time.monotonic,
) -> Predictor:
    """``model`` served as ``name`` under the output ``policy`` spec and ``guards``."""
    return Predictor(
        model,
        name=name,
        policy=parse_policy(policy),
        guards=(guards or Guards()).for_model(model),
        max_batch=max_batch,
        clock=clock,
    )
