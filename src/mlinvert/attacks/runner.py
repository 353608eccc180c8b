"""``run_attack_job``: one attack job (``mlinvert attack miface``) from its config to the
PNGs and ``result.json`` in its output folder.

The job reaches the target through a local model folder (white-box, or black-box through
the same Predictor the service uses) or a prediction API with one or several keys; it
searches a pixel/DCT space, an eigenface prior of auxiliary photos, or a learned prior;
and it runs the labels one after another or several at once (lanes). Several keys are
used in turn; with ``checkpoint`` what each key answered is kept beside it
(``CHECKPOINT.keys.json``), so a resumed run moves past a key the service refused.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlinvert.attacks.base import AttackResult, ProgressEvent
from mlinvert.attacks.checkpoint import Checkpoint
from mlinvert.attacks.gradients import Exact, parse_gradient
from mlinvert.attacks.label_only import LabelOnly, LabelOnlyConfig
from mlinvert.attacks.lockstep import LabelAttack, run_lockstep
from mlinvert.attacks.miface import MIFace, MIFaceConfig, resolve_label
from mlinvert.attacks.presets import search_space
from mlinvert.attacks.priors import load_prior
from mlinvert.attacks.spaces import Space, check_disjoint, load_aux, parse_space
from mlinvert.core import OracleInfo, output_dir, write_json
from mlinvert.defenses.spec import build_predictor
from mlinvert.errors import ConfigError, MlinvertError, OracleError, Unauthorized
from mlinvert.oracle.base import Oracle
from mlinvert.oracle.http import HttpOracle, key_fingerprint
from mlinvert.oracle.local import LocalOracle, WhiteBoxOracle
from mlinvert.oracle.lockstep import check_lanes
from mlinvert.oracle.wire import WireConfig
from mlinvert.oracle.wrappers import Blinded, largest_blinding, one_attacker
from mlinvert.targets.files import is_model_file, load_file
from mlinvert.targets.io import load as load_model
from mlinvert.targets.io import trained_on

log = logging.getLogger(__name__)

MODES = ("whitebox", "blackbox", "label-only")
#: ``aux="heldout"``: per person, the local model's held-out photos of everyone else.
HELDOUT = "heldout"
#: Statuses that mean the API refuses this account: the labels after it are not attacked.
STOPPED = ("rate_limited", "blocked")

Note = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class AttackJob:
    """One attack job: what to attack, how, and where its results go.

    Exactly one of ``model`` (a local model folder) or ``target`` (an API URL
    ``http://HOST:PORT/v1/models/NAME``, with ``api_keys``) and exactly one of ``label``
    (a class name or index) or ``all_labels``. ``mode``: whitebox, blackbox or label-only.
    ``gradient``, ``samples``, ``sigma``: the black-box gradient source
    (:func:`~mlinvert.attacks.gradients.parse_gradient`). ``space``, ``aux``, ``pca_k``,
    ``detail``, ``radius``, ``augment``: the search space
    (:func:`~mlinvert.attacks.spaces.parse_space`; ``aux="heldout"`` an eigenface prior per
    person from the local model's held-out photos of everyone else); ``prior`` a learned
    prior's folder instead. ``paper``, ``objective``, ``max_iter``: MI-Face's settings.
    ``budget``: queries per label. ``policy``: the output policy of a local ``model``.
    ``checkpoint``: a file that makes the job resumable. ``lanes``: labels attacked at
    once through an API. ``blind``: noise of +-A on every probe (against a query
    detector); ``escalate``: doubled each time the service blocks one of several keys.
    """

    out: Path
    model: Path | None = None
    target: str | None = None
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    label: str | None = None
    all_labels: bool = False
    mode: str = "whitebox"
    gradient: str = "auto"
    samples: int = 20
    sigma: float = 0.02
    space: str = "auto"
    aux: str | None = None
    prior: Path | None = None
    pca_k: int = 40
    detail: int = 0
    radius: float = 1.0
    augment: bool = False
    paper: bool = False
    objective: str | None = None
    max_iter: int | None = None
    budget: int | None = None
    policy: str = "full"
    checkpoint: Path | None = None
    lanes: int = 1
    blind: float | None = None
    escalate: bool = False
    seed: int = 0
    #: what the API speaks (``--protocol`` and its options); for a model file, its
    #: ``input_shape`` and ``class_names`` complete what the file declares
    wire: WireConfig = field(default_factory=WireConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_keys", tuple(k.strip() for k in self.api_keys if k.strip()))
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if (self.label is None) == (not self.all_labels):
            raise ConfigError("pass --label NAME or --all-labels (exactly one)")
        check_lanes(self.lanes)
        if self.lanes > 1 and self.mode == "whitebox":
            raise ConfigError(
                "--lanes batches the API queries of --mode blackbox or label-only; a "
                "white-box attack runs in process on the model's gradients: drop --lanes"
            )
        if self.aux == HELDOUT and self.model is None:
            raise ConfigError(
                "--aux heldout reads the held-out photos a local model's card names: it "
                "needs --model DIR (an API attacker brings public photos: --aux lfw or "
                "--aux folder:PATH)"
            )
        if self.escalate and (self.blind is None or self.target is None or len(self.api_keys) < 2):
            raise ConfigError(
                "--escalate raises the --blind noise each time the service blocks a key: it "
                "needs --target URL, --blind A and several keys (--api-key K1,K2,...)"
            )
        if self.blind is not None and self.mode == "whitebox":
            raise ConfigError(
                "--blind adds noise to the probes sent to an API; a white-box attack "
                "sends none: drop --blind or use --mode blackbox/label-only"
            )
        if self.objective is not None and self.mode == "label-only":
            raise ConfigError(
                "--objective sets what MI-Face climbs; the label-only attack has no "
                "scores to climb: drop --objective or use --mode whitebox/blackbox"
            )
        self._check_reach()

    def _check_reach(self) -> None:
        """A local model or an API with keys, never both."""
        if (self.model is None) == (self.target is None):
            raise ConfigError(
                "pass exactly one of --model DIR (a local model folder) or "
                "--target URL (http://HOST:PORT/v1/models/NAME, or another API with --protocol)"
            )
        if self.target is not None and self.mode == "whitebox":
            raise ConfigError(
                "--mode whitebox needs the model itself (--model DIR); an API "
                "--target allows --mode blackbox or label-only"
            )
        mlinvert_api = self.wire.protocol == "mlinvert"
        if self.target is not None and not self.api_keys and mlinvert_api:
            raise ConfigError("--target needs --api-key KEY (create one with `mlinvert keys`)")
        if self.model is not None and self.wire.to_dict() != WireConfig().to_dict():
            raise ConfigError(
                "--protocol, --output, --request, --scores and --header describe an API "
                "--target; a local --model needs none of them"
            )

    @property
    def resumable(self) -> bool:
        """Whether an interrupted run can resume (the label-only attack keeps no state)."""
        return self.checkpoint is not None and self.mode != "label-only"

    @property
    def stopped_note(self) -> str:
        """What an interrupted run keeps, and how to go on."""
        if self.resumable:
            assert self.checkpoint is not None
            states = self.checkpoint.parent / (self.checkpoint.stem + ".label*.npz")
            return f"each label's state is in {states}; run the same command to resume"
        if self.checkpoint is not None:
            return "nothing was saved (the label-only attack keeps no state to resume)"
        return "nothing was saved; pass --checkpoint FILE to make an attack resumable"

    @property
    def ledger(self) -> Path | None:
        """Where a multi-key API attack with a checkpoint keeps what each key answered
        (by key fingerprint); None without a checkpoint or with one key."""
        if self.checkpoint is None or self.target is None or len(self.api_keys) < 2:
            return None
        return self.checkpoint.with_name(self.checkpoint.name + ".keys.json")


@dataclass
class JobResult:
    """What a job produced: the merged result, its PNGs and its wall time."""

    result: AttackResult
    paths: list[Path]
    elapsed_s: float

    @property
    def stopped(self) -> dict[str, str]:
        """The API's refusals (``rate_limited``, ``blocked``) that ended labels early."""
        found = {r["status"]: r.get("message") or "" for r in self.result.per_label}
        return {s: found[s] for s in STOPPED if s in found}


def run_attack_job(
    job: AttackJob,
    *,
    started: Callable[[OracleInfo, list[int]], None] | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    note: Note = log.info,
) -> JobResult:
    """Run ``job``: reach the target, build each label's attack, attack, and write one
    PNG per label and ``result.json`` into ``job.out``.

    ``started(info, labels)`` is called once the target is reached and the labels are
    known (a progress display sets itself up there); ``progress`` receives every
    attack's progress events; ``note`` the job's remarks (key budgets, skipped checks).
    """
    before = _read_ledger(job.ledger, list(job.api_keys))
    base = _reach(job, before, note)
    oracle = base
    if job.blind is not None and not job.escalate:
        oracle = Blinded(oracle, job.blind, seed=job.seed)
    info = oracle.info
    if len(info.input_shape) != 2:
        raise ConfigError(
            f"MI-Face reconstructs images; {job.target or job.model} takes inputs of shape "
            f"{tuple(info.input_shape)} (survey answers): audit a decision tree with "
            "`mlinvert audit --model DIR --data steak:PATH` (or gss:PATH, fair)"
        )
    labels = (
        list(range(info.n_classes))
        if job.all_labels
        else [resolve_label(job.label or "", info.class_names)]
    )
    make = _attack_maker(job, info, _spaces(job, info.input_shape, note))
    checkpoint = Checkpoint(job.checkpoint) if job.resumable and job.checkpoint else None
    if not job.resumable and (job.out / "result.json").exists():
        raise ConfigError(
            f"--out {job.out} already holds an attack's result.json (and its PNGs), which "
            "this run would replace: choose another --out or delete that folder first "
            "(a run resumed with the same --checkpoint may write over its own results)"
        )
    output_dir(job.out)  # before the attack, whose results would be lost after it
    if checkpoint is not None:
        output_dir(checkpoint.path.parent, "--checkpoint")
    if started is not None:
        started(info, labels)
    t0 = time.perf_counter()
    try:
        results = run_lockstep(
            make,
            oracle,
            labels,
            lanes=min(job.lanes, len(labels)),
            seed=job.seed,
            budget=job.budget,
            progress=progress,
            checkpoint=checkpoint,
            stop_on=STOPPED,
        )
    finally:  # interrupted too: the keys' answers were spent
        if job.ledger is not None:
            _write_ledger(job.ledger, list(job.api_keys), before, base)
    merged = AttackResult.merge(results)
    merged.extra.update(
        target=job.target or str(job.model),
        mode=job.mode,
        blind=job.blind,
        escalate=job.escalate,
        blinded_up_to=largest_blinding(oracle),
        api_keys_used=getattr(base, "accounts_used", 1 if job.target else 0),
        wire=job.wire.to_dict() if job.target else None,
        api_answered=_api_counts(base) if job.target else None,
    )
    paths = merged.save_pngs(job.out, scale=3)
    write_json(job.out / "result.json", merged.to_dict())
    return JobResult(result=merged, paths=paths, elapsed_s=time.perf_counter() - t0)


def _attack_maker(
    job: AttackJob, info: OracleInfo, space_of: Callable[[int], Space]
) -> Callable[[int], LabelAttack]:
    """The attack of each label, as the job asks for it."""
    overrides: dict[str, Any] = {} if job.max_iter is None else {"max_iter": job.max_iter}
    if job.objective is not None:
        overrides["objective"] = job.objective
    cfg = MIFaceConfig.paper(**overrides) if job.paper else MIFaceConfig.improved(**overrides)

    def make(label: int) -> LabelAttack:
        if job.mode == "label-only":
            return LabelOnly(LabelOnlyConfig(), space=space_of(label))
        if job.mode == "whitebox":
            return MIFace(cfg, gradient=Exact(), space=space_of(label))
        source = parse_gradient(
            job.gradient, samples=job.samples, sigma=job.sigma, policy=info.policy
        )
        return MIFace(cfg, gradient=source, space=space_of(label))

    return make


def _reach(job: AttackJob, answered_before: Sequence[int], note: Note) -> Oracle:
    """The attacker's oracle: a local model, or the API through one key or several
    (with ``escalate`` each key blinds its probes, the noise doubled each time the
    service blocks one; ``answered_before``: what each key answered in an earlier,
    interrupted run, see :class:`~mlinvert.oracle.wrappers.Rotating`)."""
    if job.target is None:
        assert job.model is not None
        if is_model_file(job.model):  # what the file does not declare: --input-shape, --classes
            model = load_file(
                job.model, input_shape=job.wire.input_shape, class_names=job.wire.class_names
            )
        else:
            model = load_model(job.model)
        if job.mode == "whitebox":
            return WhiteBoxOracle(build_predictor(model, name=job.model.name))
        return LocalOracle(build_predictor(model, name=job.model.name, policy=job.policy))
    # another protocol: a key (or --header) only if the API asks for one
    keys: list[str | None] = [*job.api_keys] or [None]
    # several keys: a refused key hands over at once; the last one waits out a 429
    accounts = [HttpOracle(job.target, k, wire=job.wire, max_wait=0.0) for k in keys[:-1]]
    accounts.append(HttpOracle(job.target, keys[-1], wire=job.wire))
    # what each key may still send (mlinvert's accounts); a refused key stops here
    for account in accounts if job.wire.protocol == "mlinvert" else ():
        try:
            a = account.account()
        except Unauthorized:
            raise
        except OracleError as exc:
            note(f"cannot read the key's account ({exc})")
            continue
        left = f"{a.remaining} of {a.rate_limit} inputs left" if a.rate_limit else "no limit"
        note(f"account {a.name}: {left}{' (blocked)' if a.blocked else ''}")
    return one_attacker(
        accounts,
        escalate=job.blind if job.escalate else None,
        seed=job.seed,
        answered_before=answered_before if job.ledger is not None else (),
    )


def _api_counts(base: Any) -> dict[str, int]:
    """What the API answered this run, over all keys: inputs (the attack's queries and
    any probe that read what the answers carry) and requests."""
    oracles = [getattr(o, "inner", o) for o in getattr(base, "oracles", [base])]  # unblinded
    return {
        "inputs": sum(int(o.n_queries) for o in oracles),
        "requests": sum(int(o.n_requests) for o in oracles),
    }


def _read_ledger(ledger: Path | None, keys: list[str]) -> list[int]:
    """Inputs each of ``keys`` answered in earlier runs (zeros without a ledger)."""
    if ledger is None or not ledger.exists():
        return [0] * len(keys)
    try:
        counts = json.loads(ledger.read_text())
        return [int(counts.get(key_fingerprint(k), 0)) for k in keys]
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"{ledger} is not a key ledger written by mlinvert ({exc}); delete it to start "
            "the keys' counts afresh"
        ) from None


def _write_ledger(ledger: Path, keys: list[str], before: list[int], rotating: Any) -> None:
    """Add what each key answered in this run to the ledger (atomic replace)."""
    counts = {
        key_fingerprint(k): n + int(o.n_queries)
        for k, n, o in zip(keys, before, rotating.oracles, strict=True)
    }
    tmp = ledger.with_name(ledger.name + ".tmp")
    tmp.write_text(json.dumps(counts, indent=1) + "\n")
    tmp.replace(ledger)


def _spaces(job: AttackJob, shape: tuple[int, ...], note: Note) -> Callable[[int], Space]:
    """The search space of each label: one shared space, or with ``aux="heldout"`` an
    eigenface prior per person from the held-out photos of everyone else, or with
    ``prior`` the latent space of a learned prior."""
    if job.prior is not None:
        if job.aux is not None or job.space != "auto":
            raise ConfigError(
                "--prior DIR is the search space (a prior learned from public faces): drop "
                "--aux and --space, or drop --prior to search an eigenface or pixel space"
            )
        private = _private_photos(job.model, "--prior", note)
        learned = load_prior(job.prior).space(radius=job.radius or None, private=private)
        shared = learned.bind(shape)
        return lambda label: shared
    if job.aux == HELDOUT:
        assert job.model is not None  # checked by AttackJob
        if job.space not in ("auto", "pca"):
            raise ConfigError(
                f"--aux heldout builds an eigenface prior: use --space pca, not {job.space!r}"
            )
        data = trained_on(job.model)
        return lambda label: search_space(
            data,
            label,
            f"pca:{job.pca_k}",
            augment=job.augment,
            detail=job.detail,
            radius=job.radius or None,
        )
    if job.aux is not None:
        private = _private_photos(job.model, "--aux", note)
        if private is not None:  # a prior from the target's own photos measures nothing
            check_disjoint(load_aux(job.aux), private)
    # bound once here, so every label shares one prior instead of fitting its own
    shared = _space(job).bind(shape)
    return lambda label: shared


def _space(job: AttackJob) -> Space:
    spec = job.space
    if spec == "auto":
        if job.aux is not None:
            spec = "pca"
        else:
            spec = {"whitebox": "pixel", "blackbox": "dct:10", "label-only": "dct:8"}[job.mode]
    if spec == "pca" and job.aux is not None:
        spec = f"pca:{job.aux}"
    return parse_space(
        spec, k=job.pca_k, detail=job.detail, radius=job.radius or None, augment=job.augment
    )


def _private_photos(model: Path | None, option: str, note: Note) -> Any:
    """The local model's private training photos, to check an attacker's prior against;
    None (and a note) when there is no local model or its data is not on this machine
    (the card's data set may live elsewhere)."""
    if model is None:
        return None
    try:
        return trained_on(model).train()[0]
    except MlinvertError as exc:
        note(f"cannot check {option} against the model's data ({exc})")
        return None
