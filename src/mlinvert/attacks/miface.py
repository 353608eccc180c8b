"""MI-Face: reconstruct a class's face from a model's confidences.

Fredrikson, Jha, Ristenpart, "Model Inversion Attacks that Exploit Confidence
Information and Basic Countermeasures", ACM CCS 2015 (Algorithm 1, MI-Face).

Cost ``c(x) = 1 - p_label(x)`` plus optional prior terms; gradient descent from
``x0``; ``x <- Process(x - lambda grad c(x))``; return the best iterate; stop after
``alpha`` iterations, after ``beta`` iterations without improvement, or when the
*confidence* reaches ``gamma`` (PAPER.md: read as a cost threshold the rule would
stop at step one). Defaults ``alpha = 5000``, ``beta = 100``, ``gamma = 0.99``,
``lambda = 0.1`` (:meth:`MIFaceConfig.paper`).

Beyond the paper (:meth:`MIFaceConfig.improved`): Adam or momentum steps, a log or
margin objective, and low-dimensional or prior-guided search spaces
(:mod:`mlinvert.attacks.spaces`); black-box gradients come from
:mod:`mlinvert.attacks.gradients`. For a DAE target the paper searches the 300-d
code and Process decodes, denoises (non-local means), sharpens and re-encodes: see
:class:`DAECode`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from mlinvert.attacks.base import (
    AttackResult,
    ProgressEvent,
    ProgressFn,
    Status,
    Timer,
    encode_array,
    interruption_status,
)
from mlinvert.attacks.checkpoint import Checkpoint, State, fingerprint
from mlinvert.attacks.gradients import (
    Estimate,
    Exact,
    GradientSource,
    Objective,
    ObjectiveKind,
    score_floor,
)
from mlinvert.attacks.lockstep import run_lockstep
from mlinvert.attacks.spaces import Pixel, Space
from mlinvert.core import Seed, rng_from
from mlinvert.errors import AttackError, ConfigError, OracleError
from mlinvert.oracle.base import Oracle
from mlinvert.oracle.wrappers import Budgeted

log = logging.getLogger(__name__)

Optimizer = Literal["gd", "momentum", "adam"]
Schedule = Literal["constant", "cosine"]
Start = Literal["zero", "grey", "mean", "noise"]


@dataclass(frozen=True, kw_only=True)
class MIFaceConfig:
    """Settings of MI-Face. Field names map to the paper: ``max_iter`` = alpha,
    ``patience`` = beta, ``target_confidence`` = gamma, ``step`` = lambda.

    ``objective`` ``prob`` is the paper's ``1 - p``; ``log``/``margin`` are stronger
    when ``p`` is tiny. ``target_confidence=None`` disables the confidence stop
    (improve until ``patience`` or ``max_iter``). ``tv_weight`` (total variation of
    the image) and ``prior_weight`` (``||z - center||^2 / 2``, the distance to the
    space's prior mean; ``None`` = the space's own default, the Gaussian log-prior
    weight 0.05 for a whitened PCA prior and 0 elsewhere) are optional prior cost
    terms. ``start`` chooses ``x0``: ``zero`` (black, the paper), ``grey``, ``mean``
    (the space's prior centre: the auxiliary mean face for
    :class:`~mlinvert.attacks.spaces.PCAPrior`) or ``noise``. ``checkpoint_every``:
    iterations between checkpoint writes (1 = never repeat a paid-for query).
    ``snapshot_queries``: record the best image when the query count passes each value
    (for curves of quality against queries). ``schedule`` ``cosine`` anneals the step
    from ``step`` to 0 over ``max_iter`` iterations (noisy black-box estimates then
    settle instead of jittering around the optimum).
    """

    max_iter: int = 5000
    patience: int = 100
    target_confidence: float | None = 0.99
    step: float = 0.1
    optimizer: Optimizer = "gd"
    schedule: Schedule = "constant"
    momentum: float = 0.9
    objective: ObjectiveKind = "prob"
    start: Start = "zero"
    tv_weight: float = 0.0
    prior_weight: float | None = 0.0
    min_improvement: float = 0.0
    batch_size: int = 1000
    checkpoint_every: int = 1
    progress_every: int = 1
    snapshot_queries: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if self.max_iter < 1:
            problems.append(f"max_iter (alpha) must be >= 1, got {self.max_iter}")
        if self.patience < 1:
            problems.append(f"patience (beta) must be >= 1, got {self.patience}")
        if self.target_confidence is not None and not 0.0 < self.target_confidence <= 1.0:
            problems.append(
                f"target_confidence (gamma) is a confidence in (0, 1], got {self.target_confidence}"
            )
        if not self.step > 0:
            problems.append(f"step (lambda) must be > 0, got {self.step}")
        if self.optimizer not in ("gd", "momentum", "adam"):
            problems.append(f"optimizer must be gd, momentum or adam, got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine"):
            problems.append(f"schedule must be constant or cosine, got {self.schedule!r}")
        if not 0.0 <= self.momentum < 1.0:
            problems.append(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.objective not in ("prob", "log", "margin"):
            problems.append(f"objective must be prob, log or margin, got {self.objective!r}")
        if self.start not in ("zero", "grey", "mean", "noise"):
            problems.append(f"start must be zero, grey, mean or noise, got {self.start!r}")
        if (
            self.tv_weight < 0
            or (self.prior_weight is not None and self.prior_weight < 0)
            or self.min_improvement < 0
        ):
            problems.append("tv_weight, prior_weight and min_improvement must be >= 0")
        if self.batch_size < 1 or self.checkpoint_every < 1 or self.progress_every < 1:
            problems.append("batch_size, checkpoint_every and progress_every must be >= 1")
        if problems:
            raise ConfigError("invalid MIFaceConfig: " + "; ".join(problems))

    @classmethod
    def paper(cls, **overrides: Any) -> MIFaceConfig:
        """The paper's settings: plain gradient descent on ``1 - p`` from a black image."""
        return cls(**overrides)

    @classmethod
    def improved(cls, **overrides: Any) -> MIFaceConfig:
        """Adam on the margin objective from the prior's mean for at most 200 steps
        (stopping after 50 without improvement), with the space's own prior: inside a
        :class:`~mlinvert.attacks.spaces.PCAPrior` ball that is the face the model is most
        sure of among faces as typical as the auxiliary ones. No confidence stop: the
        ball, not the stop rule, keeps the search from over-fitting the target's template
        (an unconstrained search stopped at saturation lost identity for an independent
        judge when run longer)."""
        base: dict[str, Any] = {
            "max_iter": 200,
            "patience": 50,
            "target_confidence": None,
            "step": 0.05,
            "optimizer": "adam",
            "schedule": "cosine",
            "objective": "margin",
            "start": "mean",
            "prior_weight": None,
            "tv_weight": 0.0,
        }
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        d = asdict(self)
        d["snapshot_queries"] = list(self.snapshot_queries)
        return d


