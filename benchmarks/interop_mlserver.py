"""The same scikit-learn face classifier attacked in process and through MLServer (v2).

A logistic regression trained on AT&T (tests/interop/test_mlserver.py's
``face_classifier``) is saved as ``faces.joblib``; the same file is served by a real
MLServer (its own cached virtualenv, tests/interop/mlserver_box.py) and read in process
by ``--model faces.joblib``. Each (attack, person, seed) runs on both with the same
seed; the script prints whether the reconstructions, queries and statuses are equal,
the largest pixel difference and the time each path took.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/interop_mlserver.py --labels 5
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--budget", type=int, default=1200)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="interop-"))
    repo = mlserver_box.write_repository(root / "repo", "faces", face_classifier())
    model_file = repo / "faces" / "model.joblib"
    local = LocalOracle(Predictor(load_file(model_file, input_shape=SHAPE), name="faces"))
    wire = WireConfig(protocol="v2", input_shape=SHAPE, class_names=local.info.class_names)
    rows = []
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
