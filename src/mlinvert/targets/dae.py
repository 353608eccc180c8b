"""Stacked denoising autoencoder face recogniser with a softmax head on its code.

The third target of Fredrikson, Jha, Ristenpart, CCS 2015: two sigmoid layers
(1000 -> 300 units) pre-trained greedily, one layer at a time, as denoising
autoencoders (Vincent et al., JMLR 2010: masking noise on the layer's input, rebuild
the clean input), then a softmax layer on the 300-d code, and everything fine-tuned
together. Fine-tuning keeps a reconstruction term for the decoder's upper layer and then
refits its pixel layer in closed form, so the decoder stays valid: the attack
searches the code space (``encode`` / ``decode`` / ``code_proba`` / ``code_gradient``)
and decodes its result into an image.

With ``DAEConfig.dp`` set, every stage that reads the private images is DP-SGD
(:mod:`mlinvert.targets.dp`): layer-1 pre-training, layer-2 pre-training (on the private
images' first-layer activations), fine-tuning and the decoder's pixel layer (DP-SGD
takes the place of the closed-form refit, which is not private). One noise multiplier
serves all four stages, chosen so that their composed epsilon meets the target
(:class:`mlinvert.targets.dp_sgd.StagedDP`); normalisation uses the public pixel
constants. The masking noise is per-example augmentation: each example's clipped
gradient comes from its own corrupted copy.

With ``DAEConfig.public`` set (:class:`PublicPretrain`), both autoencoder layers and the
decoder are pre-trained on a **public** face set instead (:mod:`mlinvert.data.public`; no
privacy cost: Tramèr & Boneh, ICLR 2021), normalised with that set's pixel statistics, and
only the remaining stages read the private images: the softmax head alone on the frozen
public codes (``private="head"``), or fine-tuning (``private="finetune"``). With ``dp``
these are the only DP-SGD stages and the only ones composed; the decoder's pixel layer is
then refit in closed form on the *public* faces (post-processing of what DP-SGD released),
never on the private ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mlinvert.data.public import PUBLIC_FACES, check_public_faces, public_faces
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
from mlinvert.targets.dp import DPConfig
from mlinvert.targets.dp_sgd import StagedDP, cross_entropy_sum

#: The DP-SGD stages of a DAE, in the order they run (names of ``DPConfig.stages``).
DP_STAGES = ("layer1", "layer2", "finetune", "decoder")
#: What may read the private images after public pre-training (``PublicPretrain.private``);
#: each is then the DAE's one DP-SGD stage, of that name.
PRIVATE_AFTER_PUBLIC = ("head", "finetune")
#: The stages a public pre-training runs (on the public faces only).
PUBLIC_STAGES = ("layer1", "layer2", "decoder")


@dataclass(frozen=True, kw_only=True)
class PublicPretrain:
    """Pre-train the DAE's two autoencoder layers and its decoder on public faces.

    ``data`` names a set of :data:`mlinvert.data.public.PUBLIC_FACES` (resized to the
    private images' shape; horizontal flips double it). ``epochs`` of Adam per layer
    (the DAE's ``batch_size``, ``lr``, ``weight_decay``, ``corruption``), then a ridge
    refit of the decoder's pixel layer on the public faces. ``private`` says which stages
    then read the private images: ``"head"`` (the softmax head alone, on the frozen
    public codes) or ``"finetune"`` (encoder, head and the decoder's upper layer; without
    DP the pixel layer is then refit on the private images as usual, with DP on the
    public faces).
    """

    data: str = "lfw"
    private: str = "head"
    epochs: int = 60

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", check_public_faces(self.data))
        if self.private not in PRIVATE_AFTER_PUBLIC:
            raise ConfigError(
                f"public pre-training: private must be one of "
                f"{', '.join(PRIVATE_AFTER_PUBLIC)} (the stages that read the private "
                f"images), got {self.private!r}"
            )
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 1:
            raise ConfigError(
                f"public pre-training epochs must be an int >= 1, got {self.epochs!r}"
            )

    @classmethod
    def from_value(cls, value: object) -> PublicPretrain | None:
        """A PublicPretrain from itself, its ``asdict`` form, a set name or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(data=value)
        if isinstance(value, dict):
            try:
                return cls(**value)
            except TypeError as exc:
                raise ConfigError(f"malformed public pre-training {value!r}: {exc}") from exc
        raise ConfigError(
            f"public must be a PublicPretrain, a dict, a public set name or None, "
            f"got {type(value).__name__}"
        )


@dataclass(frozen=True, kw_only=True)
class DAEConfig:
    """Layer sizes, masking-noise level and the pre-training/fine-tuning schedule.

    With ``dp`` set the DAE trains by DP-SGD in the stages :data:`DP_STAGES`, each with
    its schedule from ``dp`` (``dp.stage(name)``); then ``pretrain_epochs``,
    ``finetune_epochs``, ``batch_size``, ``lr``, ``finetune_lr``, ``weight_decay`` and
    ``decoder_ridge`` are unused (``corruption`` and ``recon_weight`` still apply).

    With ``public`` set (:class:`PublicPretrain`) the pre-training and the decoder come
    from public faces; the DP-SGD stages (with ``dp``) are then only ``public.private``
    (see :meth:`dp_stages`), and ``batch_size``, ``lr``, ``weight_decay`` and
    ``decoder_ridge`` serve the public stages.
    """

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
    dp: DPConfig | None = None
    public: PublicPretrain | None = None

    def __post_init__(self) -> None:
        check_seed(self.seed)
        object.__setattr__(self, "dp", DPConfig.from_value(self.dp))
        object.__setattr__(self, "public", PublicPretrain.from_value(self.public))
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
        if self.dp is not None:
            stages = self.dp_stages()
            unknown = sorted({s.name for s in self.dp.stages} - set(stages))
            if unknown:
                how = (
                    ""
                    if self.public is None
                    else f" after public pre-training (private={self.public.private!r})"
                )
                raise ConfigError(
                    f"unknown DP stage(s) {unknown} for the dae{how}; its DP stages are "
                    f"{', '.join(stages)}"
                )
            last = "finetune" if self.public is None else self.public.private
            if self.dp.stage(last).epochs == 0:
                raise ConfigError(
                    f"the dae's DP stage {last!r} needs epochs >= 1 (it trains the softmax "
                    "head)"
                    + (
                        "; set epochs 0 only for layer1, layer2 or decoder"
                        if self.public is None
                        else ""
                    )
                )

    def dp_stages(self) -> tuple[str, ...]:
        """The DP-SGD stages, in order: :data:`DP_STAGES`, or after public pre-training
        only the one that reads the private images (``public.private``)."""
        return DP_STAGES if self.public is None else (self.public.private,)


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


def _mse_sum(out: tuple[torch.Tensor, torch.Tensor], _: torch.Tensor) -> torch.Tensor:
    """Per-example mean squared error (over the features), summed over the batch."""
    recon, target = out
    return (recon - target).pow(2).mean(1).sum()


class _DPLayer1(nn.Module):
    """Layer-1 pre-training as one module for DP-SGD: masked pixels -> (rebuilt, clean)."""

    def __init__(self, net: _DAENet, corruption: float) -> None:
        super().__init__()
        self.standardise, self.enc1, self.dec1 = net.standardise, net.enc1, net.dec1
        self.corruption = corruption

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rebuilt pixels from masked ones, and the clean pixels (the target)."""
        h = torch.sigmoid(self.enc1(self.standardise(_mask(x, self.corruption)).flatten(1)))
        return torch.sigmoid(self.dec1(h)), x.flatten(1)


class _DPLayer2(nn.Module):
    """Layer-2 pre-training: masked first-layer activations -> (rebuilt, clean)."""

    def __init__(self, net: _DAENet, corruption: float) -> None:
        super().__init__()
        self.enc2, self.dec2 = net.enc2, net.dec2
        self.corruption = corruption

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rebuilt activations from masked ones, and the clean activations."""
        z = torch.sigmoid(self.enc2(_mask(h, self.corruption)))
        return torch.sigmoid(self.dec2(z)), h


class _DPFinetune(nn.Module):
    """Fine-tuning: encoder, head and the decoder's upper layer (not the pixel layer)."""

    def __init__(self, net: _DAENet) -> None:
        super().__init__()
        self.standardise, self.enc1, self.enc2 = net.standardise, net.enc1, net.enc2
        self.dec2, self.head = net.dec2, net.head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, the rebuilt first-layer activations and the activations themselves."""
        h = torch.sigmoid(self.enc1(self.standardise(x).flatten(1)))
        z = torch.sigmoid(self.enc2(h))
        return self.head(z), torch.sigmoid(self.dec2(z)), h.detach()


class _DPDecoder(nn.Module):
    """The decoder's pixel layer alone, on fixed upper-layer activations."""

    def __init__(self, net: _DAENet) -> None:
        super().__init__()
        self.dec1 = net.dec1

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """Pixels ``(n, h * w)`` from the decoder's upper-layer activations."""
        return torch.sigmoid(self.dec1(a))


class _DPHead(nn.Module):
    """The softmax head alone, on fixed codes (after public pre-training)."""

    def __init__(self, net: _DAENet) -> None:
        super().__init__()
        self.head = net.head

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Class logits of codes ``(n, code)``."""
        return self.head(z)


class StackedDAE(TorchTarget):
    """The paper's stacked denoising autoencoder (1000 -> 300 sigmoid) + softmax head.

    ``stages_`` (after public pre-training only, else None) records which stages were
    trained on which data: the public set, the public and the private stages.
    """

    kind = "dae"
    config_cls = DAEConfig
    config: DAEConfig

    def __init__(self, config: DAEConfig | None = None, *, threads: int | None = 1) -> None:
        super().__init__(config, threads=threads)
        self.stages_: dict[str, object] | None = None

    def _build(self, shape: tuple[int, int], n_classes: int, mean: float, std: float) -> nn.Module:
        c = self.config
        return _DAENet(shape, c.hidden, c.code, n_classes, mean, std)

    def _pixel_stats(self, x: np.ndarray) -> tuple[float, float]:
        """After public pre-training: the public faces' statistics (public, so free);
        otherwise as :class:`TorchTarget` (the training set's, or fixed under DP)."""
        if self.config.public is not None:
            faces = public_faces(self.config.public.data, (int(x.shape[1]), int(x.shape[2])))
            return float(faces.mean()), float(faces.std()) or 1.0
        return super()._pixel_stats(x)

    def _train(self, net: nn.Module, X: torch.Tensor, y: torch.Tensor) -> None:
        assert isinstance(net, _DAENet)
        c = self.config
        self.stages_ = None
        if c.public is not None:
            self._train_public(net, X, y, c.public)
            return
        if c.dp is not None:
            self._train_dp(net, X, y, c.dp)
            return
        if c.pretrain_epochs:
            self._pretrain(net, X, c.pretrain_epochs, what="dae")
        self._finetune(net, X, y)
        self._refit_decoder(net, X)

    def _pretrain(self, net: _DAENet, X: torch.Tensor, epochs: int, *, what: str) -> None:
        """Greedy layer-wise denoising pre-training (Adam) of both layers on images ``X``."""
        c = self.config
        unused = torch.zeros(X.shape[0], dtype=torch.int64)

        # layer 1: rebuild clean pixels from masked pixels
        def layer1(xb: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            h = torch.sigmoid(net.enc1(net.standardise(_mask(xb, c.corruption)).flatten(1)))
            return F.mse_loss(torch.sigmoid(net.dec1(h)), xb.flatten(1))

        adam_train(
            [*net.enc1.parameters(), *net.dec1.parameters()],
            layer1,
            X,
            unused,
            epochs=epochs,
            what=f"{what} layer 1",
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
            unused,
            epochs=epochs,
            what=f"{what} layer 2",
            batch_size=c.batch_size,
            lr=c.lr,
            weight_decay=c.weight_decay,
        )

    def _finetune(self, net: _DAENet, X: torch.Tensor, y: torch.Tensor) -> None:
        """Fine-tune encoder, head and the decoder's upper layer together (Adam)."""
        c = self.config

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

    def _dp_finetune_loss(
        self,
    ) -> Callable[[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor]:
        w = self.config.recon_weight

        def finetune_loss(
            out: tuple[torch.Tensor, torch.Tensor, torch.Tensor], yb: torch.Tensor
        ) -> torch.Tensor:
            logits, rebuilt, h = out
            total = F.cross_entropy(logits, yb, reduction="sum")
            if w > 0:
                total = total + w * (rebuilt - h).pow(2).mean(1).sum()
            return total

        return finetune_loss

    def _train_dp(self, net: _DAENet, X: torch.Tensor, y: torch.Tensor, dp: DPConfig) -> None:
        """The four stages by DP-SGD, composed to ``dp.epsilon`` (see the module doc).

        Each stage's input rows are functions of one private image each (its pixels, or
        its activations under layers an earlier stage released), so every clipped
        gradient comes from one example. The decoder's pixel layer is trained by DP-SGD
        on the fine-tuned codes' upper-layer activations instead of the ridge refit.
        """
        c = self.config
        plan = StagedDP(dp, int(X.shape[0]), DP_STAGES)
        flat = X.flatten(1)
        plan.run("layer1", _DPLayer1(net, c.corruption), X, flat, loss=_mse_sum)
        with torch.no_grad():
            H = net.hidden(X)
        plan.run("layer2", _DPLayer2(net, c.corruption), H, H, loss=_mse_sum)
        plan.run("finetune", _DPFinetune(net), X, y, loss=self._dp_finetune_loss())
        with torch.no_grad():
            A = torch.sigmoid(net.dec2(net.encode(X)))

        def decoder_loss(pixels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return (pixels - target).pow(2).mean(1).sum()

        plan.run("decoder", _DPDecoder(net), A, flat, loss=decoder_loss)
        self.privacy_ = plan.spent()
        with torch.no_grad():
            mse = float(F.mse_loss(net.decode(net.encode(X)), X))
        log.info(
            "dp dae: epsilon %.3f (composed over %d stages), training reconstruction mse %.4f",
            self.privacy_.epsilon,
            len(DP_STAGES),
            mse,
        )

    def _public_images(self, shape: tuple[int, int]) -> torch.Tensor:
        """The public faces at ``shape`` and their mirror images (public: free to augment)."""
        assert self.config.public is not None
        faces = public_faces(self.config.public.data, shape)
        return torch.from_numpy(np.concatenate([faces, faces[:, :, ::-1]]))

    def _train_public(
        self, net: _DAENet, X: torch.Tensor, y: torch.Tensor, public: PublicPretrain
    ) -> None:
        """Public pre-training of both layers and the decoder, then the private stage(s).

        The public stages read only the public faces ``P`` (and the public statistics in
        the Standardise layer). The private stage reads ``X``: with ``dp`` by DP-SGD, the
        only stage in the accounting; the decoder's pixel layer is afterwards refit on
        ``P`` (a function of the released encoder and public data: free), never on ``X``.
        """
        c = self.config
        shape = (int(X.shape[1]), int(X.shape[2]))
        P = self._public_images(shape)
        self._pretrain(net, P, public.epochs, what=f"dae public ({public.data})")
        self._refit_decoder(net, P, what=f"public ({public.data})")
        decoder = f"pixel layer refit (ridge) on the public faces ({public.data})"
        if c.dp is not None:
            plan = StagedDP(c.dp, int(X.shape[0]), c.dp_stages())
            if public.private == "head":
                with torch.no_grad():
                    Z = net.encode(X)
                    net.head.weight.zero_()
                    net.head.bias.zero_()
                plan.run("head", _DPHead(net), Z, y, loss=cross_entropy_sum)
            else:
                plan.run("finetune", _DPFinetune(net), X, y, loss=self._dp_finetune_loss())
                self._refit_decoder(net, P, what=f"public ({public.data}), after DP fine-tuning")
                decoder += "; its upper layer is trained in the private fine-tuning"
            self.privacy_ = plan.spent()
            private: list[str] = [public.private]
            public_stages = list(PUBLIC_STAGES)
        elif public.private == "head":
            with torch.no_grad():
                Z = net.encode(X)

            def head_loss(zb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
                return F.cross_entropy(net.head(zb), yb)

            adam_train(
                list(net.head.parameters()),
                head_loss,
                Z,
                y,
                epochs=c.finetune_epochs,
                batch_size=c.batch_size,
                lr=c.finetune_lr,
                weight_decay=c.weight_decay,
                what="dae head (private)",
            )
            private, public_stages = ["head"], list(PUBLIC_STAGES)
        else:  # no DP: the usual fine-tuning and decoder refit on the private images
            self._finetune(net, X, y)
            self._refit_decoder(net, X)
            private, public_stages = ["finetune", "decoder"], ["layer1", "layer2"]
            decoder = "pre-trained on the public faces, pixel layer refit on the private images"
        self.stages_ = {
            "public_data": {
                "name": public.data,
                "description": PUBLIC_FACES[public.data],
                "images": int(P.shape[0]) // 2,
                "augmented": "horizontal flips (x2)",
                "resized_to": list(shape),
                "epochs": public.epochs,
            },
            "public": public_stages,
            "private": private,
            "private_training": "dp-sgd" if c.dp is not None else "adamw (not private)",
            "decoder": decoder,
        }

    def _refit_decoder(self, net: _DAENet, X: torch.Tensor, *, what: str = "training") -> None:
        """Refit the pixel layer of the decoder to the fine-tuned codes (ridge, closed form).

        Fine-tuning moves the encoder; the decoder's upper layer follows through the
        reconstruction term, and this least-squares fit in logit space re-aligns its
        pixel layer, so ``decode(encode(x))`` gives the face back. ``X`` is whatever the
        decoder is fitted to: the training images, or public faces (``what`` says which).
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
        log.info("dae %s reconstruction mse %.4f", what, mse)

    # -- model folders -------------------------------------------------------------
    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """As :meth:`TorchTarget.get_state`, with ``stages`` after public pre-training."""
        tensors, params = super().get_state()
        if self.stages_ is not None:
            params["stages"] = self.stages_
        return tensors, params

    @classmethod
    def from_state(cls, tensors: dict[str, np.ndarray], params: dict[str, Any]) -> Self:
        """As :meth:`TorchTarget.from_state`, restoring ``stages_``."""
        model = super().from_state(tensors, params)
        stages = params.get("stages")
        model.stages_ = stages if isinstance(stages, dict) else None
        return model

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