def _floats(state: dict[str, Any]) -> dict[str, float]:
    """The scalar part of an estimator's state (arrays go to the checkpoint's arrays)."""
    return {k: float(v) for k, v in state.items() if not isinstance(v, np.ndarray)}


def total_variation(x: np.ndarray, eps: float = 1e-2) -> tuple[float, np.ndarray]:
    """Smoothed isotropic total variation (mean over pixels) of one image and its gradient."""
    x = np.asarray(x, dtype=np.float64)
    dx = np.zeros_like(x)
    dy = np.zeros_like(x)
    dx[:, :-1] = x[:, 1:] - x[:, :-1]
    dy[:-1, :] = x[1:, :] - x[:-1, :]
    mag = np.sqrt(dx**2 + dy**2 + eps**2)
    n = x.size
    gx = dx / mag
    gy = dy / mag
    grad = -(gx + gy)
    grad[:, 1:] += gx[:, :-1]
    grad[1:, :] += gy[:-1, :]
    return float(mag.sum() / n), grad / n


@dataclass
class _Optim:
    kind: Optimizer
    step: float
    momentum: float
    m: np.ndarray
    v: np.ndarray
    t: int = 0
    horizon: int | None = None  # cosine schedule over this many steps (None: constant)

    def update(self, z: np.ndarray, grad_cost: np.ndarray) -> np.ndarray:
        step = self.step
        if self.horizon is not None:
            step *= 0.5 * (1.0 + np.cos(np.pi * min(self.t, self.horizon) / self.horizon))
        self.t += 1
        if self.kind == "gd":
            return z - step * grad_cost
        if self.kind == "momentum":
            self.m = self.momentum * self.m + grad_cost
            return z - step * self.m
        b1, b2 = 0.9, 0.999
        self.m = b1 * self.m + (1 - b1) * grad_cost
        self.v = b2 * self.v + (1 - b2) * grad_cost**2
        mhat = self.m / (1 - b1**self.t)
        vhat = self.v / (1 - b2**self.t)
        return z - step * mhat / (np.sqrt(vhat) + 1e-8)


