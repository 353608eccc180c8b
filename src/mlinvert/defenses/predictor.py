"""The Predictor: a target plus every defence. The only place defences live.

Both :class:`~mlinvert.oracle.LocalOracle` and the HTTP route call
:meth:`Predictor.predict`, so a defence behaves identically in process and over HTTP.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from mlinvert.core import OracleInfo, Response
from mlinvert.defenses.base import Guard, OutputPolicy
from mlinvert.defenses.policies import FullScores, score_step
from mlinvert.errors import InputTooLarge, QueryRejected
from mlinvert.targets.base import Confident, Tabular, Target


class Predictor:
    """Serve ``model`` under ``name`` with ``guards`` and an output ``policy``.

    ``max_batch`` bounds one call. ``clock`` is injected so guards are testable.
    """

    def __init__(
        self,
        model: Target,
        *,
        name: str,
        policy: OutputPolicy | None = None,
        guards: Sequence[Guard] = (),
        max_batch: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.name = name
        self.policy: OutputPolicy = policy if policy is not None else FullScores()
        self.guards = tuple(guards)
        self.max_batch = max_batch
        self.clock = clock

    @property
    def info(self) -> OracleInfo:
        """What callers are told about this model and its answers."""
        carries = self.policy.carries
        if isinstance(self.model, Confident) and carries == "probs":
            carries = "confidence"
        return OracleInfo(
            model=self.name,
            kind=self.model.kind,
            input_shape=tuple(self.model.input_shape_),
            class_names=tuple(self.model.class_names_),
            carries=carries,
            policy=self.policy.name,
            score_step=score_step(self.policy.name),
        )

    def validate(self, x: np.ndarray) -> np.ndarray:
        """Return ``x`` as float32 or raise QueryRejected naming the problem."""
        x = np.asarray(x)
        shape = tuple(self.model.input_shape_)
        if x.shape[1:] != shape or x.ndim != len(shape) + 1:
            raise QueryRejected(
                f"model {self.name!r} expects a batch of shape (n, {', '.join(map(str, shape))}),"
                f" got {x.shape}"
            )
        if x.shape[0] == 0:
            raise QueryRejected("empty batch: send at least one input")
        if x.shape[0] > self.max_batch:
            raise InputTooLarge(
                f"batch of {x.shape[0]} inputs exceeds the limit of {self.max_batch}; "
                "split it into smaller batches"
            )
        if isinstance(self.model, Tabular):
            return self.model.check_input(x)
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise QueryRejected(f"inputs must be numbers, got dtype {x.dtype}")
        if not np.isfinite(x).all():
            raise QueryRejected("inputs contain NaN or infinity; send finite values in [0, 1]")
        if x.min() < 0.0 or x.max() > 1.0:  # before the cast: 1e300 is no float32
            raise QueryRejected(
                f"inputs must lie in [0, 1], got values in [{x.min():.4g}, {x.max():.4g}]"
            )
        return x.astype(np.float32, copy=False)

    def predict(self, x: np.ndarray, *, account: str) -> Response:
        """Validate, check guards, predict, apply the policy, then let guards observe."""
        x = self.validate(x)
        now = self.clock()
        for guard in self.guards:
            guard.check(account, x, now)
        raw = np.asarray(self.model.predict_proba(x), dtype=np.float64)
        index = raw.argmax(axis=1)
        labels = np.asarray(self.model.classes_)[index].astype(np.int64)
        names = self.model.class_names_
        probs = self.policy(raw)
        confidence = None
        if isinstance(self.model, Confident) and probs is not None:
            shaped = self.policy(np.asarray(self.model.confidence(x), dtype=np.float64)[:, None])
            confidence = None if shaped is None else shaped[:, 0]
        for guard in self.guards:
            guard.observe(account, x, now)
        return Response(
            labels=labels,
            probs=probs,
            confidence=confidence,
            label_names=tuple(str(names[i]) for i in index),
        )
