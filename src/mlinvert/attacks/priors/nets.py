"""The priors' networks: one decoder shape serves the VAE and the GAN, a linear one PCA.

Every decoder maps latent points ``z`` ``(n, d)`` to grey images ``(n, 1, h, w)`` at any
requested ``size`` (bilinear resampling inside the graph, so a gradient with respect to
the target's input pixels flows back to ``z``). Normalisation is per sample
(GroupNorm), so a decoder behaves identically in training and in an attack.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def resample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Images ``(n, 1, h, w)`` resampled bilinearly to ``size`` (anti-aliased when shrinking)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


class LinearDecoder(nn.Module):
    """Whitened eigenfaces: ``mean + basis z`` (not clipped; the search space clips)."""

    def __init__(self, latent: int, shape: tuple[int, int]) -> None:
        super().__init__()
        self.shape = shape
        self.mean = nn.Parameter(torch.zeros(shape[0] * shape[1]))
        self.basis = nn.Parameter(torch.zeros(shape[0] * shape[1], latent))

    def forward(self, z: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Images for latent points ``z``."""
        x = (self.mean + z @ self.basis.T).view(-1, 1, *self.shape)
        return resample(x, size or self.shape)


class ConvDecoder(nn.Module):
    """A DCGAN-style generator (Radford et al., ICLR 2016) with per-sample normalisation:
    a linear layer to a ``(4c, h/8, w/8)`` grid, three stride-2 transposed convolutions,
    a sigmoid to [0, 1], resampled to the requested size."""

    def __init__(self, latent: int, shape: tuple[int, int], width: int = 32) -> None:
        super().__init__()
        self.shape = shape
        self.grid = (math.ceil(shape[0] / 8), math.ceil(shape[1] / 8))
        c = width
        self.fc = nn.Linear(latent, 4 * c * self.grid[0] * self.grid[1])
        self.net = nn.Sequential(
            nn.GroupNorm(8, 4 * c),
            nn.ReLU(),
            nn.ConvTranspose2d(4 * c, 2 * c, 4, 2, 1),
            nn.GroupNorm(8, 2 * c),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * c, c, 4, 2, 1),
            nn.GroupNorm(8, c),
            nn.ReLU(),
            nn.ConvTranspose2d(c, 1, 4, 2, 1),
        )

    def forward(self, z: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Images for latent points ``z``."""
        h = self.fc(z).view(z.shape[0], -1, *self.grid)
        return resample(torch.sigmoid(self.net(h)), size or self.shape)


class ConvEncoder(nn.Module):
    """Three stride-2 convolutions and a linear head: the VAE's encoder (``2 d`` outputs,
    mean and log-variance) or, spectrally normalised, the GAN's discriminator (1 output)."""

    def __init__(
        self, shape: tuple[int, int], out: int, width: int = 32, *, spectral: bool = False
    ) -> None:
        super().__init__()
        c = width
        wrap = nn.utils.parametrizations.spectral_norm if spectral else (lambda m: m)
        self.net = nn.Sequential(
            wrap(nn.Conv2d(1, c, 4, 2, 1)),
            nn.LeakyReLU(0.2),
            wrap(nn.Conv2d(c, 2 * c, 4, 2, 1)),
            nn.LeakyReLU(0.2),
            wrap(nn.Conv2d(2 * c, 4 * c, 4, 2, 1)),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
        )
        with torch.no_grad():
            n_flat = int(self.net(torch.zeros(1, 1, *shape)).shape[1])
        self.head = wrap(nn.Linear(n_flat, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs for images ``x`` ``(n, 1, h, w)``."""
        out: torch.Tensor = self.head(self.net(x))
        return out
