"""The same scikit-learn face classifier attacked in process and through MLServer (v2).

A logistic regression trained on AT&T (tests/interop/test_mlserver.py's
``face_classifier``) is saved as ``faces.joblib``; the same file is served by a real
MLServer (its own cached virtualenv, tests/interop/mlserver_box.py) and read in process
by ``--model faces.joblib``. Each (attack, person, seed) runs on both with the same
seed; the script prints whether the reconstructions, queries and statuses are equal,
the largest pixel difference and the time each path took.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/interop_mlserver.py --labels 5

With ``--audit`` the same file is served by MLServer and by ``mlinvert serve --protocol
v2`` side by side, and one seeded ``mlinvert audit --api URL --protocol v2`` (black-box
and label-only, the independent judge) runs against each; the script prints whether the
records, the served utility and the answered counts are equal, wall-clock fields aside.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/interop_mlserver.py --audit --labels 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from interop import mlserver_box  # noqa: E402
from interop.test_mlserver import face_classifier  # noqa: E402
from mlinvert.attacks import (  # noqa: E402
    LabelOnly,
    LabelOnlyConfig,
    MIFace,
    MIFaceConfig,
    parse_gradient,
)
from mlinvert.attacks.spaces import parse_space  # noqa: E402
from mlinvert.defenses import Predictor  # noqa: E402
from mlinvert.oracle import HttpOracle, LocalOracle  # noqa: E402
from mlinvert.oracle.wire import WireConfig  # noqa: E402
from mlinvert.targets.files import load_file  # noqa: E402

SHAPE = (112, 92)
ATT = f"att:{ROOT.parent / 'shared' / 'data' / 'att_faces'}"
#: Record fields that are wall-clock, not results.
CLOCK = frozenset({"seconds", "elapsed_s", "started", "finished", "judge_seconds"})


def attack(kind: str) -> Any:
    """The black-box MI-Face (NES, DCT space) or the label-only attack of the CLI."""
    if kind == "blackbox":
        return MIFace(
            MIFaceConfig.improved(max_iter=30),
            gradient=parse_gradient("nes", samples=20, sigma=0.02),
            space=parse_space("dct:10"),
        )
    return LabelOnly(LabelOnlyConfig(start_samples=200, batch_size=200), space=parse_space("dct:8"))


def run(oracle: Any, kind: str, label: int, seed: int, budget: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    result = attack(kind).run(oracle, label, seed=seed, budget=budget)
    return {
        "image": np.asarray(result.reconstructions[0]),
        "n_queries": result.n_queries,
        "status": result.status,
        "seconds": time.perf_counter() - t0,
    }


def audit(url: str, out: Path, labels: int, budget: int, **wire: Any) -> dict[str, Any]:
    """One seeded deployed-API audit of ``url`` through v2; its results and its time."""
    from mlinvert.audit.config import AuditConfig
    from mlinvert.audit.runner import run_audit

    keys = tuple(wire.pop("keys", ()))
    config = AuditConfig(
        api=url,
        api_keys=keys,
        data=ATT,
        labels=labels,
        budget=budget,
        quick=True,
        seed=1,
        attacks=("blackbox", "label-only"),
        wire=WireConfig(protocol="v2", **wire),
        out=out,
    )
    t0 = time.perf_counter()
    run_audit(config)
    done = json.loads((out / "results.json").read_text())
    done["bench_seconds"] = time.perf_counter() - t0
    return dict(done)


def print_audit(title: str, doc: dict[str, Any]) -> None:
    """One audit's time, answered counts and records, under ``title``."""
    print(title)
    print(f"  {doc['bench_seconds']:.0f} s, answered {doc['deployment']['answered']}")
    for r in doc["records"]:
        print(f"  {r['attack']} {r['label']}: {r['status']}, {r['n_queries']} queries")


def without_clock(value: Any) -> Any:
    """``value`` with the wall-clock fields dropped, at any depth."""
    if isinstance(value, dict):
        return {k: without_clock(v) for k, v in value.items() if k not in CLOCK}
    if isinstance(value, list):
        return [without_clock(v) for v in value]
    return value


