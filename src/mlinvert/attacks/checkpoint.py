"""Checkpoints: an interrupted attack resumes without repeating paid-for queries.

A checkpoint file (``.npz``, written atomically) holds the arrays of the attack state
(current point, best point, optimizer moments) and a JSON record (iteration, queries
paid so far, elapsed seconds, RNG state, adaptive probe sizes) plus a fingerprint of
the attack configuration and label; loading it for a different attack is refused.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlinvert.errors import ConfigError


def fingerprint(record: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able record (config, label, space, gradient)."""
    text = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class State:
    """What is saved: named arrays and a JSON-able ``meta`` dict."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


class Checkpoint:
    """One checkpoint file per (attack, label); ``path`` ends in ``.npz``."""

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        self.path = p if p.suffix == ".npz" else p.with_suffix(".npz")

    def for_label(self, label: int) -> Checkpoint:
        """A sibling checkpoint for ``label`` (used when attacking many labels)."""
        return Checkpoint(self.path.with_name(f"{self.path.stem}.label{label}.npz"))

    def exists(self) -> bool:
        """True when a saved state is present."""
        return self.path.exists()

    def save(self, state: State, key: str) -> None:
        """Write ``state`` atomically (tmp file then rename)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        meta = json.dumps({**state.meta, "_key": key})
        arrays = {"_meta": np.frombuffer(meta.encode(), dtype=np.uint8), **state.arrays}
        with tmp.open("wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        tmp.replace(self.path)

    def load(self, key: str) -> State | None:
        """The saved state, ``None`` if absent; ConfigError if it belongs to another run."""
        if not self.path.exists():
            return None
        try:
            with np.load(self.path) as data:
                meta = json.loads(bytes(data["_meta"]).decode())
                arrays = {k: np.array(data[k]) for k in data.files if k != "_meta"}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise ConfigError(
                f"checkpoint {self.path} cannot be read ({exc}); it is not an mlinvert "
                "checkpoint or was cut short: delete it (the attack then starts afresh) or "
                "pass another --checkpoint path"
            ) from None
        if not isinstance(meta, dict) or meta.pop("_key", None) != key:
            raise ConfigError(
                f"checkpoint {self.path} was written by a different attack configuration or "
                "label; delete it or pass another --checkpoint path to start afresh"
            )
        return State(arrays=arrays, meta=meta)

    def clear(self) -> None:
        """Remove the file (after a finished run, if the caller wants)."""
        self.path.unlink(missing_ok=True)
