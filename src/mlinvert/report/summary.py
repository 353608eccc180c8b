"""Aggregate audit records and turn them into plain-words verdicts.

Everything here is a pure function of the ``results.json`` document (see
``docs/results-schema.md``), so a report can be re-rendered from a saved run.

On faces the verdicts are the independent face recogniser's (``thresholds.judge`` is
``independent``): *recovered* = it ranks the right person first, *identity leaks* = its
mean 5-way lineup probability reaches ``thresholds.identity_lineup``. Elsewhere (digits)
this project's own judges give them. A record that could not be measured (``measured``
false: the attack raised an error, or the judge failed) counts as not recovered in every
rate, and its defence's verdict is ``not measured`` unless what was measured already
shows it ``exposed``: a failed measurement never reads as a defence's success.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from mlinvert.core import API_ATTACKS

#: Chance of the automated 5-way lineup.
LINEUP_CHANCE = 0.2
#: The verdicts' thresholds: the audit writes them into ``results.json``
#: (``thresholds``), and a results file that lacks one is judged with these.
#: ``exposed_rate``: recovered for at least this share of the people is "exposed";
#: ``identity_rate``: the evaluation model's top-1 at least this (and twice chance) is
#: "identity leaks" off faces; ``max_accuracy_cost``: a defence may cost honest users
#: at most this much accuracy to be recommended.
THRESHOLDS = {"exposed_rate": 0.2, "identity_rate": 0.3, "max_accuracy_cost": 0.01}


def thresholds(results: dict[str, Any]) -> dict[str, Any]:
    """The thresholds ``results`` was judged with (:data:`THRESHOLDS` where it is silent)."""
    return {**THRESHOLDS, **(results.get("thresholds") or {})}


ATTACK_TITLES = {
    "whitebox": "White-box MI-Face (attacker holds the model)",
    "blackbox": "Black-box MI-Face (scores through the API)",
    "label-only": "Label-only inversion (labels through the API)",
}


def attack_title(name: str) -> str:
    """Human title of an attack name."""
    return ATTACK_TITLES.get(name, name)


def _rate(records: Sequence[dict[str, Any]], key: str) -> float:
    if not records:
        return 0.0
    return sum(1 for r in records if r.get(key) is True) / len(records)


def _mean(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _median(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.median(vals) if vals else None


@dataclass(frozen=True, kw_only=True)
class Cell:
    """One attack × defence × target summary (rates in [0, 1])."""

    attack: str
    defense: str
    target_model: str
    n: int
    eval_top1: float
    eval_top5: float
    lineup: float
    pixel_nn: float
    recovered: float
    likeness: float | None
    ssim: float | None
    feature_distance: float | None
    median_queries: float | None
    median_seconds: float | None
    statuses: dict[str, int]
    judge_top1: float | None = None  # independent recogniser: right person first
    judge_top5: float | None = None
    judge_lineup: float | None = None  # its mean exact 5-way lineup probability
    face_found: float | None = None  # its detector found a face
    unmeasured: int = 0  # records that could not be measured (error, judge failure)
    errors: tuple[str, ...] = ()  # their distinct errors
    shared_from: str | None = None
    blinded: float | None = None  # the attacker's query blinding (+-amplitude), if any
    blinded_up_to: float | None = None  # the largest blinding after blocked accounts
    accounts: int = 1  # most API accounts one attack opened

    @property
    def status_text(self) -> str:
        """Status counts as ``succeeded 9, rate_limited 1`` (+ the run it shares)."""
        text = ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items()))
        return text + (f" (run shared with {self.shared_from})" if self.shared_from else "")


def cells(records: Sequence[dict[str, Any]]) -> list[Cell]:
    """One :class:`Cell` per (target, attack, defence), in first-seen order."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["target_model"], r["attack"], r["defense"]), []).append(r)
    out = []
    for (target, attack, defense), rs in groups.items():
        statuses: dict[str, int] = {}
        for r in rs:
            statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        out.append(
            Cell(
                attack=attack,
                defense=defense,
                target_model=target,
                n=len(rs),
                eval_top1=_rate(rs, "eval_top1"),
                eval_top5=_rate(rs, "eval_top5"),
                lineup=_rate(rs, "lineup_correct"),
                pixel_nn=_rate(rs, "pixel_nn_correct"),
                recovered=_rate(rs, "recovered"),
                likeness=_mean(r.get("likeness") for r in rs),
                ssim=_mean(r.get("ssim") for r in rs),
                feature_distance=_mean(r.get("feature_distance") for r in rs),
                median_queries=_median(r.get("n_queries") for r in rs),
                median_seconds=_median(r.get("seconds") for r in rs),
                statuses=statuses,
                judge_top1=_judged_rate(rs, "judge_top1"),
                judge_top5=_judged_rate(rs, "judge_top5"),
                judge_lineup=_judged_mean(rs, "judge_lineup5"),
                face_found=_judged_rate(rs, "face_found"),
                unmeasured=sum(1 for r in rs if not r.get("measured", True)),
                errors=tuple(
                    dict.fromkeys(str(r.get("error")) for r in rs if not r.get("measured", True))
                ),
                shared_from=next((r["shared_from"] for r in rs if r.get("shared_from")), None),
                blinded=next((r["blinded"] for r in rs if r.get("blinded")), None),
                blinded_up_to=max(
                    (float(r["blinded_up_to"]) for r in rs if r.get("blinded_up_to")),
                    default=None,
                ),
                accounts=max((int(r.get("accounts") or 1) for r in rs), default=1),
            )
        )
    return out


