"""Targets from users' model files: ONNX, TorchScript and scikit-learn.

``--model file.onnx`` (onnxruntime), ``--model file.pt`` (TorchScript; white-box too:
its gradients come from autograd) and ``--model file.joblib`` / ``file.skops``
(scikit-learn classifiers with ``predict_proba``). Each becomes a
:class:`~mlinvert.targets.base.Target` that a Predictor serves like a model folder.

What mlinvert knows of such a model (its card: input shape, classes, kind) comes from
what the file declares, completed by the caller: ``input_shape`` (e.g. the image shape
of the ``--data`` when the file declares a flat row of features) and ``class_names``
(else the file's classes, or ``0..k-1``). A model that answers unnormalised scores
(logits: rows that do not sum to 1) is read through a softmax, and the card says so.

joblib files are pickles: loading one runs code from it, so load only files you trust;
a ``.skops`` file is loaded only if every type in it is one skops trusts by default or
comes from scikit-learn, numpy or scipy.sparse.

A file target saved with :func:`mlinvert.targets.io.save` becomes a model folder that
points at the file: its card holds the file's path and SHA-256, the input shape and the
classes the caller gave (``mlinvert audit --model file --data SPEC`` writes one, so the
service it starts reads the file as the audit does); loading the folder refuses a file
that changed since.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlinvert.errors import ModelError, QueryRejected

if TYPE_CHECKING:
    from mlinvert.data.surveys import SurveyDataset
    from mlinvert.targets.tree import DecisionTreeTarget

SUFFIXES = (".onnx", ".pt", ".pth", ".joblib", ".skops")
_CHUNK = 256
#: A .skops file's types from these modules are trusted (e.g. a tree's
#: ``sklearn.tree._tree.Tree``, which skops itself does not trust by default).
_TRUSTED_MODULES = ("sklearn.", "numpy.", "scipy.sparse.")
_SUM_TOL = 1e-3


def is_model_file(path: str | Path) -> bool:
    """Whether ``path`` names a model file (by its extension), not a model folder."""
    p = Path(path)
    return p.suffix.lower() in SUFFIXES or (p.is_file() and p.suffix != "")


def load_file(
    path: str | Path,
    *,
    input_shape: tuple[int, ...] | None = None,
    class_names: tuple[str, ...] | None = None,
) -> Any:
    """The target in the model file ``path``; ModelError for an unknown extension, a
    missing file, a shape that does not fit, or (``.skops``) types not trusted."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise ModelError(
            f"{p} is not a model file mlinvert reads (extension {suffix or 'none'!r}); use "
            f"{', '.join(SUFFIXES)}, or a model folder written by `mlinvert train`"
        )
    if not p.is_file():
        raise ModelError(f"model file {p} does not exist")
    if suffix == ".onnx":
        return OnnxTarget(p, input_shape=input_shape, class_names=class_names)
    if suffix in (".pt", ".pth"):
        return TorchScriptTarget(p, input_shape=input_shape, class_names=class_names)
    return SklearnTarget(p, input_shape=input_shape, class_names=class_names)


def _shape(
    path: Path, declared: tuple[int, ...] | None, given: tuple[int, ...] | None
) -> tuple[int, ...]:
    """The attacker's input shape: ``given`` (checked against ``declared``), else declared."""
    if given is None and declared is None:
        raise ModelError(
            f"{path} does not declare its input shape: pass --input-shape (e.g. 112x92) "
            "or --data whose images the model reads"
        )
    if given is not None and declared is not None and math.prod(given) != math.prod(declared):
        raise ModelError(
            f"{path} takes inputs of shape {declared} ({math.prod(declared)} values), not "
            f"{given} ({math.prod(given)}): pass the --input-shape or --data it was trained on"
        )
    shape = given or declared
    assert shape is not None
    return shape


