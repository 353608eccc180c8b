"""Model folders: round trip, and every tampered or incomplete folder is a ModelError."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlinvert.errors import ModelError
from mlinvert.targets import io, load, save
from mlinvert.targets.files import file_sha256

from .conftest import Trained


@pytest.fixture
def folder(trained: Trained, tmp_path: Path) -> Path:
    """A saved quick softmax digits model."""
    t = trained("softmax")
    return save(t.model, tmp_path / "m", card=t.card)


def _rewrite_card(folder: Path, **changes: object) -> None:
    card = json.loads((folder / "model.json").read_text())
    card.update(changes)
    (folder / "model.json").write_text(json.dumps(card))


def test_card_is_self_describing(folder: Path, trained: Trained) -> None:
    card = json.loads((folder / "model.json").read_text())
    for key in (
        "dataset",
        "split",
        "input_shape",
        "class_names",
        "seed",
        "config",
        "train_accuracy",
        "test_accuracy",
        "train_seconds",
        "library_versions",
    ):
        assert key in card, key
    assert card["format"] == io.FORMAT and card["kind"] == "softmax"
    assert card["input_shape"] == [8, 8] and len(card["weights"]["sha256"]) == 64
    assert {"torch", "numpy", "python"} <= set(card["library_versions"])
    x = np.random.default_rng(0).random((5, 8, 8), dtype=np.float32)
    assert np.array_equal(load(folder).predict_proba(x), trained("softmax").model.predict_proba(x))


def test_missing_folder_and_file_instead(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load(tmp_path / "nope")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ModelError, match="is a file"):
        load(f)


def test_missing_card_or_weights(folder: Path) -> None:
    (folder / "weights.safetensors").unlink()
    with pytest.raises(ModelError, match=r"weights\.safetensors is missing"):
        load(folder)
    (folder / "model.json").unlink()
    with pytest.raises(ModelError, match=r"model\.json is missing"):
        load(folder)


def test_tampered_weights(folder: Path) -> None:
    w = folder / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        load(folder)


def test_truncated_weights(folder: Path) -> None:
    w = folder / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ModelError, match="sha256"):
        load(folder)


def test_corrupt_card(folder: Path) -> None:
    (folder / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load(folder)


def test_unknown_kind_and_format(folder: Path) -> None:
    _rewrite_card(folder, kind="resnet")
    with pytest.raises(ModelError, match="unknown model kind 'resnet'"):
        load(folder)
    _rewrite_card(folder, format="other/9")
    with pytest.raises(ModelError, match="format"):
        load(folder)


def test_wrong_tensor_shapes_even_with_matching_sha(folder: Path) -> None:
    w = folder / "weights.safetensors"
    tensors = load_file(str(w))
    name = next(k for k, v in tensors.items() if v.ndim == 2)
    tensors[name] = np.zeros((3, 3), np.float32)
    save_file(tensors, str(w))
    _rewrite_card(folder, weights={"file": w.name, "sha256": file_sha256(w)})
    with pytest.raises(ModelError, match=r"has shape \(3, 3\)"):
        load(folder)


def test_missing_tensor_and_bad_params(folder: Path) -> None:
    w = folder / "weights.safetensors"
    tensors = load_file(str(w))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(w))
    _rewrite_card(folder, weights={"file": w.name, "sha256": file_sha256(w)})
    with pytest.raises(ModelError, match="missing"):
        load(folder)
    card = json.loads((folder / "model.json").read_text())
    card["params"]["config"]["l2"] = -1
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="l2"):
        load(folder)


def test_weights_path_cannot_escape_the_folder(folder: Path, tmp_path: Path) -> None:
    _rewrite_card(folder, weights={"file": "../elsewhere.safetensors", "sha256": "0" * 64})
    with pytest.raises(ModelError, match="missing"):
        load(folder)


def test_save_refuses_objects_without_state(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="get_state"):
        save(object(), tmp_path / "x")


def test_tree_kind_routes_to_the_tree_target(tmp_path: Path) -> None:
    from mlinvert.data import load as load_data
    from mlinvert.data.surveys import SurveyDataset
    from mlinvert.errors import ConfigError
    from mlinvert.targets.training import train_target

    ds = load_data("fair", seed=0)
    t = train_target(ds, "tree", seed=0, quick=True)
    assert t.model.kind == "tree" and t.card["train_seconds"] >= 0
    again = load(save(t.model, tmp_path / "tree", card=t.card))
    assert isinstance(ds, SurveyDataset)
    x, _ = ds.nonmembers()
    assert np.array_equal(again.predict_proba(x), t.model.predict_proba(x))
    with pytest.raises(ConfigError, match="needs an image data set"):
        train_target(ds, "softmax", seed=0)