def _judged(records: Sequence[dict[str, Any]], key: str) -> bool:
    """Whether any record carries the independent judge's ``key`` (faces only)."""
    return any(r.get(key) is not None for r in records)


def _judged_rate(records: Sequence[dict[str, Any]], key: str) -> float | None:
    """Rate of ``key`` over every record (unmeasured ones count as misses); None when no
    record was judged by the independent recogniser."""
    return _rate(records, key) if _judged(records, key) else None


def _judged_mean(records: Sequence[dict[str, Any]], key: str) -> float | None:
    """Mean of ``key`` over every record, an unmeasured one counting as 0 (no identity
    shown); None when no record was judged."""
    if not _judged(records, key):
        return None
    return statistics.fmean(float(r.get(key) or 0.0) for r in records)


def faces_judged(results: dict[str, Any]) -> bool:
    """Whether the independent face recogniser gives this audit's verdicts."""
    return results.get("thresholds", {}).get("judge") == "independent"


def identity_bar(results: dict[str, Any]) -> float:
    """Mean lineup probability that counts as clearly above chance (faces)."""
    return float(results.get("thresholds", {}).get("identity_lineup", 2 * LINEUP_CHANCE))


def utility_of(results: dict[str, Any], target: str, defense: str) -> dict[str, Any]:
    """The utility block of ``defense`` on ``target`` (empty if not measured)."""
    return dict(results.get("utility", {}).get(target, {}).get(defense, {}))


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """The plain-words judgement of one defence on one target."""

    defense: str
    target_model: str
    level: str  # "exposed", "identity leaks", "mitigated", "cut off", "not measured"
    headline: str
    details: list[str]
    api_identity: float
    api_recovered: float
    api_lineup: float
    api_queries: float | None
    accuracy: float | None
    accuracy_cost: float | None
    ece: float | None
    brier: float | None
    topk: float | None
    blinded: float | None = None  # the API attacker's query blinding, if it adapted
    blinded_up_to: float | None = None  # its largest, after the service blocked accounts
    accounts: int = 1  # API accounts the strongest API attack opened
    stopped: bool = False  # the service refused the strongest API attack for every person
    faces_found: float | None = None  # the independent detector found a face (strongest)
    judge: str = "evaluation model"  # who gave the verdict
    errors: tuple[str, ...] = ()  # why cells could not be measured


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f} %"