@dataclass
class _Run:
    """Mutable state of one label's run (what a checkpoint stores)."""

    z: np.ndarray
    best_z: np.ndarray
    optim: _Optim
    iteration: int = 0
    best_cost: float = np.inf
    best_conf: float = float("nan")
    best_pred: int = -1
    since_best: int = 0
    queries_before: int = 0
    elapsed_before: float = 0.0
    estimator_state: dict[str, Any] = field(default_factory=dict)  # floats and arrays
    snapshots: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Search:
    """One label's search: what every iteration reads, and the run's mutable state."""

    oracle: Oracle  # budgeted when the run has a budget
    space: Space  # bound to the model's input shape
    objective: Objective
    center: np.ndarray
    rng: np.random.Generator
    run: _Run
    key: str  # the checkpoint key
    timer: Timer
    start_queries: int
    pending: list[int]  # snapshot query counts still to come

    def queries(self) -> int:
        """Queries of this label so far, those paid before a resume included."""
        return self.run.queries_before + self.oracle.n_queries - self.start_queries


@dataclass
class _End:
    """How the search ended: an interruption status (None: ran out), the stop rule,
    the refusal's message and the last confidence seen."""

    status: Status | None = None
    stop: str = "max_iter"
    message: str = ""
    conf: float = float("nan")


