"""Tiny toy targets for the service tests: a numpy softmax image model and a tabular one."""

from __future__ import annotations

from typing import Any

import numpy as np

from mlinvert.errors import QueryRejected


class ToySoftmax:
    """Multinomial logistic regression on (h, w) images in [0, 1] (numpy only)."""

    kind = "toy-softmax"

    def __init__(self, shape: tuple[int, int] = (6, 5), n_classes: int = 5, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.input_shape_: tuple[int, ...] = shape
        self.classes_ = np.arange(n_classes, dtype=np.int64)
        self.class_names_: tuple[str, ...] = tuple(f"s{i + 1}" for i in range(n_classes))
        self.W = rng.normal(0, 3.0, size=(int(np.prod(shape)), n_classes))
        self.b = rng.normal(0, 0.5, size=n_classes)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Softmax scores."""
        z = X.reshape(X.shape[0], -1).astype(np.float64) @ self.W + self.b
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Argmax class."""
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def class_gradient(self, X: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """d p_label / d x."""
        p = self.predict_proba(X)
        rows = np.arange(X.shape[0])
        pl = p[rows, labels]
        grad = pl[:, None] * (self.W[:, labels].T - p @ self.W.T)
        return grad.reshape(X.shape).astype(np.float32)


COLORS = ("red", "green", "blue")


class ToyTabular:
    """A survey-style model on {age: number 0..100, color: red|green|blue}, with confidence."""

    kind = "toy-tabular"
    feature_names_ = ("age", "color")
    input_shape_: tuple[int, ...] = (4,)
    classes_ = np.array([0, 1], dtype=np.int64)
    class_names_: tuple[str, ...] = ("no", "yes")

    def encode_records(self, records: list[dict[str, Any]]) -> np.ndarray:
        """Encode records; QueryRejected names the field."""
        out = np.zeros((len(records), 4), dtype=np.float32)
        for i, rec in enumerate(records):
            for field in rec:
                if field not in self.feature_names_:
                    raise QueryRejected(
                        f"record {i}: unknown field {field!r}; fields: {self.feature_names_}"
                    )
            for field in self.feature_names_:
                if field not in rec:
                    raise QueryRejected(f"record {i}: missing field {field!r}")
            age = rec["age"]
            if isinstance(age, bool) or not isinstance(age, int | float) or not 0 <= age <= 100:
                raise QueryRejected(f"record {i}: field 'age' must be a number in 0..100")
            if rec["color"] not in COLORS:
                raise QueryRejected(
                    f"record {i}: unknown category {rec['color']!r} for field 'color'; "
                    f"expected one of {COLORS}"
                )
            out[i, 0] = age / 100.0
            out[i, 1 + COLORS.index(rec["color"])] = 1.0
        return out

    def check_input(self, X: np.ndarray) -> np.ndarray:
        """Validate encoded rows."""
        if X.dtype.kind not in "fiu":
            raise QueryRejected(f"encoded rows must be numbers, got {X.dtype}")
        X = X.astype(np.float32)
        if not np.isfinite(X).all() or X.min() < 0 or X.max() > 1:
            raise QueryRejected("encoded rows must be finite and in [0, 1]")
        if not np.all(np.isin(X[:, 1:], (0.0, 1.0))) or not np.all(X[:, 1:].sum(axis=1) == 1):
            raise QueryRejected("field 'color' must be one-hot encoded")
        return X

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Logistic in age, shifted by colour."""
        z = 6.0 * (X[:, 0] - 0.5) + X[:, 1:] @ np.array([1.0, -1.0, 0.2])
        p1 = 1.0 / (1.0 + np.exp(-z))
        return np.stack([1 - p1, p1], axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Argmax class."""
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def confidence(self, X: np.ndarray) -> np.ndarray:
        """Confidence of the predicted label (the max probability, shrunk a little)."""
        return 0.9 * self.predict_proba(X).max(axis=1)
