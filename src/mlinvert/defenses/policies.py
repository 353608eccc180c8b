"""Output policies: pure, vectorised ``probs -> probs`` defences, composable with ``+``.

Each policy takes a ``(n, k)`` float64 batch of class probabilities and returns what
the API may reveal: a transformed ``(n, k)`` array, or ``None`` for labels only. The
predicted *label* is always computed from the raw scores by the Predictor, so a policy
changes what the scores say, never which class is answered.

Spec grammar (:func:`parse_policy`)::

    full | round:D | round-to:R | top:K | labels | noise:SIGMA[:SEED]
         | reverse-sigmoid:BETA:GAMMA         chained with "+", e.g. top:3+round:2
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlinvert.core import Carries
from mlinvert.defenses.base import OutputPolicy
from mlinvert.errors import ConfigError

POLICY_GRAMMAR = (
    "full | round:D (D decimals, 0..15) | round-to:R (granularity, 0 < R <= 1) | "
    "top:K (K >= 1) | labels | noise:SIGMA[:SEED] (SIGMA > 0) | "
    "reverse-sigmoid:BETA:GAMMA (BETA > 0, GAMMA > 0); chain with '+', e.g. top:3+round:2"
)


class FullScores:
    """Return every class score unchanged (no output defence)."""

    name = "full"
    carries: Carries = "probs"

    def __call__(self, probs: np.ndarray) -> np.ndarray | None:
        return probs


@dataclass(frozen=True, kw_only=True)
class Round:
    """Round every score to ``decimals`` decimal places.

    The countermeasure evaluated by Fredrikson, Jha, Ristenpart, "Model Inversion
    Attacks that Exploit Confidence Information and Basic Countermeasures", CCS 2015
    (Section 6: rounding confidences degrades MI-Face reconstructions).
    """

    decimals: int

    def __post_init__(self) -> None:
        if not 0 <= self.decimals <= 15:
            raise ConfigError(f"round:D needs 0 <= D <= 15 decimals, got {self.decimals}")

    @property
    def name(self) -> str:
        """The policy spec."""
        return f"round:{self.decimals}"

    @property
    def carries(self) -> Carries:
        """Rounded scores are still per-class probabilities."""
        return "probs"

    def __call__(self, probs: np.ndarray) -> np.ndarray | None:
        return np.round(probs, self.decimals)


@dataclass(frozen=True, kw_only=True)
class RoundTo:
    """Round every score to the nearest multiple of ``granularity`` (e.g. 0.05).

    Fredrikson et al., CCS 2015, Section 6, round confidences to a granularity r in
    {0.001, 0.005, 0.01, 0.05}; r = 0.05 stops their attack on faces.
    """

    granularity: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.granularity) and 0.0 < self.granularity <= 1.0):
            raise ConfigError(f"round-to:R needs 0 < R <= 1, got {self.granularity}")

    @property
    def name(self) -> str:
        """The policy spec."""
        return f"round-to:{self.granularity:g}"

    @property
    def carries(self) -> Carries:
        """Rounded scores are still per-class probabilities."""
        return "probs"

    def __call__(self, probs: np.ndarray) -> np.ndarray | None:
        steps = 1.0 / self.granularity
        if abs(steps - round(steps)) < 1e-9:  # r = 1/m: k/m is the double nearest k*r
            return np.round(probs * round(steps)) / round(steps)
        return np.round(probs / self.granularity) * self.granularity


@dataclass(frozen=True, kw_only=True)
class TopK:
    """Reveal only the ``k`` highest scores per row; the others read 0.

    Suggested by Tramèr et al., "Stealing Machine Learning Models via Prediction
    APIs", USENIX Security 2016 (Section 8) and by Shokri et al., "Membership
    Inference Attacks against Machine Learning Models", IEEE S&P 2017 (Section VI).
    Ties at the k-th score keep the lower class index.
    """

    k: int

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"top:K needs K >= 1, got {self.k}")

    @property
    def name(self) -> str:
        """The policy spec."""
        return f"top:{self.k}"

    @property
    def carries(self) -> Carries:
        """Only some classes carry a score."""
        return "top-k"

    def __call__(self, probs: np.ndarray) -> np.ndarray | None:
        k = min(self.k, probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        out = np.zeros_like(probs)
        rows = np.arange(probs.shape[0])[:, None]
        out[rows, order] = probs[rows, order]
        return out


class LabelsOnly:
    """Withhold every score; answer the label alone.

    The strongest output restriction of Tramèr et al., USENIX Security 2016 and
    Shokri et al., IEEE S&P 2017 (label-only APIs).
    """

    name = "labels"
    carries: Carries = "label"

    def __call__(self, probs: np.ndarray) -> np.ndarray | None:
        return None


@dataclass(frozen=True, kw_only=True)
class GaussianNoise:
    """Add N(0, sigma^2) noise to every score, clip at 0 and renormalise rows to 1.

    Output perturbation as a baseline defence (Fredrikson et al., CCS 2015, Section 7
    discuss perturbing confidences; Jia et al., "MemGuard", CCS 2019, use crafted noise).
    The noise is keyed on ``seed`` and the row's own scores, so the same input always
    gets the same answer: repeating a query cannot average the noise away, and the
    policy stays a pure function.
    """

    sigma: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.sigma) and self.sigma > 0):
            raise ConfigError(f"noise:SIGMA needs SIGMA > 0, got {self.sigma}")
        if self.seed < 0:
            raise ConfigError(f"noise seed must be >= 0, got {self.seed}")

    @property
    def name(self) -> str:
        """The policy spec."""
        return f"noise:{self.sigma:g}:{self.seed}"

    @property
    def carries(self) -> Carries:
        """Noisy per-class probabilities."""
        return "probs"

    def __call__(self, probs: np.ndarray) -> np.ndarray | None:
        probs = np.ascontiguousarray(probs, dtype=np.float64)
        noise = np.empty_like(probs)
        for i, row in enumerate(probs):
            key = hashlib.blake2b(row.tobytes(), digest_size=8).digest()
            rng = np.random.default_rng([self.seed, int.from_bytes(key, "little")])
            noise[i] = rng.normal(0.0, self.sigma, size=row.shape)
        noisy = np.clip(probs + noise, 0.0, None)
        total = noisy.sum(axis=1, keepdims=True)
        uniform = np.full_like(noisy, 1.0 / max(noisy.shape[1], 1))
        return np.where(total > 0, noisy / np.where(total > 0, total, 1.0), uniform)


@dataclass(frozen=True, kw_only=True)
class ReverseSigmoid:
    """Deceptive perturbation ``y - beta * (s(gamma * logit(y)) - 1/2)``, renormalised.

    Lee, Edwards, Molloy, Srivastava, "Defending Against NN Model Stealing Attacks
    Using Deceptive Perturbations", IEEE S&P Workshops 2019. The perturbation makes
    gradients of the answered scores misleading while the scores still sum to 1. If
    it would change a row's top class, the original top class's score is swapped
    back to the top (ties broken in its favour) so the answered argmax equals the label.
    """

    beta: float
    gamma: float

    def __post_init__(self) -> None:
        for label, value in (("BETA", self.beta), ("GAMMA", self.gamma)):
            if not (np.isfinite(value) and value > 0):
                raise ConfigError(f"reverse-sigmoid needs {label} > 0, got {value}")

    @property
    def name(self) -> str:
        """The policy spec."""
        return f"reverse-sigmoid:{self.beta:g}:{self.gamma:g}"

    @property
    def carries(self) -> Carries:
        """Perturbed per-class probabilities."""
        return "probs"

    def __call__(self, probs: np.ndarray) -> np.ndarray | None:
        eps = 1e-12
        y = np.clip(probs, eps, 1.0 - eps)
        logit = np.log(y) - np.log1p(-y)
        shifted = 1.0 / (1.0 + np.exp(-self.gamma * logit))
        out = np.clip(probs - self.beta * (shifted - 0.5), 0.0, None)
        total = out.sum(axis=1, keepdims=True)
        out = np.where(total > 0, out / np.where(total > 0, total, 1.0), probs)
        top = probs.argmax(axis=1)
        flipped = np.flatnonzero(out.argmax(axis=1) != top)
        if flipped.size:
            a, b = top[flipped], out[flipped].argmax(axis=1)
            out[flipped, a], out[flipped, b] = out[flipped, b], out[flipped, a].copy()
            tied = flipped[out[flipped].argmax(axis=1) != a]  # equal maxima after clipping
            out[tied, top[tied]] += 1e-9
            out[tied] /= out[tied].sum(axis=1, keepdims=True)
        return out


@dataclass(frozen=True)
class Chain:
    """Apply policies left to right (``top:3+round:2``); ``None`` short-circuits."""

    policies: tuple[OutputPolicy, ...]

    @property
    def name(self) -> str:
        """The chained spec."""
        return "+".join(p.name for p in self.policies)

    @property
    def carries(self) -> Carries:
        """The most restrictive thing any member carries."""
        rank: dict[Carries, int] = {"probs": 0, "confidence": 0, "top-k": 1, "label": 2}
        return max((p.carries for p in self.policies), key=lambda c: rank[c])

    def __call__(self, probs: np.ndarray) -> np.ndarray | None:
        out: np.ndarray | None = probs
        for policy in self.policies:
            if out is None:
                return None
            out = policy(out)
        return out


def _number(text: str, kind: type[int] | type[float], part: str) -> float:
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(
            f"output policy {part!r}: {text!r} is not a valid {kind.__name__}; "
            f"grammar: {POLICY_GRAMMAR}"
        ) from None


def _parse_one(part: str) -> OutputPolicy:
    name, *args = part.strip().split(":")
    arity = {
        "full": (0,),
        "labels": (0,),
        "round": (1,),
        "round-to": (1,),
        "top": (1,),
        "noise": (1, 2),
        "reverse-sigmoid": (2,),
    }
    if name not in arity:
        raise ConfigError(f"unknown output policy {part!r}; grammar: {POLICY_GRAMMAR}")
    if len(args) not in arity[name]:
        raise ConfigError(
            f"output policy {part!r} takes {' or '.join(map(str, arity[name]))} "
            f"argument(s), got {len(args)}; grammar: {POLICY_GRAMMAR}"
        )
    try:
        if name == "full":
            return FullScores()
        if name == "labels":
            return LabelsOnly()
        if name == "round":
            return Round(decimals=int(_number(args[0], int, part)))
        if name == "round-to":
            return RoundTo(granularity=_number(args[0], float, part))
        if name == "top":
            return TopK(k=int(_number(args[0], int, part)))
        if name == "noise":
            seed = int(_number(args[1], int, part)) if len(args) == 2 else 0
            return GaussianNoise(sigma=_number(args[0], float, part), seed=seed)
        return ReverseSigmoid(
            beta=_number(args[0], float, part), gamma=_number(args[1], float, part)
        )
    except ConfigError as exc:
        if "grammar:" in str(exc):
            raise
        raise ConfigError(f"{exc}; grammar: {POLICY_GRAMMAR}") from None


def score_step(spec: str) -> float:
    """The rounding step of the scores an API under output policy ``spec`` returns
    (``round:2`` -> 0.01, ``round-to:0.05`` -> 0.05, chains -> their coarsest step); 0.0
    when it does not round or ``spec`` is not a policy of this package."""
    try:
        policy = parse_policy(spec)
    except ConfigError:
        return 0.0
    parts = policy.policies if isinstance(policy, Chain) else (policy,)
    steps = [
        10.0**-p.decimals if isinstance(p, Round) else p.granularity
        for p in parts
        if isinstance(p, Round | RoundTo)
    ]
    return max(steps, default=0.0)


def parse_policy(spec: str | Sequence[str]) -> OutputPolicy:
    """Build an output policy from a spec such as ``"top:3+round:2"``.

    Raises ConfigError naming the bad part and quoting the grammar.
    """
    parts = spec.split("+") if isinstance(spec, str) else list(spec)
    if not parts or any(not p.strip() for p in parts):
        raise ConfigError(f"empty output policy in {spec!r}; grammar: {POLICY_GRAMMAR}")
    policies = tuple(_parse_one(p) for p in parts)
    return policies[0] if len(policies) == 1 else Chain(policies)
