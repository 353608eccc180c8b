"""One seeded audit of the same scikit-learn face classifier through KServe and MLServer.

The logistic regression of tests/interop/test_mlserver.py (``face_classifier``, AT&T
split seed 1) is saved once as ``model.joblib`` and served side by side by a real KServe
model server (``kserve.ModelServer`` on loopback, tests/interop/kserve_box.py) and a
real MLServer (tests/interop/mlserver_box.py), each in its own cached virtualenv. One
seeded ``mlinvert audit --api URL --protocol v2`` (black-box and label-only, the
independent judge) runs against each; the script prints whether the records, the served
utility, the answered counts and the reconstruction PNGs are equal (wall-clock fields
aside), each server's own count of the inputs it predicted, and the time of each audit.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/interop_kserve.py --labels 2 --budget 400

KServe is audited with ``--output output-0`` (its one output): without it the probe that
asks for ``predict_proba`` (MLServer's probability output) is predicted by KServe and
refused (400), one input more in KServe's count than mlinvert answered.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from interop import kserve_box, mlserver_box  # noqa: E402
from interop.test_mlserver import face_classifier  # noqa: E402
from interop_mlserver import audit, print_audit, without_clock  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=2)
    parser.add_argument("--budget", type=int, default=400)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="interop-kserve-"))
    repo = mlserver_box.write_repository(root / "repo", "faces", face_classifier())
    model_file = repo / "faces" / "model.joblib"
    with (
        kserve_box.serve(model_file, "faces", root / "kserve.log") as kserve,
        mlserver_box.serve(repo, "faces", root / "mlserver.log") as mlserver,
    ):
        before = kserve.counts("faces")
        ks = audit(
            kserve.url("faces"), root / "kserve", args.labels, args.budget, output="output-0"
        )
        after = kserve.counts("faces")
        ml = audit(mlserver.url, root / "mlserver", args.labels, args.budget)
        ml_counts = mlserver.counts()
    for name, doc in (("KServe", ks), ("MLServer", ml)):
        print_audit(f"{name}: {doc['deployment']['description']}", doc)
    own = {key: after[key] - before[key] for key in after}
    print(json.dumps({"kserve_own": own, "mlserver_own": ml_counts}))
    same = {
        "records": without_clock(ks["records"]) == without_clock(ml["records"]),
        "utility": without_clock(ks["utility"]) == without_clock(ml["utility"]),
        "answered": sum(ks["deployment"]["answered"].values())
        == sum(ml["deployment"]["answered"].values())
        == own["inputs"],
        "images": all(
            (root / "kserve" / r["image"]).read_bytes()
            == (root / "mlserver" / r["image"]).read_bytes()
            for r in ks["records"]
        ),
    }
    print(json.dumps(same))


if __name__ == "__main__":
    main()