def _names(path: Path, k: int, given: tuple[str, ...] | None) -> tuple[str, ...]:
    if given is None:
        return tuple(str(i) for i in range(k))
    if len(given) != k:
        raise ModelError(
            f"{path} answers {k} classes, {len(given)} class names were given: pass the "
            "--data (or --classes) the model was trained on"
        )
    return tuple(given)


def _is_probability(p: np.ndarray) -> bool:
    return bool(
        p.ndim == 2
        and np.all(np.isfinite(p))
        and p.min() >= -_SUM_TOL
        and np.all(np.abs(p.sum(axis=1) - 1) <= _SUM_TOL)
    )


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


class _FileTarget:
    """What the file targets share: the card, input checks, predict."""

    kind = "file"
    path: Path
    input_shape_: tuple[int, ...]
    class_names_: tuple[str, ...]
    classes_: np.ndarray
    #: the file answers logits, read through a softmax
    logits_: bool = False

    def _finish(self, probe: np.ndarray, class_names: tuple[str, ...] | None) -> None:
        """Set the classes and whether the outputs are logits from one probe answer."""
        if probe.ndim != 2 or probe.shape[1] < 2:
            raise ModelError(
                f"{self.path} answers {probe.shape} per batch, not a score per class (n, k)"
            )
        self.logits_ = not _is_probability(probe)
        self.class_names_ = _names(self.path, int(probe.shape[1]), class_names)
        self.classes_ = np.arange(len(self.class_names_))

    def _check(self, X: np.ndarray) -> np.ndarray:
        x = np.asarray(X, dtype=np.float32)
        if x.shape[1:] != self.input_shape_:
            raise QueryRejected(
                f"{self.path.name} takes inputs of shape (n, "
                f"{', '.join(map(str, self.input_shape_))}), got {x.shape}"
            )
        return x

    def _raw(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, k)`` float64 (a softmax over logits)."""
        x = self._check(X)
        parts = [self._raw(x[i : i + _CHUNK]) for i in range(0, len(x), _CHUNK)]
        out = np.concatenate(parts) if parts else np.empty((0, len(self.classes_)))
        out = out.astype(np.float64)
        return _softmax(out) if self.logits_ and len(out) else out

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Most likely class index per input (int64)."""
        return self.predict_proba(X).argmax(axis=1).astype(np.int64)

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """A model folder's state: no tensors; the file (path, SHA-256), the input shape
        and the classes, so the folder loads the file as this target reads it."""
        return {}, {
            "file": str(self.path.resolve()),
            "sha256": file_sha256(self.path),
            "input_shape": list(self.input_shape_),
            "class_names": list(self.class_names_),
        }

    @classmethod
    def from_state(cls, tensors: dict[str, np.ndarray], params: dict[str, Any]) -> Any:
        """Inverse of :meth:`get_state`: the file, if it is still the one recorded."""
        del tensors  # the model lives in the file
        path = Path(params["file"])
        if not path.is_file():
            raise ModelError(f"the model file {path} this folder points at does not exist")
        if file_sha256(path) != params["sha256"]:
            raise ModelError(
                f"{path} changed since this folder was written (its SHA-256 differs): "
                "audit the new file with --model again"
            )
        return load_file(
            path,
            input_shape=tuple(params["input_shape"]),
            class_names=tuple(params["class_names"]),
        )

    def card(self) -> dict[str, Any]:
        """What mlinvert knows of the model (its card)."""
        return {
            "kind": self.kind,
            "file": str(self.path),
            "class_names": list(self.class_names_),
            "input_shape": list(self.input_shape_),
            "outputs": "logits (read through a softmax)" if self.logits_ else "probabilities",
        }


