"""What one audit run is asked to do: the config, the target and defence specs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlinvert.core import ATTACKS
from mlinvert.defenses.spec import Defense
from mlinvert.errors import ConfigError
from mlinvert.oracle.http import key_fingerprint
from mlinvert.oracle.lockstep import check_lanes
from mlinvert.oracle.wire import WireConfig, split_url
from mlinvert.targets.dae import PublicPretrain
from mlinvert.targets.training import DP_KINDS, dp_config

#: Output-policy part of the default defence matrix; the rate limit is added per budget.
DEFAULT_POLICIES = ("none", "round:3", "round:2", "round:1", "top:1", "labels")


#: The query detector's row of the default matrix (blocks after 100 near duplicates).
DEFAULT_DETECTOR = "detect:block"


#: A reconstruction counts as *recovered* when the evaluation model's top-1 is right AND
#: its likeness reaches this value (see docs/results-schema.md, "recovered").
LIKENESS_THRESHOLD = 0.5


#: People one API attack runs on at once (their probes share each request), see
#: :class:`AuditConfig` and BENCHMARKS.md "Lockstep batching".
DEFAULT_LANES = 8


#: Query blinding of the audit's API attacker under a defence with a query detector
#: (+-0.05 per value: past the detector at the default quantisation, BENCHMARKS.md
#: "Query detector").
DEFAULT_BLIND = 0.05


#: Most API accounts one attack may open (``--accounts``): every one is a real API key.
MAX_ACCOUNTS = 1000
#: Most service processes per defence (``--replicas``).
MAX_REPLICAS = 16
#: People one cluster task attacks at most, where the defence lets the people be split
#: (``--group-size``; see ``audit/cluster.py``): two lockstep batches of the default lanes.
DEFAULT_GROUP_SIZE = 2 * DEFAULT_LANES


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
    ``cluster`` runs the attack matrix on a Dask cluster (:func:`parse_cluster`): one
    task per (defence, target, attack, group of people), against the service the audit
    starts or the ``api`` endpoint; ``group_size`` (with ``cluster``; ``None``:
    :data:`DEFAULT_GROUP_SIZE`) caps the people of one task where the defence keeps no
    per-account state (``audit/cluster.py`` says where and why). ``replicas`` (with
    ``cluster``) starts that many service processes per defence behind one Redis, which
    holds their shared rate limits and detector history, and spreads the tasks over them;
    with ``api`` and ``cluster``, ``api`` may list several comma-separated URLs of the
    same model (service replicas sharing one Redis) that the tasks spread over instead
    (:attr:`api_urls`).
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
    cluster: str | None = None
    replicas: int = 1
    group_size: int | None = None
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
        if self.cluster is not None:
            self._check_cluster()
        if isinstance(self.replicas, bool) or not 1 <= self.replicas <= MAX_REPLICAS:
            raise ConfigError(
                f"--replicas must be between 1 and {MAX_REPLICAS}, got {self.replicas}"
            )
        if self.replicas > 1 and self.cluster is None:
            raise ConfigError(
                "--replicas spreads a cluster's workers over several service processes; "
                "give --cluster local:N or tcp://HOST:PORT, or drop --replicas"
            )
        if self.group_size is not None and (
            self.cluster is None or isinstance(self.group_size, bool) or self.group_size < 1
        ):
            raise ConfigError(
                "--group-size N (N >= 1) is the most people of one cluster task; give it "
                f"with --cluster, or drop it (got {self.group_size})"
            )
        if self.defenses is not None:
            if not self.defenses:
                raise ConfigError("empty defence list; use e.g. none,round:2,labels")
            names = [Defense.parse(d).name for d in self.defenses]
            if len(set(names)) != len(names):
                raise ConfigError(f"defences listed twice: {', '.join(names)}")

    def _check_cluster(self) -> None:
        parse_cluster(str(self.cluster))
        if self.in_process:
            raise ConfigError(
                "--cluster runs the attacks in worker processes, which reach the model "
                "through the service the audit starts: drop --in-process"
            )
        if self.api is not None and self.replicas > 1:
            raise ConfigError(
                "--replicas starts service processes, and an --api audit starts none: give "
                "the deployed replicas' URLs as --api URL1,URL2 instead"
            )

    def _check_api(self) -> None:
        """The deployed-API mode's own rules (``api`` is set); fixes ``targets`` and
        ``accounts``."""

        urls = self.api_urls
        if not urls:
            raise ConfigError("--api is empty; give http://HOST:PORT/v1/models/NAME")
        if self.wire.protocol == "mlinvert":
            names = {split_url(u, "/v1/models/")[1] for u in urls}  # ConfigError if malformed
            if len(names) > 1:
                raise ConfigError(
                    f"the --api URLs name different models ({', '.join(sorted(names))}); "
                    "list replicas of one model"
                )
        if len(urls) > 1 and self.cluster is None:
            raise ConfigError(
                "several --api URLs spread a cluster's tasks over service replicas: give "
                "--cluster local:N or tcp://HOST:PORT, or one URL"
            )
        if len(set(urls)) != len(urls):
            raise ConfigError(f"--api lists a URL twice: {self.api}")
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

    @property
    def api_urls(self) -> tuple[str, ...]:
        """The deployed API's URLs (``api`` split at commas); empty without ``api``."""
        if self.api is None:
            return ()
        return tuple(u.strip() for u in str(self.api).split(",") if u.strip())

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


#: How ``--cluster`` is written.
CLUSTER_GRAMMAR = (
    "local:N (a Dask cluster of N worker processes on this machine) or tcp://HOST:PORT "
    "(the scheduler of a running Dask cluster whose workers can read this output folder)"
)


def parse_cluster(spec: str) -> tuple[str, int | str]:
    """``("local", N)`` or ``("tcp", "tcp://HOST:PORT")`` of a ``--cluster`` spec."""
    text = spec.strip()
    if text.startswith("local:"):
        count = text.removeprefix("local:")
        if count.isdigit() and 1 <= int(count) <= 64:
            return "local", int(count)
    elif text.startswith("tcp://") and text.removeprefix("tcp://").rpartition(":")[2].isdigit():
        return "tcp", text
    raise ConfigError(f"--cluster {spec!r}: write {CLUSTER_GRAMMAR}")


def resolve_defenses(config: AuditConfig, budget: int) -> list[Defense]:
    """The defence matrix: the user's list, or the default with a visible rate limit."""
    if config.defenses is not None:
        return [Defense.parse(d) for d in config.defenses]
    rate = max(budget // 4, 10)
    return [Defense.parse(d) for d in (*DEFAULT_POLICIES, f"rate:{rate}/hour", DEFAULT_DETECTOR)]


#: Output policies of the survey audit when ``defenses`` is not given.
TREE_DEFENSES = ("none", "round:2", "labels")


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
