"""One attack on one person under one defence, judged: a record of ``results.json``."""

from __future__ import annotations

from typing import Any, cast

import numpy as np

from mlinvert.attacks.base import AttackResult
from mlinvert.audit.config import LIKENESS_THRESHOLD
from mlinvert.audit.context import AuditContext, AuditTarget, blinding
from mlinvert.audit.people import Outcome
from mlinvert.audit.results import Record, json_safe
from mlinvert.data.images import save_png
from mlinvert.defenses.spec import Defense
from mlinvert.errors import MlinvertError, OracleError
from mlinvert.evaluation.recogniser import JUDGE_FIELDS

METRICS = (
    "eval_top1",
    "eval_top5",
    "likeness",
    "lineup_correct",
    "pixel_nn_correct",
    "ssim",
    "mse",
    "feature_distance",
    "eigen_nn_correct",
    *JUDGE_FIELDS,
)


def is_recovered(metrics: Record | dict[str, Any]) -> bool:
    """On faces: the independent recogniser ranks the right person first. Elsewhere
    (digits): the evaluation model's top-1 and the likeness threshold."""
    if metrics.get("judge_top1") is not None:
        return bool(metrics["judge_top1"])
    like = metrics.get("likeness")
    return (
        bool(metrics.get("eval_top1")) and like is not None and float(like) >= (LIKENESS_THRESHOLD)
    )


def shared_record(
    ctx: AuditContext, attack: str, defense: Defense, target: AuditTarget, label: int
) -> Record | None:
    """The record of an earlier run this one provably equals (see :func:`_shared_run`)."""
    shared = _shared_run(ctx, attack, defense, target, label)
    if shared is None:
        return None
    source, why = shared
    record = cast(Record, {k: v for k, v in source.items() if k not in ("defense", "utility")})
    record.update(_base(ctx, attack, defense, target, label))
    record["utility"] = ctx.results.doc["utility"][target.name][defense.name]
    record["channel"] = f"{source['channel']} (shared run of '{source['defense']}': {why})"
    record["shared_from"] = source["defense"]
    return record


def _base(
    ctx: AuditContext, attack: str, defense: Defense, target: AuditTarget, label: int
) -> Record:
    return Record(
        attack=attack,
        defense=defense.name,
        target_model=target.name,
        label=label,
        label_name=ctx.dataset.class_names[label],
        seed=ctx.config.seed,
    )


def _channel(ctx: AuditContext, attack: str) -> str:
    """How the attacker reached the model."""
    if attack == "whitebox":
        return "model weights"
    if ctx.config.api is not None:
        return "deployed HTTP API"
    return "in-process API" if ctx.config.in_process else "HTTP API"


def judged_record(
    ctx: AuditContext,
    attack: str,
    defense: Defense,
    target: AuditTarget,
    label: int,
    outcome: AttackResult | MlinvertError,
    *,
    lanes: int,
    accounts: int | None = None,
    blinded_up_to: float | None = None,
    stalled: int = 0,
) -> Record:
    """Judge an attack's result (or record its error): one record.

    ``lanes``: how many people this attack ran beside (1: alone; its ``seconds`` are
    then its own wall time, otherwise the wall time while sharing requests).
    ``accounts``: API accounts the attacker had opened when it ended (None: white-box).
    ``blinded_up_to``: the largest blinding noise its probes carried (``blinded`` is
    the amplitude it started with; larger after the service blocked an account).
    ``stalled``: shared requests sent without a lane while this attack ran (recorded
    only when there were some: a seeded re-run may then differ in the last bits).
    """
    record = _base(ctx, attack, defense, target, label)
    record.update(
        Record(
            channel=_channel(ctx, attack),
            lanes=lanes,
            blinded=blinding(ctx, attack, defense),
            blinded_up_to=blinded_up_to,
            accounts=accounts,
        )
    )
    if stalled:
        record["lanes_stalled"] = stalled
    util = ctx.results.doc["utility"][target.name][defense.name]
    if isinstance(outcome, MlinvertError):
        record.update(_failed(ctx, attack, outcome, util))
    else:
        record.update(_judged(ctx, attack, defense, target, label, outcome))
    record["recovered"] = is_recovered(record)
    record["utility"] = util
    return record