class OnnxTarget(_FileTarget):
    """An ONNX classifier run by onnxruntime (one float input; the probability output,
    or the single float output)."""

    kind = "onnx"

    def __init__(
        self,
        path: Path,
        *,
        input_shape: tuple[int, ...] | None = None,
        class_names: tuple[str, ...] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        try:
            self._session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"onnxruntime cannot load {path}: {exc}") from None
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"{path} takes {len(inputs)} inputs; mlinvert sends one")
        self._input = inputs[0].name
        dims = inputs[0].shape[1:]
        declared = tuple(int(d) for d in dims) if all(isinstance(d, int) for d in dims) else None
        self.input_shape_ = _shape(self.path, declared, input_shape)
        self._feed = declared or self.input_shape_
        self._output = self._choose_output()
        self._finish(self._raw(np.full((1, *self.input_shape_), 0.5, np.float32)), class_names)

    def _choose_output(self) -> str:
        outs = [o for o in self._session.get_outputs() if o.type.startswith("tensor(float")]
        named = [o for o in outs if "prob" in o.name.lower()]
        chosen = named if len(named) == 1 else outs
        if len(chosen) != 1:
            names = ", ".join(o.name for o in self._session.get_outputs())
            raise ModelError(f"{self.path} has no single float output of class scores: {names}")
        return str(chosen[0].name)

    def _raw(self, x: np.ndarray) -> np.ndarray:
        feed = x.reshape((len(x), *self._feed))
        try:
            (out,) = self._session.run([self._output], {self._input: feed})
        except Exception as exc:  # onnxruntime's own errors: a shape or type the graph refuses
            raise ModelError(f"{self.path} refused inputs of shape {feed.shape}: {exc}") from None
        return np.asarray(out)


