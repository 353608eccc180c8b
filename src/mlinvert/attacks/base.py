"""What every inversion attack returns, and the small helpers attacks share.

:class:`AttackResult` is JSON first (``to_json``/``from_json``); images are stored
exactly (base64 float32) so a result file round-trips. ``save_pngs`` writes the
reconstructions scaled up for viewing.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mlinvert.core import Response
from mlinvert.data.images import save_png
from mlinvert.errors import Blocked, BudgetExhausted, ConfigError, RateLimited
from mlinvert.oracle.base import Oracle

Status = Literal["succeeded", "budget_exhausted", "rate_limited", "blocked", "failed"]
STATUSES: tuple[str, ...] = ("succeeded", "budget_exhausted", "rate_limited", "blocked", "failed")


def encode_array(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return {
        "dtype": "float32",
        "shape": list(a.shape),
        "b64": base64.b64encode(a.tobytes()).decode("ascii"),
    }


def decode_array(d: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(d["b64"])
    return np.frombuffer(raw, dtype=np.float32).reshape(d["shape"]).copy()


@dataclass(eq=False)
class AttackResult:
    """Reconstructions and the record of how they were obtained.

    ``reconstructions`` float32 ``(n, h, w)`` in [0, 1], one per entry of ``labels``;
    ``confidence`` the target-label score the oracle returned for each (NaN when the
    oracle returns labels only); ``per_label`` one dict per label (status, queries,
    seconds, iterations, ...); ``status`` the overall status (``succeeded`` only if
    every label succeeded, otherwise the first other status met).
    """

    attack: str
    reconstructions: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    confidence: np.ndarray
    per_label: list[dict[str, Any]]
    n_queries: int
    elapsed_s: float
    seed: int | None
    config: dict[str, Any]
    status: Status
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ConfigError(f"status must be one of {STATUSES}, got {self.status!r}")
        self.reconstructions = np.asarray(self.reconstructions, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.confidence = np.asarray(self.confidence, dtype=np.float64)

    @property
    def label_names(self) -> list[str]:
        """The class name of each reconstruction."""
        return [self.class_names[int(i)] for i in self.labels]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (images base64 float32)."""
        return {
            "attack": self.attack,
            "status": self.status,
            "labels": self.labels.tolist(),
            "label_names": self.label_names,
            "class_names": list(self.class_names),
            "confidence": [None if not np.isfinite(c) else float(c) for c in self.confidence],
            "n_queries": int(self.n_queries),
            "elapsed_s": float(self.elapsed_s),
            "seed": self.seed,
            "config": self.config,
            "per_label": self.per_label,
            "extra": self.extra,
            "reconstructions": encode_array(self.reconstructions),
        }

    def to_json(self) -> str:
        """The result as a JSON string."""
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AttackResult:
        """Inverse of :meth:`to_dict`."""
        return cls(
            attack=d["attack"],
            reconstructions=decode_array(d["reconstructions"]),
            labels=np.asarray(d["labels"], dtype=np.int64),
            class_names=tuple(d["class_names"]),
            confidence=np.asarray(
                [np.nan if c is None else c for c in d["confidence"]], dtype=np.float64
            ),
            per_label=list(d["per_label"]),
            n_queries=int(d["n_queries"]),
            elapsed_s=float(d["elapsed_s"]),
            seed=d["seed"],
            config=dict(d["config"]),
            status=d["status"],
            extra=dict(d.get("extra", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> AttackResult:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def merge(cls, results: list[AttackResult]) -> AttackResult:
        """Concatenate per-label results of one attack (e.g. ``--all-labels``)."""
        if not results:
            raise ConfigError("merge needs at least one AttackResult")
        first = results[0]
        status: Status = "succeeded"
        for r in results:
            if r.status != "succeeded":
                status = r.status
                break
        return cls(
            attack=first.attack,
            reconstructions=np.concatenate([r.reconstructions for r in results]),
            labels=np.concatenate([r.labels for r in results]),
            class_names=first.class_names,
            confidence=np.concatenate([r.confidence for r in results]),
            per_label=[p for r in results for p in r.per_label],
            n_queries=sum(r.n_queries for r in results),
            elapsed_s=sum(r.elapsed_s for r in results),
            seed=first.seed,
            config=first.config,
            status=status,
            extra={"parts": [r.extra for r in results]},
        )

    def save_pngs(self, out_dir: str | Path, *, scale: int = 3) -> list[Path]:
        """Write one PNG per reconstruction, ``scale`` times larger, nearest-neighbour."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for img, name in zip(self.reconstructions, self.label_names, strict=True):
            paths.append(save_png(out / f"{_safe(name)}.png", img, scale=scale))
        return paths


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "label"


def image_grid(rows: list[np.ndarray], path: str | Path, *, scale: int = 1, pad: int = 2) -> Path:
    """Save a grid PNG: each entry of ``rows`` is a ``(n, h, w)`` stack shown as one row."""
    n = max(len(r) for r in rows)
    h, w = rows[0].shape[1:]
    grid = np.ones(((h + pad) * len(rows) + pad, (w + pad) * n + pad), dtype=np.float64)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y : y + h, x : x + w] = np.clip(img, 0, 1)
    return save_png(path, grid, scale=scale)


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report of a running attack (for a progress bar)."""

    label: int
    iteration: int
    n_queries: int
    confidence: float
    best_confidence: float
    elapsed_s: float


ProgressFn = Callable[[ProgressEvent], None]


def query_batched(oracle: Oracle, x: np.ndarray, batch_size: int) -> Response:
    """Send ``x`` in batches of at most ``batch_size`` rows and join the answers."""
    if x.shape[0] <= batch_size:
        return oracle.query(x)
    parts = [oracle.query(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    probs = None
    if parts[0].probs is not None:
        probs = np.concatenate([np.asarray(p.probs) for p in parts])
    conf = None
    if parts[0].confidence is not None:
        conf = np.concatenate([np.asarray(p.confidence) for p in parts])
    return Response(labels=np.concatenate([p.labels for p in parts]), probs=probs, confidence=conf)


def interruption_status(exc: BaseException) -> Status | None:
    """Map an oracle refusal to a result status (None: not an interruption)."""
    if isinstance(exc, BudgetExhausted):
        return "budget_exhausted"
    if isinstance(exc, RateLimited):
        return "rate_limited"
    if isinstance(exc, Blocked):
        return "blocked"
    return None


class Timer:
    """Wall-clock seconds since creation (plus an offset carried over on resume)."""

    def __init__(self, offset: float = 0.0) -> None:
        self._t0 = time.perf_counter() - offset

    def __call__(self) -> float:
        return time.perf_counter() - self._t0
