"""Time ``mlinvert audit`` end to end: the embedded default and the full faces audit.

Usage (from the repository root)::

    .venv/bin/python benchmarks/audit_timing.py default            # digits, <= 5 min
    nice .venv/bin/python benchmarks/audit_timing.py faces \
        --faces ../shared/data/att_faces                            # AT&T, <= 30 min

Each run starts the real CLI in a subprocess (fresh output folder, the real HTTP
service), measures wall-clock time, and prints one JSON line with the time and a
summary of ``results.json`` (records, statuses, strongest API attack per defence).
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


def summarise(out: Path) -> dict[str, Any]:
    """Counts and the verdict table of a finished (or partial) audit folder."""
    from mlinvert.report.html import load_results
    from mlinvert.report.summary import verdicts

    results = load_results(out)
    statuses: dict[str, int] = {}
    for r in results["records"]:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return {
        "status": results["status"],
        "records": len(results["records"]),
        "statuses": statuses,
        "targets": {k: v.get("test_accuracy") for k, v in results["targets"].items()},
        "verdicts": [
            {
                "target": v.target_model,
                "defense": v.defense,
                "level": v.level,
                "api_recovered": round(v.api_recovered, 3),
                "api_eval_top1": round(v.api_identity, 3),
                "median_queries": v.api_queries,
            }
            for v in verdicts(results)
        ],
    }


def main() -> None:
    """Parse arguments, run the audit, print the timing line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("which", choices=("default", "faces"))
    parser.add_argument("--faces", default="../shared/data/att_faces")
    parser.add_argument("--out", default=None, help="output folder (default runs/bench-WHICH)")
    parser.add_argument("--resume", action="store_true", help="continue a partial run")
    parser.add_argument("extra", nargs="*", help="more audit flags after --")
    args = parser.parse_args()
    out = Path(args.out or f"runs/bench-{args.which}")
    if out.exists() and not args.resume:
        shutil.rmtree(out)
    exe = Path(sys.executable).with_name("mlinvert")
    cmd = [str(exe), "audit", "--out", str(out), *args.extra]
    if args.which == "faces":
        cmd += ["--data", f"att:{args.faces}"]
    if args.resume:
        cmd.append("--resume")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False)
    seconds = time.perf_counter() - t0
    line = {
        "which": args.which,
        "command": " ".join(cmd[1:]),
        "seconds": round(seconds, 1),
        "exit_code": proc.returncode,
    }
    if (out / "results.json").exists():
        line.update(summarise(out))
    print(json.dumps(line))


if __name__ == "__main__":
    main()
