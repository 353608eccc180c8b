"""Label-only inversion makes measurable progress using labels alone."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mlinvert.attacks import LabelOnly, LabelOnlyConfig, PCAPrior
from mlinvert.defenses import Predictor, parse_policy
from mlinvert.errors import ConfigError
from mlinvert.oracle import LocalOracle


def test_label_only_moves_deeper_into_the_class(digits: Any, toy_softmax: Any) -> None:
    oracle = LocalOracle(Predictor(toy_softmax, name="toy", policy=parse_policy("labels")))
    X, y = digits.train()
    means = np.stack([X[y == c].mean(axis=0) for c in range(10)])
    Xa, ya = digits.test()
    hits = 0
    for label in (0, 2, 7):
        attack = LabelOnly(
            LabelOnlyConfig(max_iter=80, n_directions=24), space=PCAPrior(Xa[ya != label], 20)
        )
        result = attack.run(oracle, label, seed=0, budget=3000)
        per = result.per_label[0]
        assert per["start_found"] and result.n_queries <= 3000
        assert per["radius"] > LabelOnlyConfig().initial_radius  # grew: deeper in the class
        assert toy_softmax.predict(result.reconstructions)[0] == label
        assert np.isnan(result.confidence[0])
        corr = [np.corrcoef(result.reconstructions[0].ravel(), m.ravel())[0, 1] for m in means]
        hits += int(np.argmax(corr) == label)
    assert hits >= 2


def test_label_only_reports_budget_and_bad_config(toy_softmax: Any) -> None:
    oracle = LocalOracle(Predictor(toy_softmax, name="toy", policy=parse_policy("labels")))
    result = LabelOnly(LabelOnlyConfig(max_iter=1000)).run(oracle, 1, seed=0, budget=200)
    assert result.status in ("budget_exhausted", "failed")
    assert oracle.n_queries <= 200
    with pytest.raises(ConfigError):
        LabelOnlyConfig(initial_radius=10, max_radius=1)
