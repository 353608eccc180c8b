"""A real KServe model server (``kserve.ModelServer`` on loopback, no Kubernetes) serving
the face classifier test_mlserver.py serves, attacked and audited through v2.

KServe answers one output, ``output-0``: probabilities (FP32, the classifier's own
dtype) or labels (INT64), and declares no inputs or outputs. It runs the model before
it refuses an output it does not have, so the probe that asks for ``predict_proba``
(MLServer's probability output) is predicted, answered 400, and not counted by mlinvert;
with ``--output output-0`` no input is refused and every count is equal. KServe runs in
its own virtual environment, built once into a cache folder and reused
(tests/interop/kserve_box.py); without the package index the module is skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlinvert.cli.main import main
from mlinvert.data import load

from . import box, kserve_box
from .test_mlserver import ATT, face_classifier

NAME = "faces"
LABELS = f"{NAME}-labels"


@pytest.fixture(scope="module")
def kserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if not Path(ATT.partition(":")[2]).is_dir():
        pytest.skip("the AT&T faces are not in ../shared/data/att_faces")
    try:
        kserve_box.environment()
    except box.IndexUnreachable as exc:
        pytest.skip(str(exc))
    import joblib

    root = tmp_path_factory.mktemp("kserve")
    estimator = face_classifier()
    joblib.dump(estimator, root / "model.joblib")
    with kserve_box.serve(root / "model.joblib", NAME, root / "kserve.log") as server:
        yield {"server": server, "root": root, "estimator": estimator}


def _wire(**kwargs: Any) -> Any:
    from mlinvert.oracle.wire import WireConfig

    names = load(ATT, seed=1).class_names
    return WireConfig(protocol="v2", class_names=names, input_shape=(112, 92), **kwargs)


def test_kserve_answers_the_estimator_s_probabilities_and_labels(
    kserve: dict[str, Any],
) -> None:
    """The default path: the predict_proba probe is refused (400), output-0 is read."""
    from mlinvert.oracle import HttpOracle

    server, estimator = kserve["server"], kserve["estimator"]
    x = load(ATT, seed=1).test()[0][:20]
    flat = x.reshape(20, -1)
    before = server.counts(NAME)
    with HttpOracle(server.url(NAME), wire=_wire()) as oracle:
        probs = oracle.query(x).probs
        assert oracle.info.extra["output"] is None and oracle.info.extra["tensors"] == "json"
    after = server.counts(NAME)
    np.testing.assert_array_equal(probs, estimator.predict_proba(flat))
    assert oracle.n_queries == 21 and oracle.n_requests == 2  # the probe and the batch
    assert after["answered"] - before["answered"] == oracle.n_requests
    assert after["refused"] - before["refused"] == 1  # the probe asking for predict_proba
    assert after["predicted"] - before["predicted"] == oracle.n_requests + 1
    assert after["inputs"] - before["inputs"] == oracle.n_queries + 1
    with HttpOracle(server.url(LABELS), wire=_wire(output="output-0")) as oracle:
        answered = oracle.query(x)
        assert oracle.info.carries == "label" and answered.probs is None
    np.testing.assert_array_equal(answered.labels, estimator.predict(flat))


def test_label_only_attack_on_kserve_s_labels_and_miface_refused(
    kserve: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    server = kserve["server"]
    args = ["attack", "miface", "--target", server.url(LABELS), "--protocol", "v2"]
    args += ["--output", "output-0", "--input-shape", "112x92", "--classes", "40"]
    before = server.counts(LABELS)
    with pytest.raises(SystemExit) as done:
        main([*args, "--mode", "blackbox", "--label", "3", "--out", str(kserve["root"] / "no")])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "labels only" in err and "label-only" in err and "Traceback" not in err
    out = kserve["root"] / "lo"
    with pytest.raises(SystemExit) as done:
        main([*args, "--mode", "label-only", "--label", "3", "--budget", "1100", "--out", str(out)])
    assert done.value.code == 0
    after = server.counts(LABELS)
    result = json.loads((out / "result.json").read_text())
    answered = result["extra"]["api_answered"]
    assert result["n_queries"] > 0 and answered["inputs"] == result["n_queries"] + 1
    # both runs' probes and the attack's queries: every input KServe answered, no refusal
    assert after["inputs"] - before["inputs"] == answered["inputs"] + 1
    assert after["answered"] - before["answered"] == answered["requests"] + 1
    assert after["refused"] == before["refused"]


def test_a_kserve_without_the_model_ends_with_one_line_and_exit_2(
    kserve: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["attack", "miface", "--target", kserve["server"].url("nope"), "--protocol", "v2"]
    args += ["--input-shape", "112x92", "--mode", "blackbox", "--label", "0"]
    with pytest.raises(SystemExit) as done:
        main([*args, "--out", str(kserve["root"] / "nope")])
    err = " ".join(capsys.readouterr().err.split())  # the console wraps its lines
    assert done.value.code == 2 and "Traceback" not in err
    assert "no model 'nope'" in err and "check the model name at the end of the URL" in err


@pytest.mark.slow
def test_audit_through_v2_counts_every_input_kserve_answered(kserve: dict[str, Any]) -> None:
    server = kserve["server"]
    out = kserve["root"] / "audit"
    before = server.counts(NAME)
    args = ["audit", "--api", server.url(NAME), "--protocol", "v2", "--output", "output-0"]
    args += ["--data", ATT, "--labels", "2", "--budget", "400", "--quick", "--seed", "1"]
    with pytest.raises(SystemExit) as done:
        main([*args, "--attacks", "blackbox,label-only", "--out", str(out)])
    after = server.counts(NAME)
    assert done.value.code in (0, 3)
    final = json.loads((out / "results.json").read_text())
    assert final["status"] == "complete" and final["deployment"]["protocol"] == "v2"
    records = final["records"]
    assert sorted(r["attack"] for r in records) == ["blackbox"] * 2 + ["label-only"] * 2
    assert all(r["n_queries"] > 0 for r in records)
    spent = (
        sum(r["n_queries"] for r in records) + final["utility"][NAME]["deployed"]["queries_spent"]
    )
    # the attacks', the served-accuracy measurement's and the one probe's inputs
    assert sum(final["deployment"]["answered"].values()) == spent + 1
    assert after["inputs"] - before["inputs"] == spent + 1
    assert after["predicted"] - before["predicted"] == after["answered"] - before["answered"]
    assert after["refused"] == before["refused"]
