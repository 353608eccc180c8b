"""Stacked denoising autoencoder face recogniser with a softmax head on its code.

The third target of Fredrikson, Jha, Ristenpart, CCS 2015: two sigmoid layers
(1000 -> 300 units) pre-trained greedily, one layer at a time, as denoising
autoencoders (Vincent et al., JMLR 2010: masking noise on the layer's input, rebuild
the clean input), then a softmax layer on the 300-d code, and everything fine-tuned
together. Fine-tuning keeps a reconstruction term for the decoder's upper layer and then
refits its pixel layer in closed form, so the decoder stays valid: the attack
searches the code space (``encode`` / ``decode`` / ``code_proba`` / ``code_gradient``)
and decodes its result into an image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mlinvert.errors import ConfigError, DataError
from mlinvert.targets._torch import (
    PREDICT_CHUNK,
    Standardise,
    TorchTarget,
    adam_train,
    check_images,
    check_nonnegative,
    check_positive,
    check_seed,
    log,
)


@dataclass(frozen=True, kw_only=True)
class DAEConfig:
    """Layer sizes, masking-noise level and the pre-training/fine-tuning schedule."""

    seed: int = 0
    hidden: int = 1000
    code: int = 300
    corruption: float = 0.25
    pretrain_epochs: int = 20
    finetune_epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    finetune_lr: float = 3e-3
    weight_decay: float = 1e-4
    recon_weight: float = 1.0
    decoder_ridge: float = 1.0

    def __post_init__(self) -> None:
        check_seed(self.seed)
        check_positive(
            hidden=self.hidden,
            code=self.code,
            finetune_epochs=self.finetune_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            finetune_lr=self.finetune_lr,
        )
        check_nonnegative(
            pretrain_epochs=self.pretrain_epochs,
            weight_decay=self.weight_decay,
            recon_weight=self.recon_weight,
            decoder_ridge=self.decoder_ridge,
        )
        if not 0.0 <= self.corruption < 1.0:
            raise ConfigError(f"corruption must lie in [0, 1), got {self.corruption}")


class _DAENet(nn.Module):
    """Encoder (two sigmoid layers), decoder (mirror, sigmoid pixels) and softmax head."""

    def __init__(
        self,
        shape: tuple[int, int],
        hidden: int,
        code: int,
        n_classes: int,
        mean: float,
        std: float,
    ) -> None:
        super().__init__()
        d = shape[0] * shape[1]
        self.shape = shape
        self.standardise = Standardise(mean, std)
        self.enc1 = nn.Linear(d, hidden)
        self.enc2 = nn.Linear(hidden, code)
        self.dec2 = nn.Linear(code, hidden)
        self.dec1 = nn.Linear(hidden, d)
        self.head = nn.Linear(code, n_classes)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """First-layer activations of raw images ``(n, h, w)``."""
        return torch.sigmoid(self.enc1(self.standardise(x).flatten(1)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The 300-d sigmoid code of raw images."""
        return torch.sigmoid(self.enc2(self.hidden(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images ``(n, h, w)`` in [0, 1] from codes."""
        h = torch.sigmoid(self.dec2(z))
        return torch.sigmoid(self.dec1(h)).reshape(-1, *self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of raw images."""
        return self.head(self.encode(x))


def _mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Masking noise: zero a fraction ``p`` of the entries."""
    return x * (torch.rand_like(x) >= p) if p > 0 else x


class StackedDAE(TorchTarget):
    """The paper's stacked denoising autoencoder (1000 -> 300 sigmoid) + softmax head."""

    kind = "dae"
    config_cls = DAEConfig
    config: DAEConfig

    def _build(self, shape: tuple[int, int], n_classes: int, mean: float, std: float) -> nn.Module:
        c = self.config
        return _DAENet(shape, c.hidden, c.code, n_classes, mean, std)

    def _train(self, net: nn.Module, X: torch.Tensor, y: torch.Tensor) -> None:
        assert isinstance(net, _DAENet)
        c = self.config
        if c.pretrain_epochs:
            # layer 1: rebuild clean pixels from masked pixels
            def layer1(xb: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
                h = torch.sigmoid(net.enc1(net.standardise(_mask(xb, c.corruption)).flatten(1)))
                return F.mse_loss(torch.sigmoid(net.dec1(h)), xb.flatten(1))

            adam_train(
                [*net.enc1.parameters(), *net.dec1.parameters()],
                layer1,
                X,
                y,
                epochs=c.pretrain_epochs,
                what="dae layer 1",
                batch_size=c.batch_size,
                lr=c.lr,
                weight_decay=c.weight_decay,
            )
            # layer 2: rebuild clean first-layer activations from masked ones
            with torch.no_grad():
                H = net.hidden(X)

            def layer2(hb: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
                z = torch.sigmoid(net.enc2(_mask(hb, c.corruption)))
                return F.mse_loss(torch.sigmoid(net.dec2(z)), hb)

            adam_train(
                [*net.enc2.parameters(), *net.dec2.parameters()],
                layer2,
                H,
                y,
                epochs=c.pretrain_epochs,
                what="dae layer 2",
                batch_size=c.batch_size,
                lr=c.lr,
                weight_decay=c.weight_decay,
            )

        def finetune(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            h = net.hidden(xb)
            z = torch.sigmoid(net.enc2(h))
            loss = F.cross_entropy(net.head(z), yb)
            if c.recon_weight > 0:  # keep the decoder's upper layer valid for the new codes
                loss = loss + c.recon_weight * F.mse_loss(torch.sigmoid(net.dec2(z)), h.detach())
            return loss

        finetune_params = [
            p for m in (net.enc1, net.enc2, net.dec2, net.head) for p in m.parameters()
        ]
        adam_train(
            finetune_params,
            finetune,
            X,
            y,
            epochs=c.finetune_epochs,
            batch_size=c.batch_size,
            lr=c.finetune_lr,
            weight_decay=c.weight_decay,
            what="dae fine-tune",
        )
        self._refit_decoder(net, X)

    def _refit_decoder(self, net: _DAENet, X: torch.Tensor) -> None:
        """Refit the pixel layer of the decoder to the fine-tuned codes (ridge, closed form).

        Fine-tuning moves the encoder; the decoder's upper layer follows through the
        reconstruction term, and this least-squares fit in logit space re-aligns its
        pixel layer, so ``decode(encode(x))`` gives the face back.
        """
        with torch.no_grad():
            h = torch.sigmoid(net.dec2(net.encode(X))).double()
            a = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], dim=1)
            target = torch.logit(X.flatten(1).double().clamp(0.02, 0.98))
            reg = self.config.decoder_ridge * torch.eye(a.shape[1], dtype=h.dtype)
            reg[-1, -1] = 0.0  # do not shrink the bias
            sol = torch.linalg.solve(a.T @ a + reg, a.T @ target)
            net.dec1.weight.copy_(sol[:-1].T.float())
            net.dec1.bias.copy_(sol[-1].float())
            mse = float(F.mse_loss(net.decode(net.encode(X)), X))
        log.info("dae training reconstruction mse %.4f", mse)

    # -- the code space ------------------------------------------------------------
    def _net(self) -> _DAENet:
        net = self._check_fitted()
        assert isinstance(net, _DAENet)
        return net

    @property
    def code_size_(self) -> int:
        """Dimension of the code (300 in the paper)."""
        return self.config.code

    def _check_codes(self, Z: np.ndarray) -> torch.Tensor:
        z = np.asarray(Z)
        if z.ndim != 2 or z.shape[1] != self.config.code:
            raise DataError(f"codes must have shape (n, {self.config.code}), got {z.shape}")
        if not np.isfinite(z).all():
            raise DataError("codes contain NaN or infinity")
        return torch.from_numpy(z.astype(np.float32))

    def _chunks(self, x: torch.Tensor, fn: object) -> np.ndarray:
        assert callable(fn)
        with torch.no_grad():
            return np.concatenate(
                [fn(x[i : i + PREDICT_CHUNK]).numpy() for i in range(0, x.shape[0], PREDICT_CHUNK)]
            )

    def encode(self, X: np.ndarray) -> np.ndarray:
        """Codes ``(n, 300)`` float32 in (0, 1) of images ``(n, h, w)``."""
        net = self._net()
        x = torch.from_numpy(check_images(X, self.input_shape_))
        return self._chunks(x, net.encode).astype(np.float32)

    def decode(self, Z: np.ndarray) -> np.ndarray:
        """Images ``(n, h, w)`` float32 in [0, 1] from codes ``(n, 300)``."""
        net = self._net()
        return self._chunks(self._check_codes(Z), net.decode).astype(np.float32)

    def code_proba(self, Z: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, k)`` float64 of the softmax head on codes."""
        net = self._net()
        probs = self._chunks(self._check_codes(Z), lambda z: torch.softmax(net.head(z), dim=1))
        return probs.astype(np.float64)

    def code_gradient(self, Z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Gradient of the head's probability of ``labels`` w.r.t. the codes ``(n, 300)``."""
        net = self._net()
        z = self._check_codes(Z).requires_grad_(True)
        lab = self._check_labels(labels, z.shape[0])
        p = torch.softmax(net.head(z), dim=1)
        (grad,) = torch.autograd.grad(p[torch.arange(z.shape[0]), lab].sum(), z)
        return grad.double().numpy()
