"""What a defence costs honest users: the accuracy, calibration and scores they are served."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mlinvert.core import Response
from mlinvert.data.base import ImageDataset
from mlinvert.defenses.predictor import Predictor
from mlinvert.defenses.spec import Defense, build_guards, build_predictor
from mlinvert.errors import Blocked
from mlinvert.targets.base import Target

TOPK = 3


def expected_calibration_error(conf: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """ECE: mean |accuracy - confidence| over equal-width confidence bins, bin-weighted."""
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def served_utility(
    responses: Response, y: np.ndarray, n_classes: int, *, k: int = TOPK
) -> dict[str, Any]:
    """What honest users get from a defended API on held-out rows ``y``.

    ``accuracy``: the served label; ``ece``: calibration error of the returned score of
    the served label (a labels-only answer is read as confidence 1, as a client must);
    ``topk_accuracy``: true class among the ``k`` highest returned scores, ties broken
    against the user (withheld classes are not ranked above anything); ``brier``: mean
    squared distance of the returned score vector (withheld scores 0, labels one-hot)
    to the one-hot truth — the information an honest client loses shows up here. A
    row the API refused (label -1, all-zero scores) is a wrong answer with confidence 0.
    """
    y = np.asarray(y, dtype=np.int64)
    labels = np.asarray(responses.labels, dtype=np.int64)
    correct = labels == y
    rows = np.arange(len(y))
    answered = labels >= 0  # -1: the API refused the row (see _honest_client)
    if responses.probs is None:
        scores = np.zeros((len(y), n_classes))
        scores[rows[answered], labels[answered]] = 1.0
        carries = "label"
    else:
        scores = np.asarray(responses.probs, dtype=np.float64)
        carries = "probs"
    conf = np.where(answered, scores[rows, np.maximum(labels, 0)], 0.0)
    true_score = scores[np.arange(len(y)), y]
    ahead = (scores >= true_score[:, None]).sum(axis=1) - 1  # others tying or beating y
    k = min(k, n_classes)
    return {
        "accuracy": float(correct.mean()),
        "ece": expected_calibration_error(conf, correct),
        "topk_accuracy": float(((ahead < k) & (true_score > 0)).mean()),
        "brier": float(((scores - np.eye(n_classes)[y]) ** 2).sum(axis=1).mean()),
        "k": k,
        "carries": carries,
        "n_test": len(y),
    }


def served_utilities(
    models: Mapping[str, Target], defenses: Sequence[Defense], dataset: ImageDataset
) -> dict[str, dict[str, dict[str, Any]]]:
    """:func:`served_utility` of every model (by name) under every defence (by name), on
    the held-out split. An honest client goes through the detector (not the rate limit,
    which does not change answers), a few inputs per request."""
    x, y = dataset.test()
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, model in models.items():
        per: dict[str, dict[str, Any]] = {}
        for d in defenses:
            predictor = build_predictor(
                model,
                name=name,
                policy=d.policy,
                guards=build_guards(None, d.detector),
                max_batch=max(len(x), 1),
            )
            if d.detector:
                served, refused = _honest_client(predictor, x)
            else:
                served, refused = predictor.predict(x, account="utility"), 0
            util = served_utility(served, y, len(model.class_names_))
            util["labels_unchanged"] = bool(
                np.array_equal(served.labels, np.asarray(model.predict(x)))
            )
            util["policy"] = d.policy
            util["rate_limit"] = d.rate
            util["detector"] = d.detector
            if d.detector is not None:
                util["honest_refused"] = refused
            per[d.name] = util
        out[name] = per
    return out


def _honest_client(predictor: Predictor, x: np.ndarray, batch: int = 16) -> tuple[Response, int]:
    """Serve the held-out rows as one honest account would send them, ``batch`` at a time.

    Rows a guard refuses (the detector blocking the account) count as answered wrongly:
    label -1 and, under a score policy, all-zero scores. Returns the answers and how many
    rows were refused.
    """

    labels: list[np.ndarray] = []
    probs: list[np.ndarray | None] = []
    refused = 0
    for start in range(0, len(x), batch):
        chunk = x[start : start + batch]
        try:
            r = predictor.predict(chunk, account="honest-utility")
        except Blocked:
            refused += len(chunk)
            labels.append(np.full(len(chunk), -1, dtype=np.int64))
            probs.append(None)
            continue
        labels.append(np.asarray(r.labels))
        probs.append(r.probs)
    return answers(labels, probs), refused


def answers(labels: list[np.ndarray], probs: list[np.ndarray | None]) -> Response:
    """One Response from an honest client's batches; a refused batch (``probs`` None,
    labels -1) gets all-zero scores when the others carry scores."""
    width = next((p.shape[1] for p in probs if p is not None), None)
    scores = (
        None
        if width is None
        else np.concatenate(
            [
                np.zeros((len(lab), width)) if p is None else p
                for lab, p in zip(labels, probs, strict=True)
            ]
        )
    )
    return Response(labels=np.concatenate(labels), probs=scores)
