"""A real third-party Open Inference Protocol server: MLServer with its scikit-learn
runtime, serving a face classifier trained on AT&T, attacked and audited through v2.

Every input the attacks send is counted, and the count equals what MLServer reports
in its own Prometheus metrics. MLServer runs in its own virtual environment, built once
into a cache folder and reused (tests/interop/mlserver_box.py); without the package
index the module is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlinvert.cli.main import main
from mlinvert.data import load

from . import box, mlserver_box

ATT = "att:../shared/data/att_faces"
NAME = "faces"


def face_classifier(seed: int = 1) -> Any:
    """A logistic regression on AT&T's training photos (flattened), a few iterations."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    dataset = load(ATT, seed=seed)
    x, y = dataset.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(max_iter=15, random_state=seed).fit(x.reshape(len(x), -1), y)


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if not Path(ATT.partition(":")[2]).is_dir():
        pytest.skip("the AT&T faces are not in ../shared/data/att_faces")
    try:
        mlserver_box.environment()
    except box.IndexUnreachable as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("mlserver")
    estimator = face_classifier()
    repo = mlserver_box.write_repository(root / "repo", NAME, estimator)
    with mlserver_box.serve(repo, NAME, root / "mlserver.log") as server:
        yield {"server": server, "root": root, "estimator": estimator}


def _attack(server: Any, out: Path, mode: str, budget: int, *extra: str) -> dict[str, Any]:
    args = ["attack", "miface", "--target", server.url, "--protocol", "v2"]
    args += ["--input-shape", "112x92", "--classes", "40", "--mode", mode, "--label", "3"]
    with pytest.raises(SystemExit) as done:
        main([*args, "--budget", str(budget), "--max-iter", "3", "--out", str(out), *extra])
    assert done.value.code == 0
    return dict(json.loads((out / "result.json").read_text()))


def test_blackbox_and_label_only_through_v2_counted_as_mlserver_counts(
    mlserver: dict[str, Any],
) -> None:
    server = mlserver["server"]
    before = server.counts()
    blackbox = _attack(server, mlserver["root"] / "bb", "blackbox", 150)
    middle = server.counts()
    # the server's labels (its default output), as a labels-only deployment answers
    label_only = _attack(server, mlserver["root"] / "lo", "label-only", 1100, "--output", "predict")
    after = server.counts()
    assert blackbox["extra"]["wire"]["protocol"] == "v2"
    for result, start, end in ((blackbox, before, middle), (label_only, middle, after)):
        answered = result["extra"]["api_answered"]
        assert result["n_queries"] > 0
        # the attack's queries and the one probe that read what the answers carry
        assert answered["inputs"] == result["n_queries"] + 1
        assert end["inputs"] - start["inputs"] == answered["inputs"]
        assert end["requests"] - start["requests"] == answered["requests"]
    assert blackbox["per_label"][0]["status"] in ("succeeded", "budget_exhausted", "failed")


def test_labels_only_v2_answers_refuse_miface_with_a_clear_line(
    mlserver: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    server = mlserver["server"]
    out = mlserver["root"] / "refused"
    args = ["attack", "miface", "--target", server.url, "--protocol", "v2", "--output"]
    args += ["predict", "--input-shape", "112x92", "--classes", "40", "--mode", "blackbox"]
    with pytest.raises(SystemExit) as done:
        main([*args, "--label", "3", "--budget", "50", "--out", str(out)])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "labels only" in err and "label-only" in err and "Traceback" not in err


def test_a_v2_server_without_the_model_ends_with_one_line_and_exit_2(
    mlserver: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"{mlserver['server'].root}/v2/models/nope"
    args = ["attack", "miface", "--target", url, "--protocol", "v2", "--input-shape"]
    with pytest.raises(SystemExit) as done:
        main([*args, "112x92", "--mode", "blackbox", "--label", "0", "--out", "x"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in err
    assert "no model 'nope'" in err and f"served: {NAME}" in err


def test_mlserver_answers_what_the_estimator_answers(mlserver: dict[str, Any]) -> None:
    from mlinvert.oracle import HttpOracle
    from mlinvert.oracle.wire import WireConfig

    dataset = load(ATT, seed=1)
    x, _ = dataset.test()
    wire = WireConfig(protocol="v2", class_names=dataset.class_names, input_shape=(112, 92))
    with HttpOracle(mlserver["server"].url, wire=wire) as oracle:
        answered = oracle.query(x[:20])
    assert answered.probs is not None
    expected = mlserver["estimator"].predict_proba(x[:20].reshape(20, -1))
    np.testing.assert_allclose(answered.probs, expected, atol=1e-9)


def test_mlinvert_serve_v2_answers_mlserver_s_very_numbers(mlserver: dict[str, Any]) -> None:
    """The same model.joblib behind `mlinvert serve --protocol v2` (its FP64 scores as
    binary tensors and as JSON) and behind MLServer (JSON): bit-identical probabilities,
    so a seeded audit through either takes the same path (BENCHMARKS.md, "Interop")."""
    from mlinvert.oracle import HttpOracle
    from mlinvert.oracle.wire import WireConfig
    from mlinvert.service.runner import ServiceProcess
    from mlinvert.service.store import Store

    dataset = load(ATT, seed=1)
    x = dataset.test()[0][:20]
    wire = WireConfig(protocol="v2", class_names=dataset.class_names, input_shape=(112, 92))
    db = mlserver["root"] / "serve.sqlite3"
    key, _ = Store(db).create_key("parity")
    model_file = mlserver["root"] / "repo" / NAME / "model.joblib"
    with HttpOracle(mlserver["server"].url, wire=wire) as theirs:
        expected = theirs.query(x).probs
        assert theirs.info.extra["tensors"] == "json"  # MLServer lists no binary tensors
    with ServiceProcess([f"{NAME}={model_file}"], db=db, protocol="v2") as served:
        for binary, tensors in ((None, "binary"), (False, "json")):
            ours = dataclasses.replace(wire, output="probabilities", binary=binary)
            with HttpOracle(served.url + f"/v2/models/{NAME}", key, wire=ours) as oracle:
                np.testing.assert_array_equal(oracle.query(x).probs, expected)
                assert oracle.info.extra["tensors"] == tensors


@pytest.mark.slow
def test_audit_through_v2_counts_every_input_mlserver_answered(
    mlserver: dict[str, Any],
) -> None:
    server = mlserver["server"]
    out = mlserver["root"] / "audit"
    before = server.counts()
    args = ["audit", "--api", server.url, "--protocol", "v2", "--data", ATT, "--labels", "1"]
    args += ["--budget", "400", "--quick", "--seed", "1", "--attacks", "blackbox,label-only"]
    with pytest.raises(SystemExit) as done:
        main([*args, "--out", str(out)])
    after = server.counts()
    assert done.value.code in (0, 3)
    final = json.loads((out / "results.json").read_text())
    assert final["status"] == "complete" and final["deployment"]["protocol"] == "v2"
    assert final["config"]["wire"]["protocol"] == "v2"
    records = final["records"]
    assert sorted(r["attack"] for r in records) == ["blackbox", "label-only"]
    assert all(r["n_queries"] > 0 for r in records)
    utility = final["utility"]["faces"]["deployed"]
    spent = sum(r["n_queries"] for r in records) + utility["queries_spent"]
    # the attacks', the served-accuracy measurement's and the one probe's inputs
    assert after["inputs"] - before["inputs"] == spent + 1
    assert sum(final["deployment"]["answered"].values()) == spent + 1
