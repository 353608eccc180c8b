"""The tree audit: the paper's result shape, record schema, tables, sweep, plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlinvert.data.surveys import SurveyDataset
from mlinvert.evaluation.trees import (
    binary_metrics,
    plot_depth_sweep,
    render_defense_table,
    render_tree_table,
    run_tree_audit,
    sweep_verdict,
)

KEYS = {
    "dataset",
    "estimator",
    "population",
    "defense",
    "accuracy",
    "precision",
    "recall",
    "mcc",
    "gmean",
    "n_queries",
    "model_accuracy",
    "status",
}


def _get(records: list[dict[str, Any]], **where: Any) -> dict[str, Any]:
    hits = [r for r in records if all(r[k] == v for k, v in where.items())]
    assert len(hits) == 1, where
    return hits[0]


def test_binary_metrics_numbers() -> None:
    m = binary_metrics(np.array([1, 1, 0, 0, 0]), np.array([1, 0, 1, 0, 0]))
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5)
    assert m["mcc"] == pytest.approx((1 * 2 - 1 * 1) / (2 * 2 * 3 * 3) ** 0.5)
    assert m["gmean"] == pytest.approx((0.5 * 2 / 3) ** 0.5)
    none = binary_metrics(np.array([1, 0]), np.array([0, 0]))
    assert none["precision"] == 0.0 and none["mcc"] == 0.0


@pytest.fixture(scope="module")
def steak_records(steak: SurveyDataset) -> list[dict[str, Any]]:
    return run_tree_audit(steak, seed=0, depths=(1, 3), dp_epsilons=(1.0,), max_depths=(4,))


def test_steak_paper_shape(steak_records: list[dict[str, Any]], steak: SurveyDataset) -> None:
    for r in steak_records:
        assert set(r) >= KEYS and r["status"] == "succeeded"
    wb = _get(steak_records, estimator="white-box", population="members", defense="none")
    bb = _get(steak_records, estimator="black-box-2014", population="members", defense="full")
    wb_out = _get(steak_records, estimator="white-box", population="non-members", defense="none")
    no = _get(steak_records, estimator="always-no", population="members")
    assert wb["precision"] > bb["precision"] + 0.1
    assert bb["precision"] > wb_out["precision"] + 0.1
    assert wb["accuracy"] > no["accuracy"] and wb["mcc"] > 0.3
    assert bb["n_queries"] == 2 * steak.split.train.size
    assert no["precision"] == 0.0 and no["accuracy"] == pytest.approx(
        1 - steak.X[steak.split.train, steak.sensitive_index].mean()
    )


def test_tables_sweep_and_plot(steak_records: list[dict[str, Any]], tmp_path: Path) -> None:
    table = render_tree_table(steak_records)
    assert "| steak | white-box |" in table and "86.4 / 100.0 / 21.1" in table
    assert "depth:3" in render_defense_table(steak_records)
    verdict = sweep_verdict(steak_records)
    assert "exclude-sensitive" in verdict["defenses_meeting_bar"]
    png = plot_depth_sweep(steak_records, tmp_path / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shallow = _get(
        steak_records, estimator="white-box", population="members", defense="max-depth:4"
    )
    assert shallow["model_accuracy"] > 0 and shallow["n_queries"] == 0
    dp = _get(steak_records, estimator="white-box", population="members", defense="dp:1")
    assert (
        dp["precision"]
        < _get(steak_records, estimator="white-box", population="members", defense="none")[
            "precision"
        ]
    )


def test_fair_members_leak_more(fair: SurveyDataset) -> None:
    records = run_tree_audit(fair, seed=0, policies=("full",))
    inside = _get(records, estimator="white-box", population="members", defense="none")
    outside = _get(records, estimator="white-box", population="non-members", defense="none")
    assert inside["precision"] > outside["precision"] + 0.2
