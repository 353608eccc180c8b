"""Gradient sources for MI-Face: exact (white-box) or estimated from answers (black-box).

Each source estimates, in the search space's coordinates ``z``, the gradient of an
:class:`Objective` ``f(probs(decode(z)))`` that the attack *maximises*; the attack's
cost is ``-f`` plus prior terms. One call sends the base point and every probe in
as few oracle batches as the oracle allows, and returns the answers at the base
point too (so tracking the best iterate costs nothing extra).

- :class:`Exact`: ``class_gradient`` of a white-box oracle (Fredrikson et al. 2015).
- :class:`FiniteDifferences`: the paper's black-box estimator, one probe per
  coordinate: ``d + 1`` queries (forward) or ``2d + 1`` (central, base included).
- :class:`NES`: antithetic Gaussian sampling (Ilyas et al., ICML 2018).
- :class:`SPSA`: antithetic Rademacher sampling (Spall 1992; Uesato et al. 2018).
- :class:`Broyden`: finite differences of *every* class score once (``d + 1``
  queries), then one query per step and Broyden's secant update of that Jacobian
  (Broyden 1965); against a softmax over linear logits this is equation-solving model
  extraction (Tramer et al., USENIX Security 2016) inside the search space, followed by
  a white-box-quality search.

Rounded confidences: when the API rounds scores to a granularity ``r``, a probe that
changes the score by less than ``r`` comes back unchanged and the estimate is zero.
The black-box sources therefore adapt their perturbation size: when more than half
of the probe differences are exactly zero they double it (up to ``max_scale`` times the
configured size), and they shrink it back towards the configured size when nearly all
differences are non-zero. The current size is kept in the attack state (checkpointed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import numpy as np

from mlinvert.attacks.base import query_batched
from mlinvert.attacks.spaces import Space
from mlinvert.core import OracleInfo, Response
from mlinvert.errors import ConfigError, GradientUnavailable, OracleError
from mlinvert.oracle.base import Oracle
from mlinvert.oracle.wrappers import has_gradient

ObjectiveKind = Literal["prob", "log", "margin"]
EPS = 1e-12


@dataclass(frozen=True)
class Objective:
    """What the attack maximises for ``label``.

    ``prob``: ``p_label`` (the paper's cost is ``1 - p_label``); ``log``: ``log p_label``;
    ``margin``: ``log p_label - log max_{j != label} p_j`` (informative even when
    ``p_label`` is tiny; needs every class score).

    ``floor``: inside the logs a score counts as at least this much. Against rounded
    scores use :func:`score_floor`: a score that reads 0 lies anywhere below half a
    rounding step, and reading it as 1e-12 makes the margin jump by ~23 each time a
    rival flips between 0 and one step — jumps that then steer a sampling estimator
    instead of the face (BENCHMARKS.md, "Rounded confidences").
    """

    kind: ObjectiveKind
    label: int
    floor: float = EPS

    def value(self, probs: np.ndarray) -> np.ndarray:
        """Objective per row of ``probs`` ``(n, k)``."""
        p = np.asarray(probs, dtype=np.float64)
        pl = p[:, self.label]
        if self.kind == "prob":
            return pl
        if self.kind == "log":
            return np.log(np.maximum(pl, self.floor))
        others = np.delete(p, self.label, axis=1).max(axis=1)
        return np.log(np.maximum(pl, self.floor)) - np.log(np.maximum(others, self.floor))

    def rival(self, probs: np.ndarray) -> int:
        """The most likely class other than ``label`` for one answer ``probs`` ``(k,)``."""
        p = np.asarray(probs)
        return int(np.argmax(np.where(np.arange(p.size) == self.label, -np.inf, p)))

    def score_weights(self, probs: np.ndarray) -> np.ndarray:
        """``d f / d s_j`` at ``probs`` ``(k,)``, where ``s`` are the centred log-scores
        (:func:`centred_log_scores`; ``log p_j = s_j - log sum exp s``)."""
        p = np.asarray(probs, dtype=np.float64)
        own = np.zeros_like(p)
        own[self.label] = 1.0
        if self.kind == "margin":
            own[self.rival(p)] = -1.0
            return own
        dlog = own - p
        return dlog if self.kind == "log" else p[self.label] * dlog


def score_floor(info: OracleInfo) -> float:
    """The :class:`Objective` floor for an API described by ``info``: half the step its
    scores are rounded to (``round:2`` -> 0.005), or ``EPS`` for unrounded scores."""
    return max(EPS, info.score_step / 2.0)


def centred_log_scores(probs: np.ndarray) -> np.ndarray:
    """``log p`` minus its mean over classes, per row: the logits up to the softmax's
    free constant (exactly linear in the input for a softmax over linear logits)."""
    logp = np.log(np.maximum(np.asarray(probs, dtype=np.float64), EPS))
    return np.asarray(logp - logp.mean(axis=-1, keepdims=True))


@dataclass
class Estimate:
    """One gradient estimate: ``grad`` ``(dim,)`` of the objective, and the base answers."""

    grad: np.ndarray
    value: float
    probs: np.ndarray
    predicted: int
    n_queries: int


def _probs(response: Response, n_classes: int) -> np.ndarray:
    if response.probs is None:
        raise OracleError(
            "the oracle returns labels only; MI-Face needs confidence scores. Use the "
            "label-only attack (LabelOnly / --mode label-only) against this API"
        )
    p = np.asarray(response.probs, dtype=np.float64)
    if p.shape[1] != n_classes:
        raise OracleError(f"expected {n_classes} class scores per answer, got {p.shape[1]}")
    return p


class GradientSource(Protocol):
    """Estimates the objective's gradient in the search space (see module doc)."""

    @property
    def name(self) -> str:
        """Short name (``exact``, ``fd``, ``nes``, ``spsa``)."""
        ...

    def estimate(
        self,
        oracle: Oracle,
        space: Space,
        z: np.ndarray,
        objective: Objective,
        rng: np.random.Generator,
        state: dict[str, Any],
        batch_size: int,
    ) -> Estimate:
        """Gradient at ``z`` and the answers at ``z``; may update ``state``."""
        ...

    def queries_per_step(self, dim: int) -> int:
        """Queries one estimate costs in a space of ``dim`` coordinates."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """JSON form for result configs."""
        ...


@dataclass(frozen=True, kw_only=True)
class Exact:
    """The true gradient from a white-box oracle's ``class_gradient`` (2 queries/step:
    the answer at ``z`` and the gradient; 3 for the margin objective)."""

    name: str = "exact"

    def queries_per_step(self, dim: int) -> int:
        """One answer plus one gradient evaluation."""
        return 2

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"name": self.name}

    def estimate(
        self,
        oracle: Oracle,
        space: Space,
        z: np.ndarray,
        objective: Objective,
        rng: np.random.Generator,
        state: dict[str, Any],
        batch_size: int,
    ) -> Estimate:
        """Exact gradient by the chain rule through the space's linear map."""
        if not has_gradient(oracle):
            raise GradientUnavailable(
                f"gradient=Exact() needs a white-box oracle with class_gradient, got "
                f"{type(oracle).__name__}: load the model locally (--model DIR with --mode "
                "whitebox, i.e. WhiteBoxOracle) or use a black-box source: "
                "FiniteDifferences(), NES() or SPSA() (--mode blackbox --gradient nes)"
            )
        before = oracle.n_queries
        x = space.decode(z[None])
        response = oracle.query(x)
        p = _probs(response, oracle.info.n_classes)[0]
        label = objective.label
        code_estimate = getattr(space, "code_estimate", None)
        if code_estimate is not None:  # DAE: the paper's gradient of the code-level softmax
            pc, g = code_estimate(z, label)
            if objective.kind != "prob":
                g = g / max(pc[label], EPS)
            return Estimate(
                grad=g,
                value=float(objective.value(pc[None])[0]),
                probs=p,
                predicted=int(response.labels[0]),
                n_queries=oracle.n_queries - before,
            )
        grad_fn = oracle.class_gradient  # type: ignore[attr-defined]
        if objective.kind == "margin":
            rival = objective.rival(p)
            g = np.asarray(
                grad_fn(np.concatenate([x, x]), np.asarray([label, rival])), dtype=np.float64
            )
            gx = g[0] / max(p[label], EPS) - g[1] / max(p[rival], EPS)
        else:
            gx = np.asarray(grad_fn(x, np.asarray([label])), dtype=np.float64)[0]
            if objective.kind == "log":
                gx = gx / max(p[label], EPS)
        grad = space.pullback(z[None], gx[None])[0]
        return Estimate(
            grad=grad,
            value=float(objective.value(p[None])[0]),
            probs=p,
            predicted=int(response.labels[0]),
            n_queries=oracle.n_queries - before,
        )


