"""Evaluation of attribute inversion on survey trees, and the tree audit runner.

Fredrikson, Jha, Ristenpart, CCS 2015, Section 5 (attacks) and Section 6 (privacy-aware
CART). :func:`run_tree_audit` trains the target, runs every estimator against members
and non-members, under each output policy, and optionally sweeps the sensitive
feature's depth and differentially private trees. It returns flat JSON records.

Record schema (one dict per estimator x population x defence)
-------------------------------------------------------------
``dataset``         survey name: ``steak``, ``gss`` or ``fair``
``spec``            the data spec it was loaded from
``estimator``       ``white-box``, ``white-box-predicted-label``, ``black-box-2014``,
                    ``black-box-confidence``, ``label-only``, or a baseline:
                    ``random`` (uniform over the domain), ``always-no``, ``ideal`` (a
                    CART trained on the true sensitive answers, see :func:`ideal_guesses`)
``population``      ``members`` (training set) or ``non-members``
``defense``         ``none`` (white-box and baselines, or plain answers), an output
                    policy spec (``full``, ``round:2``, ``labels``), ``depth:L``
                    (privacy-aware CART, sensitive feature at depth L only),
                    ``exclude-sensitive``, ``dp:EPS`` (differentially private tree), or
                    ``max-depth:D`` (the same CART stopped at depth D: plain regularisation)
``accuracy``        share of respondents whose sensitive value is guessed right
``precision``       of the guessed "yes" answers, the share that are true (0 if none)
``recall``          of the true "yes" answers, the share guessed
``mcc``             Matthews correlation of guessed vs true "yes" (0 if undefined)
``gmean``           sqrt(true-positive rate x true-negative rate)
``n``, ``n_yes``, ``n_guessed_yes``  respondents, true and guessed "yes"
``n_queries``       oracle queries the estimator spent on this population
``model_accuracy``  the target tree's accuracy on the non-members (held out)
``model_train_accuracy``  its accuracy on the members
``status``          ``succeeded`` or why the attack stopped
``elapsed_s``, ``seed``
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mlinvert.attacks.tree_inversion import (
    BlackBox2014,
    ConfidenceBlackBox,
    Knowledge,
    LabelOnlyMatch,
    TreeInversion,
    TreeInversionResult,
    WhiteBoxCounts,
    training_confusion,
)
from mlinvert.core import Seed, rng_from
from mlinvert.data.surveys import SurveyDataset
from mlinvert.errors import AttackError, ConfigError
from mlinvert.oracle.base import Oracle
from mlinvert.targets.tree import DecisionTreeTarget, TreeConfig, train_tree

log = logging.getLogger(__name__)

POPULATIONS = ("members", "non-members")
OracleFactory = Callable[[DecisionTreeTarget, str], Oracle]

# Fredrikson et al., CCS 2015, Table (accuracy / precision / recall, %), as recalled in
# ../shared/PAPER.md ([mem]: not checked against the paper's text).
PAPER_TABLE: dict[str, dict[str, tuple[float, float, float]]] = {
    "steak": {
        "white-box": (86.4, 100.0, 21.1),
        "black-box-2014": (85.8, 85.7, 21.1),
        "random": (50.0, 50.0, 50.0),
        "always-no": (82.9, 0.0, 0.0),
    },
    "gss": {
        "white-box": (80.3, 100.0, 0.7),
        "black-box-2014": (80.0, 38.8, 1.0),
        "random": (50.0, 50.0, 50.0),
        "always-no": (82.0, 0.0, 0.0),
    },
}


def binary_metrics(truth_yes: np.ndarray, guess_yes: np.ndarray) -> dict[str, float]:
    """Accuracy, precision, recall, MCC and G-mean of guessed vs true "yes" answers."""
    t = np.asarray(truth_yes, dtype=bool)
    g = np.asarray(guess_yes, dtype=bool)
    tp = float((t & g).sum())
    tn = float((~t & ~g).sum())
    fp = float((~t & g).sum())
    fn = float((t & ~g).sum())
    n = max(t.size, 1)
    tpr = tp / (tp + fn) if tp + fn else 0.0
    tnr = tn / (tn + fp) if tn + fp else 0.0
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {
        "accuracy": (tp + tn) / n,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tpr,
        "mcc": (tp * tn - fp * fn) / denom if denom else 0.0,
        "gmean": math.sqrt(tpr * tnr),
    }


IDEAL_CONFIG = TreeConfig(max_depth=6, min_samples_leaf=5)


def ideal_guesses(
    dataset: SurveyDataset, *, seed: Seed = 0, folds: int = 5
) -> dict[str, np.ndarray]:
    """The "ideal" baseline: a classifier trained on the true sensitive answers.

    A depth-6 CART (:data:`IDEAL_CONFIG`) predicting the sensitive answer from the other
    answers plus the label. Members: ``folds``-fold cross-validated predictions;
    non-members: the tree fitted on all members. Returns ``{population: guessed codes}``.
    """
    s = dataset.sensitive_index
    others = [j for j in range(dataset.n_features) if j != s]
    names = [dataset.feature_names[j] for j in others] + [dataset.target_name]
    domains = [dataset.domains[j] for j in others] + [dataset.class_names]
    ordered = [dataset.ordered[j] for j in others] + [False]
    classes = dataset.domains[s]

    def features(X: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.column_stack([X[:, others], y]).astype(np.float32)

    def fit(X: np.ndarray, target: np.ndarray) -> DecisionTreeTarget:
        return DecisionTreeTarget(IDEAL_CONFIG).fit(
            X,
            target,
            feature_names=names,
            domains=domains,
            class_names=classes,
            ordered=ordered,
        )

    Xm, ym = dataset.members()
    Xn, yn = dataset.nonmembers()
    fm = features(Xm, ym)
    target = Xm[:, s].astype(np.int64)
    fold = rng_from(seed).permutation(fm.shape[0]) % folds
    members = np.empty(fm.shape[0], dtype=np.int64)
    for k in range(folds):
        test = fold == k
        members[test] = fit(fm[~test], target[~test]).predict(fm[test])
    nonmembers = fit(fm, target).predict(features(Xn, yn)) if yn.size else np.empty(0, np.int64)
    return {"members": members, "non-members": nonmembers}


def _local_oracle(model: DecisionTreeTarget, policy: str) -> Oracle:
    from mlinvert.defenses.spec import build_predictor
    from mlinvert.oracle import LocalOracle

    return LocalOracle(
        build_predictor(model, name="tree", policy=policy, max_batch=4096),
        account="auditor",
    )


def _record(
    dataset: SurveyDataset,
    knowledge: Knowledge,
    guesses: np.ndarray,
    *,
    estimator: str,
    population: str,
    defense: str,
    n_queries: int,
    model_acc: tuple[float, float],
    status: str = "succeeded",
    elapsed_s: float = 0.0,
    seed: Seed = None,
) -> dict[str, Any]:
    truth_yes = knowledge.truth == dataset.sensitive_positive
    guess_yes = guesses == dataset.sensitive_positive
    return {
        "dataset": dataset.name,
        "spec": dataset.spec,
        "estimator": estimator,
        "population": population,
        "defense": defense,
        **binary_metrics(truth_yes, guess_yes),
        "n": int(knowledge.n),
        "n_yes": int(truth_yes.sum()),
        "n_guessed_yes": int(guess_yes.sum()),
        "n_queries": int(n_queries),
        "model_accuracy": model_acc[1],
        "model_train_accuracy": model_acc[0],
        "status": status,
        "elapsed_s": round(elapsed_s, 4),
        "seed": seed if isinstance(seed, int) else None,
    }


def _from_result(
    dataset: SurveyDataset,
    knowledge: Knowledge,
    result: TreeInversionResult,
    population: str,
    defense: str,
    model_acc: tuple[float, float],
) -> dict[str, Any]:
    return _record(
        dataset,
        knowledge,
        result.guesses,
        estimator=result.estimator,
        population=population,
        defense=defense,
        n_queries=result.n_queries,
        model_acc=model_acc,
        status=result.status,
        elapsed_s=result.elapsed_s,
        seed=result.seed,
    )


def _model_acc(model: DecisionTreeTarget, dataset: SurveyDataset) -> tuple[float, float]:
    Xm, ym = dataset.members()
    Xn, yn = dataset.nonmembers()
    return float((model.predict(Xm) == ym).mean()), float((model.predict(Xn) == yn).mean())


def attack_tree(
    dataset: SurveyDataset,
    model: DecisionTreeTarget,
    *,
    seed: Seed = 0,
    defense: str = "none",
    policies: Sequence[str] = ("full",),
    oracle_factory: OracleFactory | None = None,
    white_box: bool = True,
    black_box: bool = True,
) -> list[dict[str, Any]]:
    """Run the estimators against one target ``model``; records for both populations.

    White-box estimators read ``model.to_document()`` (recorded with ``defense``);
    black-box ones query ``oracle_factory(model, policy)`` for each policy (default: a
    LocalOracle over a Predictor with that policy), recorded with the policy as the
    defense (or ``defense`` when it is not ``none``, e.g. ``depth:2``).
    """
    factory = oracle_factory or _local_oracle
    acc = _model_acc(model, dataset)
    confusion = training_confusion(model, *dataset.members())
    doc = model.to_document()
    records = []
    for population in POPULATIONS:
        knowledge = Knowledge.of(dataset, population)
        if not knowledge.n:
            continue
        if white_box:
            for rule in ("density", "predicted-label"):
                result = WhiteBoxCounts(doc, rule=rule).run(None, knowledge, seed=seed)
                records.append(_from_result(dataset, knowledge, result, population, defense, acc))
        if not black_box:
            continue
        for policy in policies:
            estimators: list[TreeInversion] = [
                BlackBox2014(confusion),
                ConfidenceBlackBox(),
                LabelOnlyMatch(),
            ]
            label = policy if defense == "none" else defense
            for est in estimators:
                oracle = factory(model, policy)
                try:
                    result = est.run(oracle, knowledge, seed=seed)
                except AttackError as exc:  # e.g. confidences withheld by the policy
                    log.info("%s skipped under %s: %s", est.name, policy, exc)
                    continue
                records.append(_from_result(dataset, knowledge, result, population, label, acc))
    return records


def baseline_records(
    dataset: SurveyDataset, model_acc: tuple[float, float], *, seed: Seed = 0
) -> list[dict[str, Any]]:
    """Random guess (prior-free coin over the domain), always "no", and the ideal."""
    rng = rng_from(seed)
    ideal = ideal_guesses(dataset, seed=seed)
    negative = (
        1 - dataset.sensitive_positive if len(dataset.domains[dataset.sensitive_index]) == 2 else 0
    )
    records = []
    for population in POPULATIONS:
        k = Knowledge.of(dataset, population)
        if not k.n:
            continue
        guesses = {
            "random": rng.integers(0, k.m, size=k.n),
            "always-no": np.full(k.n, negative),
            "ideal": ideal[population],
        }
        for name, g in guesses.items():
            records.append(
                _record(
                    dataset,
                    k,
                    np.asarray(g),
                    estimator=name,
                    population=population,
                    defense="none",
                    n_queries=0,
                    model_acc=model_acc,
                    seed=seed,
                )
            )
    return records


def run_tree_audit(
    spec: str | SurveyDataset,
    *,
    seed: Seed = 0,
    policies: Sequence[str] = ("full", "round:2", "labels"),
    oracle_factory: OracleFactory | None = None,
    config: TreeConfig | None = None,
    model: DecisionTreeTarget | None = None,
    depths: Sequence[int] = (),
    dp_epsilons: Sequence[float] = (),
    max_depths: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """Train the survey tree and attack it; records follow the module's schema.

    ``policies`` are output-policy specs (:func:`mlinvert.defenses.parse_policy`) for
    the black-box estimators; ``oracle_factory(model, policy) -> Oracle`` replaces the
    in-process oracle (e.g. an ``HttpOracle`` to a served model) for the main target:
    ``model`` when given (already trained with ``config``, e.g. to serve it before the
    attacks start), else ``train_tree(dataset, seed=seed, config=config)``. ``depths``
    adds the privacy-aware CART sweep (plus ``exclude-sensitive``), ``dp_epsilons`` the
    DP trees, ``max_depths`` depth-limited trees; those are attacked in process.
    """
    from mlinvert.data import load

    dataset = (
        load(spec, seed=seed if isinstance(seed, int) else 0) if isinstance(spec, str) else spec
    )
    if not isinstance(dataset, SurveyDataset):
        raise ConfigError(
            f"run_tree_audit needs a survey data set (steak, gss, fair), got {dataset.spec!r}"
        )
    config = config or TreeConfig()
    if model is None:
        model, _ = train_tree(dataset, seed=seed, config=config)
    records = baseline_records(dataset, _model_acc(model, dataset), seed=seed)
    records += attack_tree(
        dataset, model, seed=seed, policies=policies, oracle_factory=oracle_factory
    )
    records += depth_sweep(dataset, depths, seed=seed, config=config)
    records += dp_comparison(dataset, dp_epsilons, seed=seed)
    records += pruning_comparison(dataset, max_depths, seed=seed, config=config)
    return records


def pruning_comparison(
    dataset: SurveyDataset,
    max_depths: Sequence[int],
    *,
    seed: Seed = 0,
    config: TreeConfig | None = None,
) -> list[dict[str, Any]]:
    """The same CART stopped at each depth D (regularisation as a defence), attacked alike."""
    base = config or TreeConfig()
    records: list[dict[str, Any]] = []
    for depth in max_depths:
        model, _ = train_tree(dataset, seed=seed, config=replace(base, max_depth=int(depth)))
        records += attack_tree(
            dataset, model, seed=seed, defense=f"max-depth:{depth}", policies=("full",)
        )
    return records


def depth_sweep(
    dataset: SurveyDataset,
    depths: Sequence[int],
    *,
    seed: Seed = 0,
    config: TreeConfig | None = None,
) -> list[dict[str, Any]]:
    """Privacy-aware CART (CCS 2015, Section 6): the sensitive feature at depth L only.

    For every L in ``depths`` and for a tree that never uses the sensitive feature
    (``exclude-sensitive``): the white-box and the full-answer black-box estimators.
    """
    if not depths:
        return []
    base = config or TreeConfig()
    records: list[dict[str, Any]] = []
    variants = [(f"depth:{d}", replace(base, sensitive_depth=d)) for d in depths]
    variants.append(("exclude-sensitive", replace(base, exclude_sensitive=True)))
    for label, cfg in variants:
        model, _ = train_tree(dataset, seed=seed, config=cfg)
        records += attack_tree(dataset, model, seed=seed, defense=label, policies=("full",))
    return records


def dp_comparison(
    dataset: SurveyDataset, epsilons: Sequence[float], *, seed: Seed = 0, depth: int = 6
) -> list[dict[str, Any]]:
    """eps-DP random trees (diffprivlib's mechanism) at each eps, attacked the same way."""
    records: list[dict[str, Any]] = []
    for eps in epsilons:
        cfg = TreeConfig(dp_epsilon=float(eps), dp_depth=depth)
        model, _ = train_tree(dataset, seed=seed, config=cfg)
        records += attack_tree(dataset, model, seed=seed, defense=f"dp:{eps:g}", policies=("full",))
    return records


def _pick(records: Sequence[dict[str, Any]], **where: Any) -> dict[str, Any] | None:
    for r in records:
        if all(r.get(k) == v for k, v in where.items()):
            return r
    return None


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def render_tree_table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown table in the paper's shape: our numbers beside the paper's (recalled).

    One block per data set; rows are the baselines and the estimators on plain answers
    (defense ``none``/``full``), columns accuracy / precision / recall / MCC / G-mean for
    members and non-members, then the paper's accuracy / precision / recall, marked
    [mem] (recalled from the paper, not checked against its text).
    """
    order = (
        "white-box",
        "white-box-predicted-label",
        "black-box-2014",
        "black-box-confidence",
        "label-only",
        "ideal",
        "random",
        "always-no",
    )
    lines = [
        "| data | estimator | members acc / prec / rec / MCC / G | "
        "non-members acc / prec / rec / MCC / G | paper acc / prec / rec [mem] |",
        "|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["dataset"] for r in records):
        for est in order:
            cells = []
            for population in POPULATIONS:
                r = _pick(
                    records, dataset=name, estimator=est, population=population, defense="none"
                ) or _pick(
                    records, dataset=name, estimator=est, population=population, defense="full"
                )
                cells.append(
                    "–"
                    if r is None
                    else " / ".join(
                        [
                            _pct(r["accuracy"]),
                            _pct(r["precision"]),
                            _pct(r["recall"]),
                            f"{r['mcc']:.2f}",
                            f"{r['gmean']:.2f}",
                        ]
                    )
                )
            if cells == ["–", "–"]:
                continue
            paper = PAPER_TABLE.get(name, {}).get(est)
            ref = "–" if paper is None else " / ".join(f"{v:.1f}" for v in paper)
            lines.append(f"| {name} | {est} | {cells[0]} | {cells[1]} | {ref} |")
    return "\n".join(lines)


def render_defense_table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown: model accuracy and attack accuracy/precision (members) per defence."""
    lines = [
        "| data | defense | model acc | estimator | members acc / prec / rec | "
        "non-members acc / prec / rec |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        if r["population"] != "members" or r["estimator"] in ("random", "always-no", "ideal"):
            continue
        other = _pick(
            records,
            dataset=r["dataset"],
            estimator=r["estimator"],
            population="non-members",
            defense=r["defense"],
        )
        non = (
            "–"
            if other is None
            else " / ".join(_pct(other[k]) for k in ("accuracy", "precision", "recall"))
        )
        mem = " / ".join(_pct(r[k]) for k in ("accuracy", "precision", "recall"))
        lines.append(
            f"| {r['dataset']} | {r['defense']} | {_pct(r['model_accuracy'])} | "
            f"{r['estimator']} | {mem} | {non} |"
        )
    return "\n".join(lines)


def sweep_verdict(
    records: Sequence[dict[str, Any]], *, estimator: str = "white-box", tolerance: float = 0.02
) -> dict[str, Any]:
    """Does some depth bring the attack to the always-"no" baseline at <= 2 points cost?

    Compares, on members, each ``depth:L`` / ``exclude-sensitive`` tree's attack accuracy
    with the always-"no" accuracy, and its model accuracy with the unconstrained tree's.
    """
    base = _pick(records, estimator="always-no", population="members")
    plain = _pick(records, estimator=estimator, population="members", defense="none")
    if base is None or plain is None:
        raise ConfigError("sweep_verdict needs the baseline and unconstrained records")
    good = []
    for r in records:
        if r["population"] != "members" or r["estimator"] != estimator:
            continue
        if not (r["defense"].startswith("depth:") or r["defense"] == "exclude-sensitive"):
            continue
        at_baseline = r["accuracy"] <= base["accuracy"] + 1e-9
        cheap = r["model_accuracy"] >= plain["model_accuracy"] - tolerance
        if at_baseline and cheap:
            good.append(r["defense"])
    return {
        "baseline_accuracy": base["accuracy"],
        "unconstrained_model_accuracy": plain["model_accuracy"],
        "unconstrained_attack_accuracy": plain["accuracy"],
        "defenses_meeting_bar": good,
    }


def plot_depth_sweep(
    records: Sequence[dict[str, Any]], path: str | Path, *, estimator: str = "white-box"
) -> Path:
    """PNG: model accuracy and attack accuracy/precision (members) against depth L.

    The last point, "never", is the tree that does not use the sensitive feature at all.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(
        (int(r["defense"].split(":")[1]), r)
        for r in records
        if r["defense"].startswith("depth:")
        and r["population"] == "members"
        and r["estimator"] == estimator
    )
    if not rows:
        raise ConfigError("no depth:L records to plot; run run_tree_audit(..., depths=...)")
    never = _pick(records, estimator=estimator, population="members", defense="exclude-sensitive")
    points = [r for _, r in rows] + ([never] if never is not None else [])
    x = list(range(len(points)))
    labels = [str(d) for d, _ in rows] + (["never"] if never is not None else [])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r["model_accuracy"] for r in points], "o-", label="model accuracy (held out)")
    ax.plot(x, [r["accuracy"] for r in points], "s-", label=f"{estimator} accuracy")
    ax.plot(x, [r["precision"] for r in points], "^-", label=f"{estimator} precision")
    ax.set_xticks(x, labels)
    base = _pick(records, estimator="always-no", population="members")
    if base is not None:
        ax.axhline(base["accuracy"], color="grey", ls="--", label='always "no" accuracy')
    plain = _pick(records, estimator=estimator, population="members", defense="none")
    if plain is not None:
        ax.axhline(
            plain["model_accuracy"], color="C0", ls=":", label="unconstrained model accuracy"
        )
    ax.set_xlabel("depth of the sensitive feature (root = 0)")
    ax.set_ylabel("share")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"privacy-aware CART on {rows[0][1]['dataset']} (members)")
    ax.legend(fontsize=7, loc="lower right")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
