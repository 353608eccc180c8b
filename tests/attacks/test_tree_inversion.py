"""Attribute-inversion estimators: exact white-box scores, query counting, policies."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mlinvert.attacks.tree_inversion import (
    BlackBox2014,
    ConfidenceBlackBox,
    Knowledge,
    LabelOnlyMatch,
    WhiteBoxCounts,
    decide,
    training_confusion,
)
from mlinvert.data.surveys import SurveyDataset
from mlinvert.defenses import Predictor, parse_policy
from mlinvert.errors import AttackError
from mlinvert.oracle import LocalOracle
from mlinvert.oracle.wrappers import Budgeted
from mlinvert.targets.tree import DecisionTreeTarget, train_tree


def _tiny_document() -> dict[str, Any]:
    """Root splits on the sensitive feature s; the right branch then splits on a."""
    return {
        "format": "mlinvert-tree/1",
        "kind": "tree",
        "features": [
            {"name": "a", "categories": ["a0", "a1"], "ordered": False},
            {"name": "s", "categories": ["no", "yes"], "ordered": False},
        ],
        "classes": ["c0", "c1"],
        "sensitive": "s",
        "config": {},
        "nodes": [
            {
                "depth": 0,
                "counts": [9, 8],
                "split": {"feature": "s", "left": ["no"]},
                "children": [1, 2],
            },
            {"depth": 1, "counts": [8, 2]},
            {
                "depth": 1,
                "counts": [1, 6],
                "split": {"feature": "a", "left": ["a0"]},
                "children": [3, 4],
            },
            {"depth": 2, "counts": [0, 5]},
            {"depth": 2, "counts": [1, 1]},
        ],
    }


def test_white_box_scores_exact_on_hand_made_tree() -> None:
    priors = (np.array([0.5, 0.5]), np.array([0.7, 0.3]))
    X = np.array([[0, 0], [1, 0], [0, 0]], dtype=np.float32)
    y = np.array([1, 1, 0])
    k = Knowledge(X=X, y=y, sensitive_index=1, priors=priors)
    r = WhiteBoxCounts(_tiny_document()).run(None, k)
    # volume(leaf 1) = 1 * 0.7; leaf 3 = 0.5 * 0.3; leaf 4 = 0.5 * 0.3
    expected = np.array(
        [
            [2 * 0.7 / 0.7, 5 * 0.3 / 0.15],
            [2 * 0.7 / 0.7, 1 * 0.3 / 0.15],
            [8 * 0.7 / 0.7, 0 * 0.3 / 0.15],
        ]
    )
    assert np.allclose(r.scores, expected)
    assert r.guesses.tolist() == [1, 0, 0]  # row 2 ties at 2 vs 2: the prior says "no"
    assert r.n_queries == 0
    p = WhiteBoxCounts(_tiny_document(), rule="predicted-label").run(None, k)
    # leaf 1 predicts c0, leaf 3 c1 (5 rows), leaf 4 ties -> c0
    assert np.allclose(p.scores[:2], [[0.0, 5 * 0.3], [0.7, 0.3]])
    assert p.guesses.tolist()[:2] == [1, 0]


def test_decide_breaks_ties_by_prior() -> None:
    prior = np.array([0.2, 0.8])
    assert decide(np.array([[1.0, 1.0], [2.0, 1.0]]), prior).tolist() == [1, 0]


def _oracle(model: DecisionTreeTarget, policy: str = "full") -> LocalOracle:
    return LocalOracle(Predictor(model, name="t", policy=parse_policy(policy)))


def test_black_box_counts_queries_exactly(steak: SurveyDataset) -> None:
    model, _ = train_tree(steak, seed=0)
    k = Knowledge.of(steak, "non-members")
    m = len(steak.domains[steak.sensitive_index])
    confusion = training_confusion(model, *steak.members())
    for est in (BlackBox2014(confusion), ConfidenceBlackBox(), LabelOnlyMatch()):
        oracle = _oracle(model)
        r = est.run(oracle, k, seed=0)
        assert r.n_queries == oracle.n_queries == k.n * m
        assert r.status == "succeeded" and r.n_answered == k.n
    # same answers through the oracle as from the model: label-only equals a local rerun
    cand = k.candidates()
    match = model.predict(cand).reshape(k.n, m) == k.y[:, None]
    local = decide(k.prior[None, :] * np.where(match, 1.0, 1e-3), k.prior)
    assert np.array_equal(LabelOnlyMatch().run(_oracle(model), k).guesses, local)


def test_budget_stops_cleanly(steak: SurveyDataset) -> None:
    model, _ = train_tree(steak, seed=0)
    k = Knowledge.of(steak, "members")
    from mlinvert.attacks.tree_inversion import TreeAttackConfig

    est = LabelOnlyMatch(TreeAttackConfig(batch_size=64))
    r = est.run(Budgeted(_oracle(model), 200), k)
    assert r.status == "budget_exhausted"
    assert r.n_queries <= 200 and r.n_answered == r.n_queries // 2 < k.n
    assert r.guesses.shape == (k.n,)


def test_labels_policy_withholds_confidence(steak: SurveyDataset) -> None:
    model, _ = train_tree(steak, seed=0, quick=True)
    k = Knowledge.of(steak, "non-members")
    labels_only = _oracle(model, "labels")
    with pytest.raises(AttackError, match="needs confidences"):
        ConfidenceBlackBox().run(labels_only, k)
    assert labels_only.n_queries == 0  # refused before paying for any query
    full = LabelOnlyMatch().run(_oracle(model), k)
    labels = LabelOnlyMatch().run(_oracle(model, "labels"), k)
    assert np.array_equal(full.guesses, labels.guesses)


def test_white_box_sums_paths_when_a_feature_is_unknown() -> None:
    priors = (np.array([0.5, 0.5]), np.array([0.7, 0.3]))
    X = np.array([[0, 0], [1, 0]], dtype=np.float32)
    k = Knowledge(X=X, y=np.array([1, 0]), sensitive_index=1, priors=priors, unknown=(0,))
    r = WhiteBoxCounts(_tiny_document()).run(None, k)
    # a unknown: "yes" reaches leaves 3 and 4, each of volume 0.3 (s only)
    assert np.allclose(r.scores, [[2.0, (5 + 1) * 0.3 / 0.3], [8.0, (0 + 1) * 0.3 / 0.3]])
    assert r.guesses.tolist() == [1, 0]


def test_unknown_features_multiply_queries(steak: SurveyDataset) -> None:
    model, _ = train_tree(steak, seed=0)
    full = Knowledge.of(steak, "non-members")
    part = Knowledge.of(steak, "non-members", unknown=("age", "gender"))
    combos = len(steak.domains[steak.feature_names.index("age")]) * len(
        steak.domains[steak.feature_names.index("gender")]
    )
    assert part.n_combos == combos and part.combos()[1].sum() == pytest.approx(1.0)
    oracle = _oracle(model)
    r = BlackBox2014(training_confusion(model, *steak.members())).run(oracle, part)
    assert r.n_queries == oracle.n_queries == full.n * 2 * combos
    # the white-box path sum with nothing unknown equals the one-path traversal
    wb = WhiteBoxCounts(model.to_document())
    summed = wb._sum_paths(full, _volume(wb, full))
    one_path = wb.run(None, full).scores
    empty = summed.max(axis=1) <= 0  # run() falls back to the prior there
    assert np.allclose(summed[~empty], one_path[~empty])
    assert np.allclose(one_path[empty], full.prior)


def _volume(wb: WhiteBoxCounts, k: Knowledge) -> np.ndarray:
    v = np.ones(wb.tree.n_nodes_)
    for j, name in enumerate(wb.tree.feature_names_):
        v *= wb.allowed[name].astype(float) @ k.priors[j]
    return v


def test_respondent_larger_than_a_batch_is_split(steak: SurveyDataset) -> None:
    from mlinvert.attacks.tree_inversion import TreeAttackConfig

    model, _ = train_tree(steak, seed=0)
    part = Knowledge.of(steak, "non-members", unknown=("age", "income"))
    per = 2 * part.n_combos  # 60 candidate rows per respondent
    small = LabelOnlyMatch(TreeAttackConfig(batch_size=16)).run(_oracle(model), part)
    big = LabelOnlyMatch().run(_oracle(model), part)
    assert small.n_queries == big.n_queries == part.n * per
    assert np.array_equal(small.guesses, big.guesses)
    cut = LabelOnlyMatch(TreeAttackConfig(batch_size=16)).run(Budgeted(_oracle(model), 100), part)
    assert cut.status == "budget_exhausted" and cut.n_answered == 1
