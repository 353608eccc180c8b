"""The BigML-like tree: counts, Wilson confidence, encoding errors, state, countermeasures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlinvert.data.surveys import SurveyDataset
from mlinvert.defenses import Predictor
from mlinvert.errors import ConfigError, QueryRejected
from mlinvert.targets.base import Confident, Tabular, Target
from mlinvert.targets.tree import DecisionTreeTarget, TreeConfig, train_tree, wilson_lower


def test_wilson_lower_bound_numbers() -> None:
    got = wilson_lower(np.array([1, 8, 50, 0]), np.array([1, 10, 100, 0]))
    # 1/1: n / (n + z^2); 8/10 and 50/100 from the closed form (z = 1.96)
    assert got[0] == pytest.approx(1 / (1 + 1.96**2))
    assert got[1] == pytest.approx(0.4902, abs=1e-4)
    assert got[2] == pytest.approx(0.4038, abs=1e-4)
    assert got[3] == 0.0


def _consistent(model: DecisionTreeTarget, X: np.ndarray, y: np.ndarray) -> None:
    k = len(model.class_names_)
    assert np.array_equal(model.counts_[0], np.bincount(y, minlength=k))
    inner = np.flatnonzero(model.feature_ >= 0)
    kids = model.counts_[model.children_left_[inner]] + model.counts_[model.children_right_[inner]]
    assert np.allclose(model.counts_[inner], kids)
    leaves = model.apply(X)
    per_leaf = np.zeros_like(model.counts_)
    np.add.at(per_leaf, (leaves, y), 1)
    assert np.array_equal(per_leaf[model.feature_ < 0], model.counts_[model.feature_ < 0])


def test_counts_confidence_and_protocols(steak: SurveyDataset) -> None:
    model, card = train_tree(steak, seed=0)
    X, y = steak.members()
    _consistent(model, X, y)
    assert isinstance(model, Target) and isinstance(model, Confident)
    assert isinstance(model, Tabular)
    proba = model.predict_proba(steak.X)
    assert np.allclose(proba.sum(1), 1.0)
    leaf = model.counts_[model.apply(steak.X)]
    expected = wilson_lower(leaf.max(1), leaf.sum(1))
    assert np.allclose(model.confidence(steak.X), expected)
    assert card["train_accuracy"] > 0.6 and card["n_nodes"] == model.n_nodes_


def test_document_and_state_round_trip(steak: SurveyDataset, tmp_path: Path) -> None:
    model, card = train_tree(steak, seed=0)
    doc = json.loads(json.dumps(model.to_document()))
    again = DecisionTreeTarget.from_document(doc)
    assert np.array_equal(again.predict_proba(steak.X), model.predict_proba(steak.X))
    tensors, params = model.get_state()
    same = DecisionTreeTarget.from_state(tensors, params)
    assert np.array_equal(same.confidence(steak.X), model.confidence(steak.X))
    io = pytest.importorskip("mlinvert.targets.io")
    io.save(model, tmp_path / "tree", card=card)
    loaded = io.load(tmp_path / "tree")
    assert np.array_equal(loaded.predict(steak.X), model.predict(steak.X))
    assert np.array_equal(loaded.confidence(steak.X), model.confidence(steak.X))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, "unknown field 'colour'"),
        ({"age": "150"}, "field 'age' has unknown category"),
        ({"smoke": True}, "field 'smoke' must be a string"),
        ({"smoke": None}, "field 'smoke' must be a string"),
    ],
)
def test_encode_records_names_the_field(
    steak: SurveyDataset, change: dict[str, object], message: str
) -> None:
    model, _ = train_tree(steak, seed=0, quick=True)
    record = {**steak.decode(steak.X[:1])[0], **change}
    with pytest.raises(QueryRejected, match=message):
        model.encode_records([record])


def test_missing_field_and_bad_codes(steak: SurveyDataset) -> None:
    model, _ = train_tree(steak, seed=0, quick=True)
    record = steak.decode(steak.X[:1])[0]
    del record["gender"]
    with pytest.raises(QueryRejected, match="missing field 'gender'"):
        model.encode_records([record])
    bad = steak.X[:2].copy()
    bad[1, steak.feature_names.index("location")] = 42
    with pytest.raises(QueryRejected, match="field 'location'"):
        Predictor(model, name="t").predict(bad, account="a")
    bad[1, 0] = 0.5
    with pytest.raises(QueryRejected, match="field 'lottery'"):
        model.check_input(bad)


@pytest.mark.parametrize("depth", [0, 2, 4])
def test_privacy_aware_tree_uses_sensitive_only_at_depth(fair: SurveyDataset, depth: int) -> None:
    model, _ = train_tree(fair, seed=0, config=TreeConfig(max_depth=8, sensitive_depth=depth))
    s = fair.sensitive_index
    at = model.feature_ == s
    assert at.any() and set(model.depth_[at].tolist()) == {depth}
    # a node at that depth splits on something else only if no sensitive split is allowed
    X = fair.members()[0].astype(np.int64)
    rows = {0: np.arange(X.shape[0])}
    for node in np.argsort(model.depth_, kind="stable"):
        j = model.feature_[node]
        if j < 0:
            continue
        left = model.left_set_[node, X[rows[node], j]]
        rows[model.children_left_[node]] = rows[node][left]
        rows[model.children_right_[node]] = rows[node][~left]
        if model.depth_[node] == depth and j != s:
            n_yes = int(X[rows[node], s].sum())
            assert min(n_yes, rows[node].size - n_yes) < model.config.min_samples_leaf
    _consistent(model, *fair.members())
    never, _ = train_tree(fair, seed=0, config=TreeConfig(max_depth=8, exclude_sensitive=True))
    assert not (never.feature_ == s).any()


def test_dp_tree_noisy_counts(fair: SurveyDataset) -> None:
    cfg = TreeConfig(dp_epsilon=1.0, dp_depth=5)
    a, _ = train_tree(fair, seed=3, config=cfg)
    b, _ = train_tree(fair, seed=3, config=cfg)
    assert np.array_equal(a.counts_, b.counts_)
    assert (a.counts_ >= 0).all() and a.depth_.max() == 5
    inner = a.feature_ >= 0
    kids = a.counts_[a.children_left_[inner]] + a.counts_[a.children_right_[inner]]
    assert np.allclose(a.counts_[inner], kids)
    true_root = np.bincount(fair.members()[1], minlength=5)
    assert not np.array_equal(a.counts_[0], true_root)  # noise was added
    assert np.abs(a.counts_[0] - true_root).sum() < 0.2 * true_root.sum()


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        TreeConfig(sensitive_depth=2, exclude_sensitive=True)
    with pytest.raises(ConfigError):
        TreeConfig(dp_epsilon=0.0)
    with pytest.raises(ConfigError):
        TreeConfig(max_depth=3, sensitive_depth=3)
