"""``results.json``: the records of an audit, rewritten atomically after every change,
and the rules by which ``--resume`` continues a run."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from mlinvert.audit.config import LIKENESS_THRESHOLD, AuditConfig
from mlinvert.errors import ConfigError, DataError
from mlinvert.report.summary import THRESHOLDS

log = logging.getLogger(__name__)


SCHEMA = "mlinvert-audit/1"


def now_utc() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the packages that shape the numbers."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("mlinvert", "numpy", "torch", "scikit-learn", "scikit-image", "fastapi"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


class Record(TypedDict, total=False):
    """One record of ``results.json``: one attack on one person under one defence
    (``docs/results-schema.md`` documents every field)."""

    attack: str
    defense: str
    target_model: str
    label: int
    label_name: str
    seed: int
    channel: str
    lanes: int
    lanes_stalled: int
    blinded: float | None
    blinded_up_to: float | None
    accounts: int | None
    status: str
    measured: bool
    error: str | None
    n_queries: int
    seconds: float
    image: str | None
    target_confidence: float | None
    recovered: bool
    utility: dict[str, Any]
    shared_from: str
    # the evaluation model's and the likeness judge's metrics
    eval_top1: bool | None
    eval_top5: bool | None
    likeness: float | None
    lineup_correct: bool | None
    pixel_nn_correct: bool | None
    ssim: float | None
    mse: float | None
    feature_distance: float | None
    eigen_nn_correct: bool | None
    # the independent face recogniser's (faces only)
    face_found: bool | None
    judge_rank: int | None
    judge_top1: bool | None
    judge_top5: bool | None
    judge_lineup5: float | None
    judge_distance: float | None
    judge_same_person: bool | None


RecordKey = tuple[str, str, str, int]


def record_key(r: Record | dict[str, Any]) -> RecordKey:
    """The identity of a record: (attack, defense, target_model, label)."""
    return (str(r["attack"]), str(r["defense"]), str(r["target_model"]), int(r["label"]))


#: Config fields that must match for ``--resume`` to continue a run.
_RESUME_FIELDS = (
    "data",
    "model_dir",
    "targets",
    "seed",
    "quick",
    "budget",
    "blind",
    "accounts",
    "escalate",
    "api",
    "prior",
)


#: What a results file written before a field existed ran with.
_RESUME_DEFAULTS: dict[str, Any] = {
    "blind": 0.0,
    "accounts": 1,
    "escalate": False,
    "api": None,
    "prior": None,
}


def _failed_empty(doc: dict[str, Any], out: Path) -> bool:
    """True when ``doc`` (an earlier ``results.json`` in ``out``) is a run that failed
    before it trained, queried or recorded anything (e.g. on a mistyped ``--data``):
    nothing in ``out`` is worth keeping, so a corrected command may start afresh."""
    return (
        doc.get("status") == "failed"
        and not doc.get("records")
        and not doc.get("tree_audit")
        and not doc.get("deployment")
        and all(p.name in ("results.json", "results.json.tmp") for p in out.iterdir())
    )


class ResultsFile:
    """``DIR/results.json``, rewritten atomically after every change."""

    def __init__(self, out: Path, config: AuditConfig) -> None:
        self.path = out / "results.json"
        self.out = out
        fresh: dict[str, Any] = {
            "schema": SCHEMA,
            "status": "running",
            "started": now_utc(),
            "updated": now_utc(),
            "finished": None,
            "command": config.command,
            "seed": config.seed,
            "versions": versions(),
            "config": config.to_dict(),
            "dataset": {},
            "thresholds": {
                "likeness": LIKENESS_THRESHOLD,
                "likeness_doc": "FaceJudge likeness score in [0, 1]",
                **THRESHOLDS,
                "judge": None,
            },
            "targets": {},
            "evaluation_model": {},
            "defenses": [],
            "utility": {},
            "private_images": {},
            "held_out_images": {},
            "references": [],
            "records": [],
            "tree_audit": None,
        }
        old = None
        if self.path.exists():
            try:
                old = json.loads(self.path.read_text())
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{self.path} is not valid JSON ({exc}); delete it or use another --out"
                ) from exc
            if not isinstance(old, dict):
                raise DataError(
                    f"{self.path} is not an audit's results (a JSON {type(old).__name__}, not "
                    "an object); delete it or use another --out"
                )
            if _failed_empty(old, out):
                log.info("replacing %s: the earlier run failed before it produced anything", out)
                old = None
        if old is not None:
            if not config.resume:
                raise ConfigError(
                    f"{self.path} already holds an audit ({len(old.get('records', []))} "
                    "records); pass --resume to continue it or choose another --out"
                )
            if old.get("schema") != SCHEMA:
                raise DataError(f"{self.path} has schema {old.get('schema')!r}, not {SCHEMA}")
            new_cfg, old_cfg = config.to_dict(), old.get("config", {})
            old_cfg = {**_RESUME_DEFAULTS, **old_cfg}
            diff = [f for f in _RESUME_FIELDS if old_cfg.get(f) != new_cfg.get(f)]
            if diff:
                changes = ", ".join(f"{f}: {old_cfg.get(f)!r} -> {new_cfg.get(f)!r}" for f in diff)
                raise ConfigError(
                    f"cannot resume {self.path}: the run used different settings ({changes}); "
                    "resume with the same flags or choose another --out"
                )
            old.update(
                status="running",
                updated=now_utc(),
                command=config.command or old.get("command", ""),
                config=new_cfg,
            )
            self.doc = old
        else:
            if config.resume:
                log.info("nothing to resume in %s; starting a new audit", out)
            self.doc = fresh
        # a record that could not be measured (an error, a judge failure) runs again
        self.done: dict[RecordKey, Record] = {
            record_key(r): r for r in self.doc["records"] if r.get("measured", True)
        }

    def save(self) -> None:
        """Atomic rewrite (write a temporary file, then rename over the old one)."""
        self.doc["updated"] = now_utc()
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, allow_nan=False) + "\n")
        tmp.replace(self.path)

    def add(self, record: Record) -> None:
        """Append (or replace) one record and persist at once."""
        key = record_key(record)  # replaces a record of that key (an unmeasured one too)
        self.doc["records"] = [r for r in self.doc["records"] if record_key(r) != key]
        self.doc["records"].append(record)
        self.done[key] = record
        self.save()


def json_safe(value: Any) -> Any:
    """JSON-safe scalar: numpy -> python, NaN/inf -> None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def markdown_table(text: str, title: str) -> dict[str, Any]:
    """A Markdown pipe table as ``{title, columns, rows}`` (for the HTML report)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    body = [row for row in cells[1:] if not all(set(c) <= set("-: ") for c in row)]
    return {"title": title, "columns": cells[0] if cells else [], "rows": body}
