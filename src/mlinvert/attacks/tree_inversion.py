"""Attribute inversion of decision trees on lifestyle surveys.

Setting (Fredrikson, Jha, Ristenpart, "Model Inversion Attacks that Exploit Confidence
Information and Basic Countermeasures", CCS 2015, Section 5): the attacker knows a
target respondent's answers to every question but the sensitive one, the respondent's
true label (the model's target, e.g. steak preparation), and the marginal prior of
every answer. Each estimator scores every candidate value ``v`` of the sensitive
feature and guesses the best (ties go to the value with the larger prior). When some
other answers are unknown too (``Knowledge.unknown``), every estimator marginalises
them with their priors, as in the paper's general formulation.

- :class:`BlackBox2014`: ``score(v) = pi(y, f(x_v)) * prior(v)`` with
  ``pi(y, y') = Pr[true label y | predicted y']`` from the confusion matrix the MLaaS
  shows for the model on its training data (Fredrikson et al., USENIX Security 2014).
- :class:`WhiteBoxCounts`: the CCS 2015 white-box estimator on the downloadable model.
  ``rule="density"`` (default, name ``white-box``) follows the path of ``x_v`` to its
  leaf and scores ``v`` by the density of
  label-``y`` training rows there, ``count(leaf, y) * prior(v) / volume(leaf)``, where
  ``volume`` is the prior mass of the region the path allows (product over features of
  the prior mass of the categories each allows): the leaf's rows are spread over that
  region in prior proportion. ``rule="predicted-label"`` (name
  ``white-box-predicted-label``) counts only leaves that predict ``y``, each with its
  whole training count: ``score(v) = prior(v) * count(leaf_v) * [leaf_v predicts y]``
  (our reading of the paper's Section 5.2 formula, not checked against its text).
  Both need the tree document and send no query.
- :class:`ConfidenceBlackBox`: uses the returned BigML confidence ``c`` (Wilson lower
  bound of the predicted class's share). Read as the bound of a pure leaf,
  ``c = n / (n + z^2)`` gives the leaf size ``n = c z^2 / (1 - c)``; the label-``y``
  share of that leaf is then estimated with add-one smoothing,
  ``(n + 1) / (n + k)`` if the answer for ``x_v`` is ``y`` and ``1 / (n + k)``
  otherwise, and multiplied by ``prior(v)``. A small pure leaf that answers ``y`` is
  the trace a memorised training row leaves.
- :class:`LabelOnlyMatch`: labels only: ``score(v) = prior(v)`` if ``f(x_v) = y``, else
  a thousandth of it.

The black-box estimators send ``|domain|`` queries per respondent (one per candidate
value), in batches of ``batch_size`` rows through any :class:`~mlinvert.oracle.Oracle`
(in process or over HTTP). A refused query (rate limit, block, budget) stops the attack;
unanswered respondents get the prior's guess and the result's ``status`` says why.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mlinvert.attacks.base import Status
from mlinvert.core import Seed
from mlinvert.errors import AttackError, Blocked, BudgetExhausted, ConfigError, RateLimited
from mlinvert.oracle.base import Oracle
from mlinvert.targets.tree import Z_95, DecisionTreeTarget

MAX_CANDIDATES = 512  # candidate rows per respondent (|domain| x unknown combinations)

if TYPE_CHECKING:
    from mlinvert.data.surveys import SurveyDataset


@dataclass(frozen=True, kw_only=True)
class TreeAttackConfig:
    """Common knobs: rows per oracle call."""

    batch_size: int = 1024

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True, kw_only=True, eq=False)
class Knowledge:
    """What the attacker knows about the respondents and the population.

    ``X`` encoded rows ``(n, d)`` (the sensitive column is ignored and overwritten),
    ``y`` their true labels, ``sensitive_index`` the sensitive column and ``priors``
    the marginal distribution of every feature over its domain. ``unknown`` lists other
    columns the attacker does not know either (their values in ``X`` are ignored): the
    black-box estimators then query every combination of their values (weighted by the
    priors) and the white-box one sums over every path consistent with what is known.
    """

    X: np.ndarray
    y: np.ndarray
    sensitive_index: int
    priors: tuple[np.ndarray, ...]
    unknown: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.X.ndim != 2 or self.y.shape != (self.X.shape[0],):
            raise ConfigError("Knowledge needs X (n, d) and y (n,)")
        if len(self.priors) != self.X.shape[1]:
            raise ConfigError(f"priors needs one vector per feature ({self.X.shape[1]})")
        if not 0 <= self.sensitive_index < self.X.shape[1]:
            raise ConfigError(
                f"sensitive_index {self.sensitive_index} outside 0..{self.X.shape[1]}"
            )
        if self.prior.ndim != 1 or self.prior.size < 2 or (self.prior < 0).any():
            raise ConfigError("the sensitive prior must be a non-negative vector over >= 2 values")
        bad = [j for j in self.unknown if not 0 <= j < self.X.shape[1] or j == self.sensitive_index]
        if bad or len(set(self.unknown)) != len(self.unknown):
            raise ConfigError(
                f"unknown must list distinct non-sensitive columns, got {list(self.unknown)}"
            )
        if self.m * self.n_combos > MAX_CANDIDATES:
            raise ConfigError(
                f"{self.m * self.n_combos} candidate rows per respondent exceed "
                f"{MAX_CANDIDATES}; leave fewer features unknown"
            )

    @classmethod
    def of(
        cls, dataset: SurveyDataset, population: str, *, unknown: Sequence[str] = ()
    ) -> Knowledge:
        """Knowledge about the ``members`` or ``non-members`` of a survey.

        ``unknown`` names features (besides the sensitive one) the attacker lacks.
        """
        if population not in ("members", "non-members"):
            raise ConfigError(f"population must be members or non-members, got {population!r}")
        missing = [f for f in unknown if f not in dataset.feature_names]
        if missing:
            raise ConfigError(f"unknown features {missing} are not among {dataset.feature_names}")
        X, y = dataset.members() if population == "members" else dataset.nonmembers()
        return cls(
            X=X,
            y=y,
            sensitive_index=dataset.sensitive_index,
            priors=dataset.priors,
            unknown=tuple(dataset.feature_names.index(f) for f in unknown),
        )

    @property
    def prior(self) -> np.ndarray:
        """Marginal distribution of the sensitive feature."""
        return np.asarray(self.priors[self.sensitive_index], dtype=np.float64)

    @property
    def truth(self) -> np.ndarray:
        """The respondents' true sensitive codes (for evaluation only)."""
        return self.X[:, self.sensitive_index].astype(np.int64)

    @property
    def n(self) -> int:
        """Number of target respondents."""
        return int(self.X.shape[0])

    @property
    def m(self) -> int:
        """Size of the sensitive feature's domain."""
        return int(self.prior.size)

    def combos(self) -> tuple[np.ndarray, np.ndarray]:
        """Every combination of the unknown features' values ``(C, u)`` and its prior."""
        sizes = [self.priors[j].size for j in self.unknown]
        grid = np.indices(sizes).reshape(len(sizes), -1).T if sizes else np.zeros((1, 0), int)
        weight = np.ones(grid.shape[0])
        for col, j in enumerate(self.unknown):
            weight *= np.asarray(self.priors[j], dtype=np.float64)[grid[:, col]]
        return grid, weight

    @property
    def n_combos(self) -> int:
        """Number of value combinations of the unknown features (1 if none)."""
        return int(np.prod([self.priors[j].size for j in self.unknown], dtype=np.int64))

    def candidates(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Candidate rows of respondents ``start:stop``, ``(k * m * C, d)``.

        Respondent ``start + i`` with value ``v`` and unknown combination ``c`` is at row
        ``(i * m + v) * C + c``.
        """
        X = self.X[start:stop].astype(np.float32)
        grid, _ = self.combos()
        c = grid.shape[0]
        rows = np.repeat(X, self.m * c, axis=0)
        rows[:, self.sensitive_index] = np.tile(
            np.repeat(np.arange(self.m, dtype=np.float32), c), X.shape[0]
        )
        if self.unknown:
            rows[:, list(self.unknown)] = np.tile(grid.astype(np.float32), (X.shape[0] * self.m, 1))
        return rows


@dataclass(eq=False)
class TreeInversionResult:
    """Guesses of the sensitive value for every respondent, and how they were obtained."""

    estimator: str
    guesses: np.ndarray
    scores: np.ndarray
    n_queries: int
    elapsed_s: float
    seed: int | None
    status: Status = "succeeded"
    n_answered: int = 0
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON form (guesses as a list)."""
        return {
            "estimator": self.estimator,
            "guesses": self.guesses.tolist(),
            "n_queries": self.n_queries,
            "elapsed_s": self.elapsed_s,
            "seed": self.seed,
            "status": self.status,
            "n_answered": self.n_answered,
            "config": self.config,
        }


class TreeInversion(Protocol):
    """An attribute-inversion estimator: ``run(oracle, knowledge, *, seed)``."""

    name: str

    def run(
        self, oracle: Oracle | None, knowledge: Knowledge, *, seed: Seed = None
    ) -> TreeInversionResult:
        """Guess the sensitive value of every respondent in ``knowledge``."""
        ...


def decide(scores: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Argmax of ``scores`` per row, ties broken towards the larger prior."""
    best = scores.max(axis=1, keepdims=True)
    tied = scores >= best * (1 - 1e-12)
    return np.argmax(np.where(tied, prior[None, :] + 1.0, 0.0), axis=1).astype(np.int64)


@dataclass(eq=False)
class _Answers:
    labels: np.ndarray  # (n, m, C) int64, -1 where unanswered
    confidence: np.ndarray | None  # (n, m, C) float64, NaN where unanswered or withheld
    status: Status
    n_answered: int
    n_queries: int


def _query_all(oracle: Oracle, knowledge: Knowledge, batch_size: int) -> _Answers:
    """Send every candidate row in batches of at most ``batch_size``; stop on a refusal.

    Candidate rows are built per group of respondents (whole respondents per batch when
    they fit), so memory stays bounded by the answers themselves.
    """
    per = knowledge.m * knowledge.n_combos
    total = knowledge.n * per
    labels = np.full(total, -1, dtype=np.int64)
    conf = np.full(total, np.nan)
    seen_conf = False
    status: Status = "succeeded"
    before = oracle.n_queries
    group = max(1, batch_size // per)
    done = 0
    for first in range(0, knowledge.n, group):
        rows = knowledge.candidates(first, first + group)
        for offset in range(0, rows.shape[0], batch_size):
            try:
                response = oracle.query(rows[offset : offset + batch_size])
            except RateLimited:
                status = "rate_limited"
            except Blocked:
                status = "blocked"
            except BudgetExhausted:
                status = "budget_exhausted"
            if status != "succeeded":
                break
            start = first * per + offset
            stop = start + len(response)
            labels[start:stop] = response.labels
            if response.confidence is not None:
                conf[start:stop] = response.confidence
                seen_conf = True
            done = stop
        if status != "succeeded":
            break
    shape = (knowledge.n, knowledge.m, knowledge.n_combos)
    return _Answers(
        labels=labels.reshape(shape),
        confidence=conf.reshape(shape) if seen_conf else None,
        status=status,
        n_answered=done // per,
        n_queries=oracle.n_queries - before,
    )


def _finish(
    name: str,
    scores: np.ndarray,
    knowledge: Knowledge,
    answers: _Answers | None,
    started: float,
    seed: Seed,
    config: dict[str, Any],
) -> TreeInversionResult:
    prior = knowledge.prior
    if answers is not None:  # respondents the oracle never answered: prior only
        unanswered = (answers.labels < 0).reshape(knowledge.n, -1).any(axis=1)
        scores[unanswered] = prior
    return TreeInversionResult(
        estimator=name,
        guesses=decide(scores, prior),
        scores=scores,
        n_queries=0 if answers is None else answers.n_queries,
        elapsed_s=time.perf_counter() - started,
        seed=seed if isinstance(seed, int) else None,
        status="succeeded" if answers is None else answers.status,
        n_answered=knowledge.n if answers is None else answers.n_answered,
        config=config,
    )


def _marginal(g: np.ndarray, knowledge: Knowledge) -> np.ndarray:
    """``prior(v) * sum_c weight(c) * g[i, v, c]``: scores ``(n, m)``."""
    _, weight = knowledge.combos()
    return knowledge.prior[None, :] * (g * weight[None, None, :]).sum(axis=2)


def _need_oracle(oracle: Oracle | None, name: str) -> Oracle:
    if oracle is None:
        raise AttackError(f"{name} is a black-box estimator and needs an oracle to query")
    return oracle


def training_confusion(model: DecisionTreeTarget, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Confusion counts ``C[true, predicted]`` of ``model`` on its training rows.

    This is what an MLaaS (BigML) shows its customer next to a model, and what the
    2014 estimator assumes the attacker can see.
    """
    k = len(model.class_names_)
    pred = model.predict(X)
    return np.bincount(np.asarray(y) * k + pred, minlength=k * k).reshape(k, k).astype(float)


class BlackBox2014:
    """Fredrikson et al. 2014 estimator: confusion statistics x marginal prior.

    Fredrikson, Lantz, Jha, Lin, Page, Ristenpart, "Privacy in Pharmacogenetics",
    USENIX Security 2014; the baseline of CCS 2015, Section 5.
    """

    name = "black-box-2014"

    def __init__(self, confusion: np.ndarray, config: TreeAttackConfig | None = None) -> None:
        c = np.asarray(confusion, dtype=np.float64)
        if c.ndim != 2 or c.shape[0] != c.shape[1] or (c < 0).any():
            raise ConfigError("confusion must be a square non-negative count matrix")
        self.config = config or TreeAttackConfig()
        # pi[y, y'] = Pr[true y | predicted y'] (+1/2 smoothing for classes never predicted)
        smoothed = c + 0.5
        self.pi = smoothed / smoothed.sum(axis=0, keepdims=True)

    def run(
        self, oracle: Oracle | None, knowledge: Knowledge, *, seed: Seed = None
    ) -> TreeInversionResult:
        """Query every candidate value and score by ``pi(y, f(x_v)) * prior(v)``."""
        started = time.perf_counter()
        answers = _query_all(_need_oracle(oracle, self.name), knowledge, self.config.batch_size)
        pred = np.maximum(answers.labels, 0)
        scores = _marginal(self.pi[knowledge.y[:, None, None], pred], knowledge)
        return _finish(self.name, scores, knowledge, answers, started, seed, asdict(self.config))


class ConfidenceBlackBox:
    """Black-box estimator that weighs each candidate by the returned BigML confidence.

    Extends the CCS 2015 black-box setting (the API returns a confidence with every
    label) by using that confidence as the estimate of ``Pr[y | leaf]``.
    """

    name = "black-box-confidence"

    def __init__(self, config: TreeAttackConfig | None = None) -> None:
        self.config = config or TreeAttackConfig()

    def run(
        self, oracle: Oracle | None, knowledge: Knowledge, *, seed: Seed = None
    ) -> TreeInversionResult:
        """Query every candidate value; needs confidences in the answers."""
        started = time.perf_counter()
        oracle = _need_oracle(oracle, self.name)
        # a declared labels-only API is refused before any query is paid for; one that
        # says nothing of itself is found out from its first answers
        labels_only = oracle.info.carries == "label"
        answers = None if labels_only else _query_all(oracle, knowledge, self.config.batch_size)
        if answers is None or (answers.confidence is None and answers.n_answered):
            raise AttackError(
                f"{self.name} needs confidences but the API answers {oracle.info.carries} "
                f"(policy {oracle.info.policy!r}); use LabelOnlyMatch or BlackBox2014"
            )
        k = max(len(oracle.info.class_names), 2)
        conf = np.zeros(answers.labels.shape)
        if answers.confidence is not None:
            conf = np.clip(np.nan_to_num(answers.confidence), 0.0, 0.999)
        size = conf * Z_95**2 / (1 - conf)
        match = answers.labels == knowledge.y[:, None, None]
        scores = _marginal(np.where(match, size + 1, 1.0) / (size + k), knowledge)
        return _finish(self.name, scores, knowledge, answers, started, seed, asdict(self.config))


class LabelOnlyMatch:
    """Labels only: the most probable value (by prior) whose answer equals the true label.

    The label-only setting of later work (Mehnaz et al., USENIX Security 2022) in its
    simplest form; no confidence is used.
    """

    name = "label-only"

    def __init__(self, config: TreeAttackConfig | None = None) -> None:
        self.config = config or TreeAttackConfig()

    def run(
        self, oracle: Oracle | None, knowledge: Knowledge, *, seed: Seed = None
    ) -> TreeInversionResult:
        """Query every candidate value; score ``prior(v)`` if ``f(x_v) = y``."""
        started = time.perf_counter()
        answers = _query_all(_need_oracle(oracle, self.name), knowledge, self.config.batch_size)
        match = answers.labels == knowledge.y[:, None, None]
        scores = _marginal(np.where(match, 1.0, 1e-3), knowledge)
        return _finish(self.name, scores, knowledge, answers, started, seed, asdict(self.config))


class WhiteBoxCounts:
    """The CCS 2015 white-box estimator on the downloadable model's node counts.

    Fredrikson, Jha, Ristenpart, CCS 2015, Section 5.2. Takes the tree document
    (:meth:`DecisionTreeTarget.to_document`), sends no query; vectorised over
    respondents (one tree traversal per candidate value).
    """

    def __init__(self, document: dict[str, Any], *, rule: str = "density") -> None:
        if rule not in ("density", "predicted-label"):
            raise ConfigError(f"rule must be 'density' or 'predicted-label', got {rule!r}")
        self.rule = rule
        self.name = "white-box" if rule == "density" else "white-box-predicted-label"
        self.tree = DecisionTreeTarget.from_document(document)
        sensitive = document.get("sensitive")
        if sensitive is None:
            raise AttackError("the tree document names no sensitive feature; set it when training")
        self.sensitive = str(sensitive)
        self.allowed = {f: self.tree.allowed(f) for f in self.tree.feature_names_}

    def run(
        self, oracle: Oracle | None, knowledge: Knowledge, *, seed: Seed = None
    ) -> TreeInversionResult:
        """Score every value by the label-``y`` count on its leaf; ``oracle`` is unused."""
        del oracle
        started = time.perf_counter()
        s = self.tree.feature_names_.index(self.sensitive)
        if s != knowledge.sensitive_index or knowledge.m != self.allowed[self.sensitive].shape[1]:
            raise AttackError("the knowledge's sensitive feature does not match the tree's")
        prior = knowledge.prior
        volume = np.ones(self.tree.n_nodes_)
        for j, name in enumerate(self.tree.feature_names_):
            if j not in knowledge.unknown:  # unknown features integrate out
                volume *= self.allowed[name].astype(np.float64) @ knowledge.priors[j]
        volume = np.maximum(volume, 1e-300)
        if knowledge.unknown:
            scores = self._sum_paths(knowledge, volume)
            scores[scores.max(axis=1) <= 0] = prior
            return _finish(self.name, scores, knowledge, None, started, seed, {"rule": self.rule})
        X = knowledge.X.astype(np.float32).copy()
        scores = np.empty((knowledge.n, knowledge.m))
        for v in range(knowledge.m):
            X[:, s] = v
            leaf = self.tree.apply(X)
            counts = self.tree.counts_[leaf]
            if self.rule == "predicted-label":
                says_y = counts.argmax(axis=1) == knowledge.y
                scores[:, v] = np.where(says_y, counts.sum(axis=1), 0.0) * prior[v]
            else:
                scores[:, v] = counts[np.arange(knowledge.n), knowledge.y] * prior[v] / volume[leaf]
        empty = scores.max(axis=1) <= 0
        scores[empty] = prior
        return _finish(self.name, scores, knowledge, None, started, seed, {"rule": self.rule})

    def _sum_paths(self, knowledge: Knowledge, volume: np.ndarray, chunk: int = 2048) -> np.ndarray:
        """Scores summed over every leaf consistent with the known answers and ``v``."""
        tree = self.tree
        leaves = np.flatnonzero(tree.feature_ < 0)
        counts = tree.counts_[leaves]
        says = counts.argmax(axis=1)
        known = [
            j
            for j in range(knowledge.X.shape[1])
            if j != knowledge.sensitive_index and j not in knowledge.unknown
        ]
        codes = knowledge.X.astype(np.int64)
        allowed_s = self.allowed[self.sensitive][leaves]  # (L, m)
        allowed = {j: self.allowed[tree.feature_names_[j]][leaves] for j in known}
        scores = np.zeros((knowledge.n, knowledge.m))
        for start in range(0, knowledge.n, chunk):
            rows = slice(start, start + chunk)
            ok = np.ones((codes[rows].shape[0], leaves.size), dtype=bool)
            for j in known:
                ok &= allowed[j][:, codes[rows, j]].T
            y = knowledge.y[rows]
            if self.rule == "predicted-label":
                weight = np.where(says[None, :] == y[:, None], counts.sum(axis=1)[None, :], 0.0)
            else:
                weight = counts[:, y].T / volume[leaves][None, :]
            for v in range(knowledge.m):
                hit = ok & allowed_s[None, :, v]
                scores[rows, v] = (weight * hit).sum(axis=1) * knowledge.prior[v]
        return scores
