"""``mlinvert audit --model FILE --data SPEC``: ONNX and TorchScript files exported from
the project's digits softmax audited as its model folder is (served by the audit's own
service, served utility measured), and the clear refusals."""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest

from mlinvert.cli.main import main
from mlinvert.data import load
from mlinvert.targets import io
from mlinvert.targets.files import export_onnx, export_torchscript

#: The small audit: one digit, two defences, API attacks over the real service.
SMALL = ["--data", "digits", "--labels", "1", "--budget", "150", "--quick", "--seed", "1"]
SMALL += ["--defenses", "none,round:2", "--lanes", "1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from mlinvert.targets.training import train_target

    root = tmp_path_factory.mktemp("audit-files")
    trained = train_target(load("digits", seed=1), "softmax", seed=1, quick=True)
    folder = io.save(trained.model, root / "softmax", card=trained.card)
    evaluation = train_target(load("digits", seed=1), "evaluation", seed=1, quick=True)
    io.save(evaluation.model, root / "evaluation", card=evaluation.card)
    return {
        "root": root,
        "folder": folder,
        "onnx": export_onnx(trained.model, root / "softmax.onnx"),
        "pt": export_torchscript(trained.model, root / "softmax.pt"),
    }


def _audit(files: dict[str, Any], name: str, *args: str) -> tuple[int, dict[str, Any]]:
    """Run the audit into a fresh folder holding the shared evaluation model."""
    out = files["root"] / name
    shutil.copytree(files["root"] / "evaluation", out / "models" / "evaluation")
    with pytest.raises(SystemExit) as done:
        main(["audit", *args, "--out", str(out)])
    code = int(done.value.code or 0)
    return code, json.loads((out / "results.json").read_text())


def _same(record: dict[str, Any]) -> tuple[Any, ...]:
    """What must not move between the file and the folder (scores to 1e-3: ONNX runs the
    same float32 network in another library)."""
    keys = ("defense", "attack", "label", "status", "n_queries", "recovered")
    confidence = record["target_confidence"]
    return (*(record[k] for k in keys), None if confidence is None else round(confidence, 3))


def test_an_onnx_file_is_audited_as_its_model_folder(files: dict[str, Any]) -> None:
    api = ["--attacks", "blackbox,label-only", *SMALL]
    code, onnx = _audit(files, "onnx", "--model", str(files["onnx"]), *api)
    assert code in (0, 3) and onnx["status"] == "complete"
    _, folder = _audit(files, "folder", "--model", str(files["folder"]), *api)
    records = sorted(map(_same, onnx["records"]))
    assert len(records) == 4 and records == sorted(map(_same, folder["records"]))
    assert all(r["channel"].startswith("HTTP API") for r in onnx["records"])
    # the served utility, per defence, as the model folder's
    (utility,) = onnx["utility"].values()
    for defense, served in next(iter(folder["utility"].values())).items():
        assert utility[defense]["accuracy"] == served["accuracy"] > 0.5
        assert utility[defense]["brier"] == pytest.approx(served["brier"], abs=1e-5)
    assert utility["round:2"]["labels_unchanged"]
    card = json.loads((files["root"] / "onnx" / "models" / "softmax" / "model.json").read_text())
    assert card["kind"] == "onnx" and card["dataset"] == "digits"
    assert card["input_shape"] == [8, 8] and card["file"]["outputs"].startswith("logits")
    assert card["split"] == json.loads((files["folder"] / "model.json").read_text())["split"]


def test_a_torchscript_file_runs_the_white_box_attack(files: dict[str, Any]) -> None:
    white = ["--attacks", "whitebox", "--in-process", *SMALL]
    code, pt = _audit(files, "pt", "--model", str(files["pt"]), *white)
    _, folder = _audit(files, "pt-folder", "--model", str(files["folder"]), *white)
    assert code in (0, 3) and pt["targets"]["softmax"]["kind"] == "torchscript"
    assert sorted(map(_same, pt["records"])) == sorted(map(_same, folder["records"]))


def test_a_joblib_classifier_of_flat_rows_is_served_at_the_data_s_image_shape(
    files: dict[str, Any],
) -> None:
    """A scikit-learn file declares 64 features; the audit's service reads 8x8 images."""
    import joblib
    from sklearn.linear_model import LogisticRegression

    x, y = load("digits", seed=1).train()
    path = files["root"] / "logistic.joblib"
    joblib.dump(LogisticRegression(max_iter=200).fit(x.reshape(len(x), -1), y), path)
    args = ["--model", str(path), "--attacks", "label-only", *SMALL[:-4], "--defenses", "none"]
    code, done = _audit(files, "joblib", *args)
    assert code in (0, 3) and done["targets"]["logistic"]["kind"] == "sklearn"
    (record,) = done["records"]
    assert record["channel"] == "HTTP API" and record["n_queries"] > 0 and record["measured"]
    assert done["utility"]["logistic"]["none"]["accuracy"] > 0.8


def test_model_file_mistakes_end_with_one_line(
    files: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    for args, said in (
        (["--model", str(files["onnx"])], "does not say what data it was trained on"),
        (["--model", str(files["onnx"]), *SMALL], "--attacks blackbox,label-only"),
    ):
        out = files["root"] / f"refused-{len(args)}"
        with pytest.raises(SystemExit) as done:
            main(["audit", *args, "--out", str(out)])
        err = " ".join(capsys.readouterr().err.split())
        assert done.value.code == 2 and said in err and "Traceback" not in err, err
