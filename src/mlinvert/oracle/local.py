"""LocalOracle: the in-process oracle, through the same Predictor as the HTTP service."""

from __future__ import annotations

import numpy as np

from mlinvert.core import OracleInfo, Response
from mlinvert.defenses.predictor import Predictor
from mlinvert.errors import GradientUnavailable
from mlinvert.targets.base import Differentiable


class LocalOracle:
    """Query ``predictor`` as ``account``; counts every input answered."""

    def __init__(self, predictor: Predictor, account: str = "local") -> None:
        self.predictor = predictor
        self.account = account
        self._n = 0

    @property
    def info(self) -> OracleInfo:
        """The predictor's info."""
        return self.predictor.info

    @property
    def n_queries(self) -> int:
        """Inputs answered so far."""
        return self._n

    def query(self, x: np.ndarray) -> Response:
        """Answer a batch through the predictor (defences apply)."""
        response = self.predictor.predict(x, account=self.account)
        self._n += len(response)
        return response


class WhiteBoxOracle(LocalOracle):
    """A LocalOracle that also exposes ``class_gradient`` (white-box attacker).

    Output defences do not apply to gradients: the white-box attacker holds the model.
    """

    def __init__(self, predictor: Predictor, account: str = "local") -> None:
        if not isinstance(predictor.model, Differentiable):
            raise GradientUnavailable(
                f"model {predictor.name!r} ({predictor.model.kind}) is not differentiable; "
                "use a black-box gradient source (FiniteDifferences, NES, SPSA) instead"
            )
        super().__init__(predictor, account)

    def class_gradient(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Gradient of ``p_label(x)`` w.r.t. ``x`` from the target itself (counted)."""
        model = self.predictor.model
        assert isinstance(model, Differentiable)  # checked in __init__
        x = self.predictor.validate(x)
        self._n += x.shape[0]  # a gradient is one model evaluation per input
        return model.class_gradient(x, labels)