class MIFace:
    """MI-Face (Fredrikson et al., CCS 2015), white-box or black-box by composition.

    ``MIFace(config, gradient=Exact() | FiniteDifferences() | NES() | SPSA(),
    space=Pixel() | LowRes() | DCT() | PCAPrior(aux))``; the oracle is passed to
    :meth:`run`, so one attack object runs against many targets and defences.
    """

    name = "miface"

    def __init__(
        self,
        config: MIFaceConfig | None = None,
        *,
        gradient: GradientSource | None = None,
        space: Space | None = None,
    ) -> None:
        self.config = config if config is not None else MIFaceConfig.paper()
        self.gradient: GradientSource = gradient if gradient is not None else Exact()
        self.space = space if space is not None else Pixel()

    def describe(self) -> dict[str, Any]:
        """Config, gradient source and space as one JSON-able dict."""
        return {
            **self.config.to_dict(),
            "gradient": self.gradient.to_dict(),
            "space": self.space.to_dict(),
        }

    # -- cost pieces -------------------------------------------------------
    def _prior(self, space: Space, z: np.ndarray, center: np.ndarray) -> tuple[float, np.ndarray]:
        cfg = self.config
        cost, grad = 0.0, np.zeros_like(z)
        weight = space.default_prior_weight if cfg.prior_weight is None else cfg.prior_weight
        if weight > 0:
            diff = z - center
            cost += weight * 0.5 * float(diff @ diff)
            grad += weight * diff
        if cfg.tv_weight > 0:
            tv, g_img = total_variation(space.raw(z[None])[0])
            cost += cfg.tv_weight * tv
            grad += cfg.tv_weight * space.push(g_img[None])[0]
        return cost, grad

    def _start(self, space: Space, rng: np.random.Generator) -> np.ndarray:
        h, w = space.shape or (0, 0)
        start = self.config.start
        if start == "mean":
            z = space.prior_center()
        elif start == "grey":
            z = space.encode(np.full((1, h, w), 0.5))[0]
        elif start == "noise":
            z = space.encode(rng.uniform(0.0, 1.0, size=(1, h, w)))[0]
        else:
            z = space.encode(np.zeros((1, h, w)))[0]
        return space.project(z)

    # -- checkpoint state --------------------------------------------------
    def _save(self, ckpt: Checkpoint, search: _Search) -> None:
        run = search.run
        meta = {
            "iteration": run.iteration,
            "best_cost": run.best_cost,
            "best_conf": run.best_conf,
            "best_pred": run.best_pred,
            "since_best": run.since_best,
            "queries": search.queries(),
            "elapsed": search.timer(),
            "rng": search.rng.bit_generator.state,
            "estimator_state": _floats(run.estimator_state),
            "optim_t": run.optim.t,
            "snapshots": [{k: v for k, v in s.items() if k != "image"} for s in run.snapshots],
        }
        arrays = {"z": run.z, "best_z": run.best_z, "m": run.optim.m, "v": run.optim.v}
        for k, v in run.estimator_state.items():
            if isinstance(v, np.ndarray):
                arrays[f"estimator:{k}"] = v
        for i, s in enumerate(run.snapshots):
            arrays[f"snap{i}"] = s["image"]
        ckpt.save(State(arrays=arrays, meta=meta), search.key)

    def _restore(self, state: State, run: _Run, rng: np.random.Generator) -> None:
        m = state.meta
        run.z = state.arrays["z"]
        run.best_z = state.arrays["best_z"]
        run.optim.m = state.arrays["m"]
        run.optim.v = state.arrays["v"]
        run.optim.t = int(m["optim_t"])
        run.iteration = int(m["iteration"])
        run.best_cost = float(m["best_cost"])
        run.best_conf = float(m["best_conf"])
        run.best_pred = int(m["best_pred"])
        run.since_best = int(m["since_best"])
        run.queries_before = int(m["queries"])
        run.elapsed_before = float(m["elapsed"])
        run.estimator_state = {k: float(v) for k, v in m["estimator_state"].items()}
        run.estimator_state.update(
            {k.partition(":")[2]: v for k, v in state.arrays.items() if k.startswith("estimator:")}
        )
        run.snapshots = [
            {**s, "image": state.arrays[f"snap{i}"]} for i, s in enumerate(m["snapshots"])
        ]
        rng.bit_generator.state = m["rng"]

    # -- the attack ---------------------------------------------------------
    def run(
        self,
        oracle: Oracle,
        label: int | str,
        *,
        seed: Seed = None,
        budget: int | None = None,
        progress: ProgressFn | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> AttackResult:
        """Reconstruct class ``label`` (index or name) through ``oracle``.

        ``budget`` caps the queries of this label (including those paid before a
        resume); ``checkpoint`` saves the state every ``checkpoint_every`` iterations
        and resumes from it if present.
        """
        info = oracle.info
        label_idx = resolve_label(label, info.class_names)
        if info.carries == "label":
            raise AttackError(
                f"model {info.model!r} answers labels only (policy {info.policy!r}); MI-Face "
                "needs confidence scores: use the label-only attack (--mode label-only)"
            )
        search = self._begin(oracle, label_idx, seed, budget, checkpoint)
        end = self._iterate(search, progress, checkpoint)
        if checkpoint is not None:
            self._save(checkpoint, search)
        return self._result(search, end, seed)

    def _fresh_run(self, space: Space, rng: np.random.Generator) -> _Run:
        """The state of a search that has not started: at ``x0``, optimiser at rest."""
        cfg = self.config
        z0 = self._start(space, rng)
        return _Run(
            z=z0,
            best_z=z0.copy(),
            optim=_Optim(
                cfg.optimizer,
                cfg.step,
                cfg.momentum,
                np.zeros_like(z0),
                np.zeros_like(z0),
                horizon=cfg.max_iter if cfg.schedule == "cosine" else None,
            ),
        )

    def _begin(
        self,
        oracle: Oracle,
        label_idx: int,
        seed: Seed,
        budget: int | None,
        checkpoint: Checkpoint | None,
    ) -> _Search:
        """Bind the space, start (or resume from ``checkpoint``), cap the oracle by ``budget``."""
        cfg = self.config
        info = oracle.info
        space = self.space.bind(info.input_shape)
        rng = rng_from(seed)
        objective = Objective(kind=cfg.objective, label=label_idx, floor=score_floor(info))
        center = space.prior_center()
        run = self._fresh_run(space, rng)
        key = fingerprint(
            {
                "attack": self.describe(),
                "label": label_idx,
                "model": info.model,
                "seed": seed if isinstance(seed, int) else None,
            }
        )
        if checkpoint is not None:
            state = checkpoint.load(key)
            if state is not None:
                self._restore(state, run, rng)
                log.info(
                    "resumed label %d from %s at iteration %d (%d queries paid)",
                    label_idx,
                    checkpoint.path,
                    run.iteration,
                    run.queries_before,
                )
        if budget is not None:
            oracle = Budgeted(oracle, budget, already_spent=run.queries_before)
        pending = sorted(
            q
            for q in cfg.snapshot_queries
            if q > run.queries_before and all(s["queries"] != q for s in run.snapshots)
        )
        return _Search(
            oracle=oracle,
            space=space,
            objective=objective,
            center=center,
            rng=rng,
            run=run,
            key=key,
            timer=Timer(run.elapsed_before),
            start_queries=oracle.n_queries,
            pending=pending,
        )

    def _iterate(
        self, search: _Search, progress: ProgressFn | None, checkpoint: Checkpoint | None
    ) -> _End:
        """Descend until a stop rule fires or the API refuses; checkpoint on the way."""
        cfg = self.config
        run = search.run
        end = _End()
        while run.iteration < cfg.max_iter:
            rng_state = search.rng.bit_generator.state
            try:
                est: Estimate = self.gradient.estimate(
                    search.oracle,
                    search.space,
                    run.z,
                    search.objective,
                    search.rng,
                    run.estimator_state,
                    cfg.batch_size,
                )
            except OracleError as exc:
                end.status = interruption_status(exc)
                if end.status is None:
                    raise
                end.message = str(exc)
                end.stop = end.status
                search.rng.bit_generator.state = rng_state  # refused probes are redrawn on resume
                break
            end.conf = float(est.probs[search.objective.label])
            prior_grad = self._observe(search, est, end.conf)
            if progress is not None and run.iteration % cfg.progress_every == 0:
                progress(
                    ProgressEvent(
                        label=search.objective.label,
                        iteration=run.iteration,
                        n_queries=search.queries(),
                        confidence=end.conf,
                        best_confidence=run.best_conf,
                        elapsed_s=search.timer(),
                    )
                )
            if cfg.target_confidence is not None and end.conf >= cfg.target_confidence:
                end.stop = "confidence"
                break
            if run.since_best >= cfg.patience:
                end.stop = "patience"
                break
            run.z = search.space.project(run.optim.update(run.z, -est.grad + prior_grad))
            run.iteration += 1
            if checkpoint is not None and run.iteration % cfg.checkpoint_every == 0:
                self._save(checkpoint, search)
        return end

    def _observe(self, search: _Search, est: Estimate, conf: float) -> np.ndarray:
        """Score the current point (keeping it if best) and take the snapshots now due;
        returns the prior terms' gradient for the step."""
        run = search.run
        prior_cost, prior_grad = self._prior(search.space, run.z, search.center)
        cost = -est.value + prior_cost
        if cost < run.best_cost - self.config.min_improvement:
            run.best_cost, run.best_z = cost, run.z.copy()
            run.best_conf, run.best_pred = conf, est.predicted
            run.since_best = 0
        else:
            run.since_best += 1
        while search.pending and search.queries() >= search.pending[0]:
            run.snapshots.append(
                {
                    "queries": search.pending.pop(0),
                    "confidence": run.best_conf,
                    "image": search.space.decode(run.best_z[None])[0],
                }
            )
        return prior_grad

    def _result(self, search: _Search, end: _End, seed: Seed) -> AttackResult:
        """The label's AttackResult (the best iterate, its per-label record, snapshots)."""
        run = search.run
        label_idx = search.objective.label
        class_names = search.oracle.info.class_names
        status: Status = end.status or ("succeeded" if run.best_pred == label_idx else "failed")
        per = {
            "label": label_idx,
            "name": class_names[label_idx],
            "status": status,
            "stop": end.stop,
            "iterations": run.iteration,
            "n_queries": search.queries(),
            "elapsed_s": search.timer(),
            "confidence": run.best_conf,
            "last_confidence": end.conf,
            "predicted": run.best_pred,
            "best_cost": run.best_cost,
            "queries_per_iteration": self.gradient.queries_per_step(search.space.dim),
            "score_floor": search.objective.floor,
            "message": end.message,
            **_floats(run.estimator_state),
        }
        log.info(
            "label %s: %s after %d iterations, %d queries, confidence %.3f",
            class_names[label_idx],
            end.stop,
            run.iteration,
            search.queries(),
            run.best_conf,
        )
        extra: dict[str, Any] = {}
        if run.snapshots:
            extra["snapshots"] = [
                {
                    "label": label_idx,
                    "queries": s["queries"],
                    "confidence": s["confidence"],
                    "image": encode_array(s["image"]),
                }
                for s in run.snapshots
            ]
        return AttackResult(
            attack=self.name,
            reconstructions=search.space.decode(run.best_z[None]),
            labels=np.asarray([label_idx]),
            class_names=tuple(class_names),
            confidence=np.asarray([run.best_conf if np.isfinite(run.best_conf) else np.nan]),
            per_label=[per],
            n_queries=search.queries(),
            elapsed_s=search.timer(),
            seed=seed if isinstance(seed, int) else None,
            config=self.describe(),
            status=status,
            extra=extra,
        )

    def run_all(
        self,
        oracle: Oracle,
        labels: list[int] | None = None,
        *,
        seed: Seed = None,
        budget: int | None = None,
        progress: ProgressFn | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> AttackResult:
        """Attack every label (or ``labels``), ``budget`` per label; one merged result.

        Stops early (keeping what it has) when the API rate-limits or blocks.
        """
        todo = list(range(oracle.info.n_classes)) if labels is None else labels
        results = run_lockstep(
            lambda lab: self,
            oracle,
            todo,
            lanes=1,
            seed=seed,
            budget=budget,
            progress=progress,
            checkpoint=checkpoint,
            stop_on=("rate_limited", "blocked"),
        )
        return AttackResult.merge(results)


def resolve_label(label: int | str, class_names: tuple[str, ...]) -> int:
    """A class index from an index or a class name (ConfigError naming the choices)."""
    if isinstance(label, str) and not label.lstrip("-").isdigit():
        if label in class_names:
            return class_names.index(label)
        shown = ", ".join(class_names[:8]) + (" ..." if len(class_names) > 8 else "")
        raise ConfigError(f"unknown label {label!r}; the model's classes are: {shown}")
    idx = int(label)
    if not 0 <= idx < len(class_names):
        if isinstance(label, str) and label in class_names:
            return class_names.index(label)
        raise ConfigError(
            f"label index {idx} out of range: the model has {len(class_names)} "
            "classes (0 .. n-1), or pass a class name"
        )
    return idx


__all__ = ["MIFace", "MIFaceConfig", "resolve_label", "total_variation"]
