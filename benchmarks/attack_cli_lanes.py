"""The attack CLI over real HTTP: ``mlinvert attack miface --all-labels --lanes 1`` vs ``K``.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/attack_cli_lanes.py --kind mlp --lanes 1,8

One real service (``mlinvert serve`` subprocess, one math thread, query log on the RAM
disk) serves the cached AT&T target ``benchmarks/out/models/KIND`` (trained by
``benchmarks/miface_att.py``). For each lane count the CLI itself runs as a user would
start it, one subprocess, with a fresh API key: black-box MI-Face on all 40 people, NES
with 5 antithetic pairs, 100 steps (1100 queries per person), in the eigenface prior of
scikit-image's 100 public LFW faces (``--aux lfw``, people disjoint from AT&T). Prints
wall seconds, queries, requests and inputs per request (the service's own log), whether
every lane count gave the same reconstructions and queries as ``--lanes 1``, the judge's
top-1 and likeness, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

from lockstep_timing import LANE_COLUMNS, MODELS, ROOT, add_requests, markdown
from mlinvert.attacks import AttackResult
from mlinvert.audit.channels import ONE_THREAD_ENV
from mlinvert.data import load
from mlinvert.data.base import ImageDataset
from mlinvert.errors import DataError
from mlinvert.evaluation.faces import FaceJudge
from mlinvert.service.runner import ServiceProcess
from mlinvert.service.store import Store
from mlinvert.targets import load as load_model

ATTACK = shlex.split(
    "--all-labels --mode blackbox --gradient nes --samples 5 --max-iter 100 --budget 1100 "
    "--space pca --aux lfw --pca-k 80 --augment --seed 0"
)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per lane count, side by side on one service."""
    lane_counts = [int(v) for v in args.lanes.split(",")]
    faces = load(f"att:{args.faces}", seed=0)
    if not isinstance(faces, ImageDataset):
        raise DataError(f"expected AT&T face images at {args.faces}")
    judge = FaceJudge.fit(faces, load_model(MODELS / "evaluation"), seed=0)
    rows: list[dict[str, Any]] = []
    results: dict[int, AttackResult] = {}
    with (
        tempfile.TemporaryDirectory(dir="/dev/shm") as tmp,
        closing(Store(Path(tmp) / "q.db")) as store,
    ):
        keys = {n: store.create_key(f"cli-lanes{n}")[0] for n in lane_counts}
        with ServiceProcess(
            [f"{args.kind}={MODELS / args.kind}"], db=store.path, env=ONE_THREAD_ENV
        ) as service:
            for lanes, key in keys.items():
                out = Path(tmp) / f"out{lanes}"
                cmd = [sys.executable, "-m", "mlinvert", "attack", "miface", *ATTACK]
                cmd += ["--target", service.model_url(args.kind), "--api-key", key]
                cmd += ["--lanes", str(lanes), "--out", str(out)]
                t0 = time.perf_counter()
                subprocess.run(
                    cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, **ONE_THREAD_ENV}
                )
                seconds = time.perf_counter() - t0
                result = AttackResult.from_json((out / "result.json").read_text())
                results[lanes] = result
                scores = judge.score(result.reconstructions, result.labels)
                first = results[lane_counts[0]]
                rows.append(
                    {
                        "kind": args.kind,
                        "lanes": lanes,
                        "people": len(result.labels),
                        "seconds": round(seconds, 1),
                        "queries": int(result.n_queries),
                        "same_as_first": bool(
                            [p["n_queries"] for p in result.per_label]
                            == [p["n_queries"] for p in first.per_label]
                            and np.allclose(
                                result.reconstructions, first.reconstructions, atol=1e-5
                            )
                        ),
                        "eval_top1": float(np.mean([bool(s["eval_top1"]) for s in scores])),
                        "likeness": float(np.mean([float(s["likeness"]) for s in scores])),
                    }
                )
        add_requests(rows, store, lambda row: f"cli-lanes{row['lanes']}")
    return rows


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print JSON lines and the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--faces", default=str(ROOT.parent / "shared" / "data" / "att_faces"))
    p.add_argument("--kind", default="mlp", help="cached target to serve")
    p.add_argument("--lanes", default="1,8", help="comma-separated lane counts")
    rows = run(p.parse_args(argv))
    for r in rows:
        print(json.dumps(r))
    extra = [("same as first row", "same_as_first", ""), ("eval top-1", "eval_top1", ".3f")]
    print(markdown(rows, [*LANE_COLUMNS, *extra, ("likeness", "likeness", ".2f")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
