"""Targets from users' files: ONNX and TorchScript exported from the project's own
softmax, scikit-learn classifiers in .joblib and .skops, and the clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlinvert.attacks import MIFace, MIFaceConfig, parse_gradient
from mlinvert.attacks.gradients import Exact
from mlinvert.attacks.spaces import parse_space
from mlinvert.cli.main import main
from mlinvert.data import load
from mlinvert.defenses import Predictor
from mlinvert.errors import ModelError, QueryRejected
from mlinvert.oracle import LocalOracle, WhiteBoxOracle
from mlinvert.targets import io
from mlinvert.targets.files import export_onnx, export_torchscript, load_file


@pytest.fixture(scope="module")
def softmax(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from mlinvert.targets.training import train_target

    root = tmp_path_factory.mktemp("files")
    dataset = load("digits", seed=1)
    trained = train_target(dataset, "softmax", seed=1, quick=True)
    folder = io.save(trained.model, root / "softmax", card=trained.card)
    return {
        "root": root,
        "dataset": dataset,
        "folder": folder,
        "model": io.load(folder),
        "onnx": export_onnx(trained.model, root / "softmax.onnx"),
        "pt": export_torchscript(trained.model, root / "softmax.pt"),
    }


def _miface(oracle: Any, gradient: Any) -> np.ndarray:
    attack = MIFace(
        MIFaceConfig.improved(max_iter=8), gradient=gradient, space=parse_space("pixel")
    )
    return np.asarray(attack.run(oracle, 2, seed=3).reconstructions)


def test_onnx_and_torchscript_answer_as_the_model_folder(softmax: dict[str, Any]) -> None:
    x, _ = softmax["dataset"].test()
    expected = softmax["model"].predict_proba(x)
    for path in (softmax["onnx"], softmax["pt"]):
        target = io.load(path)  # the extension picks the reader
        assert target.input_shape_ == (8, 8) and target.logits_  # exported logits
        np.testing.assert_allclose(target.predict_proba(x), expected, atol=1e-5)
        assert target.card()["outputs"] == "logits (read through a softmax)"


def test_torchscript_white_box_and_onnx_black_box_reconstruct_as_the_folder(
    softmax: dict[str, Any],
) -> None:
    folder = Predictor(softmax["model"], name="softmax")
    names = softmax["dataset"].class_names
    pt = Predictor(load_file(softmax["pt"], class_names=names), name="softmax")
    onnx = Predictor(load_file(softmax["onnx"], class_names=names), name="softmax")
    white = _miface(WhiteBoxOracle(folder), Exact())
    np.testing.assert_allclose(_miface(WhiteBoxOracle(pt), Exact()), white, atol=1e-4)
    nes = parse_gradient("nes", samples=10, sigma=0.02)
    black = _miface(LocalOracle(folder), nes)
    np.testing.assert_allclose(_miface(LocalOracle(onnx), nes), black, atol=1e-3)


def test_cli_attacks_an_onnx_file(
    softmax: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    out = softmax["root"] / "onnx-attack"
    args = ["attack", "miface", "--model", str(softmax["onnx"]), "--mode", "blackbox"]
    with pytest.raises(SystemExit) as done:
        main([*args, "--label", "2", "--max-iter", "3", "--budget", "300", "--out", str(out)])
    assert done.value.code == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    assert result["n_queries"] > 0 and result["per_label"][0]["name"] == "2"


@pytest.fixture(scope="module")
def sklearn_files(softmax: dict[str, Any]) -> dict[str, Any]:
    import joblib
    import skops.io as sio
    from sklearn.tree import DecisionTreeClassifier

    x, y = softmax["dataset"].train()
    tree = DecisionTreeClassifier(max_depth=6, random_state=0).fit(x.reshape(len(x), -1), y)
    root = softmax["root"]
    joblib.dump(tree, root / "tree.joblib")
    sio.dump(tree, root / "tree.skops")
    return {"tree": tree, "joblib": root / "tree.joblib", "skops": root / "tree.skops"}


def test_sklearn_joblib_and_skops_answer_as_the_estimator(
    softmax: dict[str, Any], sklearn_files: dict[str, Any]
) -> None:
    x, _ = softmax["dataset"].test()
    expected = sklearn_files["tree"].predict_proba(x.reshape(len(x), -1))
    for suffix in ("joblib", "skops"):
        flat = load_file(sklearn_files[suffix])
        assert flat.input_shape_ == (64,) and flat.class_names_[:2] == ("0", "1")
        images = load_file(sklearn_files[suffix], input_shape=(8, 8))
        np.testing.assert_allclose(images.predict_proba(x), expected)
        with pytest.raises(QueryRejected, match=r"shape \(n, 8, 8\)"):
            images.predict_proba(x.reshape(len(x), -1))


def test_cli_label_only_on_a_joblib_tree(
    softmax: dict[str, Any], sklearn_files: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    out = softmax["root"] / "tree-attack"
    args = ["attack", "miface", "--model", str(sklearn_files["joblib"]), "--input-shape", "8x8"]
    with pytest.raises(SystemExit) as done:
        main([*args, "--mode", "label-only", "--label", "1", "--budget", "3000", "--out", str(out)])
    assert done.value.code == 0, capsys.readouterr().err
    assert json.loads((out / "result.json").read_text())["n_queries"] > 0


def test_model_files_refused_with_a_clear_error(
    softmax: dict[str, Any], sklearn_files: dict[str, Any], tmp_path: Path
) -> None:
    import skops.io as sio
    from sklearn.linear_model import LogisticRegression

    (tmp_path / "model.h5").write_bytes(b"x")
    with pytest.raises(ModelError, match=r"not a model file .*\.onnx"):
        io.load(tmp_path / "model.h5")
    with pytest.raises(ModelError, match="does not exist"):
        load_file(tmp_path / "missing.onnx")
    with pytest.raises(ModelError, match=r"takes inputs of shape \(64,\)"):
        load_file(sklearn_files["joblib"], input_shape=(7, 7))
    with pytest.raises(ModelError, match="does not declare its input shape"):
        jit = tmp_path / "bare.pt"
        _bare_torchscript(jit)
        load_file(jit)
    odd = LogisticRegression().fit(np.eye(4), [0, 1, 0, 1])
    odd.note_ = _Odd()
    sio.dump(odd, tmp_path / "odd.skops")
    with pytest.raises(ModelError, match=r"does not trust by default.*_Odd"):
        load_file(tmp_path / "odd.skops")


class _Odd:
    """A type skops does not trust."""


def _bare_torchscript(path: Path) -> None:
    import torch

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 2, 2)), str(path))


def test_a_folder_pointing_at_a_file_loads_it_and_refuses_a_changed_file(
    softmax: dict[str, Any], sklearn_files: dict[str, Any], tmp_path: Path
) -> None:
    import shutil

    path = shutil.copy(sklearn_files["joblib"], tmp_path / "tree.joblib")
    target = load_file(path, input_shape=(8, 8), class_names=tuple("abcdefghij"))
    folder = io.save(target, tmp_path / "folder", card={"dataset": "digits"})
    again = io.load(folder)  # the file at the shape and classes the folder recorded
    x, _ = softmax["dataset"].test()
    assert again.input_shape_ == (8, 8) and again.class_names_ == tuple("abcdefghij")
    np.testing.assert_array_equal(again.predict_proba(x), target.predict_proba(x))
    Path(path).write_bytes(Path(path).read_bytes() + b"\0")
    with pytest.raises(ModelError, match="changed since this folder was written"):
        io.load(folder)


def test_a_scikit_learn_tree_on_survey_codes_answers_as_the_estimator(tmp_path: Path) -> None:
    import joblib
    import skops.io as sio
    from sklearn.tree import DecisionTreeClassifier

    from mlinvert.data.surveys import SurveyDataset
    from mlinvert.targets.files import load_survey_tree

    fair = load("fair", seed=0)
    assert isinstance(fair, SurveyDataset)
    x, y = fair.members()
    estimator = DecisionTreeClassifier(max_depth=7, random_state=0).fit(x, y)
    sio.dump(estimator, tmp_path / "tree.skops")
    tree, card = load_survey_tree(tmp_path / "tree.skops", fair)
    everything = fair.X
    np.testing.assert_allclose(tree.predict_proba(everything), estimator.predict_proba(everything))
    # the white-box document: training rows per node, each split a set of categories
    leaves = estimator.apply(x)
    rows = np.bincount(leaves, minlength=estimator.tree_.node_count)
    np.testing.assert_allclose(tree.counts_.sum(axis=1)[leaves], rows[leaves])
    assert card["depth"] == estimator.get_depth() and card["split"] == fair.split.to_dict()
    joblib.dump(DecisionTreeClassifier().fit(x[:, :3], y), tmp_path / "narrow.joblib")
    with pytest.raises(ModelError, match=r"reads 3 features, the data fair has 8"):
        load_survey_tree(tmp_path / "narrow.joblib", fair)
