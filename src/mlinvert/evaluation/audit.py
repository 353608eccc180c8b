"""The audit: attack a model under every defence, measure, write ``results.json``.

For each target model and each defence of the matrix (none; rounding to 3, 2 and 1
decimals; top-1 score only; labels only; a per-account rate limit; a query detector
that blocks an account sending near-duplicate inputs) the audit runs the
attack suite on every attacked person — white-box MI-Face (the attacker holds the
weights), black-box MI-Face and label-only inversion (both through the prediction API
with a fresh API key) — judges each reconstruction on both axes (identity and
likeness, :class:`~mlinvert.evaluation.faces.FaceJudge`), measures what each defence
costs honest users, and writes every record to ``results.json`` as soon as it exists
(atomic rewrite), so an interrupted run leaves a valid partial file that ``resume``
continues. The schema is documented in ``docs/results-schema.md``.

With ``AuditConfig.api`` the audit targets a prediction API that is already deployed
instead: no service is started and no model trained; the API attacks run through the
attacker's own keys under the one defence the endpoint advertises, judged against the
owner's data (:func:`_run_deployed`).

Threat mapping: OWASP ML03:2023 (Model Inversion), MITRE ATLAS AML.T0024.001 (Invert
ML Model via the inference API). Attacks after Fredrikson, Jha, Ristenpart, CCS 2015.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import itertools
import json
import logging
import platform
import re
import shlex
import shutil
import sqlite3
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from mlinvert.core import Response
from mlinvert.data.base import ImageDataset, Split
from mlinvert.errors import ConfigError, DataError, MlinvertError, ModelError, OracleError
from mlinvert.evaluation.faces import NOT_FACES
from mlinvert.evaluation.recogniser import JUDGE_FIELDS, JUDGE_NAME, lineup_chance_bar
from mlinvert.oracle.http import key_fingerprint
from mlinvert.oracle.lockstep import check_lanes
from mlinvert.oracle.wire import WireConfig, split_url
from mlinvert.oracle.wrappers import largest_blinding

log = logging.getLogger(__name__)

SCHEMA = "mlinvert-audit/1"
ATTACKS = ("whitebox", "blackbox", "label-only")
#: The attacks that only use the prediction API (all a deployed API allows, ``--api``).
API_ATTACKS = ("blackbox", "label-only")
#: Output-policy part of the default defence matrix; the rate limit is added per budget.
DEFAULT_POLICIES = ("none", "round:3", "round:2", "round:1", "top:1", "labels")
#: The query detector's row of the default matrix (blocks after 100 near duplicates).
DEFAULT_DETECTOR = "detect:block"
#: A reconstruction counts as *recovered* when the evaluation model's top-1 is right AND
#: its likeness reaches this value (see docs/results-schema.md, "recovered").
LIKENESS_THRESHOLD = 0.5
TOPK = 3
#: People one API attack runs on at once (their probes share each request), see
#: :class:`AuditConfig` and BENCHMARKS.md "Lockstep batching".
DEFAULT_LANES = 8
#: Query blinding of the audit's API attacker under a defence with a query detector
#: (+-0.05 per value: past the detector at the default quantisation, BENCHMARKS.md
#: "Query detector").
DEFAULT_BLIND = 0.05
#: Most API accounts one attack may open (``--accounts``): every one is a real API key.
MAX_ACCOUNTS = 1000

Event = Callable[[str, dict[str, Any]], None]


def _no_event(kind: str, data: dict[str, Any]) -> None:
    """Default event sink: log at debug level."""
    log.debug("%s %s", kind, data)


def _serialised(events: Event) -> Event:
    """``events`` called by one thread at a time (lanes report progress concurrently)."""
    lock = threading.Lock()

    def emit(kind: str, data: dict[str, Any]) -> None:
        with lock:
            events(kind, data)

    return emit


@dataclass(frozen=True, kw_only=True)
class Defense:
    """One row of the defence matrix: an output policy, a rate limit, a query detector.

    ``name`` is the spec the user wrote (``none``, ``round:2``, ``rate:500/hour``,
    ``detect:block``, ``round:2+rate:500/hour``); ``policy`` is a
    :func:`mlinvert.defenses.parse_policy` spec, ``rate`` a
    :func:`mlinvert.defenses.ratelimit.parse_rate` spec or ``None``, ``detector`` a
    :func:`mlinvert.defenses.parse_detector` spec or ``None``.
    """

    name: str
    policy: str = "full"
    rate: str | None = None
    detector: str | None = None

    @classmethod
    def parse(cls, spec: str) -> Defense:
        """Parse POLICY parts, ``rate:N/PERIOD`` and ``detect[:ACTION][:AFTER]`` joined by +."""
        from mlinvert.defenses.detector import parse_detector
        from mlinvert.defenses.policies import parse_policy
        from mlinvert.defenses.ratelimit import parse_rate

        spec = spec.strip()
        if not spec:
            raise ConfigError(
                "empty defence spec; use e.g. none, round:2, labels, rate:500/hour, detect:block"
            )
        policy_parts, rate, detector = [], None, None
        for part in spec.split("+"):
            part = part.strip()
            if part.startswith("rate:"):
                if rate is not None:
                    raise ConfigError(f"defence {spec!r} has two rate limits; keep one")
                rate = part.removeprefix("rate:")
                parse_rate(rate)
            elif part.startswith("detect"):
                if detector is not None:
                    raise ConfigError(f"defence {spec!r} has two detectors; keep one")
                detector = parse_detector(part).name
            elif part not in ("none", "full"):
                policy_parts.append(part)
        policy = "+".join(policy_parts) or "full"
        parse_policy(policy)
        return cls(name=spec, policy=policy, rate=rate, detector=detector)

    def guards(self) -> list[Any]:
        """Fresh guards for this row, in the service's order: rate limit, then detector."""
        from mlinvert.defenses.detector import QueryDetector
        from mlinvert.defenses.ratelimit import RateLimiter

        guards: list[Any] = []
        if self.rate is not None:
            guards.append(RateLimiter(self.rate))
        if self.detector is not None:
            guards.append(QueryDetector(self.detector))
        return guards

    @property
    def slug(self) -> str:
        """File-name-safe form of ``name``."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.name)


@dataclass(frozen=True, kw_only=True)
class AuditConfig:
    """Everything one audit run needs; serialised into ``results.json``.

    ``data`` is a :func:`mlinvert.data.load` spec (``None``: the data set recorded in the
    ``model_dir`` card, else the embedded default ``digits``); ``model_dir`` audits an
    existing model folder (its card's private/held-out split is used, so the judge
    compares with what the model really trained on) instead of training ``targets``
    (specs of :func:`parse_target_spec`: a kind, ``KIND@dp:EPSILON`` for a DP-SGD model, and
    for the dae ``@public:lfw`` and ``@dp:EPSILON+public:lfw``, public pre-training);
    ``labels`` attacks the first N classes (``None``: all); ``budget`` caps the API
    queries of one black-box or label-only attack on one person (``None``: the preset
    for the image size); ``defenses``
    ``None`` means the default matrix, whose rate limit is a quarter of the budget per
    hour (so it visibly stops the black-box attack). ``quick`` trains tiny models
    (tests). ``in_process`` uses LocalOracle through the same Predictor instead of the
    real HTTP service. ``tree_depths`` are the depths L of the privacy-aware CART sweep
    of the survey (decision-tree) audit (empty: no sweep). ``lanes`` is how many people
    one API attack (black-box, label-only) attacks at once under one defence and
    target: their probe batches travel in one request
    (:class:`~mlinvert.oracle.lockstep.Coalescer`), each record's ``seconds`` is then
    that person's wall time while running beside the others; 1 attacks one person
    after another. ``blind`` is the adaptive attacker's answer to a query detector: under
    a defence with one (which ``/v1/models`` advertises), every probe of the black-box and
    label-only attacks gets fresh uniform noise of +-``blind`` per value
    (:class:`~mlinvert.oracle.wrappers.Blinded`); 0 is a naive attacker who does not adapt.
    ``accounts`` is how many API accounts each API attack may open: when the service
    refuses one (rate limited or blocked) the attacker re-sends through the next
    (:class:`~mlinvert.oracle.wrappers.Rotating`); 1 is a single account. ``escalate``
    (with ``blind`` and several ``accounts``): the attacker doubles its noise each time
    the service blocks one of its accounts, trading signal for stealth (on 8x8 digits
    it is flagged once instead of on every account, and recovers less; BENCHMARKS.md).
    ``api`` audits a prediction API that is already deployed
    (``http://HOST:PORT/v1/models/NAME`` of an mlinvert-compatible service) with the
    attacker's ``api_keys`` (rotated through like ``accounts``; ``accounts`` becomes their
    number): no service is started and no target trained, only the API attacks run, under
    the one defence the endpoint advertises (row ``deployed``). ``data`` is then required
    (the judge and the attacker's prior need the owner's data; ``model_dir`` only
    contributes its card's split). ``utility_key`` (optional, another account than the
    attacker's) is the honest client that measures the served accuracy; without it the
    first attacker key does, and those queries then count against that key's rate limit
    and detector history. The keys never reach ``results.json`` (only short fingerprints).
    """

    data: str | None = None
    model_dir: Path | None = None
    targets: tuple[str, ...] = ("softmax", "mlp")
    attacks: tuple[str, ...] = ATTACKS
    defenses: tuple[str, ...] | None = None
    labels: int | None = None
    budget: int | None = None
    seed: int = 0
    out: Path = Path("runs/audit")
    in_process: bool = False
    resume: bool = False
    quick: bool = False
    tree_depths: tuple[int, ...] = (1, 2, 3, 5)
    lanes: int = DEFAULT_LANES
    blind: float = DEFAULT_BLIND
    accounts: int = 1
    escalate: bool = False
    api: str | None = None
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    utility_key: str | None = field(default=None, repr=False)
    prior: Path | None = None
    wire: WireConfig = field(default_factory=WireConfig)
    command: str = ""

    def __post_init__(self) -> None:
        if self.model_dir is not None:
            object.__setattr__(self, "model_dir", Path(self.model_dir))
        if self.prior is not None:
            object.__setattr__(self, "prior", Path(self.prior))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        if self.api is not None:
            self._check_api()
        elif self.utility_key is not None:
            raise ConfigError(
                "--utility-key is for --api (auditing a deployed API); give --api URL"
            )
        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown or not self.attacks:
            raise ConfigError(
                f"unknown attack(s) {unknown or '(none given)'}; choose from {', '.join(ATTACKS)}"
            )
        if len(set(self.attacks)) != len(self.attacks):
            raise ConfigError(f"attacks listed twice: {', '.join(self.attacks)}")
        if not self.targets and self.model_dir is None and self.api is None:
            raise ConfigError("no target model: give target kinds or --model DIR")
        names = [parse_target(t)[0] for t in self.targets]
        if len(set(names)) != len(names):
            raise ConfigError(f"targets listed twice: {', '.join(self.targets)}")
        if self.labels is not None and self.labels < 1:
            raise ConfigError(f"--labels must be >= 1, got {self.labels}")
        if self.budget is not None and self.budget < 10:
            raise ConfigError(f"--budget must be at least 10 queries per person, got {self.budget}")
        check_lanes(self.lanes)
        if isinstance(self.accounts, bool) or not 1 <= self.accounts <= MAX_ACCOUNTS:
            raise ConfigError(
                f"--accounts must be between 1 and {MAX_ACCOUNTS}, got {self.accounts}"
            )
        if not (np.isfinite(self.blind) and 0.0 <= self.blind <= 1.0):
            raise ConfigError(f"--blind must be in [0, 1] (0: no blinding), got {self.blind}")
        if self.escalate and (self.blind <= 0 or self.accounts < 2):
            raise ConfigError(
                "--escalate raises the blinding noise each time the service blocks an account: "
                f"it needs --blind > 0 and --accounts >= 2 (got --blind {self.blind:g}, "
                f"--accounts {self.accounts})"
            )
        object.__setattr__(self, "tree_depths", tuple(self.tree_depths))
        if any(d < 0 for d in self.tree_depths):
            raise ConfigError(f"tree depths must be >= 0 (0 is the root), got {self.tree_depths}")
        if self.defenses is not None:
            if not self.defenses:
                raise ConfigError("empty defence list; use e.g. none,round:2,labels")
            names = [Defense.parse(d).name for d in self.defenses]
            if len(set(names)) != len(names):
                raise ConfigError(f"defences listed twice: {', '.join(names)}")

    def _check_api(self) -> None:
        """The deployed-API mode's own rules (``api`` is set); fixes ``targets`` and
        ``accounts``."""
        if self.wire.protocol == "mlinvert":
            split_url(str(self.api), "/v1/models/")  # ConfigError naming the expected form
        elif not self.api_keys:  # an API without keys: one anonymous account
            object.__setattr__(self, "api_keys", ("",))
        if self.wire.protocol == "mlinvert" and not all(k.strip() for k in self.api_keys or ("",)):
            raise ConfigError(
                "--api needs the attacker's API key(s) of that service: --api-key K1[,K2,...]"
            )
        if len(self.api_keys) > MAX_ACCOUNTS:
            raise ConfigError(f"at most {MAX_ACCOUNTS} --api-key keys, got {len(self.api_keys)}")
        if self.utility_key is not None:
            if not self.utility_key.strip():
                raise ConfigError("--utility-key is empty; give an API key or leave it out")
            if self.utility_key in self.api_keys:
                raise ConfigError(
                    "--utility-key is one of the attacker's --api-key keys; give the honest "
                    "client its own account (or leave --utility-key out to use --api-key #1)"
                )
        if not self.data:
            raise ConfigError(
                "--api needs --data SPEC: the judge (evaluation model) and the attacker's "
                "prior are built from the owner's data set and its held-out split (add "
                "--model DIR to use the split recorded in the deployed model's card)"
            )
        if "whitebox" in self.attacks:
            raise ConfigError(
                "--api attacks a deployed prediction API: the white-box attack needs the "
                "model weights, which an API does not give; use --attacks blackbox,label-only "
                "(or audit the model folder itself without --api)"
            )
        if self.defenses is not None:
            raise ConfigError(
                "--api audits the one defence the deployed endpoint runs (it advertises its "
                "policy, rate limit and detector); drop --defenses"
            )
        if self.in_process:
            raise ConfigError("--api queries the deployed service over HTTP; drop --in-process")
        if self.accounts not in (1, len(self.api_keys)):
            raise ConfigError(
                f"with --api the attacker's accounts are its --api-key keys "
                f"({len(self.api_keys)}); drop --accounts {self.accounts}"
            )
        object.__setattr__(self, "accounts", len(self.api_keys))
        object.__setattr__(self, "targets", ())

    def to_dict(self) -> dict[str, Any]:
        """JSON form (paths as strings; API keys as short SHA-256 fingerprints)."""
        d = asdict(self)
        d["api_keys"] = [key_fingerprint(k) if k else None for k in self.api_keys]
        d["wire"] = self.wire.to_dict()  # header names only: their values may be secrets
        d["utility_key"] = None if self.utility_key is None else key_fingerprint(self.utility_key)
        d["model_dir"] = None if self.model_dir is None else str(self.model_dir)
        d["prior"] = None if self.prior is None else str(self.prior)
        d["out"] = str(self.out)
        d["targets"] = list(self.targets)
        d["attacks"] = list(self.attacks)
        d["defenses"] = None if self.defenses is None else list(self.defenses)
        d["tree_depths"] = list(self.tree_depths)
        return d


# --------------------------------------------------------------------------- presets
@dataclass(frozen=True, kw_only=True)
class Preset:
    """Attack settings chosen for an image size (documented in BENCHMARKS.md)."""

    budget: int
    whitebox_iters: int
    nes_samples: int
    label_only_iters: int
    space: str  # a mlinvert.attacks.spaces.parse_space spec, or pca:K (see _space)
    augment: bool = False  # PCA prior: mirrored and shifted aux faces (faces only)
    quick_targets: bool = False


def preset_for(shape: tuple[int, int], quick: bool) -> Preset:
    """Search spaces and iteration caps per image size (all attacks share the space).

    On small images (digits) the targets train with the short settings: measured here
    they reach the same test accuracy (softmax 96.8 %, MLP 97.2 %) in seconds instead of
    a minute. The evaluation model always trains fully unless ``quick``.
    """
    pixels = shape[0] * shape[1]
    # digits: Broyden needs 21 queries per Jacobian in the 20-d prior; against coarser
    # scores NES with 20 antithetic pairs: 41 inputs per request
    if pixels <= 1024:
        p = Preset(
            budget=2000,
            whitebox_iters=200,
            nes_samples=20,
            label_only_iters=100,
            space="pca:20",
            quick_targets=True,
        )
    else:
        # faces. Black-box against an API with full-precision scores: Broyden (one
        # Jacobian of every class score by differences, 201 queries in the 200-d prior,
        # then one query per step): measured on AT&T softmax (first 10 people, in
        # process, 1100-query budget) recovered 90 % with ~470 queries, NES 10 %. Against
        # rounded or top-k scores Broyden's differences vanish (round:3: 0 % recovered)
        # and the attacker uses NES with 5 antithetic pairs (11 inputs per step) and as
        # many cosine-annealed steps as the budget pays for (1100 queries = 100 steps).
        # The prior: 200 eigenfaces of the 39 other people's held-out photos, each also
        # mirrored and shifted 2 px (BENCHMARKS.md, "MI-Face" and "Audit"). White-box:
        # the full 200 steps of MIFaceConfig.improved() (at 60 it recovered less than the
        # black-box attack: 72 / 80 % against 78 / 82 %).
        p = Preset(
            budget=1100,
            whitebox_iters=200,
            nes_samples=5,
            label_only_iters=30,
            space="pca:200",
            augment=True,
        )
    if quick:
        p = Preset(
            budget=min(p.budget, 600),
            whitebox_iters=60,
            nes_samples=p.nes_samples,
            label_only_iters=20,
            space=p.space,
            augment=p.augment,
            quick_targets=True,
        )
    return p


# --------------------------------------------------------------------------- utility
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


# --------------------------------------------------------------------------- results file
def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the packages that shape the numbers."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("mlinvert", "numpy", "torch", "scikit-learn", "scikit-image", "fastapi"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


RecordKey = tuple[str, str, str, int]


def record_key(r: dict[str, Any]) -> RecordKey:
    """The identity of a record: (attack, defense, target_model, label)."""
    return (str(r["attack"]), str(r["defense"]), str(r["target_model"]), int(r["label"]))


#: Config fields that must match for ``--resume`` to continue a run.
_RESUME_FIELDS = (
    "data",
    "model_dir",
    "targets",
    "seed",
    "quick",
    "budget",
    "blind",
    "accounts",
    "escalate",
    "api",
    "prior",
)
#: What a results file written before a field existed ran with.
_RESUME_DEFAULTS: dict[str, Any] = {
    "blind": 0.0,
    "accounts": 1,
    "escalate": False,
    "api": None,
    "prior": None,
}


def _failed_empty(doc: dict[str, Any], out: Path) -> bool:
    """True when ``doc`` (an earlier ``results.json`` in ``out``) is a run that failed
    before it trained, queried or recorded anything (e.g. on a mistyped ``--data``):
    nothing in ``out`` is worth keeping, so a corrected command may start afresh."""
    return (
        doc.get("status") == "failed"
        and not doc.get("records")
        and not doc.get("tree_audit")
        and not doc.get("deployment")
        and all(p.name in ("results.json", "results.json.tmp") for p in out.iterdir())
    )


class ResultsFile:
    """``DIR/results.json``, rewritten atomically after every change."""

    def __init__(self, out: Path, config: AuditConfig) -> None:
        self.path = out / "results.json"
        self.out = out
        fresh: dict[str, Any] = {
            "schema": SCHEMA,
            "status": "running",
            "started": _now(),
            "updated": _now(),
            "finished": None,
            "command": config.command,
            "seed": config.seed,
            "versions": versions(),
            "config": config.to_dict(),
            "dataset": {},
            "thresholds": {
                "likeness": LIKENESS_THRESHOLD,
                "likeness_doc": "FaceJudge likeness score in [0, 1]",
                "exposed_rate": 0.2,
                "identity_rate": 0.3,
                "max_accuracy_cost": 0.01,
                "judge": None,
            },
            "targets": {},
            "evaluation_model": {},
            "defenses": [],
            "utility": {},
            "private_images": {},
            "held_out_images": {},
            "references": [],
            "records": [],
            "tree_audit": None,
        }
        old = None
        if self.path.exists():
            try:
                old = json.loads(self.path.read_text())
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{self.path} is not valid JSON ({exc}); delete it or use another --out"
                ) from exc
            if not isinstance(old, dict):
                raise DataError(
                    f"{self.path} is not an audit's results (a JSON {type(old).__name__}, not "
                    "an object); delete it or use another --out"
                )
            if _failed_empty(old, out):
                log.info("replacing %s: the earlier run failed before it produced anything", out)
                old = None
        if old is not None:
            if not config.resume:
                raise ConfigError(
                    f"{self.path} already holds an audit ({len(old.get('records', []))} "
                    "records); pass --resume to continue it or choose another --out"
                )
            if old.get("schema") != SCHEMA:
                raise DataError(f"{self.path} has schema {old.get('schema')!r}, not {SCHEMA}")
            new_cfg, old_cfg = config.to_dict(), old.get("config", {})
            old_cfg = {**_RESUME_DEFAULTS, **old_cfg}
            diff = [f for f in _RESUME_FIELDS if old_cfg.get(f) != new_cfg.get(f)]
            if diff:
                changes = ", ".join(f"{f}: {old_cfg.get(f)!r} -> {new_cfg.get(f)!r}" for f in diff)
                raise ConfigError(
                    f"cannot resume {self.path}: the run used different settings ({changes}); "
                    "resume with the same flags or choose another --out"
                )
            old.update(
                status="running",
                updated=_now(),
                command=config.command or old.get("command", ""),
                config=new_cfg,
            )
            self.doc = old
        else:
            if config.resume:
                log.info("nothing to resume in %s; starting a new audit", out)
            self.doc = fresh
        # a record that could not be measured (an error, a judge failure) runs again
        self.done: dict[RecordKey, dict[str, Any]] = {
            record_key(r): r for r in self.doc["records"] if r.get("measured", True)
        }

    def save(self) -> None:
        """Atomic rewrite (write a temporary file, then rename over the old one)."""
        self.doc["updated"] = _now()
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, allow_nan=False) + "\n")
        tmp.replace(self.path)

    def add(self, record: dict[str, Any]) -> None:
        """Append (or replace) one record and persist at once."""
        key = record_key(record)  # replaces a record of that key (an unmeasured one too)
        self.doc["records"] = [r for r in self.doc["records"] if record_key(r) != key]
        self.doc["records"].append(record)
        self.done[key] = record
        self.save()


def save_png(path: Path, image: np.ndarray) -> None:
    """Store a float image in [0, 1] as an 8-bit grey PNG."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    Image.fromarray(arr, mode="L").save(path)


def _clean(value: Any) -> Any:
    """JSON-safe scalar: numpy -> python, NaN/inf -> None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------- the run
@dataclass
class _Target:
    name: str
    model: Any
    card: dict[str, Any]
    folder: Path


@dataclass
class _Context:
    config: AuditConfig
    results: ResultsFile
    dataset: ImageDataset
    preset: Preset
    targets: list[_Target]
    judge: Any
    labels: list[int]
    defenses: list[Defense]
    events: Event
    spaces: dict[int, Any] = field(default_factory=dict)
    #: the search space of the attacker's learned prior (``--prior``), bound once and
    #: shared by every person; None: eigenfaces of the others, per person
    prior: Any = None
    #: False once the API the attacks talk to has gone away (then an error is the
    #: run's problem, not an attack outcome: the run stops instead of recording it)
    api_alive: Callable[[], bool] = lambda: True
    #: ``--api``: one HttpOracle per attacker key, shared by the utility measurement and
    #: every attack (their counts are per attack differences), as one attacker's keys are
    api_oracles: list[Any] = field(default_factory=list)


def resolve_defenses(config: AuditConfig, budget: int) -> list[Defense]:
    """The defence matrix: the user's list, or the default with a visible rate limit."""
    if config.defenses is not None:
        return [Defense.parse(d) for d in config.defenses]
    rate = max(budget // 4, 10)
    return [Defense.parse(d) for d in (*DEFAULT_POLICIES, f"rate:{rate}/hour", DEFAULT_DETECTOR)]


#: Environment of the service subprocess: one math thread (see :func:`single_threaded`).
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """One torch and one BLAS thread for the block, restored afterwards.

    An audit makes hundreds of thousands of tiny predictions; on a small shared machine
    two intra-op threads that fight other processes for the cores were measured here
    ~600x slower per small batch (30 ms instead of 0.05 ms).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


def _data_spec(config: AuditConfig) -> tuple[str, Split | None]:
    """The data spec to load and, with ``--model``, the split recorded in its card."""
    if config.model_dir is None:
        return config.data or "digits", None
    from mlinvert.targets.io import read_card

    card = read_card(config.model_dir)
    spec = config.data or card.get("dataset")
    if not spec:
        raise ConfigError(
            f"the card of {config.model_dir} does not say which data set it was trained on; "
            "pass --data SPEC"
        )
    split = Split.from_dict(card["split"]) if isinstance(card.get("split"), dict) else None
    return str(spec), split


def run_audit(config: AuditConfig, *, events: Event | None = None) -> Path:
    """Run the audit described by ``config``; return the path of ``index.html``.

    ``events(kind, data)`` receives progress (``stage``, ``plan``, ``record``,
    ``attack_progress``) for a progress display. Ctrl-C (KeyboardInterrupt) marks the
    run ``interrupted``, renders the partial report and re-raises.
    """
    from mlinvert.data import load
    from mlinvert.report.html import render_report

    emit = _serialised(events or _no_event)
    out = config.out
    results = ResultsFile(out, config)
    results.save()
    try:
        spec, split = _data_spec(config)
        emit("stage", {"name": f"loading data {spec}"})
        dataset = load(spec, seed=config.seed)
        if split is not None and isinstance(dataset, ImageDataset):
            dataset = dataclasses.replace(dataset, split=split)
        with single_threaded():
            if config.api is not None:
                if not isinstance(dataset, ImageDataset):
                    raise ConfigError(
                        f"--api audits image models; {spec} is survey data (audit a "
                        "decision tree from its model folder without --api)"
                    )
                _run_deployed(config, results, dataset, emit)
            elif not isinstance(dataset, ImageDataset):
                _run_tree(config, results, dataset, emit)
            else:
                _run_faces(config, results, dataset, emit)
        results.doc["status"] = "complete"
        results.doc["finished"] = _now()
    except KeyboardInterrupt:
        results.doc["status"] = "interrupted"
        results.save()
        with contextlib.suppress(MlinvertError, OSError, ValueError):
            render_report(out)
        raise
    except BaseException:
        results.doc["status"] = "failed"
        results.save()
        raise
    results.save()
    emit("stage", {"name": "rendering the report"})
    return render_report(out)


#: Output policies of the survey audit when ``defenses`` is not given.
TREE_DEFENSES = ("none", "round:2", "labels")


def _run_tree(config: AuditConfig, results: ResultsFile, dataset: Any, emit: Event) -> None:
    """Survey data: the decision-tree attribute-inversion audit (paper-shaped tables).

    The target tree is ``model_dir`` (its card's member split is used) or is trained
    once and saved to ``DIR/models/tree``; unless ``in_process`` it is served by the
    real service (one model name per output policy, see :func:`_tree_service`), and the
    black-box estimators query it over HTTP. The privacy-aware CART sweep
    (``tree_depths``) is attacked in process.
    """
    from mlinvert.evaluation.trees import (
        plot_depth_sweep,
        render_defense_table,
        render_tree_table,
        run_tree_audit,
    )
    from mlinvert.targets.tree import train_tree

    emit("stage", {"name": f"decision-tree audit on {dataset.spec}"})
    defenses = [Defense.parse(x) for x in (config.defenses or TREE_DEFENSES)]
    limited = [d.name for d in defenses if d.rate is not None or d.detector is not None]
    if limited:
        raise ConfigError(
            f"the survey (decision-tree) audit runs output policies only, not rate limits or "
            f"detectors ({', '.join(limited)}): every estimator needs all its candidate rows "
            "answered; drop the rate: and detect parts"
        )
    policies = tuple(dict.fromkeys(d.policy for d in defenses))
    from mlinvert.targets import io

    if config.model_dir is not None:
        folder = config.model_dir
        model, dataset = _load_tree(folder, dataset)
    else:
        emit("stage", {"name": "training the survey tree"})
        model, card = train_tree(dataset, seed=config.seed)
        folder = results.out / "models" / "tree"
        io.save(model, folder, card=card)
    served: _TreeOracles | None = None
    with contextlib.ExitStack() as stack:
        if not config.in_process:
            served = stack.enter_context(_tree_service(results.out, folder, model, policies, emit))
        records = run_tree_audit(
            dataset,
            seed=config.seed,
            policies=policies,
            model=model,
            oracle_factory=None if served is None else served.oracle,
            depths=config.tree_depths,
        )
    service = None if served is None else served.summary
    route = "in-process" if config.in_process else "http"
    records = [
        {**{k: _clean(v) for k, v in r.items()}, "channel": _tree_channel(r, policies, route)}
        for r in records
    ]
    plot = results.out / "images" / "tree_depth_sweep.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    if config.tree_depths:
        plot_depth_sweep(records, plot)
    where = (
        "the real HTTP service (query log in service/tree.sqlite3)"
        if service is not None
        else "an in-process oracle through the same Predictor"
    )
    results.doc["dataset"] = {"spec": dataset.spec, "kind": "survey"}
    xt, yt = dataset.nonmembers()
    results.doc["targets"]["tree"] = {
        "kind": model.kind,
        "test_accuracy": float((model.predict(xt) == yt).mean()) if yt.size else None,
        "model_dir": str(folder),
    }
    results.doc["tree_audit"] = {
        "title": "Attribute inversion of the sensitive survey answer (Fredrikson et al., "
        "CCS 2015, Section 5), beside the paper's numbers; then each defence, including the "
        "privacy-aware CART that places the sensitive feature at depth L. The black-box "
        f"estimators queried {where}.",
        "route": route,
        "policies": list(policies),
        "service": service,
        "tables": [
            markdown_table(render_tree_table(records), "estimators vs the paper"),
            markdown_table(render_defense_table(records), "per defence"),
        ],
        "plot": "images/tree_depth_sweep.png" if config.tree_depths else None,
        "records": records,
    }


def _load_tree(folder: Path, dataset: Any) -> tuple[Any, Any]:
    """The tree in ``folder`` and ``dataset`` with the member split of its card."""
    from mlinvert.targets import io

    model = io.load(folder)
    if model.kind != "tree":
        raise ConfigError(
            f"{folder} holds a {model.kind!r} model; survey data is audited on a decision "
            "tree (train one with `mlinvert train --data SPEC --model tree`, or drop --model)"
        )
    if tuple(model.feature_names_) != tuple(dataset.feature_names):
        raise DataError(
            f"the tree in {folder} reads {list(model.feature_names_)}, the data {dataset.spec} "
            f"has {list(dataset.feature_names)}; pass the --data it was trained on"
        )
    split = io.read_card(folder).get("split")
    if isinstance(split, dict):
        dataset = dataclasses.replace(dataset, split=Split.from_dict(split))
    return model, dataset


def _tree_channel(record: dict[str, Any], policies: tuple[str, ...], route: str) -> str:
    """How an estimator got at the tree: no access, the model document, or an API."""
    if record["n_queries"] == 0 and record["estimator"] in ("random", "always-no", "ideal"):
        return "none (baseline)"
    if record["estimator"].startswith("white-box"):
        return "model document"
    # run_tree_audit labels the main target's black-box records with the policy itself
    if route == "http" and record["defense"] in policies:
        return "HTTP API"
    return "in-process API"


@dataclass
class _TreeOracles:
    """The survey tree served under one model name per output policy.

    ``oracle(model, policy)`` is the ``oracle_factory`` of
    :func:`mlinvert.evaluation.trees.run_tree_audit`: each call is one attacker with a
    fresh account (API key) on the model name that serves ``policy``. ``summary`` holds
    the service's own query counts once the service has stopped.
    """

    model: Any
    store: Any
    urls: dict[str, str]
    oracles: list[Any] = field(default_factory=list)
    summary: dict[str, Any] | None = None

    def oracle(self, model: Any, policy: str) -> Any:
        """A fresh-account HttpOracle on the model name serving ``policy``."""
        from mlinvert.oracle.http import HttpOracle

        if model is not self.model:
            raise ConfigError(
                "the survey service serves only the audited tree; other trees (depth sweep, "
                "DP, pruning) are attacked in process"
            )
        if policy not in self.urls:
            raise ConfigError(f"policy {policy!r} is not served; served: {', '.join(self.urls)}")
        slug = Defense(name=policy).slug
        key, _ = self.store.create_key(f"audit-tree-{slug}-{len(self.oracles) + 1}")
        oracle = HttpOracle(self.urls[policy], key, max_wait=0.0)
        self.oracles.append(oracle)
        return oracle


@contextlib.contextmanager
def _tree_service(
    out: Path, folder: Path, model: Any, policies: tuple[str, ...], emit: Event
) -> Iterator[_TreeOracles]:
    """Run ``mlinvert serve`` once for the tree ``model`` saved in ``folder``.

    The same folder is served as ``tree-<policy>`` with that policy for each of
    ``policies`` (``--model-policy``), so every policy is one model name of one process.
    The query log lives on the RAM disk while the service runs and is copied to
    ``out/service/tree.sqlite3`` afterwards; ``summary`` counts its requests and inputs
    per model name and account.
    """
    from mlinvert.attacks.tree_inversion import TreeAttackConfig
    from mlinvert.service.runner import ServiceProcess
    from mlinvert.service.store import Store

    names = {p: f"tree-{Defense(name=p).slug}" for p in policies}
    final_db = out / "service" / "tree.sqlite3"
    emit("stage", {"name": f"starting the service for {', '.join(names.values())}"})
    with _ram_query_log(final_db) as db, contextlib.closing(Store(db)) as store:
        with ServiceProcess(
            [f"{n}={folder}" for n in names.values()],
            db=db,
            model_policies={n: p for p, n in names.items()},
            max_batch=TreeAttackConfig().batch_size,
            env=ONE_THREAD_ENV,
        ) as service:
            served = _TreeOracles(
                model=model,
                store=store,
                urls={p: service.model_url(n) for p, n in names.items()},
            )
            try:
                yield served
            finally:
                for o in served.oracles:
                    o.close()
        served.summary = {
            "url": service.url,
            "models": {n: p for p, n in names.items()},
            "query_log": str(final_db.relative_to(out)),
            **_query_counts(store),
        }


def _query_counts(store: Any) -> dict[str, Any]:
    """Requests, answered inputs and refusals in the service's query log."""
    per_model: dict[str, dict[str, int]] = {}
    per_account: dict[str, int] = {}
    for q in store.queries():
        m = per_model.setdefault(str(q.model), {"requests": 0, "inputs": 0, "refused": 0})
        m["requests"] += 1
        if q.status == 200:
            m["inputs"] += q.n_inputs
            per_account[str(q.account)] = per_account.get(str(q.account), 0) + q.n_inputs
        else:
            m["refused"] += 1
    return {
        "requests": sum(m["requests"] for m in per_model.values()),
        "inputs": sum(m["inputs"] for m in per_model.values()),
        "per_model": per_model,
        "inputs_per_account": per_account,
    }


def markdown_table(text: str, title: str) -> dict[str, Any]:
    """A Markdown pipe table as ``{title, columns, rows}`` (for the HTML report)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    body = [row for row in cells[1:] if not all(set(c) <= set("-: ") for c in row)]
    return {"title": title, "columns": cells[0] if cells else [], "rows": body}


def _load_or_train(
    ctx_out: Path,
    spec: str,
    dataset: ImageDataset,
    config: AuditConfig,
    emit: Event,
    *,
    quick: bool,
) -> _Target:
    """The target of ``spec`` (see :func:`parse_target`): reloaded from the run's
    ``models/NAME`` folder if there, else trained and saved there."""
    from mlinvert.targets import io
    from mlinvert.targets.training import dp_config, public_pretrain, train_target

    name, kind, epsilon, public_spec = parse_target_spec(spec)
    folder = ctx_out / "models" / name
    if (folder / "model.json").exists():
        emit("stage", {"name": f"loading {name} from {folder}"})
        try:
            model = io.load(folder)
        except ModelError as exc:  # retrain (same seed) rather than give up the resume
            log.warning("cannot reload %s (%s); training it again", folder, exc)
        else:
            return _Target(name=name, model=model, card=io.read_card(folder), folder=folder)
    public = None if public_spec is None else public_pretrain(*public_spec, quick=quick)
    private = None if public is None else public.private
    dp = None if epsilon is None else dp_config(kind, epsilon, quick=quick, private=private)
    emit("stage", {"name": f"training {name}" + ("" if dp is None else " (DP-SGD)")})
    trained = train_target(dataset, kind, seed=config.seed, quick=quick, dp=dp, public=public)
    io.save(trained.model, folder, card=trained.card)
    return _Target(name=name, model=trained.model, card=io.read_card(folder), folder=folder)


def parse_target(spec: str) -> tuple[str, str, float | None]:
    """``(name, kind, epsilon)`` of an audit target spec (:func:`parse_target_spec`)."""
    name, kind, epsilon, _ = parse_target_spec(spec)
    return name, kind, epsilon


def parse_target_spec(spec: str) -> tuple[str, str, float | None, tuple[str, str] | None]:
    """``(name, kind, epsilon, public)`` of an audit target spec.

    ``KIND`` trains that face model as usual; ``KIND@dp:EPSILON`` trains it by DP-SGD
    at privacy budget epsilon (:func:`mlinvert.targets.training.dp_config`; the kinds of
    ``DP_KINDS``), named ``KIND-dpEPSILON`` in the results, so a DP model is audited beside the
    plain one under the same defences. For the dae, ``@public:SET[:STAGE]`` (alone or after
    ``dp:EPSILON`` with ``+``, e.g. ``dae@dp:8+public:lfw``) pre-trains it on the public face
    set first and trains only ``STAGE`` (``head``, the default, or ``finetune``) on the
    private photos (:class:`mlinvert.targets.dae.PublicPretrain`); ``public`` is then
    ``(SET, STAGE)`` and the name ends ``-public-SET-STAGE``.
    """
    from mlinvert.targets.dae import PublicPretrain
    from mlinvert.targets.training import DP_KINDS, dp_config

    kind, sep, rest = spec.strip().partition("@")
    kind = kind.strip().lower()
    if not sep:
        return kind, kind, None, None
    usage = (
        f"target {spec!r}: write KIND or KIND@dp:EPSILON, e.g. softmax@dp:8 (the dae also "
        "takes @public:lfw[:head|finetune] and @dp:EPSILON+public:lfw[:head|finetune])"
    )
    epsilon: float | None = None
    public: tuple[str, str] | None = None
    for part in rest.split("+"):
        how, _, value = part.partition(":")
        how = how.strip().lower()
        if how == "dp" and epsilon is None:
            try:
                epsilon = float(value)
            except ValueError:
                raise ConfigError(usage) from None
        elif how == "public" and public is None:
            if kind != "dae":
                raise ConfigError(
                    f"target {spec!r}: public pre-training is available for the dae only, "
                    f"not {kind!r}"
                )
            data, _, stage = value.partition(":")
            checked = PublicPretrain(data=data, private=stage.strip().lower() or "head")
            public = (checked.data, checked.private)
        else:
            raise ConfigError(usage)
    if epsilon is not None:
        if kind not in DP_KINDS:
            raise ConfigError(
                f"target {spec!r}: DP-SGD training is available for {', '.join(DP_KINDS)}, "
                f"not {kind!r}"
            )
        dp_config(kind, epsilon, private=None if public is None else public[1])  # checks
    name = kind + ("" if epsilon is None else f"-dp{epsilon:g}")
    if public is not None:
        name += f"-public-{public[0]}-{public[1]}"
    return name, kind, epsilon, public


def _test_accuracy(model: Any, dataset: ImageDataset) -> float:
    x, y = dataset.test()
    return float((np.asarray(model.predict(x)) == y).mean())


def _run_faces(
    config: AuditConfig, results: ResultsFile, dataset: ImageDataset, emit: Event
) -> None:
    out = config.out
    preset = preset_for(dataset.image_shape, config.quick)
    budget = config.budget or preset.budget
    defenses = resolve_defenses(config, budget)
    labels = _describe_dataset(config, results, dataset, preset, budget, defenses)
    doc = results.doc

    targets: list[_Target] = []
    if config.model_dir is not None:
        from mlinvert.targets import io

        emit("stage", {"name": f"loading {config.model_dir}"})
        model = io.load(config.model_dir)
        card = io.read_card(config.model_dir)
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(config.model_dir).name) or model.kind
        targets.append(_Target(name=name, model=model, card=card, folder=Path(config.model_dir)))
    else:
        quick = config.quick or preset.quick_targets
        targets.extend(
            _load_or_train(out, k, dataset, config, emit, quick=quick) for k in config.targets
        )
    for t in targets:
        if tuple(t.model.input_shape_) != dataset.image_shape:
            raise DataError(
                f"model {t.name} takes images {tuple(t.model.input_shape_)}, the data "
                f"{dataset.spec} has {dataset.image_shape}; pass the --data it was trained on"
            )
        doc["targets"][t.name] = {
            "kind": t.model.kind,
            "test_accuracy": _test_accuracy(t.model, dataset),
            "model_dir": str(t.folder),
            "privacy": t.card.get("privacy"),
        }
    judge = _fit_judge(config, results, dataset, labels, emit)
    _utilities(targets, defenses, dataset, results)
    results.save()

    ctx = _Context(
        config=config,
        results=results,
        dataset=dataset,
        preset=preset,
        targets=targets,
        judge=judge,
        labels=labels,
        defenses=defenses,
        events=emit,
        prior=_attacker_prior(config, results, dataset),
    )
    _attack_matrix(ctx)


def _attacker_prior(config: AuditConfig, results: ResultsFile, dataset: ImageDataset) -> Any:
    """The bound search space of the learned prior ``config.prior`` (binding checks that
    it never saw a private photo), or None for the default eigenfaces; which prior it is
    goes into ``results``."""
    preset_space = results.doc["preset"]["space"]
    if config.prior is None:
        results.doc["prior"] = {
            "kind": preset_space,
            "path": None,
            "source": "eigenfaces of the held-out photos of every other attacked person",
        }
        return None
    from mlinvert.attacks.priors import load_prior

    prior = load_prior(config.prior)
    space = prior.space(private=dataset.train()[0], shape=dataset.image_shape)
    card = prior.card
    results.doc["prior"] = {
        "kind": prior.kind,
        "path": str(config.prior),
        "source": (card.get("data") or {}).get("spec"),
        "latent": prior.latent,
        "card": {k: v for k, v in card.items() if k not in ("path",)},
    }
    return space


def _describe_dataset(
    config: AuditConfig,
    results: ResultsFile,
    dataset: ImageDataset,
    preset: Preset,
    budget: int,
    defenses: list[Defense],
) -> list[int]:
    """Write the data set, defences, budget and preset into ``results``; return the
    attacked labels."""
    labels = list(range(min(config.labels or dataset.n_classes, dataset.n_classes)))
    doc = results.doc
    doc["dataset"] = {
        "spec": dataset.spec,
        "kind": "image",
        "n_classes": dataset.n_classes,
        "class_names": list(dataset.class_names),
        "image_shape": list(dataset.image_shape),
        "n_train": int(dataset.split.train.size),
        "n_test": int(dataset.split.test.size),
        "split_rule": dataset.split.rule,
        "attacked_labels": labels,
    }
    doc["defenses"] = [asdict(d) for d in defenses]
    doc["budget"] = budget
    doc["preset"] = asdict(preset)
    return labels


def _fit_judge(
    config: AuditConfig, results: ResultsFile, dataset: ImageDataset, labels: list[int], emit: Event
) -> Any:
    """Train (or reload) the evaluation model and fit the FaceJudge; score the reference
    images and store the private photos of the attacked people."""
    from mlinvert.evaluation.faces import FaceJudge, JudgeConfig

    evaluator = _load_or_train(config.out, "evaluation", dataset, config, emit, quick=config.quick)
    results.doc["evaluation_model"] = {
        "kind": "evaluation",
        "test_accuracy": _test_accuracy(evaluator.model, dataset),
        "model_dir": str(evaluator.folder),
    }
    results.save()
    faces = is_faces(dataset)
    emit(
        "stage",
        {
            "name": "fitting the judges (independent face recogniser, evaluation model, "
            "lineup, references)"
            if faces
            else "fitting the judge (evaluation model, lineup, references)"
        },
    )
    judge = FaceJudge.fit(
        dataset, evaluator.model, seed=config.seed, config=JudgeConfig(independent=faces)
    )
    results.doc["thresholds"].update(_judge_thresholds(faces, dataset, labels))
    _references(judge, labels, config.seed, results)
    _private_photos(dataset, labels, results)
    return judge


def is_faces(dataset: ImageDataset) -> bool:
    """Whether ``dataset`` holds faces, which the independent face recogniser judges (not
    digits: a face recogniser says nothing about handwriting)."""
    return dataset.spec.partition(":")[0].strip().lower() not in NOT_FACES


def _judge_thresholds(faces: bool, dataset: ImageDataset, labels: list[int]) -> dict[str, Any]:
    """Which judge gives the verdicts, and its bars (written into ``thresholds``)."""
    if not faces:
        return {
            "judge": "evaluation model",
            "judge_doc": "not faces: recovered = evaluation-model top-1 and likeness at least "
            f"{LIKENESS_THRESHOLD}",
        }
    return {
        "judge": "independent",
        "judge_name": JUDGE_NAME,
        "judge_doc": "recovered = the independent face recogniser ranks the right person "
        f"first of {dataset.n_classes}; identity leaks = its mean 5-way lineup probability "
        "at least identity_lineup",
        "identity_lineup": lineup_chance_bar(dataset.n_classes, len(labels)),
        "identity_lineup_doc": "chance (0.2) plus 3 standard errors of the mean lineup "
        f"probability of {len(labels)} people whose images carry no identity (ranks "
        "uniform): about the 99.9th percentile of chance",
    }


def _attack_matrix(ctx: _Context) -> None:
    """Every (defence, target, attack, person) not yet in the results: attack, record."""
    config, results, emit = ctx.config, ctx.results, ctx.events
    targets, defenses, labels = ctx.targets, ctx.defenses, ctx.labels
    plan = [
        (a, d.name, t.name, lab)
        for d in defenses
        for t in targets
        for a in config.attacks
        for lab in labels
    ]
    done = sum(1 for k in plan if k in results.done)
    emit("plan", {"total": len(plan), "done": done})
    for defense in defenses:
        todo = [k for k in plan if k[1] == defense.name and k not in results.done]
        if not todo:
            continue
        with _serve(ctx, defense) as oracles:
            for (attack, target_name), group in itertools.groupby(todo, key=lambda k: (k[0], k[2])):
                target = next(t for t in targets if t.name == target_name)
                people = [k[3] for k in group]
                if attack != "whitebox" and config.lanes > 1:
                    _attack_lanes(ctx, attack, defense, target, people, oracles)
                    continue
                for label in people:
                    record = _attack_one(ctx, attack, defense, target, label, oracles)
                    results.add(record)
                    emit("record", record)


# --------------------------------------------------------------------------- deployed API
#: The one defence row of an audit of a deployed API (``--api``).
DEPLOYED = "deployed"
#: Inputs per request of the honest client measuring a deployed API's served accuracy.
_UTILITY_BATCH = 16


def _open_api(config: AuditConfig, dataset: ImageDataset) -> list[Any]:
    """An HttpOracle per ``config.api_keys`` on ``config.api``, then one for
    ``config.utility_key`` if given, speaking ``config.wire`` (what the server does not
    declare, its input shape and classes, taken from ``dataset``); the service's
    description read and every key checked (mlinvert's API: no query spent; v2 and rest
    may spend a probe): a clear OracleError otherwise."""
    from mlinvert.errors import Unauthorized, UnknownModel
    from mlinvert.oracle.http import HttpOracle

    url = str(config.api)
    keys = [*config.api_keys, *([config.utility_key] if config.utility_key else [])]
    names = [f"--api-key #{i + 1} of {len(config.api_keys)}" for i in range(len(config.api_keys))]
    names += ["--utility-key"] if config.utility_key else []
    wire = dataclasses.replace(
        config.wire,
        input_shape=config.wire.input_shape or tuple(dataset.image_shape),
        class_names=config.wire.class_names or tuple(dataset.class_names),
    )
    oracles = [HttpOracle(url, key, wire=wire, max_wait=0.0, max_retries=2) for key in keys]
    try:
        try:
            oracles[0].info  # noqa: B018 - fetch the listing: reachable, model served
        except UnknownModel as exc:
            raise UnknownModel(f"{exc}; check the model name at the end of --api") from None
        except Unauthorized as exc:
            raise Unauthorized(
                f"{url} refused the model listing with --api-key #1 ({exc}); check the key"
            ) from None
        except OracleError as exc:
            raise OracleError(
                f"cannot reach the deployed API {url} ({exc}); check --api (host, port, "
                "http/https) and that the service is running"
            ) from None
        for name, oracle in zip(names, oracles, strict=True):
            try:
                oracle.check_key()
            except Unauthorized as exc:
                raise Unauthorized(
                    f"{url} refused {name} ({exc}); check the "
                    "key (the service owner creates keys with `mlinvert keys create`)"
                ) from None
    except BaseException:
        for oracle in oracles:
            oracle.close()
        raise
    return oracles


def _check_served(info: Any, dataset: ImageDataset, url: str) -> None:
    """The deployed model must classify the data set's people and read its images."""
    served, ours = tuple(info.class_names), tuple(dataset.class_names)
    if served != ours:
        pairs = enumerate(zip(served, ours, strict=False))
        differ = next(
            (f"#{i}: {a!r} vs {b!r}" for i, (a, b) in pairs if a != b),
            f"{len(served)} vs {len(ours)} classes",
        )
        raise DataError(
            f"the model at {url} has classes {list(served[:5])}{'...' if len(served) > 5 else ''}"
            f" ({len(served)}), the data {dataset.spec} has {list(ours[:5])}"
            f"{'...' if len(ours) > 5 else ''} ({len(ours)}); first difference {differ}. "
            "Pass the --data the deployed model was trained on"
        )
    if tuple(info.input_shape) != tuple(dataset.image_shape):
        raise DataError(
            f"the model at {url} takes images {tuple(info.input_shape)}, the data "
            f"{dataset.spec} has {dataset.image_shape}; pass the --data it was trained on"
        )


def _deployed_defense(info: Any) -> tuple[Defense, str]:
    """The one defence row of a deployed API and the words describing what it advertises."""
    rate = info.extra.get("rate_limit")
    detector = info.extra.get("detector")
    defense = Defense(name=DEPLOYED, policy=str(info.policy), rate=rate, detector=detector)
    words = (
        f"what {info.extra.get('url')} advertises: output policy {info.policy} "
        f"(answers carry {info.carries}), "
        + (f"rate limit {rate} per account" if rate else "no rate limit")
        + ", "
        + (f"query detector {detector}" if detector else "no query detector")
    )
    return defense, words


def _run_deployed(
    config: AuditConfig, results: ResultsFile, dataset: ImageDataset, emit: Event
) -> None:
    """Audit a prediction API already deployed (``config.api``): the API attacks under
    the one defence it advertises, judged against the owner's data."""
    preset = preset_for(dataset.image_shape, config.quick)
    budget = config.budget or preset.budget
    emit("stage", {"name": f"reading {config.api}"})
    oracles = _open_api(config, dataset)
    try:
        _audit_deployed(config, results, dataset, emit, oracles, preset, budget)
    finally:
        for oracle in oracles:
            oracle.close()


def _audit_deployed(
    config: AuditConfig,
    results: ResultsFile,
    dataset: ImageDataset,
    emit: Event,
    oracles: list[Any],
    preset: Preset,
    budget: int,
) -> None:
    """The deployed-API audit once the keys are checked: describe the deployment, fit
    the judge, measure the served accuracy, attack. ``oracles``: one per attacker key,
    then the honest client's (``--utility-key``) if given."""
    attackers = oracles[: len(config.api_keys)]
    honest, honest_name = (
        (oracles[-1], "--utility-key") if config.utility_key else (oracles[0], "--api-key #1")
    )
    info = oracles[0].info
    _check_served(info, dataset, str(config.api))
    defense, words = _deployed_defense(info)
    labels = _describe_dataset(config, results, dataset, preset, budget, [defense])
    doc = results.doc
    doc["defenses"] = [{**asdict(defense), "description": words}]
    card: dict[str, Any] = {}
    if config.model_dir is not None:
        from mlinvert.targets.io import read_card

        card = read_card(config.model_dir)
    target = _Target(
        name=re.sub(r"[^A-Za-z0-9._-]+", "_", info.model) or "deployed",
        model=None,
        card=card,
        folder=Path(config.model_dir or "."),
    )
    # inputs each key had answered in the earlier runs this one resumes
    answered = dict(doc.get("deployment", {}).get("answered") or {})
    doc["deployment"] = {
        "url": oracles[0].url,
        "model": info.model,
        "kind": info.kind,
        "policy": info.policy,
        "carries": info.carries,
        "rate_limit": info.extra.get("rate_limit"),
        "detector": info.extra.get("detector"),
        "max_batch": info.extra.get("max_batch"),
        "protocol": info.extra.get("protocol", "mlinvert"),
        "keys": len(attackers),
        "utility_key": honest_name,
        "answered": answered,
        "description": words,
        "split_from": (
            f"the card of {config.model_dir}"
            if isinstance(card.get("split"), dict)
            else f"the default split of {dataset.spec}"
        ),
    }
    doc["targets"][target.name] = {
        "kind": info.kind,
        "test_accuracy": None,  # the weights are not used; served accuracy in utility
        "model_dir": None,
        "api": oracles[0].url,
        "privacy": card.get("privacy"),
    }
    judge = _fit_judge(config, results, dataset, labels, emit)
    measured = doc["utility"].get(target.name, {}).get(DEPLOYED)
    if measured is None:  # a resumed run keeps its measurement (it spent real queries)
        emit("stage", {"name": "measuring the served accuracy through the API"})
        doc["utility"][target.name] = {
            DEPLOYED: _deployed_utility(honest, honest_name, defense, dataset)
        }
    results.save()
    ctx = _Context(
        config=config,
        results=results,
        dataset=dataset,
        preset=preset,
        targets=[target],
        judge=judge,
        labels=labels,
        defenses=[defense],
        events=emit,
        api_oracles=attackers,
        prior=_attacker_prior(config, results, dataset),
    )
    _attack_matrix(ctx)


def _deployed_utility(
    oracle: Any, key_name: str, defense: Defense, dataset: ImageDataset
) -> dict[str, Any]:
    """Served accuracy of a deployed API: the held-out inputs sent through ``oracle``
    (the key called ``key_name``: ``--utility-key``, else the attacker's first),
    ``_UTILITY_BATCH`` a request, as an honest client would.

    Skipped (``accuracy`` None and ``skipped`` saying why) when the advertised rate
    limit is smaller than the held-out set or the service refuses on the way (rate
    limited, blocked); rows it refused count as wrong answers, as in the normal audit.
    """
    from mlinvert.errors import Blocked, RateLimited

    x, y = dataset.test()
    n_classes = dataset.n_classes
    base: dict[str, Any] = {
        "policy": defense.policy,
        "rate_limit": defense.rate,
        "detector": defense.detector,
        "labels_unchanged": None,  # unknown: the raw model is not queried
        "n_test": len(y),
    }
    skipped: str | None = None
    if defense.rate is not None:
        from mlinvert.defenses.ratelimit import parse_rate

        allowance = parse_rate(defense.rate).count
        if allowance < len(y):
            skipped = (
                f"not measured: the advertised rate limit ({defense.rate} per account) is "
                f"smaller than the {len(y)} held-out inputs"
            )
    labels: list[np.ndarray] = []
    probs: list[np.ndarray | None] = []
    refused = 0
    start_n = oracle.n_queries
    if skipped is None:
        for start in range(0, len(x), _UTILITY_BATCH):
            chunk = x[start : start + _UTILITY_BATCH]
            try:
                r = oracle.query(chunk)
            except Blocked:
                refused += len(chunk)
                labels.append(np.full(len(chunk), -1, dtype=np.int64))
                probs.append(None)
                continue
            except RateLimited as exc:
                skipped = (
                    f"not measured: the service rate limited {key_name} after "
                    f"{oracle.n_queries - start_n} of the {len(y)} held-out inputs ({exc})"
                )
                break
            labels.append(np.asarray(r.labels))
            probs.append(r.probs)
    spent = oracle.n_queries - start_n
    if skipped is not None:
        return {
            **base,
            **dict.fromkeys(("accuracy", "ece", "topk_accuracy", "brier", "k")),
            "carries": "label" if defense.policy == "labels" else None,
            "skipped": skipped,
            "queries_spent": spent,
            "measured_through": f"the deployed API with {key_name} ({spent} queries)",
        }
    util = served_utility(_answers(labels, probs), y, n_classes)
    return {
        **util,
        **base,
        "honest_refused": refused,
        "queries_spent": spent,
        "measured_through": (
            f"the deployed API with {key_name}: the {len(y)} held-out inputs, "
            f"{_UTILITY_BATCH} per request ({spent} queries spent on that key)"
        ),
    }


@contextlib.contextmanager
def _deployed(ctx: _Context, defense: Defense) -> Iterator[dict[tuple[str, str], Any]]:
    """Oracles per (target, attack) on the deployed API: the attacker's keys
    (``ctx.api_oracles``, shared by the attacks as one real attacker's are), rotated
    through like ``--accounts`` (a key the service refused earlier is moved past)."""
    (target,) = ctx.targets
    api_attacks = [a for a in ctx.config.attacks if a != "whitebox"]
    first = ctx.api_oracles[0]
    ctx.api_alive = lambda: _reachable(first)
    answered = ctx.results.doc["deployment"]["answered"]
    prints = [key_fingerprint(k) for k in ctx.config.api_keys]
    before = [int(answered.get(p, 0)) for p in prints]
    try:
        yield {
            (target.name, a): _many(ctx, defense, a, ctx.api_oracles, before) for a in api_attacks
        }
    finally:
        ctx.api_alive = lambda: True
        for p, n, oracle in zip(prints, before, ctx.api_oracles, strict=True):
            answered[p] = n + oracle.n_queries
        ctx.results.save()


def _reachable(oracle: Any) -> bool:
    """Whether the deployed API still answers its model listing."""
    import httpx

    try:
        return httpx.get(f"{oracle.root}/v1/models", timeout=10.0).status_code < 500
    except httpx.HTTPError:
        return False


# --------------------------------------------------------------------------- pieces
def _references(judge: Any, labels: list[int], seed: int, results: ResultsFile) -> None:
    """Score FaceJudge's reference images (grey, noise, noise template, held-out photo)
    for every attacked person; keep the rates and one example image each."""
    from mlinvert.evaluation.faces import FaceJudge

    y = np.asarray(labels, dtype=np.int64)
    out = []
    for name, images in judge.reference_points(y, seed=seed).items():
        scores = judge.score(images, y)
        for s in scores:
            s["recovered"] = _recovered(s)
        summary = FaceJudge.summary(scores)
        rel = f"images/references/{re.sub(r'[^A-Za-z0-9]+', '_', name)}.png"
        save_png(results.out / rel, np.asarray(images[0]))
        out.append(
            {
                "name": name.replace("_", " "),
                "n": len(scores),
                **{k: _clean(v) for k, v in summary.items() if k != "n"},
                "recovered": sum(s["recovered"] for s in scores) / max(len(scores), 1),
                "image": rel,
                "image_label": int(y[0]),
            }
        )
    results.doc["references"] = out


def _private_photos(dataset: ImageDataset, labels: list[int], results: ResultsFile) -> None:
    """Save the first private training photo and the first held-out photo of each
    attacked person (the report shows them beside the reconstructions)."""
    for key, folder, (x, y) in (
        ("private_images", "private", dataset.train()),
        ("held_out_images", "held_out", dataset.test()),
    ):
        saved = results.doc.setdefault(key, {})
        for lab in labels:
            rows = np.flatnonzero(y == lab)
            if rows.size:
                rel = f"images/{folder}/{lab}.png"
                save_png(results.out / rel, x[rows[0]])
                saved[str(lab)] = rel


def _utilities(
    targets: list[_Target], defenses: list[Defense], dataset: ImageDataset, results: ResultsFile
) -> None:
    from mlinvert.defenses.detector import QueryDetector
    from mlinvert.defenses.policies import parse_policy
    from mlinvert.defenses.predictor import Predictor

    x, y = dataset.test()
    for t in targets:
        per: dict[str, Any] = {}
        for d in defenses:
            # an honest client goes through the detector (not the rate limit, which
            # does not change answers), a few inputs per request
            predictor = Predictor(
                t.model,
                name=t.name,
                policy=parse_policy(d.policy),
                guards=[QueryDetector(d.detector)] if d.detector else [],
                max_batch=max(len(x), 1),
            )
            if d.detector:
                served, refused = _honest_client(predictor, x)
            else:
                served, refused = predictor.predict(x, account="utility"), 0
            util = served_utility(served, y, len(t.model.class_names_))
            util["labels_unchanged"] = bool(
                np.array_equal(served.labels, np.asarray(t.model.predict(x)))
            )
            util["policy"] = d.policy
            util["rate_limit"] = d.rate
            util["detector"] = d.detector
            if d.detector is not None:
                util["honest_refused"] = refused
            per[d.name] = util
        results.doc["utility"][t.name] = per


def _honest_client(predictor: Any, x: np.ndarray, batch: int = 16) -> tuple[Response, int]:
    """Serve the held-out rows as one honest account would send them, ``batch`` at a time.

    Rows a guard refuses (the detector blocking the account) count as answered wrongly:
    label -1 and, under a score policy, all-zero scores. Returns the answers and how many
    rows were refused.
    """
    from mlinvert.errors import Blocked

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
    return _answers(labels, probs), refused


def _answers(labels: list[np.ndarray], probs: list[np.ndarray | None]) -> Response:
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


def _recovered(metrics: dict[str, Any]) -> bool:
    """On faces: the independent recogniser ranks the right person first. Elsewhere
    (digits): the evaluation model's top-1 and the likeness threshold."""
    if metrics.get("judge_top1") is not None:
        return bool(metrics["judge_top1"])
    like = metrics.get("likeness")
    return (
        bool(metrics.get("eval_top1")) and like is not None and float(like) >= (LIKENESS_THRESHOLD)
    )


@contextlib.contextmanager
def _serve(ctx: _Context, defense: Defense) -> Iterator[dict[tuple[str, str], Any]]:
    """Oracles per (target, attack) for ``defense``: HTTP service or in process.

    Every API attack gets its own fresh account (API key); the white-box attacker gets
    the model itself (no API, so no output policy and no rate limit apply).
    """
    from mlinvert.defenses.detector import QueryDetector
    from mlinvert.defenses.policies import parse_policy
    from mlinvert.defenses.predictor import Predictor
    from mlinvert.oracle.local import LocalOracle

    if ctx.config.api is not None:
        with _deployed(ctx, defense) as deployed:
            yield deployed
        return
    api_attacks = [a for a in ctx.config.attacks if a != "whitebox"]
    if ctx.config.in_process or not api_attacks:
        guards = defense.guards()  # one set for every model, as in the service
        oracles: dict[tuple[str, str], Any] = {}
        for t in ctx.targets:
            predictor = Predictor(
                t.model, name=t.name, policy=parse_policy(defense.policy), guards=guards
            )
            for a in api_attacks:  # one account per target and attack, as over HTTP
                oracles[(t.name, a)] = _many(
                    ctx,
                    defense,
                    a,
                    [
                        LocalOracle(predictor, account=_account(defense, t.name, a, i))
                        for i in range(ctx.config.accounts)
                    ],
                )
        try:
            yield oracles
        finally:
            for g in guards:
                if isinstance(g, QueryDetector):
                    _note_flags(ctx, defense, api_attacks, g.flags)
        return
    from mlinvert.service.store import Store

    ctx.events("stage", {"name": f"starting the service with defence {defense.name}"})
    final_db = ctx.results.out / "service" / f"{defense.slug}.sqlite3"
    with _ram_query_log(final_db, carry_on=ctx.config.resume) as db:
        store = Store(db)
        try:
            earlier = _answered_per_account(store)
            keys = {
                (t.name, a): [
                    store.create_key(_account(defense, t.name, a, i))[0]
                    for i in range(ctx.config.accounts)
                ]
                for t in ctx.targets
                for a in api_attacks
            }
        finally:
            store.close()
        try:
            with _service(ctx, defense, db, keys, earlier) as oracles:
                yield oracles
        finally:
            if defense.detector is not None:
                store = Store(db)  # the service keeps its flags in the account database
                try:
                    _note_flags(ctx, defense, api_attacks, store)
                finally:
                    store.close()


def _answered_per_account(store: Any) -> dict[str, int]:
    """Inputs the service answered per account so far (an earlier run's, when resumed)."""
    out: dict[str, int] = {}
    for q in store.queries():
        if q.status == 200:
            out[str(q.account)] = out.get(str(q.account), 0) + q.n_inputs
    return out


def _account(defense: Defense, target: str, attack: str, i: int = 0) -> str:
    """The ``i``-th API account of one attack on one target under ``defense``."""
    return f"audit-{defense.slug}-{target}-{attack}" + (f"-{i + 1}" if i else "")


def _many(
    ctx: _Context,
    defense: Defense,
    attack: str,
    accounts: list[Any],
    answered_before: Sequence[int] = (),
) -> Any:
    """One attacker's oracle over its accounts: the only one, a Rotating over them, or
    with ``config.escalate`` against a detector the blinding Sybil
    (:func:`~mlinvert.oracle.wrappers.escalating`). ``answered_before``: what each
    account answered in an earlier run this one resumes (see ``Rotating``)."""
    from mlinvert.oracle.wrappers import Rotating, escalating

    amplitude = _blinding(ctx, attack, defense)
    if ctx.config.escalate and amplitude is not None:
        return escalating(
            accounts, amplitude, seed=ctx.config.seed, answered_before=answered_before
        )
    if len(accounts) == 1:
        return accounts[0]
    return Rotating(accounts, answered_before=answered_before)


def _note_flags(ctx: _Context, defense: Defense, attacks: list[str], flags: Any) -> None:
    """Record in ``detector_flags`` whether the detector flagged each attack's accounts
    (``flags``: a :class:`~mlinvert.defenses.detector.FlagStore`): the first account's
    flag and how many were flagged; a flag an earlier, resumed run recorded is kept."""
    mine = ctx.results.doc.setdefault("detector_flags", {}).setdefault(defense.name, {})
    for t in ctx.targets:
        row = mine.setdefault(t.name, {})
        for a in attacks:
            found = [
                f
                for i in range(ctx.config.accounts)
                if (f := flags.flagged(_account(defense, t.name, a, i))) is not None
            ]
            if found:
                row[a] = {
                    "inputs": found[0].inputs,
                    "near_duplicates": found[0].near_duplicates,
                    "accounts_flagged": len(found),
                }
            else:
                row.setdefault(a, None)
    ctx.results.save()


@contextlib.contextmanager
def _ram_query_log(final_db: Path, *, carry_on: bool = False) -> Iterator[Path]:
    """A path for the service's query log on the RAM disk, copied to ``final_db`` after.

    The service logs every query; on a RAM disk that costs no fsync per request
    (measured: 17 instead of 25 ms per request). ``carry_on`` (a resumed audit) starts
    from the database ``final_db`` already holds — the earlier run's query log, accounts
    and detector flags — so the copy back adds to it instead of replacing it.
    """
    final_db.parent.mkdir(parents=True, exist_ok=True)
    ram = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix="mlinvert-audit-", dir=ram if ram.is_dir() else None))
    db = work / final_db.name
    if carry_on:
        _copy_sqlite(final_db, db)
    try:
        yield db
    finally:
        _copy_sqlite(db, final_db)
        shutil.rmtree(work, ignore_errors=True)


def _copy_sqlite(src: Path, dst: Path) -> None:
    """Copy an SQLite database consistently (WAL included) with the backup API."""
    if not src.exists():
        return
    with (
        contextlib.closing(sqlite3.connect(src)) as a,
        contextlib.closing(sqlite3.connect(dst)) as b,
    ):
        a.backup(b)


@contextlib.contextmanager
def _service(
    ctx: _Context,
    defense: Defense,
    db: Path,
    keys: dict[tuple[str, str], list[str]],
    earlier: dict[str, int],
) -> Iterator[dict[tuple[str, str], Any]]:
    """Run ``mlinvert serve`` with the defence; yield per (target, attack) an HttpOracle
    per API key, rotated through when there are several (``earlier``: inputs answered
    per account name before, see :func:`_answered_per_account`)."""
    from mlinvert.oracle.http import HttpOracle
    from mlinvert.service.runner import ServiceProcess

    with ServiceProcess(
        [f"{t.name}={t.folder}" for t in ctx.targets],
        db=db,
        policy=defense.policy,
        rate_limit=defense.rate,
        detector=defense.detector,
        env=ONE_THREAD_ENV,
    ) as service:
        clients = {
            (name, a): [
                HttpOracle(service.model_url(name), key, max_wait=0.0) for key in account_keys
            ]
            for (name, a), account_keys in keys.items()
        }
        process = service.process
        ctx.api_alive = lambda: process is not None and process.poll() is None
        try:
            yield {
                (name, a): _many(
                    ctx,
                    defense,
                    a,
                    accounts,
                    [earlier.get(_account(defense, name, a, i), 0) for i in range(len(accounts))],
                )
                for (name, a), accounts in clients.items()
            }
        finally:
            ctx.api_alive = lambda: True
            for accounts in clients.values():
                for client in accounts:
                    client.close()


def search_space(
    dataset: ImageDataset,
    label: int,
    spec: str,
    *,
    augment: bool = False,
    detail: int = 0,
    radius: float | None = 1.0,
) -> Any:
    """The attacks' search space for ``label``, bound to the image size.

    ``pca:K`` is an eigenface prior from the attacker's auxiliary photos — the held-out
    photos of everyone *except* the attacked person (never a private training photo;
    PCAPrior checks it; ``augment`` adds their mirror images and 2-px shifts; ``detail``
    and ``radius`` as in PCAPrior) — other specs go to parse_space.
    """
    from mlinvert.attacks.spaces import PCAPrior, Space, parse_space

    space: Space
    if spec.startswith("pca"):
        _, _, k = spec.partition(":")
        x_test, y_test = dataset.test()
        x_train, _ = dataset.train()
        space = PCAPrior(
            x_test[y_test != label],
            int(k or 40),
            private=x_train,
            source="held-out photos of other people",
            augment=augment,
            detail=detail,
            radius=radius,
        )
    else:
        space = parse_space(spec)
    return space.bind(dataset.image_shape)


def build_attack(
    attack: str, preset: Preset, budget: int, space: Any, *, policy: str = "full"
) -> Any:
    """The audit's ``attack`` (whitebox, blackbox, label-only) with ``preset``'s settings,
    sized to ``budget`` queries per person, searching ``space``.

    The black-box attacker reads the API's documented output ``policy``: full-precision
    scores get Broyden's extracted Jacobian, anything coarser NES (see preset_for).
    """
    from mlinvert.attacks.gradients import NES, Exact, auto_gradient
    from mlinvert.attacks.miface import MIFace, MIFaceConfig

    p = preset
    if attack == "whitebox":
        return MIFace(
            MIFaceConfig.improved(max_iter=p.whitebox_iters), gradient=Exact(), space=space
        )
    if attack == "blackbox":
        source = auto_gradient(policy, nes=NES(samples=p.nes_samples))
        if isinstance(source, NES):  # as many cosine-annealed steps as the budget pays for
            steps = max(budget // (2 * p.nes_samples + 1), 1)
            return MIFace(MIFaceConfig.improved(max_iter=steps), gradient=source, space=space)
        return MIFace(MIFaceConfig.improved(), gradient=source, space=space)
    from mlinvert.attacks.label_only import LabelOnly, LabelOnlyConfig

    start = max(budget // 5, 10)
    directions = 16
    cfg = LabelOnlyConfig(
        n_directions=directions,
        start_samples=start,
        max_iter=max(min(p.label_only_iters, (budget - start) // (directions + 1)), 1),
        batch_size=50,
    )
    return LabelOnly(cfg, space=space)


def _build_attack(ctx: _Context, attack: str, label: int, defense: Defense) -> Any:
    if ctx.prior is None and label not in ctx.spaces:  # bound once per person, then reused
        ctx.spaces[label] = search_space(
            ctx.dataset, label, ctx.preset.space, augment=ctx.preset.augment
        )
    space = ctx.prior if ctx.prior is not None else ctx.spaces[label]
    budget = int(ctx.results.doc["budget"])
    return build_attack(attack, ctx.preset, budget, space, policy=defense.policy)


def _attack_one(
    ctx: _Context,
    attack: str,
    defense: Defense,
    target: _Target,
    label: int,
    oracles: dict[tuple[str, str], Any],
) -> dict[str, Any]:
    """Run one attack on one person under one defence and judge it: one record."""
    shared = _shared_record(ctx, attack, defense, target, label)
    if shared is not None:
        return shared
    base: Any = None  # the API attacker's account(s)
    if attack == "whitebox":
        from mlinvert.defenses.predictor import Predictor
        from mlinvert.oracle.local import WhiteBoxOracle

        oracle: Any = WhiteBoxOracle(Predictor(target.model, name=target.name))
    else:
        base = oracles[(target.name, attack)]
        oracle = _adapted(ctx, attack, defense, base, label)
    budget = _budget(ctx, attack)
    try:
        outcome: Any = _build_attack(ctx, attack, label, defense).run(
            oracle, label, seed=ctx.config.seed, budget=budget, progress=_progress(ctx, budget)
        )
    except MlinvertError as exc:
        outcome = exc
    accounts = None if base is None else getattr(base, "accounts_used", 1)
    return _record(
        ctx,
        attack,
        defense,
        target,
        label,
        outcome,
        lanes=1,
        accounts=accounts,
        blinded_up_to=largest_blinding(oracle),
    )


def _attack_lanes(
    ctx: _Context,
    attack: str,
    defense: Defense,
    target: _Target,
    labels: list[int],
    oracles: dict[tuple[str, str], Any],
) -> None:
    """Attack ``labels`` through one API oracle, ``config.lanes`` people at a time.

    Each person's attack runs unchanged on its own lane of a
    :class:`~mlinvert.oracle.lockstep.Coalescer` (exact per-person query counts; the
    probes of all running people share each request). Records are judged, written and
    reported in this thread as each person finishes.
    """
    from mlinvert.oracle.lockstep import map_lanes

    todo = []
    for label in labels:
        shared = _shared_record(ctx, attack, defense, target, label)
        if shared is None:
            todo.append(label)
        else:
            ctx.results.add(shared)
            ctx.events("record", shared)
    budget = _budget(ctx, attack)
    attacks = {}  # built here, not in the lanes: the search spaces are cached in ctx
    for label in todo:
        try:
            attacks[label] = _build_attack(ctx, attack, label, defense)
        except MlinvertError as exc:
            record = _record(ctx, attack, defense, target, label, exc, lanes=1)
            ctx.results.add(record)
            ctx.events("record", record)
    todo = [label for label in todo if label in attacks]
    if not todo:
        return
    lanes = min(ctx.config.lanes, len(todo))
    accounts = oracles[(target.name, attack)]
    adapted: dict[int, Any] = {}

    def work(label: int, lane: Any) -> Any:
        adapted[label] = _adapted(ctx, attack, defense, lane, label)
        try:
            return attacks[label].run(
                adapted[label],
                label,
                seed=ctx.config.seed,
                budget=budget,
                progress=_progress(ctx, budget),
            )
        except MlinvertError as exc:
            return exc

    def done(label: int, future: Future[Any]) -> None:
        record = _record(
            ctx,
            attack,
            defense,
            target,
            label,
            future.result(),
            lanes=lanes,
            accounts=getattr(accounts, "accounts_used", 1),
            blinded_up_to=largest_blinding(accounts if ctx.config.escalate else adapted.get(label)),
        )
        ctx.results.add(record)
        ctx.events("record", record)

    map_lanes(work, todo, oracles[(target.name, attack)], lanes=lanes, on_done=done)


def _blinding(ctx: _Context, attack: str, defense: Defense) -> float | None:
    """The blinding amplitude the API attacker uses under ``defense`` (None: none).

    The attacker reads the service's documentation (``/v1/models`` advertises the
    detector) as it reads the output policy, and adapts: against a query detector it
    blinds every probe (``AuditConfig.blind``)."""
    if attack == "whitebox" or defense.detector is None or ctx.config.blind <= 0:
        return None
    return ctx.config.blind


def _adapted(ctx: _Context, attack: str, defense: Defense, oracle: Any, label: int) -> Any:
    """``oracle`` as the attacker uses it under ``defense``: blinded against a detector
    (per person; with ``config.escalate`` the accounts blind instead, see :func:`_many`)."""
    from mlinvert.oracle.wrappers import Blinded

    amplitude = _blinding(ctx, attack, defense)
    if amplitude is None or ctx.config.escalate:
        return oracle
    return Blinded(oracle, amplitude, seed=np.random.default_rng([ctx.config.seed, label]))


def _budget(ctx: _Context, attack: str) -> int | None:
    """Queries per person: the API attacks' budget; the white-box attacker pays none."""
    return None if attack == "whitebox" else int(ctx.results.doc["budget"])


def _progress(ctx: _Context, budget: int | None) -> Callable[[Any], None]:
    def progress(ev: Any) -> None:
        ctx.events(
            "attack_progress",
            {"queries": ev.n_queries, "budget": budget, "confidence": ev.best_confidence},
        )

    return progress


def _shared_record(
    ctx: _Context, attack: str, defense: Defense, target: _Target, label: int
) -> dict[str, Any] | None:
    """The record of an earlier run this one provably equals (see :func:`_shared_run`)."""
    shared = _shared_run(ctx, attack, defense, target, label)
    if shared is None:
        return None
    source, why = shared
    keep = {k: v for k, v in source.items() if k not in ("defense", "utility", "channel")}
    return {
        **keep,
        **_base(ctx, attack, defense, target, label),
        "utility": ctx.results.doc["utility"][target.name][defense.name],
        "channel": f"{source['channel']} (shared run of '{source['defense']}': {why})",
        "shared_from": source["defense"],
    }


def _base(
    ctx: _Context, attack: str, defense: Defense, target: _Target, label: int
) -> dict[str, Any]:
    return {
        "attack": attack,
        "defense": defense.name,
        "target_model": target.name,
        "label": label,
        "label_name": ctx.dataset.class_names[label],
        "seed": ctx.config.seed,
    }


def _record(
    ctx: _Context,
    attack: str,
    defense: Defense,
    target: _Target,
    label: int,
    outcome: Any,
    *,
    lanes: int,
    accounts: int | None = None,
    blinded_up_to: float | None = None,
) -> dict[str, Any]:
    """Judge an attack's result (or record its error): one record.

    ``lanes``: how many people this attack ran beside (1: alone; its ``seconds`` are
    then its own wall time, otherwise the wall time while sharing requests).
    ``accounts``: API accounts the attacker had opened when it ended (None: white-box).
    ``blinded_up_to``: the largest blinding noise its probes carried (``blinded`` is
    the amplitude it started with; larger after the service blocked an account).
    """
    if attack == "whitebox":
        channel = "model weights"
    elif ctx.config.api is not None:
        channel = "deployed HTTP API"
    else:
        channel = "in-process API" if ctx.config.in_process else "HTTP API"
    util = ctx.results.doc["utility"][target.name][defense.name]
    record: dict[str, Any] = {
        **_base(ctx, attack, defense, target, label),
        "channel": channel,
        "lanes": lanes,
        "blinded": _blinding(ctx, attack, defense),
        "blinded_up_to": blinded_up_to,
        "accounts": accounts,
    }
    if isinstance(outcome, MlinvertError):
        if not ctx.api_alive():
            raise OracleError(
                f"the prediction service stopped during the audit ({outcome}); continue with "
                "--resume"
            ) from outcome
        # MI-Face against a labels-only API gets nothing out: the defence's measured
        # effect; any other error leaves the cell unmeasured
        inapplicable = attack == "blackbox" and util.get("carries") == "label"
        record.update(
            status="not_applicable" if inapplicable else "error",
            measured=inapplicable,
            error=str(outcome),
            n_queries=0,
            seconds=0.0,
            image=None,
            target_confidence=None,
            recovered=False,
            utility=util,
            **dict.fromkeys(_METRICS),
        )
        return record
    result = outcome
    image = result.reconstructions[0]
    rel = f"images/{target.name}/{attack}/{defense.slug}/{label}.png"
    save_png(ctx.results.out / rel, image)
    judge_error = None
    try:
        scores = ctx.judge.score(result.reconstructions[:1], np.asarray([label]))[0]
    except MlinvertError as exc:  # a judge that fails leaves the record unmeasured
        scores, judge_error = {}, f"the judge failed: {exc}"
    metrics = {k: _clean(scores.get(k)) for k in _METRICS}
    faces = ctx.results.doc["thresholds"].get("judge") == "independent"
    if faces and metrics.get("judge_top1") is None and judge_error is None:
        judge_error = "the independent face judge gave no verdict"
    conf = float(result.confidence[0]) if len(result.confidence) else float("nan")
    record.update(
        status=result.status,
        error=(result.per_label[0].get("message") or None) if result.per_label else None,
        n_queries=int(result.n_queries),
        seconds=round(float(result.elapsed_s), 4),
        image=rel,
        target_confidence=_clean(conf),
        **metrics,
        measured=judge_error is None,
    )
    if judge_error is not None:
        record["error"] = judge_error
    record["recovered"] = _recovered(record)
    record["utility"] = util
    return record


def _shared_run(
    ctx: _Context, attack: str, defense: Defense, target: _Target, label: int
) -> tuple[dict[str, Any], str] | None:
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


_METRICS = (
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


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed (for the report's reproduce section)."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["mlinvert", *args])
