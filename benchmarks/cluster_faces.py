"""The faces audit on one machine vs ``--cluster local:1`` vs ``local:2``, one sitting.

Trains the targets once (``--defenses none --attacks whitebox``), copies them into each
run's ``--out/models`` so every run only attacks and judges, runs the same audit without a
cluster and on each cluster spec, and prints the wall clock of each and how many records
equal the one-machine run's (every field but the wall-clock ``seconds`` and a rate limit's
"retry after N s / N left" text). BENCHMARKS.md, "Audit on a Dask cluster".

    python benchmarks/cluster_faces.py --data att:../shared/data/att_faces --work /tmp/cl
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mlinvert.audit.cluster import comparable


def _audit(out: Path, common: list[str], *extra: str) -> float:
    """Run one audit; its wall clock in seconds."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "mlinvert", "audit", "--out", str(out), *common, *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _records(out: Path) -> dict[tuple[Any, ...], dict[str, Any]]:
    return comparable(json.loads((out / "results.json").read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", type=Path, required=True, help="a new or empty folder")
    parser.add_argument("--targets", default="softmax,mlp")
    parser.add_argument("--labels", default="10")
    parser.add_argument("--defenses", default="none,round:2,labels,rate:275/hour")
    parser.add_argument("--clusters", default="local:1,local:2")
    parser.add_argument("--seed", default="0")
    args = parser.parse_args()
    common = ["--data", args.data, "--targets", args.targets, "--labels", args.labels]
    common += ["--seed", args.seed]
    base = args.work / "base"
    _audit(base, common, "--defenses", "none", "--attacks", "whitebox")  # trains once
    runs = [("one machine", []), *((c, ["--cluster", c]) for c in args.clusters.split(","))]
    rows = []
    for i, (name, extra) in enumerate(runs):
        out = args.work / f"run{i}"
        out.mkdir(parents=True)
        shutil.copytree(base / "models", out / "models")
        seconds = _audit(out, common, "--defenses", args.defenses, *extra)
        rows.append((name, out, seconds))
    alone = _records(rows[0][1])
    print("| run | wall clock | records equal to one machine's |")
    print("|---|---|---|")
    for name, out, seconds in rows:
        mine = _records(out)
        same = sum(1 for k, r in alone.items() if mine.get(k) == r)
        equal = "-" if out == rows[0][1] else f"{same} of {len(alone)}"
        print(f"| {name} | {seconds:.0f} s | {equal} |")


if __name__ == "__main__":
    main()
