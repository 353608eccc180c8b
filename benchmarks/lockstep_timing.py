"""Lockstep batching: the audit's black-box attack over real HTTP, 1 vs k people at once.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/lockstep_timing.py \
        --labels 16 --lanes 1,4,8

One real service (``mlinvert serve`` subprocess, one math thread, query log on the RAM
disk, as in the audit) serves the cached AT&T target (``benchmarks/out/models/KIND``,
trained by ``benchmarks/miface_att.py``). For each lane count the audit's faces-preset
black-box attack (MI-Face, NES 5 antithetic pairs, 116-eigenface prior, 1100 queries per
person) runs on the first N identities with a fresh API key: lanes = 1 is today's
sequential loop, lanes = k runs k people at once through one
:class:`~mlinvert.oracle.lockstep.Coalescer`. Prints wall seconds, queries, requests
and inputs per request (from the service's own query log) and the judge's top-1 and
likeness, then a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

from mlinvert.attacks.base import AttackResult
from mlinvert.attacks.lockstep import run_lockstep
from mlinvert.attacks.presets import build_attack, preset_for, search_space
from mlinvert.audit.channels import ONE_THREAD_ENV
from mlinvert.audit.context import single_threaded
from mlinvert.data import load
from mlinvert.data.base import ImageDataset, Split
from mlinvert.errors import DataError
from mlinvert.evaluation.faces import FaceJudge
from mlinvert.oracle.http import HttpOracle
from mlinvert.service.runner import ServiceProcess
from mlinvert.service.store import Store
from mlinvert.targets import load as load_model
from mlinvert.targets.io import read_card

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "benchmarks" / "out" / "models"
log = logging.getLogger("lockstep_timing")


def add_requests(rows: list[dict[str, Any]], store: Store, account: Callable[[dict], str]) -> None:
    """Give each row its answered ``requests`` and ``inputs_per_request`` from the
    service's own query log (read once the service has stopped), ``account(row)`` being
    the account that row's run used."""
    log_rows = store.queries()
    for row in rows:
        mine = [q for q in log_rows if str(q.account) == account(row) and q.status == 200]
        row["requests"] = len(mine)
        row["inputs_per_request"] = round(sum(int(q.n_inputs) for q in mine) / max(len(mine), 1), 1)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (kind, lanes) row, side by side on one service."""
    kinds = args.kinds.split(",")
    lane_counts = [int(v) for v in args.lanes.split(",")]
    card = read_card(MODELS / kinds[0])
    ds = load(f"att:{args.faces}", seed=0)
    if not isinstance(ds, ImageDataset):
        raise DataError(f"expected AT&T face images at {args.faces}")
    ds = dataclasses.replace(ds, split=Split.from_dict(card["split"]))
    judge = FaceJudge.fit(ds, load_model(MODELS / "evaluation"), seed=0)
    preset = preset_for(ds.image_shape, quick=False)
    labels = list(range(min(args.labels, ds.n_classes)))
    spaces = {lab: search_space(ds, lab, preset.space, augment=preset.augment) for lab in labels}

    def make(label: int) -> Any:
        # the attacker's estimator for an API answering under ``--policy`` (NES unless full)
        return build_attack("blackbox", preset, preset.budget, spaces[label], policy=args.policy)

    rows = []
    with (
        tempfile.TemporaryDirectory(dir="/dev/shm") as tmp,
        closing(Store(Path(tmp) / "q.db")) as store,
    ):
        keys = {
            (k, n): store.create_key(f"bench-{k}-lanes{n}")[0] for k in kinds for n in lane_counts
        }
        with ServiceProcess(
            [f"{k}={MODELS / k}" for k in kinds],
            db=store.path,
            env=ONE_THREAD_ENV,
            startup_timeout=240,
        ) as service:
            for (kind, lanes), key in keys.items():
                oracle = HttpOracle(service.model_url(kind), key, max_wait=0.0)
                oracle.info  # noqa: B018 - fetched before the clock starts
                t0 = time.perf_counter()
                # one lane: one person after another on the oracle itself
                results = run_lockstep(
                    make, oracle, labels, lanes=lanes, seed=0, budget=preset.budget
                )
                seconds = time.perf_counter() - t0
                oracle.close()
                merged = AttackResult.merge(results)
                scores = judge.score(merged.reconstructions, merged.labels)
                row = {
                    "kind": kind,
                    "lanes": lanes,
                    "people": len(labels),
                    "seconds": round(seconds, 1),
                    "queries": int(merged.n_queries),
                    "ms_per_query": round(1000 * seconds / max(merged.n_queries, 1), 2),
                    "eval_top1": float(np.mean([bool(s["eval_top1"]) for s in scores])),
                    "likeness": float(np.mean([float(s["likeness"]) for s in scores])),
                    "statuses": sorted({r.status for r in results}),
                }
                log.info("%s", json.dumps(row))
                rows.append(row)
        add_requests(rows, store, lambda row: f"bench-{row['kind']}-lanes{row['lanes']}")
    return rows


def markdown(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """``rows`` as a BENCHMARKS.md table; ``columns`` are (header, key, format spec)."""
    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    rule = "|" + "---|" * len(columns)
    lines = ["| " + " | ".join(format(r[k], f) for _, k, f in columns) + " |" for r in rows]
    return "\n".join([head, rule, *lines])


#: (header, key, format) of the lane tables.
LANE_COLUMNS = [
    ("target", "kind", ""),
    ("lanes", "lanes", ""),
    ("people", "people", ""),
    ("wall s", "seconds", ".1f"),
    ("queries", "queries", ","),
    ("requests", "requests", ","),
    ("inputs/request", "inputs_per_request", ".1f"),
]


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print JSON lines and the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--faces", default=str(ROOT.parent / "shared" / "data" / "att_faces"))
    p.add_argument("--labels", type=int, default=16, help="first N identities")
    p.add_argument("--lanes", default="1,4,8", help="comma-separated lane counts")
    p.add_argument("--kinds", default="mlp", help="cached targets, comma-separated")
    p.add_argument(
        "--policy",
        default="round:3",
        help="output policy the attacker plans for: full -> Broyden, otherwise NES (the "
        "recorded rows); the service itself answers with full scores",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with single_threaded():
        rows = run(args)
    for r in rows:
        print(json.dumps(r))
    extra = [("ms/query", "ms_per_query", ".2f"), ("eval top-1", "eval_top1", ".2f")]
    print(markdown(rows, [*LANE_COLUMNS, *extra, ("likeness", "likeness", ".2f")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
