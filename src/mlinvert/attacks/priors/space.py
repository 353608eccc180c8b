"""The search space of a learned prior: ``x = clip(G(z))`` for the prior's decoder ``G``.

MI-Face and the label-only attack move ``z`` (a standard normal latent point) and query
the decoded image. White-box gradients come back through the decoder by autograd
(:meth:`PriorSpace.pullback`, the chain rule of GMI, Zhang et al. CVPR 2020); black-box
estimators (Broyden, NES, finite differences) probe decoded points through the oracle
like in any other space. The realism term is the latent prior: ``||z|| <= r sqrt(d)``
(``radius``, the typical set of ``N(0, I)``) or, without a radius, the Gaussian
log-prior ``||z||^2 / 2`` weighted by the attack's ``prior_weight``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mlinvert.attacks.spaces import LatentBall
from mlinvert.errors import ConfigError

if TYPE_CHECKING:
    from mlinvert.attacks.priors.prior import Prior

#: Largest batch decoded at once (label-only draws thousands of points).
CHUNK = 256
#: Adam steps and step size of :meth:`PriorSpace.encode` (the latent point nearest an image).
ENCODE_STEPS = 200
ENCODE_LR = 0.05


class PriorSpace(LatentBall):
    """A learned prior's latent space (see the module docstring)."""

    name = "prior"

    def __init__(
        self, prior: Prior, *, radius: float | None = 1.0, private: np.ndarray | None = None
    ) -> None:
        super().__init__()
        if radius is not None and not radius > 0:
            raise ConfigError(f"prior radius must be > 0 (or None), got {radius}")
        self.prior = prior
        self.radius = radius
        self.private = private

    def _build(self, h: int, w: int) -> None:
        if self.private is not None:
            self.prior.check_disjoint(self.private)

    @property
    def dim(self) -> int:
        """Number of latent coordinates."""
        self._need()
        return self.prior.latent

    @property
    def default_prior_weight(self) -> float:  # type: ignore[override]
        """0 inside the ball (the radius is the prior), else 0.05."""
        return 0.0 if self.radius is not None else 0.05

    @property
    def pixel_scale(self) -> float:
        """RMS pixel change per unit latent step (eight random directions from ``z = 0``)."""
        u = np.random.default_rng(0).standard_normal((8, self.dim))
        eps = 1e-2
        base = self.raw(np.zeros((1, self.dim)))
        d = (self.raw(eps * u) - base) / eps
        return float(np.sqrt((d**2).mean() / self.dim)) or 1.0

    def _forward(self, z: torch.Tensor) -> torch.Tensor:
        h, w = self._need()
        out: torch.Tensor = self.prior.decoder(z, (h, w))[:, 0]
        return out

    def raw(self, z: np.ndarray) -> np.ndarray:
        """The decoder's images ``(n, h, w)`` for ``z`` ``(n, dim)`` (before clipping)."""
        z = np.atleast_2d(np.asarray(z, dtype=np.float32))
        with torch.no_grad():
            parts = [
                self._forward(torch.as_tensor(z[i : i + CHUNK])) for i in range(0, len(z), CHUNK)
            ]
        return torch.cat(parts).double().numpy()

    def pullback(self, z: np.ndarray, grad_x: np.ndarray) -> np.ndarray:
        """``d f / d z`` from ``d f / d x`` by autograd through the decoder (a clipped pixel
        counts only when ascent moves it back into [0, 1])."""
        zt = torch.as_tensor(np.atleast_2d(z), dtype=torch.float32).requires_grad_(True)
        with torch.enable_grad():
            x = self._forward(zt)
            g = torch.as_tensor(np.asarray(grad_x), dtype=torch.float32).reshape(x.shape)
            g = g * (((x > 0) | (g > 0)) & ((x < 1) | (g < 0)))
            (x * g).sum().backward()
        assert zt.grad is not None
        return zt.grad.double().numpy()

    def push(self, grad_x: np.ndarray) -> np.ndarray:
        """Image-space prior terms (total variation) are not available here."""
        raise ConfigError(
            "tv_weight is not supported in a learned prior's space (the decoder is the image "
            "prior); set it to 0"
        )

    def encode(self, x: np.ndarray) -> np.ndarray:
        """The latent points whose images are nearest ``x`` ``(n, h, w)`` (least squares by
        Adam from ``z = 0``, inside the ball)."""
        h, w = self._need()
        target = torch.as_tensor(np.asarray(x, dtype=np.float32).reshape(-1, h, w))
        z = torch.zeros(target.shape[0], self.dim, requires_grad=True)
        opt = torch.optim.Adam([z], lr=ENCODE_LR)
        with torch.enable_grad():
            for _ in range(ENCODE_STEPS):
                loss = ((self._forward(z).clamp(0, 1) - target) ** 2).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        return np.stack([self.project(row) for row in z.detach().double().numpy()])

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the prior's kind, folder, training data and the radius."""
        card = self.prior.card
        return {
            "name": self.name,
            "kind": self.prior.kind,
            "path": card.get("path"),
            "latent": self.prior.latent,
            "trained_on": card.get("data"),
            "radius": self.radius,
        }