def _failed(ctx: AuditContext, attack: str, error: MlinvertError, util: dict[str, Any]) -> Record:
    """The record's outcome when the attack raised ``error``: MI-Face against a
    labels-only API gets nothing out (the defence's measured effect); any other error
    leaves the cell unmeasured. An error because the service died stops the run."""
    if not ctx.api_alive():
        raise OracleError(
            f"the prediction service stopped during the audit ({error}); continue with --resume"
        ) from error
    inapplicable = attack == "blackbox" and util.get("carries") == "label"
    record = Record(
        status="not_applicable" if inapplicable else "error",
        measured=inapplicable,
        error=str(error),
        n_queries=0,
        seconds=0.0,
        image=None,
        target_confidence=None,
    )
    record.update(cast(Record, dict.fromkeys(METRICS)))
    return record


def _judged(
    ctx: AuditContext,
    attack: str,
    defense: Defense,
    target: AuditTarget,
    label: int,
    result: AttackResult,
) -> Record:
    """The record's outcome for a reconstruction: its image saved, the judges' scores."""
    rel = f"images/{target.name}/{attack}/{defense.slug}/{label}.png"
    save_png(ctx.results.out / rel, result.reconstructions[0])
    judge_error = None
    try:
        scores = ctx.judge.score(result.reconstructions[:1], np.asarray([label]))[0]
    except MlinvertError as exc:  # a judge that fails leaves the record unmeasured
        scores, judge_error = {}, f"the judge failed: {exc}"
    metrics = cast(Record, {k: json_safe(scores.get(k)) for k in METRICS})
    faces = ctx.results.doc["thresholds"].get("judge") == "independent"
    if faces and metrics.get("judge_top1") is None and judge_error is None:
        judge_error = "the independent face judge gave no verdict"
    conf = float(result.confidence[0]) if len(result.confidence) else float("nan")
    message = (result.per_label[0].get("message") or None) if result.per_label else None
    record = Record(
        status=result.status,
        error=judge_error or message,
        n_queries=int(result.n_queries),
        seconds=round(float(result.elapsed_s), 4),
        image=rel,
        target_confidence=json_safe(conf),
        measured=judge_error is None,
    )
    record.update(metrics)
    return record


def _shared_run(
    ctx: AuditContext, attack: str, defense: Defense, target: AuditTarget, label: int
) -> tuple[Record, str] | None:
    """An earlier record this one provably equals, and why (None: run the attack).

    White-box: the attacker holds the weights, so no API defence applies. Label-only
    under an output policy without a rate limit: it sees only labels, and the policy
    was measured (on the whole held-out split) to serve exactly the raw model's labels.
    """
    if attack == "whitebox":
        why = "the attacker holds the weights; API defences do not apply"
    elif (
        attack == "label-only"
        and defense.rate is None
        and defense.detector is None
        and ctx.results.doc["utility"][target.name][defense.name].get("labels_unchanged")
    ):
        why = "this policy serves the same labels, and the attack sees only labels"
    else:
        return None
    util = ctx.results.doc["utility"][target.name]
    for r in ctx.results.doc["records"]:
        if (
            (r["attack"], r["target_model"], r["label"]) == (attack, target.name, label)
            and not r.get("shared_from")
            and (attack == "whitebox" or util[r["defense"]].get("labels_unchanged"))
            and (attack == "whitebox" or util[r["defense"]].get("rate_limit") is None)
            and (attack == "whitebox" or util[r["defense"]].get("detector") is None)
        ):
            return r, why
    return None


def record_outcome(
    ctx: AuditContext, attack: str, defense: Defense, target: AuditTarget, o: Outcome
) -> None:
    """Judge one person's outcome, write the record and report it."""
    record = judged_record(
        ctx,
        attack,
        defense,
        target,
        o.label,
        o.outcome,
        lanes=o.lanes,
        accounts=o.accounts,
        blinded_up_to=o.blinded_up_to,
        stalled=o.stalled,
    )
    ctx.results.add(record)
    ctx.events("record", record)