def _adapt(
    state: dict[str, Any], key: str, base: float, zero_share: float, max_scale: float
) -> None:
    cur = state.get(key, base)
    if zero_share > 0.5:
        cur = min(cur * 2.0, base * max_scale)
    elif zero_share < 0.05:
        cur = max(cur * 0.8, base)
    state[key] = cur


def _probe(
    oracle: Oracle,
    space: Space,
    z: np.ndarray,
    points: np.ndarray,
    objective: Objective,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Query the base point ``z`` then ``points``; objective values, base probs, label."""
    before = oracle.n_queries
    x = space.decode(np.concatenate([z[None], points]))
    response = query_batched(oracle, x, batch_size)
    p = _probs(response, oracle.info.n_classes)
    return objective.value(p), p[0], int(response.labels[0]), oracle.n_queries - before


@dataclass(frozen=True, kw_only=True)
class FiniteDifferences:
    """The paper's black-box estimator: one probe per coordinate of ``z``.

    ``step`` is the probe size in units of one search coordinate (pixel intensity in
    :class:`~mlinvert.attacks.spaces.Pixel`); ``central`` uses ``z +- step e_i``.
    Costs ``d + 1`` queries per iteration (forward) or ``2d + 1`` (central).
    """

    step: float = 0.01
    central: bool = False
    max_scale: float = 64.0
    name: str = "fd"

    def __post_init__(self) -> None:
        if not self.step > 0 or not self.max_scale >= 1:
            raise ConfigError(
                f"FiniteDifferences needs step > 0 and max_scale >= 1, got "
                f"{self.step}, {self.max_scale}"
            )

    def queries_per_step(self, dim: int) -> int:
        """``d + 1`` or ``2d + 1``."""
        return 2 * dim + 1 if self.central else dim + 1

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)

    def estimate(
        self,
        oracle: Oracle,
        space: Space,
        z: np.ndarray,
        objective: Objective,
        rng: np.random.Generator,
        state: dict[str, Any],
        batch_size: int,
    ) -> Estimate:
        """Coordinate-wise differences, every probe in batched queries."""
        d = z.size
        h = state.get("fd_step", self.step)
        eye = np.eye(d) * h
        points = np.concatenate([z + eye, z - eye]) if self.central else z + eye
        values, p0, pred, n = _probe(oracle, space, z, points, objective, batch_size)
        f0, fv = values[0], values[1:]
        if self.central:
            diff = fv[:d] - fv[d:]
            grad = diff / (2 * h)
        else:
            diff = fv - f0
            grad = diff / h
        _adapt(state, "fd_step", self.step, float(np.mean(diff == 0.0)), self.max_scale)
        return Estimate(grad=grad, value=float(f0), probs=p0, predicted=pred, n_queries=n)


@dataclass(frozen=True, kw_only=True)
class NES:
    """Antithetic Gaussian estimator: ``samples`` pairs ``z +- sigma u`` (``2n + 1`` queries).

    ``sigma`` is given as an RMS pixel change and converted to the space's units.
    """

    samples: int = 50
    sigma: float = 0.01
    max_scale: float = 64.0
    name: str = "nes"

    def __post_init__(self) -> None:
        if self.samples < 1 or not self.sigma > 0 or not self.max_scale >= 1:
            raise ConfigError(
                f"NES needs samples >= 1, sigma > 0 and max_scale >= 1, got "
                f"{self.samples}, {self.sigma}, {self.max_scale}"
            )

    def queries_per_step(self, dim: int) -> int:
        """``2 * samples + 1``."""
        return 2 * self.samples + 1

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)

    def _directions(self, rng: np.random.Generator, d: int) -> np.ndarray:
        return rng.standard_normal((self.samples, d))

    def estimate(
        self,
        oracle: Oracle,
        space: Space,
        z: np.ndarray,
        objective: Objective,
        rng: np.random.Generator,
        state: dict[str, Any],
        batch_size: int,
    ) -> Estimate:
        """Antithetic estimate ``sum (f(z + s u) - f(z - s u)) u / (2 s n)``."""
        base = self.sigma / space.pixel_scale
        s = state.get(f"{self.name}_sigma", base)
        u = self._directions(rng, z.size)
        values, p0, pred, n = _probe(
            oracle, space, z, np.concatenate([z + s * u, z - s * u]), objective, batch_size
        )
        diff = values[1 : 1 + self.samples] - values[1 + self.samples :]
        grad = (diff[:, None] * u).sum(axis=0) / (2.0 * s * self.samples)
        _adapt(state, f"{self.name}_sigma", base, float(np.mean(diff == 0.0)), self.max_scale)
        return Estimate(grad=grad, value=float(values[0]), probs=p0, predicted=pred, n_queries=n)


@dataclass(frozen=True, kw_only=True)
class SPSA(NES):
    """Antithetic Rademacher (+-1) estimator, ``c`` = perturbation size (RMS pixel change)."""

    samples: int = 50
    sigma: float = 0.01
    name: str = "spsa"

    def _directions(self, rng: np.random.Generator, d: int) -> np.ndarray:
        return rng.choice(np.asarray([-1.0, 1.0]), size=(self.samples, d))


@dataclass(frozen=True, kw_only=True)
class Broyden:
    """The Jacobian of every class score, estimated once and then kept up to date.

    The first step probes each coordinate of ``z`` (forward differences of ``step``
    RMS pixel change: ``d + 1`` queries) and keeps the Jacobian ``J`` of the centred
    log-scores (:func:`centred_log_scores`) with respect to ``z``. Every later step
    queries only the new point and corrects ``J`` with Broyden's rank-one secant update
    from the change it observed (Broyden 1965). The objective's gradient is ``J^T``
    times its derivative with respect to the scores, so one estimate serves any
    objective and any class.

    For a softmax over linear logits the centred log-scores *are* the logits up to a
    constant: ``J`` is exact after the first step (pixel clipping aside), i.e. the
    attack extracts the model inside its search space (equation solving, Tramer et al.,
    USENIX Security 2016) and then searches with white-box-quality gradients at one
    query per step. When the observed change of a step disagrees with ``J``'s
    prediction by more than ``tol`` (relative norm), the next step estimates ``J``
    afresh (``d + 1`` queries) — so a non-linear target pays for more re-estimates;
    ``refresh = N`` also re-estimates every ``N`` steps. Probes that rounding leaves
    unchanged double the step (up to ``max_scale``), as for the other estimators.
    ``queries_per_step`` is the cost of an ordinary step (1); the per-label record
    counts the re-estimates (``jacobian_estimates``).
    """

    step: float = 0.02
    tol: float = 2.0
    refresh: int = 0
    max_scale: float = 64.0
    name: str = "broyden"

    def __post_init__(self) -> None:
        if not self.step > 0 or not self.tol > 0 or self.refresh < 0 or not self.max_scale >= 1:
            raise ConfigError(
                f"Broyden needs step > 0, tol > 0, refresh >= 0 and max_scale >= 1, got "
                f"{self.step}, {self.tol}, {self.refresh}, {self.max_scale}"
            )

    def queries_per_step(self, dim: int) -> int:
        """1 (plus ``dim + 1`` whenever the Jacobian is estimated afresh)."""
        return 1

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)

    def estimate(
        self,
        oracle: Oracle,
        space: Space,
        z: np.ndarray,
        objective: Objective,
        rng: np.random.Generator,
        state: dict[str, Any],
        batch_size: int,
    ) -> Estimate:
        """Re-estimate ``J`` by differences when due, else one query and a secant update."""
        jac = state.get("jacobian")
        since = int(state.get("steps_since_jacobian", 0))
        fresh = (
            jac is None
            or state.get("jacobian_stale", 0.0) > 0
            or (self.refresh > 0 and since >= self.refresh)
        )
        before = oracle.n_queries
        if fresh:
            base = self.step / space.pixel_scale
            h = state.get("broyden_step", base)
            points = np.concatenate([z[None], z + np.eye(z.size) * h])
            response = query_batched(oracle, space.decode(points), batch_size)
            probs = _probs(response, oracle.info.n_classes)
            scores = centred_log_scores(probs)
            diff = scores[1:] - scores[0]  # (d, k)
            jac = diff.T / h
            unchanged = float(np.mean(np.all(diff == 0.0, axis=1)))
            _adapt(state, "broyden_step", base, unchanged, self.max_scale)
            state["jacobian_estimates"] = state.get("jacobian_estimates", 0.0) + 1.0
            state["jacobian_stale"] = 0.0
            since = 0
        else:
            response = oracle.query(space.decode(z[None]))
            probs = _probs(response, oracle.info.n_classes)
            scores = centred_log_scores(probs)
            dz = z - state["last_z"]
            observed = scores[0] - state["last_scores"]
            predicted = jac @ dz
            miss = float(np.linalg.norm(observed - predicted))
            scale = max(float(np.linalg.norm(observed)), EPS)
            state["jacobian_stale"] = float(miss > self.tol * scale)
            if dz @ dz > 0:
                jac = jac + np.outer(observed - predicted, dz) / (dz @ dz)
            since += 1
        p0 = probs[0]
        assert jac is not None
        state["jacobian"] = jac
        state["last_z"] = z.copy()
        state["last_scores"] = scores[0]
        state["steps_since_jacobian"] = float(since)
        return Estimate(
            grad=jac.T @ objective.score_weights(p0),
            value=float(objective.value(p0[None])[0]),
            probs=p0,
            predicted=int(response.labels[0]),
            n_queries=oracle.n_queries - before,
        )


def auto_gradient(policy: str, *, nes: NES, broyden: Broyden | None = None) -> NES | Broyden:
    """The attacker's black-box source for an API answering under output ``policy``:
    ``broyden`` (default ``Broyden()``) for full-precision scores, ``nes`` otherwise —
    rounded or top-k scores leave Broyden's small differences at zero (BENCHMARKS.md,
    "Rounded confidences")."""
    return (broyden or Broyden()) if policy == "full" else nes


def parse_gradient(
    spec: str, *, samples: int = 50, sigma: float = 0.01, policy: str = "full"
) -> GradientSource:
    """A gradient source from a CLI name: ``exact``, ``fd``, ``fd-central``, ``nes``,
    ``spsa``, ``broyden``, or ``auto``: Broyden when the API's output ``policy`` is
    ``full`` (full-precision scores), NES otherwise (rounded or top-k scores leave
    Broyden's small differences at zero)."""
    name = spec.strip().lower()
    if name == "auto":
        return auto_gradient(
            policy, nes=NES(samples=samples, sigma=sigma), broyden=Broyden(step=sigma)
        )
    if name == "exact":
        return Exact()
    if name == "fd":
        return FiniteDifferences(step=sigma)
    if name == "fd-central":
        return FiniteDifferences(step=sigma, central=True)
    if name == "nes":
        return NES(samples=samples, sigma=sigma)
    if name == "spsa":
        return SPSA(samples=samples, sigma=sigma)
    if name == "broyden":
        return Broyden(step=sigma)
    raise ConfigError(
        f"unknown gradient source {spec!r}; use auto, exact, fd, fd-central, nes, spsa or broyden"
    )
