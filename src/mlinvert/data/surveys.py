"""Lifestyle surveys for the decision-tree setting (Fredrikson, Jha, Ristenpart, CCS 2015).

Every survey becomes a :class:`SurveyDataset`: named categorical features, each with a
fixed value domain (numeric answers are binned into the documented categories below),
an encoded matrix ``X`` and a target ``y``.

Encoding
--------
``X[i, j]`` is the index of respondent ``i``'s answer in ``domains[j]``, stored as
float32 (an integer category code, never a one-hot vector). ``y[i]`` is the index into
``class_names`` (int64). The sensitive feature is one of the columns of ``X``: a target
model takes it as input like any other answer; the attacker does not know it.

Missing answers
---------------
- Rows missing the target or the sensitive answer are dropped (they carry nothing to
  predict or to infer); the counts are in ``meta["dropped"]``.
- Any other missing answer is kept as its own category ``"missing"`` (the last code of
  that feature's domain), so no respondent is lost for one skipped question.
- GSS no-answer codes are explicit: ``childs`` 9, ``age`` 99, ``educ`` 98/99 and the
  text value ``noanswer`` (``divorce``, ``relig``, ``pornlaw``) all become ``"missing"``.

Members and non-members
-----------------------
``split.train`` are the members (the private training set), ``split.test`` the
non-members. Steak and fair: a seeded random 70/30 split. GSS: ``GSS_15235.csv`` rows
are members, ``GSS_5079.csv`` rows non-members (rows of both files are concatenated in
that order). ``priors`` are the marginal frequencies of every feature on the members,
which the attacker is assumed to know (as in the paper).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlinvert.core import Seed, rng_from
from mlinvert.data.base import Split
from mlinvert.errors import DataError, MlinvertError, QueryRejected

MISSING = "missing"
MEMBER_FRACTION = 0.7


@dataclass(frozen=True, eq=False)
class SurveyDataset:
    """A categorical survey: encoded answers ``X``, target ``y``, sensitive feature.

    ``domains[j]`` lists the category names of feature ``j`` (code = position);
    ``ordered[j]`` says whether the categories have a natural order (trees may then
    also split on ``code <= c``). ``sensitive_positive`` is the code of the sensitive
    "yes" answer, the value whose disclosure is measured.
    """

    spec: str
    name: str
    feature_names: tuple[str, ...]
    domains: tuple[tuple[str, ...], ...]
    ordered: tuple[bool, ...]
    X: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...]
    target_name: str
    sensitive: str
    sensitive_positive: int
    split: Split
    meta: dict[str, Any] = field(default_factory=dict)

    kind = "survey"

    def __post_init__(self) -> None:
        d = len(self.feature_names)
        if len(self.domains) != d or len(self.ordered) != d:
            raise DataError("feature_names, domains and ordered must have one entry per feature")
        if self.X.dtype != np.float32 or self.X.ndim != 2 or self.X.shape[1] != d:
            raise DataError(f"X must be float32 (n, {d}), got {self.X.dtype} {self.X.shape}")
        if self.y.dtype != np.int64 or self.y.shape != (self.X.shape[0],):
            raise DataError("y must be int64 with one entry per row of X")
        if self.sensitive not in self.feature_names:
            raise DataError(f"sensitive feature {self.sensitive!r} is not a feature")
        sizes = np.array([len(dom) for dom in self.domains])
        if self.X.size and (self.X.min() < 0 or (self.X.max(axis=0) >= sizes).any()):
            raise DataError("X holds a code outside its feature's domain")

    @property
    def sensitive_index(self) -> int:
        """Column of the sensitive feature in ``X``."""
        return self.feature_names.index(self.sensitive)

    @property
    def n_features(self) -> int:
        """Number of features (the sensitive one included)."""
        return len(self.feature_names)

    @property
    def n_classes(self) -> int:
        """Number of target classes."""
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int]:
        """Shape of one encoded row."""
        return (self.n_features,)

    @property
    def priors(self) -> tuple[np.ndarray, ...]:
        """Marginal frequency of every category of every feature, on the members."""
        members = self.X[self.split.train].astype(np.int64)
        out = []
        for j, dom in enumerate(self.domains):
            counts = np.bincount(members[:, j], minlength=len(dom)).astype(np.float64)
            out.append(counts / max(counts.sum(), 1.0))
        return tuple(out)

    def members(self) -> tuple[np.ndarray, np.ndarray]:
        """Encoded rows and labels of the training-set members."""
        return self.X[self.split.train], self.y[self.split.train]

    def nonmembers(self) -> tuple[np.ndarray, np.ndarray]:
        """Encoded rows and labels of the non-members (never seen in training)."""
        return self.X[self.split.test], self.y[self.split.test]

    def train(self) -> tuple[np.ndarray, np.ndarray]:
        """Alias of :meth:`members` (same name as on image data sets)."""
        return self.members()

    def test(self) -> tuple[np.ndarray, np.ndarray]:
        """Alias of :meth:`nonmembers`."""
        return self.nonmembers()

    def encode_records(self, records: Sequence[dict[str, Any]]) -> np.ndarray:
        """Encode ``{feature: category}`` records; DataError names a bad field."""
        return encode_records(records, self.feature_names, self.domains, error=DataError)

    def decode(self, X: np.ndarray) -> list[dict[str, str]]:
        """Category names of encoded rows (inverse of :meth:`encode_records`)."""
        return decode(X, self.feature_names, self.domains)


def encode_records(
    records: Sequence[dict[str, Any]],
    feature_names: Sequence[str],
    domains: Sequence[Sequence[str]],
    *,
    error: Callable[[str], MlinvertError] = QueryRejected,
) -> np.ndarray:
    """Encode JSON-style records to float32 codes ``(n, d)``.

    A value is a category name (string) or a number whose ``%g`` form is one (``22``
    for ``"22"``). Raises ``error`` naming the field for an unknown field, a missing
    field, an unknown category or a value of the wrong type (bool, null, list, ...).
    """
    names = list(feature_names)
    index = [{c: k for k, c in enumerate(dom)} for dom in domains]
    if isinstance(records, dict) or not isinstance(records, Sequence):
        raise error(f"expected a list of records (JSON objects), got {type(records).__name__}")
    out = np.empty((len(records), len(names)), dtype=np.float32)
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise error(
                f"record {i}: expected an object of named answers, got {type(record).__name__}"
            )
        unknown = sorted(set(record) - set(names))
        if unknown:
            raise error(f"record {i}: unknown field {unknown[0]!r}; fields are: {', '.join(names)}")
        for j, name in enumerate(names):
            if name not in record:
                raise error(
                    f"record {i}: missing field {name!r}; every record needs all of: "
                    f"{', '.join(names)}"
                )
            value = record[name]
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise error(
                    f"record {i}: field {name!r} must be a string category, got "
                    f"{type(value).__name__} {value!r}"
                )
            key = value if isinstance(value, str) else _number_name(value)
            if key not in index[j]:
                raise error(
                    f"record {i}: field {name!r} has unknown category {value!r}; "
                    f"expected one of: {', '.join(domains[j])}"
                )
            out[i, j] = index[j][key]
    return out


def decode(
    X: np.ndarray, feature_names: Sequence[str], domains: Sequence[Sequence[str]]
) -> list[dict[str, str]]:
    """Records ``{feature: category}`` for encoded rows ``X``."""
    codes = np.asarray(X).astype(np.int64)
    return [
        {name: domains[j][int(row[j])] for j, name in enumerate(feature_names)} for row in codes
    ]


def _number_name(value: float) -> str:
    return f"{value:g}" if math.isfinite(value) else str(value)


def _encode_column(values: pd.Series, domain: tuple[str, ...], column: str) -> np.ndarray:
    index = {c: k for k, c in enumerate(domain)}
    bad = sorted(set(values) - set(index))
    if bad:
        raise DataError(
            f"column {column!r} has unexpected values {bad[:5]}; expected one of {list(domain)}"
        )
    return values.map(index).to_numpy(dtype=np.float32)


def _random_split(n: int, seed: int, rng_seed: Seed) -> Split:
    rng = rng_from(rng_seed)
    order = rng.permutation(n)
    k = round(MEMBER_FRACTION * n)
    return Split(
        train=np.sort(order[:k]).astype(np.int64),
        test=np.sort(order[k:]).astype(np.int64),
        seed=seed,
        rule=f"random {MEMBER_FRACTION:.0%} members / {1 - MEMBER_FRACTION:.0%} non-members, "
        f"seed {seed}",
    )


def _seed_int(seed: Seed) -> int:
    return seed if isinstance(seed, int) else 0


def _read_csv(path: Path, **kwargs: Any) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"survey file {str(path)!r} not found; check the path in the data spec")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, **kwargs)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"cannot read {str(path)!r} as CSV: {exc}") from exc


def _need_columns(frame: pd.DataFrame, columns: Sequence[str], path: Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{str(path)!r} lacks the columns {missing}; is it the right file?")


# --------------------------------------------------------------------------- steak

STEAK_COLUMNS: tuple[tuple[str, str, tuple[str, ...], bool], ...] = (
    # (short name, question-text prefix, categories, ordered)
    ("lottery", "Consider the following hypothetical", ("Lottery A", "Lottery B"), False),
    ("smoke", "Do you ever smoke cigarettes?", ("No", "Yes"), False),
    ("alcohol", "Do you ever drink alcohol?", ("No", "Yes"), False),
    ("gamble", "Do you ever gamble?", ("No", "Yes"), False),
    ("skydiving", "Have you ever been skydiving?", ("No", "Yes"), False),
    ("speed", "Do you ever drive above the speed limit?", ("No", "Yes"), False),
    ("cheated", "Have you ever cheated on your significant other?", ("No", "Yes"), False),
    ("gender", "Gender", ("Male", "Female"), False),
    ("age", "Age", ("18-29", "30-44", "45-60", "> 60"), True),
    (
        "income",
        "Household Income",
        (
            "$0 - $24,999",
            "$25,000 - $49,999",
            "$50,000 - $99,999",
            "$100,000 - $149,999",
            "$150,000+",
        ),
        True,
    ),
    (
        "education",
        "Education",
        (
            "Less than high school degree",
            "High school degree",
            "Some college or Associate degree",
            "Bachelor degree",
            "Graduate degree",
        ),
        True,
    ),
    (
        "location",
        "Location (Census Region)",
        (
            "New England",
            "Middle Atlantic",
            "East North Central",
            "West North Central",
            "South Atlantic",
            "East South Central",
            "West South Central",
            "Mountain",
            "Pacific",
        ),
        False,
    ),
)
STEAK_TARGET = (
    "How do you like your steak prepared?",
    ("Rare", "Medium rare", "Medium", "Medium Well", "Well"),
)


def load_steak(path: str, *, seed: Seed = 0) -> SurveyDataset:
    """The FiveThirtyEight steak survey; sensitive ``cheated``, target steak preparation.

    ``path`` is ``steak-risk-survey.csv`` or its folder. Rows without a steak
    preparation (non-steak-eaters) or without a cheating answer are dropped; "Do you
    eat steak?" is then always "Yes" and is not a feature. Other missing answers are
    the category ``"missing"``. Members: a seeded random 70 %.
    """
    file = Path(path)
    if file.is_dir():
        file = file / "steak-risk-survey.csv"
    frame = _read_csv(file, skiprows=[1])
    by_prefix: dict[str, str] = {}
    for short, prefix, _, _ in STEAK_COLUMNS:
        hits = [c for c in frame.columns if c.startswith(prefix)]
        if not hits:
            raise DataError(
                f"{str(file)!r} has no column for {prefix!r} ({short}); "
                "is it the FiveThirtyEight steak-risk-survey.csv?"
            )
        by_prefix[short] = hits[0]
    _need_columns(frame, [STEAK_TARGET[0]], file)
    n_all = len(frame)
    target = frame[STEAK_TARGET[0]].str.strip()
    sensitive = frame[by_prefix["cheated"]].str.strip()
    keep = (target != "") & (sensitive != "")
    frame = frame.loc[keep].reset_index(drop=True)
    names, domains, ordered, columns = [], [], [], []
    for short, _, cats, is_ordered in STEAK_COLUMNS:
        dom = cats if short == "cheated" else (*cats, MISSING)
        values = frame[by_prefix[short]].str.strip().replace("", MISSING)
        columns.append(_encode_column(values, dom, short))
        names.append(short)
        domains.append(dom)
        ordered.append(is_ordered)
    y = _encode_column(frame[STEAK_TARGET[0]].str.strip(), STEAK_TARGET[1], "steak").astype(
        np.int64
    )
    X = np.stack(columns, axis=1).astype(np.float32)
    return SurveyDataset(
        spec=f"steak:{path}",
        name="steak",
        feature_names=tuple(names),
        domains=tuple(domains),
        ordered=tuple(ordered),
        X=X,
        y=y,
        class_names=STEAK_TARGET[1],
        target_name="steak",
        sensitive="cheated",
        sensitive_positive=1,
        split=_random_split(len(frame), _seed_int(seed), seed),
        meta={
            "source": str(file),
            "rows_in_file": n_all,
            "dropped": {"missing target or sensitive answer": int(n_all - len(frame))},
            "missing_rule": "target/sensitive missing: row dropped; other: category 'missing'",
        },
    )


# --------------------------------------------------------------------------- GSS

GSS_FILES = ("GSS_15235.csv", "GSS_5079.csv")
GSS_COLUMNS = (
    "year",
    "marital",
    "divorce",
    "childs",
    "age",
    "educ",
    "sex",
    "race",
    "relig",
    "xmovie",
    "pornlaw",
    "hapmar",
)
GSS_RELIG = (
    "protestant",
    "catholic",
    "jewish",
    "none",
    "other",
    "buddhism",
    "hinduism",
    "othereastern",
    "muslim",
    "orthodoxchristian",
    "christian",
    "nativeamerican",
    "internondenominational",
    "dontknow",
    MISSING,
)


def _bin(edges: Sequence[tuple[int, int, str]], missing: set[int]) -> Callable[[str], str]:
    def f(text: str) -> str:
        try:
            v = int(text)
        except ValueError as exc:
            raise DataError(f"expected an integer GSS code, got {text!r}") from exc
        if v in missing:
            return MISSING
        for lo, hi, label in edges:
            if lo <= v <= hi:
                return label
        raise DataError(f"GSS value {v} lies outside the documented range")

    return f


# Bins (inclusive) and GSS no-answer codes of the numeric columns.
GSS_BINS: dict[str, tuple[tuple[tuple[int, int, str], ...], set[int]]] = {
    "year": (
        (
            (1970, 1979, "1970s"),
            (1980, 1989, "1980s"),
            (1990, 1999, "1990s"),
            (2000, 2009, "2000s"),
            (2010, 2019, "2010s"),
        ),
        set(),
    ),
    "childs": ((*tuple((k, k, str(k)) for k in range(4)), (4, 8, "4+")), {9}),
    "age": (
        (
            (18, 29, "18-29"),
            (30, 39, "30-39"),
            (40, 49, "40-49"),
            (50, 59, "50-59"),
            (60, 69, "60-69"),
            (70, 89, "70+"),
        ),
        {99},
    ),
    "educ": (
        ((0, 11, "0-11"), (12, 12, "12"), (13, 15, "13-15"), (16, 16, "16"), (17, 20, "17-20")),
        {98, 99},
    ),
}
GSS_TEXT: dict[str, tuple[str, ...]] = {
    "marital": ("married", "separated"),
    "divorce": ("ds_no", "ds_yes", MISSING),
    "sex": ("female", "male"),
    "race": ("white", "black", "other"),
    "relig": GSS_RELIG,
    "xmovie": ("x_no", "x_yes"),
    "pornlaw": ("illegal", "illegalillegal8", "legal", "dontknow", MISSING),
}
GSS_TARGET = ("nottoohappy", "prettyhappy", "veryhappy")


def load_gss(path: str, *, seed: Seed = 0) -> SurveyDataset:
    """The GSS extract; sensitive ``xmovie``, target ``hapmar``.

    ``path`` is the folder holding both files or either file (the other is looked up
    beside it). Members: ``GSS_15235.csv``; non-members: ``GSS_5079.csv``. Numeric
    columns are binned (:data:`GSS_BINS`); no-answer codes become ``"missing"``.
    """
    base = Path(path)
    folder = base.parent if base.suffix == ".csv" else base
    if base.suffix == ".csv" and base.name not in GSS_FILES:
        raise DataError(f"expected {' or '.join(GSS_FILES)} or their folder, got {path!r}")
    frames = []
    for name in GSS_FILES:
        frame = _read_csv(folder / name)
        _need_columns(frame, GSS_COLUMNS, folder / name)
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    n_members = len(frames[0])
    names = [c for c in GSS_COLUMNS if c != "hapmar"]
    domains, ordered, columns = [], [], []
    for col in names:
        values = frame[col].str.strip()
        if col in GSS_BINS:
            edges, missing = GSS_BINS[col]
            values = values.map(_bin(edges, missing))
            dom = (*(label for _, _, label in edges), *((MISSING,) if missing else ()))
            ordered.append(True)
        else:
            values = values.replace("noanswer", MISSING)
            dom = GSS_TEXT[col]
            ordered.append(False)
        domains.append(dom)
        columns.append(_encode_column(values, dom, col))
    y = _encode_column(frame["hapmar"].str.strip(), GSS_TARGET, "hapmar").astype(np.int64)
    n = len(frame)
    return SurveyDataset(
        spec=f"gss:{path}",
        name="gss",
        feature_names=tuple(names),
        domains=tuple(domains),
        ordered=tuple(ordered),
        X=np.stack(columns, axis=1).astype(np.float32),
        y=y,
        class_names=GSS_TARGET,
        target_name="hapmar",
        sensitive="xmovie",
        sensitive_positive=1,
        split=Split(
            train=np.arange(n_members, dtype=np.int64),
            test=np.arange(n_members, n, dtype=np.int64),
            seed=_seed_int(seed),
            rule="members GSS_15235.csv, non-members GSS_5079.csv (fixed)",
        ),
        meta={
            "source": str(folder),
            "dropped": {},
            "missing_rule": "codes childs 9, age 99, educ 98/99, 'noanswer' -> 'missing'",
            "bins": {k: [label for _, _, label in v[0]] for k, v in GSS_BINS.items()},
        },
    )


# --------------------------------------------------------------------------- fair

FAIR_FEATURES = (
    "age",
    "yrs_married",
    "children",
    "religious",
    "educ",
    "occupation",
    "occupation_husb",
)
FAIR_TARGET = ("very poor", "poor", "fair", "good", "very good")


def load_fair(*, seed: Seed = 0) -> SurveyDataset:
    """statsmodels' bundled Fair (1978) affairs survey of 6 366 women.

    Sensitive ``affair`` (``yes`` when ``affairs > 0``); target ``rate_marriage``
    (1 very poor .. 5 very good). Every other column already takes a handful of coded
    values; each distinct value is a category (``%g``-formatted). No missing values.
    Members: a seeded random 70 %.
    """
    from statsmodels.datasets import fair

    frame = fair.load_pandas().data
    names, domains, ordered, columns = [], [], [], []
    for col in FAIR_FEATURES:
        values = frame[col].to_numpy(dtype=np.float64)
        cats = np.unique(values)
        dom = tuple(_number_name(float(v)) for v in cats)
        columns.append(np.searchsorted(cats, values).astype(np.float32))
        names.append(col)
        domains.append(dom)
        ordered.append(True)
    names.append("affair")
    domains.append(("no", "yes"))
    ordered.append(False)
    columns.append((frame["affairs"].to_numpy() > 0).astype(np.float32))
    y = frame["rate_marriage"].to_numpy(dtype=np.int64) - 1
    return SurveyDataset(
        spec="fair",
        name="fair",
        feature_names=tuple(names),
        domains=tuple(domains),
        ordered=tuple(ordered),
        X=np.stack(columns, axis=1).astype(np.float32),
        y=y,
        class_names=FAIR_TARGET,
        target_name="rate_marriage",
        sensitive="affair",
        sensitive_positive=1,
        split=_random_split(len(frame), _seed_int(seed), seed),
        meta={"source": "statsmodels.datasets.fair", "dropped": {}, "missing_rule": "none"},
    )
