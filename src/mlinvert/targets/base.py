"""What every target model offers (scikit-learn conventions).

A target is fitted with ``fit(X, y) -> self``; fitted attributes end in ``_``. The
face recognisers take images ``(n, h, w)`` float32 in [0, 1]; normalisation lives
inside the model. Trees take encoded survey rows.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Target(Protocol):
    """A fitted classifier that a :class:`~mlinvert.defenses.Predictor` can serve."""

    kind: str  # e.g. "softmax", "mlp", "dae", "cnn", "evaluation", "tree"
    classes_: np.ndarray
    class_names_: tuple[str, ...]
    input_shape_: tuple[int, ...]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, k)`` float32/float64 for a batch ``X``."""
        ...

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Most likely class index per row (int64)."""
        ...


@runtime_checkable
class Differentiable(Protocol):
    """A target whose class probability can be differentiated w.r.t. its input."""

    def class_gradient(self, X: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Gradient of ``p_label(x)`` w.r.t. ``x`` for each row; same shape as ``X``."""
        ...


@runtime_checkable
class Confident(Protocol):
    """A target that answers a single confidence per row (BigML-style trees)."""

    def confidence(self, X: np.ndarray) -> np.ndarray:
        """Confidence of the predicted label per row, float64 in [0, 1]."""
        ...


def card_base(model: Any) -> dict[str, Any]:
    """The model-card fields that every target shares."""
    return {
        "kind": model.kind,
        "class_names": list(model.class_names_),
        "input_shape": list(model.input_shape_),
    }


@runtime_checkable
class Tabular(Protocol):
    """A target on named survey features (trees); inputs are encoded rows.

    ``encode_records`` turns JSON-style records (``{feature: value}``) into the encoded
    float array the model takes, raising QueryRejected that names the field on an
    unknown field, a missing field, an unknown category or a wrong type.
    ``check_input`` validates an already encoded batch (raising QueryRejected).
    """

    feature_names_: tuple[str, ...]

    def encode_records(self, records: list[dict[str, Any]]) -> np.ndarray:
        """Encode records; QueryRejected names the offending field."""
        ...

    def check_input(self, X: np.ndarray) -> np.ndarray:
        """Validate an encoded batch and return it as float32."""
        ...
