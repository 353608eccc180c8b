"""Differentially private training (DP-SGD) of the torch face targets.

DP-SGD as in Abadi et al., "Deep Learning with Differential Privacy", ACM CCS 2016:
every step takes a **Poisson-sampled** batch (each training example joins with
probability ``q = batch_size / n``, independently), clips each example's gradient to
L2 norm ``clip``, sums, adds Gaussian noise of standard deviation
``noise_multiplier * clip`` to every coordinate and divides by the *expected* batch
size ``q * n`` (a data-independent constant, so the sensitivity of the update stays
``clip``). The privacy loss is counted by the Rényi-DP accountant of the Poisson
sampled Gaussian mechanism (Mironov, Talwar, Zhang, "Rényi Differential Privacy of the
Sampled Gaussian Mechanism", 2019), taken from Opacus (``opacus.accountants``), with
the add/remove-one-example neighbouring relation. The noise multiplier is searched so
that the final epsilon is at most the requested one.

Per-example gradients are never materialised: for a network whose trainable layers are
all ``nn.Linear`` on ``(n, d)`` inputs, example ``i``'s gradient of a layer is the outer
product ``delta_i a_i^T`` (output gradient times input), so its squared norm is
``|delta_i|^2 (|a_i|^2 + 1)`` with the bias, and the clipped sum is one matrix product
``(c * delta)^T a`` (the "ghost clipping" identity; Goodfellow 2015, Li et al. 2022).
That keeps the paper's 3000-unit MLP (31 M weights) trainable on a CPU. Any other
network (the CNN's convolutions) is clipped from explicit per-example gradients
(``torch.func.vmap`` of ``grad``, a chunk of examples at a time); batch normalisation,
which mixes the examples of a batch, is refused.

Models trained in several stages over the same private data (the stacked denoising
autoencoder: two pre-training stages, fine-tuning, the decoder's pixel layer) run DP-SGD
once per stage (:class:`DPStage`), all with one noise multiplier. Their privacy loss is the
**composition** of the stages: the RDP curves of the stages add at every order (Mironov,
"Rényi Differential Privacy", CSF 2017, Proposition 1; it holds for adaptive composition,
so a stage may train on what earlier stages learned), and the sum is converted to
``(epsilon, delta)`` once (:func:`epsilon_composed`). The noise multiplier is searched so
that this composed epsilon is at most the requested one (:func:`noise_for_schedule`).

Normalisation: a DP model must not standardise with its private training set's pixel
statistics, so it uses the fixed public constants :data:`PUBLIC_PIXEL_STATS`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mlinvert.errors import ConfigError

#: Mean and standard deviation used by DP models instead of the training set's pixel
#: statistics (which are private data): a [0, 1] grey image's rough, public values.
PUBLIC_PIXEL_STATS = (0.5, 0.25)

#: The default delta's ceiling (the usual choice, Abadi et al.); see :func:`default_delta`.
DEFAULT_DELTA = 1e-5

#: Opacus' name of the accountant used for the noise search and the final epsilon.
ACCOUNTANT = "rdp"

#: Rényi orders: Opacus' defaults (1.1 .. 63) and larger ones, without which epsilon
#: cannot fall below about ``log(1/delta) / 62`` (0.19 at delta 1e-5) however large
#: the noise (with them: 0.023).
ORDERS = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *range(12, 64),
    *(64, 80, 96, 128, 192, 256, 384, 512),
)


def accountant_name() -> str:
    """How the privacy loss is counted, with the library version (for model cards)."""
    from importlib.metadata import version

    return (
        f"RDP of the Poisson-sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019), "
        f"opacus {version('opacus')} RDPAccountant, add/remove-one neighbours"
    )


def config_dict(config: Any) -> dict[str, Any]:
    """``asdict(config)`` without a ``dp`` or ``public`` field that is None, so a model
    trained without DP (or without public pre-training) has the same parameters and card
    as before those options existed."""
    out = asdict(config)
    for key in ("dp", "public"):
        if key in out and out[key] is None:
            del out[key]
    return out


def default_delta(n: int) -> float:
    """``min(1e-5, n ** -1.1)``: well below ``1/n`` (a delta near ``1/n`` would allow
    publishing one whole training example) for any training set size."""
    return min(DEFAULT_DELTA, float(n) ** -1.1)


def _check_schedule(
    where: str, *, clip: float, batch_size: int, lr: float, momentum: float
) -> None:
    if not isinstance(clip, int | float) or not clip > 0 or not math.isfinite(clip):
        raise ConfigError(f"{where} clip norm must be a finite number > 0, got {clip!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"{where} batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(lr, int | float) or not lr > 0 or not math.isfinite(lr):
        raise ConfigError(f"{where} lr must be a finite number > 0, got {lr!r}")
    if not isinstance(momentum, int | float) or not 0 <= momentum < 1:
        raise ConfigError(f"{where} momentum must lie in [0, 1), got {momentum!r}")


@dataclass(frozen=True, kw_only=True)
class DPStage:
    """The DP-SGD schedule of one training stage of a model trained in stages (the DAE).

    ``name`` says which stage (the model lists its own); ``epochs`` 0 skips the stage (it
    then spends nothing). The other fields mean what they mean in :class:`DPConfig`. Every
    stage uses the one noise multiplier of the whole run (see the module docstring).
    """

    name: str
    epochs: int
    batch_size: int
    lr: float
    clip: float = 1.0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"a DP stage needs a name, got {self.name!r}")
        where = f"DP stage {self.name!r}:"
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 0:
            raise ConfigError(f"{where} epochs must be an int >= 0, got {self.epochs!r}")
        _check_schedule(
            where, clip=self.clip, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum
        )


@dataclass(frozen=True, kw_only=True)
class DPConfig:
    """DP-SGD settings: the privacy target and the training schedule.

    ``epsilon`` is the target (the achieved value is at most this); ``delta`` None means
    :func:`default_delta` of the training set size. ``batch_size`` is the *expected*
    Poisson batch size (sampling rate ``batch_size / n``); ``epochs`` sets the number of
    steps ``round(epochs * n / batch_size)``. SGD with ``momentum`` and learning rate
    ``lr`` on the noisy mean gradient (post-processing, so free in privacy).

    ``stages`` (only for a model trained in stages, the DAE) gives each stage its own
    schedule (:class:`DPStage`); a stage it does not name uses the schedule above. The
    target ``epsilon`` then bounds the composition of all stages.
    """

    epsilon: float
    delta: float | None = None
    clip: float = 1.0
    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.9
    stages: tuple[DPStage, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.epsilon, int | float) or not 0 < self.epsilon < math.inf:
            raise ConfigError(
                f"DP epsilon must be a finite number > 0, got {self.epsilon!r} "
                "(for no privacy guarantee train without DP)"
            )
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"DP delta must lie in (0, 1), got {self.delta!r}")
        _check_schedule(
            "DP", clip=self.clip, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum
        )
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 1:
            raise ConfigError(f"DP epochs must be an int >= 1, got {self.epochs!r}")
        stages = []
        for stage in self.stages:
            if isinstance(stage, dict):
                try:
                    stage = DPStage(**stage)
                except TypeError as exc:
                    raise ConfigError(f"malformed DP stage {stage!r}: {exc}") from exc
            if not isinstance(stage, DPStage):
                raise ConfigError(
                    f"DP stages must be DPStage objects or dicts, got {type(stage).__name__}"
                )
            stages.append(stage)
        names = [stage.name for stage in stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"DP stages must be named once each, got {names}")
        object.__setattr__(self, "stages", tuple(stages))

    def stage(self, name: str) -> DPStage:
        """The schedule of stage ``name``: its entry in ``stages``, else the top-level one."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        return DPStage(
            name=name,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            clip=self.clip,
            momentum=self.momentum,
        )

    @classmethod
    def from_value(cls, value: Any) -> DPConfig | None:
        """A DPConfig from itself, its ``asdict`` form (a model card) or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            try:
                return cls(**value)
            except TypeError as exc:
                raise ConfigError(f"malformed DP settings {value!r}: {exc}") from exc
        raise ConfigError(f"dp must be a DPConfig, a dict or None, got {type(value).__name__}")


@dataclass(frozen=True, kw_only=True)
class StageSpent:
    """One DP-SGD stage of a run in stages: its schedule, and ``epsilon_alone``, what this
    stage alone would spend at the run's noise multiplier and delta (for reading only:
    the run's epsilon is the composition of all stages, larger than any one of them)."""

    name: str
    clip: float
    sample_rate: float
    steps: int
    lr: float
    momentum: float
    epsilon_alone: float