def compare_audits(labels: int, budget: int) -> None:
    """The same model.joblib behind MLServer and ``mlinvert serve --protocol v2``, one
    seeded audit of each; print what is equal."""
    from mlinvert.service.runner import ServiceProcess
    from mlinvert.service.store import Store

    root = Path(tempfile.mkdtemp(prefix="interop-audit-"))
    repo = mlserver_box.write_repository(root / "repo", "faces", face_classifier())
    model_file = repo / "faces" / "model.joblib"
    db = root / "serve.sqlite3"
    key, _ = Store(db).create_key("auditor")
    with (
        mlserver_box.serve(repo, "faces", root / "mlserver.log") as server,
        ServiceProcess([f"faces={model_file}"], db=db, protocol="v2") as ours,
    ):
        theirs = audit(server.url, root / "mlserver", labels, budget)
        served = ours.url + "/v2/models/faces"
        mine = audit(served, root / "serve", labels, budget, output="probabilities", keys=[key])
        counts = server.counts()
    for name, doc in (("MLServer", theirs), ("mlinvert serve --protocol v2", mine)):
        print_audit(f"{name}: {doc['deployment']}", doc)
    print(json.dumps({"mlserver_inputs": counts["inputs"]}))
    same = {
        "records": without_clock(theirs["records"]) == without_clock(mine["records"]),
        "utility": without_clock(theirs["utility"]) == without_clock(mine["utility"]),
        "answered": sum(theirs["deployment"]["answered"].values())
        == sum(mine["deployment"]["answered"].values()),
        "images": all(
            (root / "mlserver" / r["image"]).read_bytes()
            == (root / "serve" / r["image"]).read_bytes()
            for r in theirs["records"]
        ),
    }
    for a, b in zip(theirs["records"], mine["records"], strict=True):
        diff = [k for k in a if k not in CLOCK and a[k] != b.get(k)]
        if diff:
            print(f"  differ {a['attack']} {a['label']}: {diff}")
    print(json.dumps({"equal": same, "records": len(mine["records"])}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--budget", type=int, default=1200)
    parser.add_argument("--audit", action="store_true", help="audit through both servers")
    args = parser.parse_args()
    if args.audit:
        compare_audits(args.labels, args.budget)
        return
    root = Path(tempfile.mkdtemp(prefix="interop-"))
    repo = mlserver_box.write_repository(root / "repo", "faces", face_classifier())
    model_file = repo / "faces" / "model.joblib"
    local = LocalOracle(Predictor(load_file(model_file, input_shape=SHAPE), name="faces"))
    wire = WireConfig(protocol="v2", input_shape=SHAPE, class_names=local.info.class_names)
    rows: list[dict[str, Any]] = []
    with mlserver_box.serve(repo, "faces", root / "mlserver.log") as server:
        remote = HttpOracle(server.url, wire=wire)
        for kind in ("blackbox", "label-only"):
            for label in range(args.labels):
                for seed in range(args.seeds):
                    a = run(local, kind, label, seed, args.budget)
                    b = run(remote, kind, label, seed, args.budget)
                    rows.append(
                        {
                            "attack": kind,
                            "label": label,
                            "seed": seed,
                            "equal_image": bool(np.array_equal(a["image"], b["image"])),
                            "max_pixel_diff": float(np.abs(a["image"] - b["image"]).max()),
                            "queries": [a["n_queries"], b["n_queries"]],
                            "status": [a["status"], b["status"]],
                            "seconds": [round(a["seconds"], 2), round(b["seconds"], 2)],
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
        counts = server.counts()
        remote.close()
    same = sum(r["equal_image"] and r["queries"][0] == r["queries"][1] for r in rows)
    print(
        json.dumps(
            {
                "runs": len(rows),
                "identical_records": same,
                "oracle_inputs": remote.n_queries,
                "mlserver_inputs": counts["inputs"],
                "oracle_requests": remote.n_requests,
                "mlserver_requests": counts["requests"],
                "seconds_in_process": round(sum(r["seconds"][0] for r in rows), 1),
                "seconds_mlserver": round(sum(r["seconds"][1] for r in rows), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