class TorchScriptTarget(_FileTarget):
    """A TorchScript classifier (``torch.jit.save``); white-box: autograd gradients."""

    kind = "torchscript"

    def __init__(
        self,
        path: Path,
        *,
        input_shape: tuple[int, ...] | None = None,
        class_names: tuple[str, ...] | None = None,
    ) -> None:
        import json

        import torch

        self.path = Path(path)
        extra = {"mlinvert.json": ""}
        try:
            self._net = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except (RuntimeError, ValueError) as exc:
            raise ModelError(
                f"{path} is not a TorchScript file torch can load ({exc}); save the model "
                "with torch.jit.save(torch.jit.trace(model, example), path)"
            ) from None
        self._net.eval()
        declared = None
        if extra["mlinvert.json"]:
            declared = tuple(json.loads(extra["mlinvert.json"]).get("input_shape") or ()) or None
        self.input_shape_ = _shape(self.path, declared, input_shape)
        self._finish(self._raw(np.full((1, *self.input_shape_), 0.5, np.float32)), class_names)

    def _forward(self, x: Any) -> Any:
        return self._net(x)

    def _raw(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            try:
                tensor = torch.from_numpy(np.require(x, requirements=["C", "W"]))
                return self._forward(tensor).double().numpy()
            except RuntimeError as exc:
                raise ModelError(f"{self.path} refused inputs of shape {x.shape}: {exc}") from None

    def class_gradient(self, X: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Gradient of the probability of ``labels`` w.r.t. the input (autograd)."""
        import torch

        x = torch.from_numpy(self._check(X).copy()).requires_grad_(True)
        lab = torch.from_numpy(np.broadcast_to(np.asarray(labels, np.int64), (x.shape[0],)).copy())
        out = self._forward(x)
        p = torch.softmax(out, dim=1) if self.logits_ else out
        (grad,) = torch.autograd.grad(p[torch.arange(x.shape[0]), lab].sum(), x)
        return np.asarray(grad.double().numpy())


class SklearnTarget(_FileTarget):
    """A scikit-learn classifier with ``predict_proba`` (``.joblib`` or ``.skops``),
    reading flat feature rows: an image is flattened to the ``n_features_in_`` row."""

    kind = "sklearn"

    def __init__(
        self,
        path: Path,
        *,
        input_shape: tuple[int, ...] | None = None,
        class_names: tuple[str, ...] | None = None,
    ) -> None:
        self.path = Path(path)
        self.estimator = _read_estimator(self.path)
        if not hasattr(self.estimator, "predict_proba"):
            raise ModelError(
                f"{path} holds a {type(self.estimator).__name__}, which has no predict_proba: "
                "mlinvert audits classifiers that give class probabilities"
            )
        n = getattr(self.estimator, "n_features_in_", None)
        if n is None:
            raise ModelError(f"{path} holds an estimator that is not fitted (no n_features_in_)")
        self.input_shape_ = _shape(self.path, (int(n),), input_shape)
        own = tuple(str(c) for c in getattr(self.estimator, "classes_", ()))
        self._finish(
            self._raw(np.full((1, *self.input_shape_), 0.5, np.float32)), class_names or own
        )

    def _raw(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.estimator.predict_proba(x.reshape(len(x), -1)))


def load_survey_tree(
    path: str | Path, survey: SurveyDataset
) -> tuple[DecisionTreeTarget, dict[str, Any]]:
    """The scikit-learn ``DecisionTreeClassifier`` in ``path`` (``.joblib`` / ``.skops``),
    fitted on ``survey``'s category codes, as mlinvert's tree, and its card.

    Every split ``code <= threshold`` becomes the set of categories it sends left; each
    node's class counts are its class shares times its (weighted) training rows, as
    scikit-learn keeps them; the classes are indices into ``survey.class_names``. The
    tree then answers as the estimator does and its document is the white-box
    attacker's. ModelError if the file holds anything else or reads other features.
    """
    p = Path(path)
    if p.suffix.lower() not in (".joblib", ".skops") or not p.is_file():
        raise ModelError(
            f"{p}: survey data is audited on a decision tree; give a scikit-learn "
            "DecisionTreeClassifier saved as .joblib or .skops (or a model folder)"
        )
    from sklearn.tree import DecisionTreeClassifier

    from mlinvert.targets.tree import DecisionTreeTarget

    estimator = _read_estimator(p)
    if not isinstance(estimator, DecisionTreeClassifier) or not hasattr(estimator, "tree_"):
        raise ModelError(
            f"{p} holds a {type(estimator).__name__}, not a fitted DecisionTreeClassifier"
        )
    _check_survey_tree(p, estimator, survey)
    doc = _tree_document(estimator, survey)
    model = DecisionTreeTarget.from_document(doc)
    card = {
        "dataset": survey.spec,
        "split": survey.split.to_dict(),
        "sensitive": survey.sensitive,
        "file": {"path": str(p), "sha256": file_sha256(p), "estimator": "DecisionTreeClassifier"},
        "n_nodes": model.n_nodes_,
        "depth": int(model.depth_.max()),
    }
    return model, card


def _check_survey_tree(path: Path, estimator: Any, survey: SurveyDataset) -> None:
    """ModelError unless ``estimator`` reads ``survey``'s features and predicts its classes."""
    d = len(survey.feature_names)
    names = getattr(estimator, "feature_names_in_", None)
    if estimator.n_features_in_ != d or (
        names is not None and tuple(map(str, names)) != survey.feature_names
    ):
        raise ModelError(
            f"the tree in {path} reads {estimator.n_features_in_} features"
            + ("" if names is None else f" ({', '.join(map(str, names))})")
            + f", the data {survey.spec} has {d} ({', '.join(survey.feature_names)}); "
            "pass the --data it was trained on"
        )
    classes = np.asarray(estimator.classes_)
    k = len(survey.class_names)
    if (
        estimator.n_outputs_ != 1
        or classes.dtype.kind not in "iuf"
        or np.any(classes != np.round(classes))
        or classes.min() < 0
        or classes.max() >= k
    ):
        raise ModelError(
            f"the tree in {path} predicts the classes {classes.tolist()[:6]}, not class "
            f"indices 0..{k - 1} of {survey.target_name!r} ({', '.join(survey.class_names)})"
        )


def _tree_document(estimator: Any, survey: SurveyDataset) -> dict[str, Any]:
    """The :meth:`DecisionTreeTarget.to_document` form of a fitted scikit-learn tree."""
    from dataclasses import asdict

    from mlinvert.targets.tree import DOCUMENT_FORMAT, TreeConfig

    t = estimator.tree_
    columns = np.asarray(estimator.classes_).astype(np.int64)
    shares = t.value[:, 0, :] / np.maximum(t.value[:, 0, :].sum(axis=1, keepdims=True), 1e-300)
    counts = np.zeros((t.node_count, len(survey.class_names)))
    counts[:, columns] = shares * t.weighted_n_node_samples[:, None]
    depth = np.zeros(t.node_count, dtype=np.int64)
    nodes: list[dict[str, Any]] = []
    for i in range(t.node_count):  # scikit-learn numbers a parent before its children
        node: dict[str, Any] = {"depth": int(depth[i]), "counts": counts[i].tolist()}
        left, right = int(t.children_left[i]), int(t.children_right[i])
        if left >= 0:
            j = int(t.feature[i])
            dom = survey.domains[j]
            node["split"] = {
                "feature": survey.feature_names[j],
                "left": [c for code, c in enumerate(dom) if code <= t.threshold[i]],
            }
            node["children"] = [left, right]
            depth[[left, right]] = depth[i] + 1
        nodes.append(node)
    return {
        "format": DOCUMENT_FORMAT,
        "kind": "tree",
        "features": [
            {"name": n, "categories": list(dom), "ordered": o}
            for n, dom, o in zip(survey.feature_names, survey.domains, survey.ordered, strict=True)
        ],
        "classes": list(survey.class_names),
        "sensitive": survey.sensitive,
        "config": asdict(TreeConfig(max_depth=int(estimator.get_depth()))),
        "nodes": nodes,
    }


def file_sha256(path: Path) -> str:
    """The SHA-256 of the file at ``path`` (hex)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_estimator(path: Path) -> Any:
    if path.suffix.lower() == ".joblib":
        import joblib

        try:
            return joblib.load(path)  # a pickle: runs code from the file (documented)
        except Exception as exc:  # unpickling raises anything the file's code raises
            raise ModelError(f"cannot read the joblib file {path}: {exc!r}") from None
    import skops.io as sio

    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as exc:  # skops raises its own errors on a damaged file
        raise ModelError(f"cannot read the skops file {path}: {exc!r}") from None
    foreign = [t for t in untrusted if not t.startswith(_TRUSTED_MODULES)]
    if foreign:
        raise ModelError(
            f"{path} holds types skops does not trust by default and that are not "
            f"scikit-learn's or numpy's ({', '.join(foreign)}); mlinvert loads a .skops "
            "file only when it holds nothing else: re-save the model from scikit-learn "
            "types only, or inspect it yourself and save it as .joblib"
        )
    return sio.load(path, trusted=untrusted)


def export_onnx(model: Any, path: str | Path) -> Path:
    """Write a torch target (a trained mlinvert model) as ONNX: logits of one input."""
    import torch

    out = Path(path)
    example = torch.zeros((1, *model.input_shape_), dtype=torch.float32)
    with warnings.catch_warnings():  # the TorchScript-based exporter: no onnxscript needed
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.net_,
            (example,),
            str(out),
            dynamo=False,
            input_names=["pixels"],
            output_names=["logits"],
            dynamic_axes={"pixels": {0: "n"}, "logits": {0: "n"}},
        )
    return out


def export_torchscript(model: Any, path: str | Path) -> Path:
    """Write a torch target as TorchScript, its input shape in the file's extra data."""
    import json

    import torch

    out = Path(path)
    example = torch.zeros((1, *model.input_shape_), dtype=torch.float32)
    traced = torch.jit.trace(model.net_.eval(), example)
    shape = json.dumps({"input_shape": list(model.input_shape_)})
    torch.jit.save(traced, str(out), _extra_files={"mlinvert.json": shape})
    return out