@dataclass(frozen=True, kw_only=True)
class PrivacySpent:
    """What a DP-SGD run spent: the achieved ``(epsilon, delta)`` and how it was counted.

    A run in several stages (the DAE) lists them in ``stages``, all at ``noise_multiplier``;
    ``epsilon`` is then their composition, ``steps`` the total over the stages,
    ``sample_rate`` and ``clip`` the largest of the stages' (with the total steps, a
    schedule whose epsilon is at least the composed one).
    """

    epsilon: float
    delta: float
    noise_multiplier: float
    clip: float
    sample_rate: float
    steps: int
    accountant: str
    sampling: str = "poisson"
    stages: tuple[StageSpent, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the model card's ``privacy`` field; no ``stages`` for one stage)."""
        out = asdict(self)
        if not self.stages:
            del out["stages"]
        return out

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> PrivacySpent:
        """Inverse of :meth:`to_dict`."""
        stages = tuple(StageSpent(**s) for s in value.get("stages", ()))
        return cls(**{**value, "stages": stages})


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` Poisson-sampled Gaussian steps at ``delta`` (RDP, Opacus)."""
    return epsilon_composed(noise_multiplier, [(sample_rate, steps)], delta)


def epsilon_composed(
    noise_multiplier: float, schedule: Sequence[tuple[float, int]], delta: float
) -> float:
    """Epsilon at ``delta`` of the stages ``schedule`` = ``[(sample_rate, steps), ...]``
    run one after the other on the same data, each a Poisson-sampled Gaussian mechanism
    with ``noise_multiplier``: Opacus' RDPAccountant holding one history entry per stage
    adds the stages' RDP at every order, then converts the sum to ``(epsilon, delta)``
    once (stages with 0 steps spend nothing)."""
    from opacus.accountants import RDPAccountant

    history = [(noise_multiplier, q, steps) for q, steps in schedule if steps > 0]
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = history
    return float(accountant.get_epsilon(delta=delta, alphas=list(ORDERS)))


def noise_for(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to 0.01 in epsilon) whose ``steps`` Poisson-sampled
    Gaussian steps spend at most ``epsilon`` at ``delta``; ConfigError if none does."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        sigma = float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=ACCOUNTANT,
                epsilon_tolerance=0.01,
                alphas=list(ORDERS),
            )
        )
    except ValueError as exc:
        raise ConfigError(
            f"no noise level reaches epsilon {epsilon} at delta {delta} with sampling rate "
            f"{sample_rate:.4g} over {steps} steps ({exc}); raise epsilon or delta, or train "
            "for fewer epochs"
        ) from exc
    return sigma


#: Largest noise multiplier the composed search tries (as Opacus' search).
_MAX_NOISE = 2.0**20


def noise_for_schedule(
    epsilon: float, delta: float, schedule: Sequence[tuple[float, int]]
) -> float:
    """The smallest noise multiplier (to 0.01 in epsilon) at which the stages ``schedule``
    (``[(sample_rate, steps), ...]``, one noise multiplier for all) spend at most
    ``epsilon`` composed (:func:`epsilon_composed`); ConfigError if none does.

    Stages that all share one sampling rate compose exactly like one stage of their total
    steps (RDP adds), so that case is :func:`noise_for`; otherwise the same search (double
    until under target, then bisect) runs on the composed epsilon."""
    active = [(q, steps) for q, steps in schedule if steps > 0]
    if not active:
        raise ConfigError("a DP-SGD schedule needs at least one stage with steps > 0")
    rates = {q for q, _ in active}
    if len(rates) == 1:
        return noise_for(epsilon, delta, active[0][0], sum(steps for _, steps in active))
    low, high = 0.0, 10.0
    while epsilon_composed(high, active, delta) > epsilon:
        low, high = high, 2 * high
        if high > _MAX_NOISE:
            raise ConfigError(
                f"no noise level reaches epsilon {epsilon} at delta {delta} over the stages "
                f"{active} ((sampling rate, steps) each); raise epsilon or delta, or train "
                "for fewer epochs"
            )
    while epsilon - epsilon_composed(high, active, delta) > 0.01:
        mid = (low + high) / 2
        if epsilon_composed(mid, active, delta) > epsilon:
            low = mid
        else:
            high = mid
    return high
