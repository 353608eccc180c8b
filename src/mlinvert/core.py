"""The shared vocabulary every room speaks: seeds, what an API answers, the attack
names, and the two file helpers every job writes its output with.

The bottom of the layer order (``docs/architecture.md``): it imports nothing of the
package, so data, targets, defences, oracles and attacks can all name a
:class:`Response` or an :class:`OracleInfo` without importing each other.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mlinvert.errors import ConfigError

Seed = int | np.random.Generator | None

Carries = Literal["probs", "top-k", "confidence", "label"]

#: The attacks an audit runs: white-box MI-Face (the attacker holds the weights),
#: black-box MI-Face and label-only inversion (both through the prediction API).
ATTACKS = ("whitebox", "blackbox", "label-only")
#: The attacks that only use the prediction API (all a deployed API allows, ``--api``;
#: the threat an output defence addresses).
API_ATTACKS = ("blackbox", "label-only")


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


def output_dir(path: Path, option: str = "--out") -> None:
    """Create the output folder ``path`` (the value of ``option``) and check that files can
    be written in it, before a long job starts; ConfigError if it cannot hold the output."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is a file; pass a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(
            f"cannot write into {option} {path} ({exc.strerror or exc}); pass a folder you "
            "can write to"
        ) from None


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically (write then rename); ConfigError if
    ``path`` is a folder or cannot be written (nothing is left behind)."""
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; pass the path of a JSON file to write")
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise ConfigError(
            f"cannot write {path} ({exc.strerror or exc}); pass a path you can write to"
        ) from None
