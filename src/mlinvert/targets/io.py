"""Self-describing model folders: ``weights.safetensors`` + a ``model.json`` card.

Loading runs no code from the folder: tensors come from safetensors, everything else
from JSON, and the class is chosen from a fixed table of kinds. The card records the
SHA-256 of the weights file; a mismatch (tampering, truncation) is a ModelError.

Card fields written by :func:`save` (on top of whatever the trainer's card holds):
``format``, ``kind``, ``class_names``, ``input_shape``, ``params`` (the model's JSON
state), ``weights`` (file name and sha256), ``library_versions``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from mlinvert.data import load as load_data
from mlinvert.data.base import ImageDataset, Split
from mlinvert.errors import DataError, ModelError
from mlinvert.targets.files import file_sha256

log = logging.getLogger(__name__)

FORMAT = "mlinvert-model/1"
CARD = "model.json"
WEIGHTS = "weights.safetensors"

#: card "kind" -> "module:Class" (imported lazily; torch only for torch kinds)
KINDS: dict[str, str] = {
    "softmax": "mlinvert.targets.torch_models:SoftmaxRegression",
    "mlp": "mlinvert.targets.torch_models:MLP",
    "dae": "mlinvert.targets.dae:StackedDAE",
    "cnn": "mlinvert.targets.torch_models:CNN",
    "evaluation": "mlinvert.targets.torch_models:EvaluationNet",
    "tree": "mlinvert.targets.tree:DecisionTreeTarget",
    # a folder pointing at a user's model file (see mlinvert.targets.files)
    "onnx": "mlinvert.targets.files:OnnxTarget",
    "torchscript": "mlinvert.targets.files:TorchScriptTarget",
    "sklearn": "mlinvert.targets.files:SklearnTarget",
}


def model_class(kind: str) -> Any:
    """The class that implements ``kind``; ModelError naming the known kinds otherwise."""
    if kind not in KINDS:
        raise ModelError(f"unknown model kind {kind!r}; known kinds: {', '.join(KINDS)}")
    module, _, name = KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a trained model."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for lib in ("mlinvert", "numpy", "torch", "scikit-learn", "safetensors"):
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            continue
    return out


def _json_safe(value: Any) -> Any:
    """Turn numpy scalars/arrays and tuples in a card into plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def save(model: Any, folder: str | Path, *, card: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (anything with ``get_state``) and its card into ``folder``.

    Returns the folder. Existing ``model.json``/``weights.safetensors`` are replaced;
    the card is written last, so a folder with a card is complete.
    """
    from safetensors.numpy import save_file

    get_state = getattr(model, "get_state", None)
    if get_state is None:
        raise ModelError(f"{type(model).__name__} cannot be saved: it has no get_state()")
    tensors, params = get_state()
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out} is a file; pass a folder path to save the model into")
    out.mkdir(parents=True, exist_ok=True)
    (out / CARD).unlink(missing_ok=True)
    weights = out / WEIGHTS
    tmp = out / (WEIGHTS + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, weights)
    doc = {
        **_json_safe(card or {}),
        "format": FORMAT,
        "kind": model.kind,
        "class_names": list(model.class_names_),
        "input_shape": list(model.input_shape_),
        "params": _json_safe(params),
        "weights": {"file": WEIGHTS, "sha256": file_sha256(weights)},
        "library_versions": library_versions(),
    }
    tmp_card = out / (CARD + ".tmp")
    tmp_card.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp_card, out / CARD)
    log.info("saved %s model to %s", model.kind, out)
    return out


def read_card(folder: str | Path) -> dict[str, Any]:
    """The parsed ``model.json`` of a folder; ModelError if missing or malformed."""
    root = Path(folder)
    if not root.exists():
        raise ModelError(
            f"model folder {root} does not exist; train one with "
            "`mlinvert train --out DIR` or pass the folder that holds model.json"
        )
    if not root.is_dir():
        raise ModelError(f"{root} is a file, not a model folder (expected {CARD} + {WEIGHTS})")
    path = root / CARD
    if not path.is_file():
        raise ModelError(f"{root} is not a complete model folder: {CARD} is missing")
    try:
        card = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}); the folder is corrupt") from exc
    if not isinstance(card, dict):
        raise ModelError(f"{path} must hold a JSON object, got {type(card).__name__}")
    if card.get("format") != FORMAT:
        raise ModelError(
            f"{path} has format {card.get('format')!r}, expected {FORMAT!r}; "
            "re-train the model with this version of mlinvert"
        )
    for key in ("kind", "params", "weights"):
        if key not in card:
            raise ModelError(f"{path} lacks the field {key!r}; the card is incomplete")
    return card


def load(folder: str | Path) -> Any:
    """Load a ready, fitted model from a folder written by :func:`save` (or a user's
    model file: :func:`mlinvert.targets.files.load_file`).

    ModelError on a missing folder or file, corrupt JSON or weights, a weights file
    whose SHA-256 differs from the card (tampered), an unknown kind, or tensors whose
    names/shapes do not fit the declared model.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from mlinvert.targets import files

    if files.is_model_file(folder):  # a user's .onnx, .pt, .joblib or .skops file
        return files.load_file(folder)
    root = Path(folder)
    card = read_card(root)
    cls = model_class(str(card["kind"]))
    info = card["weights"]
    if not isinstance(info, dict) or "sha256" not in info:
        raise ModelError(f"{root / CARD}: 'weights' must name the file and its sha256")
    weights = root / str(info.get("file", WEIGHTS))
    if weights.parent != root or not weights.is_file():
        raise ModelError(f"{root} is not a complete model folder: {weights.name} is missing")
    if file_sha256(weights) != info["sha256"]:
        raise ModelError(
            f"{weights} does not match the sha256 recorded in {CARD}: the weights were "
            "modified or truncated after saving; re-train or restore the original folder"
        )
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"cannot read {weights}: {exc}") from exc
    params = card["params"]
    if not isinstance(params, dict):
        raise ModelError(f"{root / CARD}: 'params' must be a JSON object")
    try:
        model = cls.from_state(tensors, params)
    except ModelError as exc:
        raise ModelError(f"{root}: {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(
            f"{root}: the card does not describe a valid {card['kind']!r} model ({exc!r})"
        ) from exc
    if list(model.class_names_) != list(card.get("class_names", model.class_names_)):
        raise ModelError(f"{root}: class names in the card and the parameters disagree")
    return model


def trained_on(model: Path) -> ImageDataset:
    """The image data set the model folder ``model`` was trained on, with its card's
    private/held-out split (DataError if that data is not readable here)."""
    card = read_card(model)
    spec, split = card.get("dataset"), card.get("split")
    if not spec or not isinstance(split, dict):
        raise DataError(f"the model card in {model} names no data set and split")
    try:
        data = load_data(spec)
    except DataError as exc:
        raise DataError(
            f"the model card in {model} names the data set {spec!r}, which is not readable "
            f"here: {exc}"
        ) from None
    if not isinstance(data, ImageDataset):
        raise DataError(f"the model in {model} was trained on {spec!r}, not on images")
    return dataclasses.replace(data, split=Split.from_dict(split))