def _queries(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def verdicts(results: dict[str, Any]) -> list[Verdict]:
    """A verdict per (target, defence), judged on the strongest API attack.

    Levels: ``exposed`` when the API attacker *recovers* faces for at least
    ``thresholds.exposed_rate`` of the people (faces: the independent recogniser ranks
    the right person first; elsewhere: evaluation-model top-1 and likeness);
    ``identity leaks`` when the reconstructions point to the right person clearly above
    chance without being recognised (faces: the independent recogniser's mean 5-way
    lineup probability at least ``thresholds.identity_lineup``; elsewhere: evaluation
    top-1 >= ``thresholds.identity_rate`` and twice chance, or the 5-way lineup right at
    least twice its 20 % chance); ``mitigated`` otherwise; ``not measured`` when a record
    of an API attack could not be measured and what was measured does not already show
    the defence exposed. A per-account guard (rate limit, query detector) that
    refused every API attack before it finished (all ``rate_limited`` / ``blocked``) and
    left it nothing is ``cut off``, not ``mitigated``: it stopped the audit's accounts,
    and a patient attacker or one with more keys is not stopped by that.

    ``api_recovered``, ``api_identity`` and ``api_lineup`` are each the highest any API
    attack reached, so no number understates what one attack got.
    """
    judging = _Judging.of(results)
    targets = list(dict.fromkeys(c.target_model for c in judging.by_key.values()))
    defenses = [d["name"] for d in results.get("defenses", [])] or list(
        dict.fromkeys(c.defense for c in judging.by_key.values())
    )
    found = (_verdict(judging, target, defense) for target in targets for defense in defenses)
    return [v for v in found if v is not None]


@dataclass(frozen=True, kw_only=True)
class _Judging:
    """What every verdict of one results document is judged with."""

    results: dict[str, Any]
    exposed_rate: float
    identity_rate: float
    chance: float | None  # 1 / the number of classes, when known
    keys: int  # API keys per attack
    faces: bool  # the independent face recogniser judges
    bar: float  # the lineup that counts as identity leaking (faces)
    by_key: dict[tuple[str, str, str], Cell]  # by (target, attack, defence)

    @classmethod
    def of(cls, results: dict[str, Any]) -> _Judging:
        """The thresholds, judge and cells of ``results``."""
        th = thresholds(results)
        n_classes = int(results.get("dataset", {}).get("n_classes", 0)) or None
        return cls(
            results=results,
            exposed_rate=float(th["exposed_rate"]),
            identity_rate=float(th["identity_rate"]),
            chance=1.0 / n_classes if n_classes else None,
            keys=int(results.get("config", {}).get("accounts") or 1),
            faces=faces_judged(results),
            bar=identity_bar(results),
            by_key={
                (c.target_model, c.attack, c.defense): c for c in cells(results.get("records", []))
            },
        )


@dataclass(frozen=True, kw_only=True)
class _ApiFindings:
    """What the API attacks on one (target, defence) got, for its :class:`Verdict`."""

    level: str
    headline: str
    details: list[str]
    api_identity: float = 0.0
    api_recovered: float = 0.0
    api_lineup: float = 0.0
    api_queries: float | None = None
    accounts: int = 1
    stopped: bool = False
    faces_found: float | None = None
    errors: tuple[str, ...] = ()


def _verdict(judging: _Judging, target: str, defense: str) -> Verdict | None:
    """The verdict of ``defense`` on ``target`` (None when no attack ran under it)."""
    by_key = judging.by_key
    api = [by_key[k] for a in API_ATTACKS if (k := (target, a, defense)) in by_key]
    white = by_key.get((target, "whitebox", defense))
    util = utility_of(judging.results, target, defense)
    acc = util.get("accuracy")
    base_acc = utility_of(judging.results, target, "none").get("accuracy")
    cost = None if acc is None or base_acc is None else base_acc - acc
    if not api and white is None:
        return None
    if api:
        found = _api_findings(judging, defense, api)
    else:
        found = _ApiFindings(
            level="not measured", headline=f"{defense}: no API attack was run.", details=[]
        )
    details = list(found.details)
    if white is not None:
        details.append(
            f"{attack_title('whitebox')}: {_measured_text(white, judging.faces)} — output "
            "defences do not reach an attacker who holds the weights."
        )
    if patience := _patience_text(util, by_key.get((target, "blackbox", "none"))):
        details.append(patience)
    blinded = next((c.blinded for c in api if c.blinded), None)
    raised = max((c.blinded_up_to or 0.0 for c in api), default=0.0)
    if util.get("detector") and api:
        flagged = _flag_text(judging.results, defense, target, api)
        details.append(_detector_text(util, api, flagged, blinded, raised))
    if util:
        details.append(_utility_text(defense, util, cost))
    return Verdict(
        defense=defense,
        target_model=target,
        level=found.level,
        headline=found.headline,
        details=details,
        api_identity=found.api_identity,
        api_recovered=found.api_recovered,
        api_lineup=found.api_lineup,
        api_queries=found.api_queries,
        accuracy=acc,
        accuracy_cost=cost,
        ece=util.get("ece"),
        brier=util.get("brier"),
        topk=util.get("topk_accuracy"),
        blinded=blinded,
        blinded_up_to=raised if blinded and raised > blinded else None,
        accounts=found.accounts,
        stopped=found.stopped,
        faces_found=found.faces_found,
        judge="independent face recogniser" if judging.faces else "evaluation model",
        errors=found.errors,
    )


def _api_findings(judging: _Judging, defense: str, api: Sequence[Cell]) -> _ApiFindings:
    """Level, headline and measures from the API attacks (``api`` not empty), judged on
    the strongest; a detail line per attack."""
    faces = judging.faces
    best = max(api, key=lambda c: (c.recovered, _lineup(c, faces), c.eval_top1))
    level = _level(judging, defense, api, best)
    errors = tuple(dict.fromkeys(e for c in api for e in c.errors))
    if level != "exposed" and any(c.unmeasured for c in api):
        level = "not measured"
    return _ApiFindings(
        level=level,
        headline=_headline(judging, defense, level, api, best, errors),
        details=[_attack_text(c, faces, judging.keys) for c in api],
        api_identity=max(c.eval_top1 for c in api),
        api_recovered=best.recovered,
        api_lineup=max(_lineup(c, faces) for c in api),
        api_queries=best.median_queries,
        accounts=best.accounts,
        stopped=_refused(best),
        faces_found=best.face_found,
        errors=errors,
    )


def _level(judging: _Judging, defense: str, api: Sequence[Cell], best: Cell) -> str:
    """``exposed``, ``identity leaks``, ``mitigated`` or ``cut off`` from what was
    measured (before unmeasured runs are accounted for)."""
    if judging.faces:
        leaks = any((c.judge_lineup or 0.0) >= judging.bar for c in api)
    else:
        chance, identity_rate = judging.chance, judging.identity_rate
        leaks = any(
            (c.eval_top1 >= identity_rate and (chance is None or c.eval_top1 >= 2 * chance))
            or c.lineup >= max(identity_rate, 2 * LINEUP_CHANCE)
            for c in api
        )
    level = (
        "exposed"
        if best.recovered >= judging.exposed_rate
        else "identity leaks"
        if leaks
        else "mitigated"
    )
    if level == "mitigated" and _cut_off(defense, api):
        level = "cut off"
    return level


def _headline(
    judging: _Judging,
    defense: str,
    level: str,
    api: Sequence[Cell],
    best: Cell,
    errors: tuple[str, ...],
) -> str:
    """The verdict's first sentence, and how many were recovered below the bar."""
    faces = judging.faces
    words = {
        "exposed": "an outsider recovers recognisable private faces through the API"
        + (" (the independent face recogniser names the person)" if faces else ""),
        "identity leaks": (
            "reconstructions point to the right person in a lineup clearly above "
            "chance, but the independent face recogniser does not name them"
            if faces
            else "reconstructions point to the right person but do not look like "
            "them (classifier templates, not faces)"
        ),
        "mitigated": "the API attacks recover neither identity nor likeness clearly above chance",
        "cut off": "the guard refused the attacker's account and cut the API attacks "
        "off before they got far; that stops one account, not an attacker with more "
        "keys or more time",
        "not measured": (
            f"{sum(c.unmeasured for c in api)} attack run(s) could not be measured, "
            "so this defence is not shown to work ("
            + "; ".join(errors[:2])
            + "); fix the cause and run again with --resume, which re-runs them"
        ),
    }[level]
    headline = f"{defense}: {words}."
    if level != "exposed" and best.recovered > 0:
        lost = round(best.recovered * best.n)
        headline += (
            f" Still, {lost} of {best.n} {'was' if lost == 1 else 'were'} recovered "
            f"({attack_title(best.attack)}), below the {_pct(judging.exposed_rate)} that "
            "counts as exposed."
        )
    return headline


def _attack_text(c: Cell, faces: bool, keys: int) -> str:
    """One API attack's detail line: what it got, its queries and the keys it used."""
    keys_text = "."
    if keys > 1 and c.accounts == 1 and _refused(c):
        # Rotating moves on only from an account that answered something
        keys_text = (
            f"; the attacker had {keys} API keys but opened 1: the service "
            "refused its first account before that account answered anything, "
            "so the refusal was of the queries themselves and a fresh key "
            "would have been refused too."
        )
    elif keys > 1:
        keys_text = (
            f"; the attacker had {keys} API keys and opened {c.accounts}, a "
            "fresh one whenever one was refused."
        )
    return (
        f"{attack_title(c.attack)}: {_measured_text(c, faces)}; median "
        f"{_queries(c.median_queries)} queries ({c.status_text})" + keys_text
    )


def _patience_text(util: dict[str, Any], free: Cell | None) -> str:
    """Under a rate limit, how long one account needs for what the undefended black-box
    attack (``free``) spent ("" without a rate limit or a parsable one)."""
    rate = util.get("rate_limit")
    if not (rate and free is not None and free.median_queries):
        return ""
    count, _, period = str(rate).partition("/")
    try:
        hours = free.median_queries / float(count)
    except ValueError:
        return ""
    return (
        f"Patience: the black-box attack needs a median of "
        f"{_queries(free.median_queries)} queries per person without a limit; "
        f"at {rate} per account that is about {hours:,.1f} {period}(s) of one "
        "account per person (many accounts or a slow attack still get there)."
    )


def _detector_text(
    util: dict[str, Any],
    api: Sequence[Cell],
    flagged: str,
    blinded: float | None,
    raised: float,
) -> str:
    """How the API attacks ended under a query detector, whether the attacker blinded its
    probes, what the detector flagged and what it refused an honest client."""
    outcomes = "; ".join(f"{attack_title(c.attack)}: {c.status_text}" for c in api)
    honest = (
        f"An honest client sending the {util.get('n_test', '?')} held-out inputs "
        f"had {util.get('honest_refused', 0)} refused."
    )
    if flagged:
        honest = f"{flagged} {honest}"
    if blinded:
        more = (
            f", doubling it each time the service blocked one of its accounts (up to ±{raised:g})"
            if raised > blinded
            else ""
        )
        return (
            f"Query detector ({util['detector']}): the API advertises it, so the "
            f"attacker adapted and added fresh noise of ±{blinded:g} to every probe "
            f"(query blinding){more}. How the attacks ended: {outcomes}. {honest}"
        )
    return (
        f"Query detector ({util['detector']}), how the attacks ended: "
        f"{outcomes}. {honest} This audit's attacker did not adapt (--blind 0). "
        "The detector stops an account, not an attacker: probes blinded with "
        "noise coarser than its quantisation (--blind), or spread over enough "
        "keys that none sends 100 near duplicates, get past it (BENCHMARKS.md, "
        "'Query detector')."
    )


def _utility_text(defense: str, util: dict[str, Any], cost: float | None) -> str:
    """What the defence leaves honest users: accuracy (and its cost), calibration,
    top-k usability, their rate limit."""
    parts = [f"served accuracy {_pct(util.get('accuracy'))}"]
    if cost is not None and defense != "none":
        parts.append(f"{abs(100 * cost):.1f} points {'above' if cost < 0 else 'below'} 'none'")
    if util.get("brier") is not None:
        parts.append(f"Brier score {util['brier']:.3f}")
    if util.get("ece") is not None:
        parts.append(f"calibration error {util['ece']:.3f}")
    if util.get("topk_accuracy") is not None:
        parts.append(f"top-{util.get('k', 3)} usability {_pct(util['topk_accuracy'])}")
    if util.get("rate_limit"):
        parts.append(f"honest clients limited to {util['rate_limit']} per account")
    return "Utility for honest users: " + ", ".join(parts) + "."


def _identity_text(v: Verdict) -> str:
    """The verdict's identity measures after its recovered rate, in its judge's words."""
    if v.judge == "evaluation model":
        return f"top-1 {_pct(v.api_identity)}, lineup {_pct(v.api_lineup)}"
    return f"lineup {_pct(v.api_lineup)}, attack accuracy {_pct(v.api_identity)}"


def _lineup(c: Cell, faces: bool) -> float:
    """The lineup measure of the verdict's judge."""
    return (c.judge_lineup or 0.0) if faces else c.lineup


def _measured_text(c: Cell, faces: bool) -> str:
    """What one attack got, in the words of the verdict's judge."""
    if faces:
        text = (
            f"recovered {_pct(c.recovered)} of {c.n} people (the independent face recogniser "
            f"ranks the right person first; top-5 {_pct(c.judge_top5)}; 5-way lineup "
            f"{_pct(c.judge_lineup)}, chance 20 %; a face found in {_pct(c.face_found)}); "
            f"attack accuracy {_pct(c.eval_top1)} (evaluation-model top-1, trained on the "
            "same private photos)"
        )
    else:
        text = (
            f"recovered {_pct(c.recovered)} of {c.n} people; evaluation-model top-1 "
            f"{_pct(c.eval_top1)}, top-5 {_pct(c.eval_top5)}; lineup {_pct(c.lineup)} "
            "(chance 20 %)"
        )
    if c.unmeasured:
        text += f"; {c.unmeasured} could not be measured ({'; '.join(c.errors[:2])})"
    return text


def _refused(c: Cell) -> bool:
    """The service refused this attack (rate limited or blocked) for every person."""
    return set(c.statuses) <= {"rate_limited", "blocked"}


def _cut_off(defense: str, api: Sequence[Cell]) -> bool:
    """Every API attack under a per-account guard was refused before it finished."""
    return _per_account(defense) and all(_refused(c) for c in api)


def _flag_text(results: dict[str, Any], defense: str, target: str, api: Sequence[Cell]) -> str:
    """Whether the detector flagged each attacking account (``detector_flags``)."""
    flags = results.get("detector_flags", {}).get(defense, {}).get(target)
    if not flags:
        return ""
    parts = []
    for c in api:
        if c.attack not in flags:
            continue
        flag = flags[c.attack]
        text = "never flagged"
        if flag is not None:
            text = (
                f"flagged at input {flag['inputs']:,} ({flag['near_duplicates']:,} near duplicates)"
            )
            if c.accounts > 1:
                flagged = flag.get("accounts_flagged", 1)
                text += f"; {flagged} of the {c.accounts} accounts it opened flagged"
        parts.append(f"{attack_title(c.attack)}: {text}")
    return f"The attacking accounts — {'; '.join(parts)}." if parts else ""


def _per_account(defense: str) -> bool:
    """A defence row that adds a per-account guard (rate limit or query detector)."""
    return any(part.strip().startswith(("rate:", "detect")) for part in defense.split("+"))


def _plain_twin(targets: dict[str, Any], name: str) -> str | None:
    """The target of the same kind trained without DP-SGD, for a DP-SGD target ``name``."""
    info = targets.get(name, {})
    if not info.get("privacy"):
        return None
    return next(
        (
            n
            for n, i in targets.items()
            if i.get("kind") == info.get("kind") and not i.get("privacy")
        ),
        None,
    )


def _dp_comparisons(results: dict[str, Any], vs: Sequence[Verdict]) -> list[str]:
    """For each DP-SGD target, what the noise bought against the same kind trained
    plainly in the same run (no output defence): recovered faces and test accuracy."""
    targets = results.get("targets", {})
    by = {(v.target_model, v.defense): v for v in vs}
    white = {
        (c.target_model, c.defense): c
        for c in cells(results.get("records", []))
        if c.attack == "whitebox"
    }
    lines = []
    for name, info in targets.items():
        privacy = info.get("privacy")
        plain = _plain_twin(targets, name)
        if not privacy or plain is None:
            continue
        parts = []
        dp_v, plain_v = by.get((name, "none")), by.get((plain, "none"))
        if dp_v and plain_v and "not measured" not in (dp_v.level, plain_v.level):
            parts.append(
                f"the strongest API attack recovered {_pct(dp_v.api_recovered)} "
                f"({_identity_text(dp_v)}) against {_pct(plain_v.api_recovered)} "
                f"({_identity_text(plain_v)}) for {plain}"
            )
        dp_w, plain_w = white.get((name, "none")), white.get((plain, "none"))
        if dp_w is not None and plain_w is not None:
            what = "attack accuracy" if faces_judged(results) else "top-1"
            parts.append(
                f"the white-box attack recovered {_pct(dp_w.recovered)} ({what} "
                f"{_pct(dp_w.eval_top1)}) against {_pct(plain_w.recovered)} "
                f"({what} {_pct(plain_w.eval_top1)})"
            )
        if not parts:
            continue
        line = (
            f"{name}: DP-SGD at epsilon {privacy['epsilon']:.2g} — with no output defence "
            + "; ".join(parts)
            + f"; test accuracy {_pct(info.get('test_accuracy'))} against "
            f"{_pct(targets[plain].get('test_accuracy'))} for {plain}."
        )
        lines.append(line)
    return lines


def answer(results: dict[str, Any], vs: Sequence[Verdict]) -> list[str]:
    """One line per target for the top of the report: which defences stop the API
    attacks, at what accuracy, and under which the private faces still come out."""
    white = {
        c.target_model: c
        for c in cells(results.get("records", []))
        if c.attack == "whitebox" and c.defense == "none"
    }
    lines = []
    for target in dict.fromkeys(v.target_model for v in vs):
        mine = [v for v in vs if v.target_model == target and v.level != "not measured"]
        unmeasured = _unmeasured_text(vs, target)
        if not mine:
            if unmeasured:
                lines.append(f"{target}: {unmeasured}")
            continue
        works = [v for v in mine if v.level == "mitigated"]
        targets = results.get("targets", {})
        label = target
        if (plain := _plain_twin(targets, target)) is not None:
            label += (
                f" (DP-SGD, epsilon {targets[target]['privacy']['epsilon']:.2g}: test accuracy "
                f"{_pct(targets[target].get('test_accuracy'))} against "
                f"{_pct(targets[plain].get('test_accuracy'))} for {plain})"
            )
        if works:
            costs = [
                f"'{v.defense}' (served accuracy {_pct(v.accuracy)}"
                + (
                    f", {100 * v.accuracy_cost:.1f} points below 'none'"
                    if v.accuracy_cost is not None and v.defense != "none"
                    else ""
                )
                + ")"
                for v in works
            ]
            head = f"{label}: the API attacks are mitigated by {', '.join(costs)}."
        else:
            head = f"{label}: no defence measured stops the API attacker."
        parts = [
            f"{title}: {', '.join(repr(v.defense) for v in mine if v.level == level)}"
            for level, title in (
                ("exposed", "exposed (faces recovered)"),
                ("identity leaks", "identity leaks"),
                ("cut off", "cut off (the audit's accounts stopped, not the attacker)"),
            )
            if any(v.level == level for v in mine)
        ]
        rest = "; ".join(parts)
        line = head + (f" {rest[:1].upper()}{rest[1:]}." if parts else "")
        if target in white:
            line += (
                f" An attacker holding the weights recovers {_pct(white[target].recovered)} "
                "whatever the output defence."
            )
        if unmeasured:
            line += f" {unmeasured}"
        lines.append(line)
    return lines


def _unmeasured_text(vs: Sequence[Verdict], target: str) -> str:
    """The defences of ``target`` whose verdict could not be measured, and why."""
    missing = [v for v in vs if v.target_model == target and v.level == "not measured"]
    if not missing:
        return ""
    why = "; ".join(dict.fromkeys(e for v in missing for e in v.errors[:1])) or "no API attack"
    return (
        f"Not measured, so not shown to protect anything: "
        f"{', '.join(repr(v.defense) for v in missing)} ({why})."
    )


def recommendations(results: dict[str, Any], vs: Sequence[Verdict]) -> list[str]:
    """Recommended settings, derived from the measured verdicts."""
    recs: list[str] = []
    max_cost = float(thresholds(results)["max_accuracy_cost"])
    for target in dict.fromkeys(v.target_model for v in vs):
        if unmeasured := _unmeasured_text(vs, target):
            recs.append(
                f"{target}: do not choose a defence from this report until every cell is "
                f"measured. {unmeasured} Fix the cause and run the audit again with --resume."
            )
        mine = [v for v in vs if v.target_model == target and v.level != "not measured"]
        if line := _policy_text(target, mine, max_cost):
            recs.append(line)
    leaky = [v for v in vs if "rate:" in v.defense and v.level == "exposed"]
    recs.extend(_rate_limit_text(v) for v in leaky)
    recs.extend(
        _detector_advice(v) for v in vs if "detect" in v.defense and v.level != "not measured"
    )
    recs.extend(_dp_comparisons(results, vs))
    if recs:
        if not leaky:
            recs.append(
                "Add a per-account rate limit on top: it caps what one key can spend on a "
                "query-hungry black-box search, at no cost to accuracy for ordinary clients."
            )
        recs.append(
            "Keep the weights private: the white-box attack is unaffected by every output "
            "defence, so a leaked or downloadable model gives the faces away."
        )
    return recs


def _policy_text(target: str, mine: Sequence[Verdict], max_cost: float) -> str:
    """The output policy to serve ``target`` with, among its measured verdicts ``mine``:
    the least exposing one costing at most ``max_cost`` accuracy ("" without any).
    Per-account guards (rate limit, detector) stop one key, not an attacker with many,
    so they are recommended on top, not instead."""
    policies = [v for v in mine if not _per_account(v.defense)]
    if not policies:
        return ""
    cheap = [v for v in policies if v.accuracy_cost is None or v.accuracy_cost <= max_cost]
    pool = cheap or policies
    best = min(
        pool,
        key=lambda v: (v.api_recovered, v.api_identity, v.api_lineup, -(v.topk or 0.0)),
    )
    none = next((v for v in mine if v.defense == "none"), None)
    got = f"recovered {_pct(best.api_recovered)} ({_identity_text(best)})"
    if best.level == "mitigated":
        line = f"{target}: serve with '{best.defense}' — the API attacks {got}"
    elif len(policies) == 1:
        line = (
            f"{target}: no output policy protects it, since only '{best.defense}' was "
            f"audited ({best.level}): the API attacks {got}"
        )
    else:
        still = "leaks identity" if best.level == "identity leaks" else f"is {best.level}"
        line = (
            f"{target}: no output policy measured protects it; under the least exposing, "
            f"'{best.defense}', it still {still}: the API attacks {got}"
        )
    if none is not None and best.defense != "none":
        line += f" instead of {_pct(none.api_recovered)} ({_identity_text(none)})"
    if best.accuracy_cost is not None and best.defense != "none":
        line += f", at an accuracy cost of {100 * best.accuracy_cost:.1f} points"
    return line + "."


def _rate_limit_text(v: Verdict) -> str:
    """Why a rate limit under which faces were recovered did not stop the attack."""
    if v.accounts > 1:
        return (
            f"{v.target_model}: the rate limit '{v.defense}' did not stop the API "
            f"attacks ({_pct(v.api_recovered)} recovered, median "
            f"{_queries(v.api_queries)} queries per person): the attacker spread them "
            f"over {v.accounts} API keys. A per-account limit prices the attack in "
            "accounts, it does not cap it: make accounts costly to open (verification, "
            "payment) and limit per client as well as per key."
        )
    fit = (
        "answered before the limit cut each attack off were already enough"
        if v.stopped
        else "fit in one account's allowance"
    )
    return (
        f"{v.target_model}: the rate limit '{v.defense}' did not stop the API attacks "
        f"({_pct(v.api_recovered)} recovered; the median {_queries(v.api_queries)} queries "
        f"per person {fit}): size a limit for the cheapest attack measured, not for a "
        "query-hungry sampling search."
    )


def _detector_advice(v: Verdict) -> str:
    """What a query detector's measured verdict ``v`` recommends."""
    how = f" whose probes carried ±{v.blinded:g} noise" if v.blinded else ""
    if v.blinded and v.blinded_up_to:
        how = f" whose probes carried ±{v.blinded:g} to ±{v.blinded_up_to:g} noise"
    if v.level == "exposed":
        return (
            f"{v.target_model}: the query detector '{v.defense}' did not stop an API "
            f"attacker{how} ({_pct(v.api_recovered)} recovered, median "
            f"{_queries(v.api_queries)} queries per person); keep it for the naive "
            "attacker it flags, not as protection."
        )
    if v.blinded:
        return (
            f"{v.target_model}: under '{v.defense}' an API attacker{how} recovered "
            f"{_pct(v.api_recovered)} ({_identity_text(v)}, a median of "
            f"{_queries(v.api_queries)} answered queries per person). The detector "
            "flags near-identical probes; the row's details say whether it caught "
            "this attacker."
        )
    return (
        f"{v.target_model}: add the query detector ('{v.defense}') to flag attacking "
        f"accounts for investigation: the strongest API attack recovered "
        f"{_pct(v.api_recovered)} through one account it watched (a median of "
        f"{_queries(v.api_queries)} answered queries per person). Count it "
        "as a tripwire, not a wall: probes blinded with noise, or spread thinly "
        "over many keys, get past it."
    )
