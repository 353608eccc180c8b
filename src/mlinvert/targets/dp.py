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

Normalisation: a DP model must not standardise with its private training set's pixel
statistics, so it uses the fixed public constants :data:`PUBLIC_PIXEL_STATS`.
"""

from __future__ import annotations

import math
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
    """``asdict(config)`` without a ``dp`` field that is None, so a model trained without
    DP has the same parameters and card as before DP training existed."""
    out = asdict(config)
    if "dp" in out and out["dp"] is None:
        del out["dp"]
    return out


def default_delta(n: int) -> float:
    """``min(1e-5, n ** -1.1)``: well below ``1/n`` (a delta near ``1/n`` would allow
    publishing one whole training example) for any training set size."""
    return min(DEFAULT_DELTA, float(n) ** -1.1)


@dataclass(frozen=True, kw_only=True)
class DPConfig:
    """DP-SGD settings: the privacy target and the training schedule.

    ``epsilon`` is the target (the achieved value is at most this); ``delta`` None means
    :func:`default_delta` of the training set size. ``batch_size`` is the *expected*
    Poisson batch size (sampling rate ``batch_size / n``); ``epochs`` sets the number of
    steps ``round(epochs * n / batch_size)``. SGD with ``momentum`` and learning rate
    ``lr`` on the noisy mean gradient (post-processing, so free in privacy).
    """

    epsilon: float
    delta: float | None = None
    clip: float = 1.0
    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if not isinstance(self.epsilon, int | float) or not 0 < self.epsilon < math.inf:
            raise ConfigError(
                f"DP epsilon must be a finite number > 0, got {self.epsilon!r} "
                "(for no privacy guarantee train without DP)"
            )
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"DP delta must lie in (0, 1), got {self.delta!r}")
        if not self.clip > 0 or not math.isfinite(self.clip):
            raise ConfigError(f"DP clip norm must be a finite number > 0, got {self.clip!r}")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"DP {name} must be an int >= 1, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"DP lr must be > 0, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"DP momentum must lie in [0, 1), got {self.momentum!r}")

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
class PrivacySpent:
    """What a DP-SGD run spent: the achieved ``(epsilon, delta)`` and how it was counted."""

    epsilon: float
    delta: float
    noise_multiplier: float
    clip: float
    sample_rate: float
    steps: int
    accountant: str
    sampling: str = "poisson"

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the model card's ``privacy`` field)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> PrivacySpent:
        """Inverse of :meth:`to_dict`."""
        return cls(**value)


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` Poisson-sampled Gaussian steps at ``delta`` (RDP, Opacus)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
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
