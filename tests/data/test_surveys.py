"""Survey loaders: shapes, domains, missing-value rules, member/non-member split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlinvert.data import load
from mlinvert.data.surveys import MISSING, SurveyDataset, load_gss, load_steak
from mlinvert.errors import DataError


def _check_common(d: SurveyDataset) -> None:
    assert d.X.dtype == np.float32 and d.y.dtype == np.int64
    sizes = np.array([len(dom) for dom in d.domains])
    assert (d.X >= 0).all() and (sizes > d.X).all() and (np.round(d.X) == d.X).all()
    assert np.intersect1d(d.split.train, d.split.test).size == 0
    assert d.split.train.size + d.split.test.size == d.X.shape[0]
    for p in d.priors:
        assert p.sum() == pytest.approx(1.0)
    assert MISSING not in d.domains[d.sensitive_index]


def test_steak_shape_rules_and_split(steak: SurveyDataset, steak_path: Path) -> None:
    _check_common(steak)
    # 550 rows; 118 without a steak preparation, 2 more without a cheating answer
    assert steak.X.shape == (430, 12)
    assert steak.meta["dropped"]["missing target or sensitive answer"] == 120
    assert steak.sensitive == "cheated" and steak.domains[steak.sensitive_index] == ("No", "Yes")
    assert (steak.split.train.size, steak.split.test.size) == (301, 129)
    income = steak.feature_names.index("income")
    raw = pd.read_csv(
        steak_path / "steak-risk-survey.csv", skiprows=[1], dtype=str, keep_default_na=False
    )
    kept = raw[(raw.iloc[:, 9] != "") & (raw.iloc[:, 7] != "")]
    n_missing = int((kept["Household Income"] == "").sum())
    assert n_missing > 0
    assert int((steak.X[:, income] == steak.domains[income].index(MISSING)).sum()) == n_missing
    assert int(steak.X[:, steak.sensitive_index].sum()) == int((kept.iloc[:, 7] == "Yes").sum())
    other = load_steak(str(steak_path), seed=1)
    assert not np.array_equal(other.split.train, steak.split.train)
    assert np.array_equal(load_steak(str(steak_path), seed=0).split.train, steak.split.train)


def test_gss_members_and_missing_codes(gss: SurveyDataset, gss_path: Path) -> None:
    _check_common(gss)
    assert gss.X.shape == (20314, 11)
    assert (gss.split.train.size, gss.split.test.size) == (15235, 5079)
    assert gss.split.train.max() < gss.split.test.min()
    raw = pd.concat(
        [pd.read_csv(gss_path / f, dtype=str) for f in ("GSS_15235.csv", "GSS_5079.csv")],
        ignore_index=True,
    )
    for col, codes in (
        ("age", {"99"}),
        ("educ", {"98", "99"}),
        ("childs", {"9"}),
        ("pornlaw", {"noanswer"}),
        ("divorce", {"noanswer"}),
    ):
        j = gss.feature_names.index(col)
        got = gss.X[:, j] == gss.domains[j].index(MISSING)
        assert np.array_equal(got, raw[col].isin(codes).to_numpy()), col
    xm = gss.sensitive_index
    assert int(gss.X[gss.split.train, xm].sum()) == 3017
    assert int(gss.X[gss.split.test, xm].sum()) == 985
    assert load_gss(str(gss_path / "GSS_5079.csv")).X.shape == gss.X.shape


def test_fair_embedded(fair: SurveyDataset) -> None:
    _check_common(fair)
    assert fair.X.shape == (6366, 8) and fair.n_classes == 5
    assert fair.split.train.size == 4456
    assert 0.25 < fair.X[:, fair.sensitive_index].mean() < 0.4


def test_dispatcher_and_bad_paths(tmp_path: Path, steak_path: Path) -> None:
    steak = load(f"steak:{steak_path}")
    assert isinstance(steak, SurveyDataset) and steak.name == "steak"
    with pytest.raises(DataError, match="not found"):
        load(f"steak:{tmp_path / 'nope.csv'}")
    bad = tmp_path / "steak-risk-survey.csv"
    bad.write_text("a,b\n,x\n1,2\n")
    with pytest.raises(DataError, match="no column"):
        load_steak(str(tmp_path))
    (tmp_path / "GSS_15235.csv").write_text("year,sex\n2000,male\n")
    (tmp_path / "GSS_5079.csv").write_text("year,sex\n2000,male\n")
    with pytest.raises(DataError, match="lacks the columns"):
        load_gss(str(tmp_path))
    with pytest.raises(DataError, match="GSS_15235"):
        load_gss(str(tmp_path / "other.csv"))


def test_records_round_trip(steak: SurveyDataset) -> None:
    records = steak.decode(steak.X[:5])
    assert np.array_equal(steak.encode_records(records), steak.X[:5])
    with pytest.raises(DataError, match="'age'"):
        steak.encode_records([{**records[0], "age": "150"}])
