"""Attacker priors learned from public faces of other people: train, save, load.

A prior is a decoder from a latent space with a standard normal prior, ``z ~ N(0, I)``,
to grey face images, learned only from public photos (e.g. ``lfw:PATH``):

- ``pca``: whitened eigenfaces (Turk & Pentland 1991) of thousands of public faces;
- ``vae``: a convolutional variational autoencoder (Kingma & Welling, ICLR 2014);
- ``gan``: a DCGAN (Radford et al., ICLR 2016; the generator GMI searches, Zhang et al.,
  CVPR 2020, "The Secret Revealer").

A trained prior is a folder: ``prior.json`` (the card: kind, data, people, seed, size,
training time, settings), ``weights.pt`` (the decoder) and ``thumbs.npy`` (a 16 x 13
thumbnail of every training photo, so a prior can prove it never saw a target's
private photo: :meth:`Prior.check_disjoint`). :func:`load_prior` reads it;
:meth:`Prior.space` is the search space MI-Face and the label-only attack use.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.nn import functional as F

from mlinvert.attacks.priors.nets import ConvDecoder, ConvEncoder, LinearDecoder, resample
from mlinvert.attacks.spaces import check_disjoint
from mlinvert.errors import ConfigError, ModelError
from mlinvert.targets._torch import seeded, torch_threads

log = logging.getLogger(__name__)

Kind = Literal["pca", "vae", "gan"]
KINDS: tuple[str, ...] = ("pca", "vae", "gan")
FORMAT = "mlinvert-prior"
VERSION = 1
THUMB = (16, 13)  # (h, w) of the training-photo thumbnails kept for the overlap check
#: Latent size and learning rate when the config leaves them unset.
DEFAULT_LATENT = {"pca": 300, "vae": 64, "gan": 100}
DEFAULT_LR = {"pca": 0.0, "vae": 1e-3, "gan": 2e-4}
#: RMS thumbnail difference below which two photos count as the same photo.
SAME_PHOTO = 0.01

#: ``progress(step, total_steps, metrics)`` during training.
TrainProgress = Callable[[int, int, dict[str, float]], None]


@dataclass(frozen=True, kw_only=True)
class PriorConfig:
    """How to train a prior. ``shape`` (h, w) is the size it learns and draws faces at
    (resampled to the target's input size in an attack); ``latent`` the number of
    latent coordinates (eigenfaces for ``pca``; None: 300 / 64 / 100 for pca / vae /
    gan); ``epochs``, ``batch_size``, ``lr`` (None: 1e-3 for the VAE, 2e-4 for the GAN)
    and ``width`` (channels of the first convolution) for the deep kinds;
    ``vae_sigma`` the VAE's pixel noise (the reconstruction term is
    ``||x - x'||^2 / (2 sigma^2)`` against the KL term); ``mirror`` adds every photo's
    mirror image (pca) or flips half of each batch (vae, gan); ``threads`` torch threads.
    """

    kind: Kind
    shape: tuple[int, int] = (64, 52)
    latent: int | None = None
    epochs: int = 20
    batch_size: int = 64
    lr: float | None = None
    width: int = 32
    vae_sigma: float = 0.1
    mirror: bool = True
    seed: int = 0
    threads: int | None = 1

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in KINDS:
            problems.append(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if len(self.shape) != 2 or min(self.shape) < 8:
            problems.append(f"shape is (h, w) with sides >= 8, got {self.shape}")
        if self.latent is not None and self.latent < 1:
            problems.append(f"latent must be >= 1, got {self.latent}")
        if self.epochs < 1 or self.batch_size < 2:
            problems.append("epochs must be >= 1 and batch_size >= 2")
        if self.lr is not None and not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.width < 8 or self.width % 8:
            problems.append(f"width must be a multiple of 8 (>= 8), got {self.width}")
        if not self.vae_sigma > 0:
            problems.append(f"vae_sigma must be > 0, got {self.vae_sigma}")
        if self.seed < 0 or (self.threads is not None and self.threads < 1):
            problems.append("seed must be >= 0 and threads >= 1 (or None)")
        if problems:
            raise ConfigError("invalid PriorConfig: " + "; ".join(problems))

    @property
    def latent_dim(self) -> int:
        """``latent``, or the kind's default."""
        return self.latent if self.latent is not None else DEFAULT_LATENT[self.kind]

    @property
    def learning_rate(self) -> float:
        """``lr``, or the kind's default."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.kind]

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PriorConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**d, "shape": tuple(d["shape"])})


def _decoder(config: PriorConfig) -> torch.nn.Module:
    if config.kind == "pca":
        return LinearDecoder(config.latent_dim, config.shape)
    return ConvDecoder(config.latent_dim, config.shape, config.width)


def thumbnails(images: np.ndarray) -> np.ndarray:
    """``THUMB``-sized anti-aliased copies of ``images`` ``(n, h, w)``, float32 in [0, 1]
    quantised to 8 bits (what a prior keeps of its training photos)."""
    with torch.no_grad():
        x = resample(torch.as_tensor(np.asarray(images, dtype=np.float32))[:, None], THUMB)
    return np.round(x[:, 0].clamp(0, 1).numpy() * 255.0).astype(np.float32) / 255.0


class Prior:
    """A trained prior: its decoder, its card and its training photos' thumbnails."""

    def __init__(
        self,
        config: PriorConfig,
        decoder: torch.nn.Module,
        card: dict[str, Any],
        thumbs: np.ndarray,
    ) -> None:
        self.config = config
        self.decoder = decoder.eval().requires_grad_(False)
        self.card = card
        self.thumbs = thumbs

    @property
    def kind(self) -> str:
        """pca, vae or gan."""
        return self.config.kind

    @property
    def latent(self) -> int:
        """Number of latent coordinates."""
        return self.config.latent_dim

    def decode(self, z: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        """Images ``(n, h, w)`` float32 in [0, 1] for latent points ``z`` ``(n, latent)``."""
        with torch.no_grad():
            x = self.decoder(torch.as_tensor(np.atleast_2d(z), dtype=torch.float32), size)
        return np.clip(x[:, 0].numpy(), 0.0, 1.0)

    def sample(self, n: int, *, seed: int = 0, size: tuple[int, int] | None = None) -> np.ndarray:
        """``n`` faces drawn from the prior (``z ~ N(0, I)``)."""
        z = np.random.default_rng(seed).standard_normal((n, self.latent))
        return self.decode(z, size)

    def check_disjoint(self, private: np.ndarray) -> None:
        """ConfigError if any of ``private`` (a target's training photos, any size) is one
        of this prior's training photos."""
        private = np.asarray(private, dtype=np.float32)
        if private.shape[1:] != self.config.shape:
            with torch.no_grad():
                private = resample(torch.as_tensor(private)[:, None], self.config.shape)[
                    :, 0
                ].numpy()
        try:
            check_disjoint(self.thumbs, thumbnails(private), tol=SAME_PHOTO)
        except ConfigError as exc:
            raise ConfigError(
                f"the prior {self.card.get('path', '')} was trained on a private training "
                f"photo of the target ({exc}); retrain it on public photos of other people"
            ) from None

    def space(
        self,
        *,
        radius: float | None = 1.0,
        private: np.ndarray | None = None,
        shape: tuple[int, ...] | None = None,
    ) -> Any:
        """The search space of this prior (:class:`PriorSpace`); bound to ``shape`` if
        given (the target's input shape); ``private`` photos are checked when bound."""
        from mlinvert.attacks.priors.space import PriorSpace

        space = PriorSpace(self, radius=radius, private=private)
        return space if shape is None else space.bind(shape)

    def save(self, folder: str | Path) -> Path:
        """Write the prior's folder (card, weights, thumbnails); returns it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.decoder.state_dict(), folder / "weights.pt")
        np.save(folder / "thumbs.npy", np.round(self.thumbs * 255.0).astype(np.uint8))
        size = sum(f.stat().st_size for f in (folder / "weights.pt", folder / "thumbs.npy"))
        self.card = {**self.card, "weights_bytes": size}
        (folder / "prior.json").write_text(json.dumps(self.card, indent=2) + "\n")
        return folder


def load_prior(folder: str | Path) -> Prior:
    """The prior saved in ``folder`` (by ``mlinvert prior train`` or :meth:`Prior.save`)."""
    folder = Path(folder)
    card_path = folder / "prior.json"
    if not card_path.is_file():
        raise ModelError(
            f"{folder} holds no prior.json: pass a folder written by `mlinvert prior train "
            "--out DIR`"
        )
    try:
        card = json.loads(card_path.read_text())
        if card.get("format") != FORMAT:
            raise ValueError(f"format is {card.get('format')!r}, not {FORMAT!r}")
        config = PriorConfig.from_dict(card["config"])
        decoder = _decoder(config)
        decoder.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))
        thumbs = np.load(folder / "thumbs.npy").astype(np.float32) / 255.0
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ModelError(
            f"cannot read the prior in {folder} ({exc}); retrain it with `mlinvert prior train`"
        ) from None
    return Prior(config, decoder, {**card, "path": str(folder)}, thumbs)


def train_prior(
    images: np.ndarray,
    config: PriorConfig,
    *,
    source: str,
    n_people: int,
    private: np.ndarray | None = None,
    progress: TrainProgress | None = None,
) -> Prior:
    """Train a prior on public ``images`` ``(n, h, w)`` in [0, 1] of ``n_people`` people
    (``source`` names the data for the card). ``private`` (a target's training photos)
    are refused if any of them is among ``images``."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 3 or x.shape[0] < 3:
        raise ConfigError(f"a prior needs at least 3 grey images (n, h, w), got {x.shape}")
    if not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0:
        raise ConfigError("a prior's training images must be finite values in [0, 1]")
    if x.shape[0] < config.latent_dim and config.kind == "pca":
        raise ConfigError(
            f"{config.latent_dim} eigenfaces need at least as many photos; got {x.shape[0]} "
            "(lower latent)"
        )
    t0 = time.perf_counter()
    with torch.no_grad():
        data = resample(torch.as_tensor(x)[:, None], config.shape)
    thumbs = thumbnails(data[:, 0].numpy())
    if private is not None:
        check = Prior(config, _decoder(config), {"path": source}, thumbs)
        check.check_disjoint(private)
    with torch_threads(config.threads), seeded(config.seed):
        decoder, metrics = _FIT[config.kind](data, config, progress)
    seconds = time.perf_counter() - t0
    card = {
        "format": FORMAT,
        "version": VERSION,
        "kind": config.kind,
        "config": config.to_dict(),
        "data": {"spec": source, "n_images": int(x.shape[0]), "n_people": int(n_people)},
        "seed": config.seed,
        "parameters": int(sum(p.numel() for p in decoder.parameters())),
        "training_seconds": round(seconds, 1),
        "torch_threads": config.threads,
        "final_metrics": metrics,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    log.info("trained a %s prior in %.0f s: %s", config.kind, seconds, metrics)
    return Prior(config, decoder, card, thumbs)


def _fit_pca(
    data: torch.Tensor, config: PriorConfig, progress: TrainProgress | None
) -> tuple[torch.nn.Module, dict[str, float]]:
    flat = data.flatten(1).double()
    if config.mirror:
        flat = torch.cat([flat, data.flip(-1).flatten(1).double()])
    mean = flat.mean(dim=0)
    centred = flat - mean
    k = min(config.latent_dim, centred.shape[0] - 1, centred.shape[1])
    _, s, v = torch.svd_lowrank(centred, q=min(k + 20, min(centred.shape)), niter=4)
    std = s[:k] / np.sqrt(centred.shape[0] - 1)
    decoder = LinearDecoder(config.latent_dim, config.shape)
    with torch.no_grad():
        decoder.mean.copy_(mean.float())
        decoder.basis[:, :k] = (v[:, :k] * std).float()
    explained = float((s[:k] ** 2).sum() / (centred**2).sum())
    if progress is not None:
        progress(1, 1, {"explained": explained})
    return decoder, {"explained_variance": round(explained, 4), "components": k}


def _batches(n: int, config: PriorConfig) -> int:
    return max(1, n // config.batch_size)


def _flip_half(x: torch.Tensor, config: PriorConfig) -> torch.Tensor:
    if not config.mirror:
        return x
    flip = torch.rand(x.shape[0]) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _fit_vae(
    data: torch.Tensor, config: PriorConfig, progress: TrainProgress | None
) -> tuple[torch.nn.Module, dict[str, float]]:
    d = config.latent_dim
    decoder = ConvDecoder(d, config.shape, config.width)
    encoder = ConvEncoder(config.shape, 2 * d, config.width)
    params = [*decoder.parameters(), *encoder.parameters()]
    opt = torch.optim.Adam(params, lr=config.learning_rate)
    per_epoch = _batches(data.shape[0], config)
    total = config.epochs * per_epoch
    recon_w = 1.0 / (2.0 * config.vae_sigma**2)
    metrics: dict[str, float] = {}
    step = 0
    for _ in range(config.epochs):
        order = torch.randperm(data.shape[0])
        for b in range(per_epoch):
            x = _flip_half(data[order[b * config.batch_size : (b + 1) * config.batch_size]], config)
            mu, logvar = encoder(x).chunk(2, dim=1)
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
            rec = F.mse_loss(decoder(z), x, reduction="none").flatten(1).sum(1).mean()
            kl = 0.5 * (mu**2 + logvar.exp() - 1.0 - logvar).sum(1).mean()
            loss = recon_w * rec + kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            metrics = {
                "rmse": float((rec.detach() / x[0].numel()).sqrt()),
                "kl": float(kl.detach()),
            }
            if progress is not None:
                progress(step, total, metrics)
    return decoder, {k: round(v, 4) for k, v in metrics.items()}


def _fit_gan(
    data: torch.Tensor, config: PriorConfig, progress: TrainProgress | None
) -> tuple[torch.nn.Module, dict[str, float]]:
    d = config.latent_dim
    gen = ConvDecoder(d, config.shape, config.width)
    disc = ConvEncoder(config.shape, 1, config.width, spectral=True)
    opt_g = torch.optim.Adam(gen.parameters(), lr=config.learning_rate, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=config.learning_rate, betas=(0.5, 0.999))
    per_epoch = _batches(data.shape[0], config)
    total = config.epochs * per_epoch
    metrics: dict[str, float] = {}
    step = 0
    for _ in range(config.epochs):
        order = torch.randperm(data.shape[0])
        for b in range(per_epoch):
            real = _flip_half(
                data[order[b * config.batch_size : (b + 1) * config.batch_size]], config
            )
            n = real.shape[0]
            fake = gen(torch.randn(n, d))
            # non-saturating GAN losses (Goodfellow et al., NeurIPS 2014)
            loss_d = F.softplus(-disc(real)).mean() + F.softplus(disc(fake.detach())).mean()
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            loss_g = F.softplus(-disc(fake)).mean()
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            step += 1
            metrics = {"loss_d": float(loss_d.detach()), "loss_g": float(loss_g.detach())}
            if progress is not None:
                progress(step, total, metrics)
    return gen, {k: round(v, 4) for k, v in metrics.items()}


_FIT = {"pca": _fit_pca, "vae": _fit_vae, "gan": _fit_gan}


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """How to adapt a prior to the target's domain with the attacker's in-domain photos of
    other people: ``steps`` of Adam (``lr``) on the decoder and one latent point per
    photo jointly (GLO, Bojanowski et al., ICML 2018), the latents pulled to the prior
    by ``latent_weight * ||z||^2 / 2``; ``mirror`` adds each photo's mirror image.

    ``train`` names the decoder parameters that adapt (prefixes of their names, e.g.
    ``("mean",)`` for the eigenface prior's offset only: fewer free dimensions, the
    public basis kept); empty: all. ``holdout`` > 0 keeps that fraction of the photos
    (of the people, when the photos' groups are given) out of the fit and stops where
    their reconstruction error, latent points fitted to the current decoder, is lowest
    (checked every ``check_every`` steps; step 0, the prior itself, is a candidate).
    """

    steps: int = 300
    lr: float = 1e-3
    latent_weight: float = 1e-3
    mirror: bool = True
    train: tuple[str, ...] = ()
    holdout: float = 0.0
    check_every: int = 10
    seed: int = 0
    threads: int | None = 1

    def __post_init__(self) -> None:
        if (
            self.steps < 1
            or not self.lr > 0
            or self.latent_weight < 0
            or self.seed < 0
            or not 0.0 <= self.holdout < 1.0
            or self.check_every < 1
        ):
            raise ConfigError(
                "invalid FinetuneConfig: steps >= 1, lr > 0, latent_weight >= 0, seed >= 0, "
                f"0 <= holdout < 1 and check_every >= 1 expected, got {self}"
            )


def finetune_prior(
    prior: Prior,
    images: np.ndarray,
    config: FinetuneConfig,
    *,
    source: str,
    private: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> Prior:
    """``prior`` adapted to in-domain ``images`` ``(n, h, w)`` of *other* people (a new
    Prior; ``prior`` is unchanged). Each photo starts at its nearest latent point (the
    space's ``encode``); the decoder's ``config.train`` parameters and the latent points
    then descend the squared reconstruction error together. ``groups`` (one person id per
    photo) makes the held-out part whole people. ``private`` photos are refused as in
    :func:`train_prior`; the card adds what the prior was adapted to."""
    import copy

    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 3 or x.shape[0] < 2:
        raise ConfigError(f"fine-tuning needs at least 2 grey images (n, h, w), got {x.shape}")
    if groups is not None and len(groups) != len(x):
        raise ConfigError(f"groups has {len(groups)} entries for {len(x)} images")
    if private is not None:
        prior.check_disjoint(private)
        check_disjoint(
            thumbnails(x), thumbnails(np.asarray(private, dtype=np.float32)), tol=SAME_PHOTO
        )
    t0 = time.perf_counter()
    with torch.no_grad():
        data = resample(torch.as_tensor(x)[:, None], prior.config.shape)
    decoder = copy.deepcopy(prior.decoder).train()
    params = _trainable(decoder, config.train)
    with torch_threads(config.threads), seeded(config.seed):
        fit, held = _split(len(x), groups, config)
        stats = _glo(prior, decoder, params, _mirrored(data[fit], config), data[held], config)
    card = {
        **prior.card,
        "finetuned": {
            "data": source,
            "n_images": int(x.shape[0]),
            "n_fit": len(fit),
            "n_heldout": len(held),
            "config": asdict(config),
            **stats,
            "seconds": round(time.perf_counter() - t0, 1),
        },
    }
    thumbs = np.concatenate([prior.thumbs, thumbnails(data[:, 0].numpy())])
    return Prior(prior.config, decoder, card, thumbs)


def _trainable(decoder: torch.nn.Module, names: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """The decoder's parameters named by ``names`` (prefixes; empty: all) set to learn,
    the others frozen; ConfigError naming the choices if a name matches nothing."""
    named = dict(decoder.named_parameters())
    unknown = [n for n in names if not any(k.startswith(n) for k in named)]
    if unknown:
        raise ConfigError(
            f"the prior's decoder has no parameters named {', '.join(unknown)}; choose "
            f"among {', '.join(sorted(named))} (or none: all of them)"
        )
    keep = [k for k in named if not names or any(k.startswith(n) for n in names)]
    for k, p in named.items():
        p.requires_grad_(k in keep)
    return [named[k] for k in keep]


def _split(n: int, groups: np.ndarray | None, config: FinetuneConfig) -> tuple[Any, Any]:
    """Indices fitted and held out (``config.holdout`` of the photos, or of the groups)."""
    rng = np.random.default_rng(config.seed)
    if config.holdout == 0.0:
        return np.arange(n), np.arange(0)
    ids = np.asarray(groups) if groups is not None else np.arange(n)
    unique = np.unique(ids)
    n_held = min(len(unique) - 1, max(1, round(config.holdout * len(unique))))
    if n_held < 1:
        raise ConfigError("holdout needs photos of at least 2 people (or 2 photos) to split")
    held = np.isin(ids, rng.choice(unique, size=n_held, replace=False))
    return np.flatnonzero(~held), np.flatnonzero(held)


def _mirrored(data: torch.Tensor, config: FinetuneConfig) -> torch.Tensor:
    return torch.cat([data, data.flip(-1)]) if config.mirror else data


def _glo(
    prior: Prior,
    decoder: torch.nn.Module,
    params: list[torch.nn.Parameter],
    data: torch.Tensor,
    held: torch.Tensor,
    config: FinetuneConfig,
) -> dict[str, Any]:
    """GLO steps on ``decoder`` (in place); with ``held`` photos, the decoder of the lowest
    held-out error is restored at the end. Returns the card's figures."""
    import copy

    space = prior.space(radius=None, shape=prior.config.shape)
    z = torch.as_tensor(space.encode(data[:, 0].numpy()), dtype=torch.float32)
    opt = torch.optim.Adam([*params, z.requires_grad_(True)], lr=config.lr)
    zh = torch.zeros(0, z.shape[1])
    if len(held):
        zh = torch.as_tensor(space.encode(held[:, 0].numpy()), dtype=torch.float32)
    opt_h = torch.optim.Adam([zh.requires_grad_(True)], lr=config.lr)
    best: tuple[float, int, dict[str, torch.Tensor] | None] = (np.inf, 0, None)

    def error(codes: torch.Tensor, photos: torch.Tensor) -> torch.Tensor:
        return ((decoder(codes) - photos) ** 2).flatten(1).sum(1).mean()

    for step in range(config.steps + 1):
        if len(held):
            rec_h = error(zh, held)
            checked = step % config.check_every == 0 or step == config.steps
            if checked and float(rec_h.detach()) < best[0]:
                best = (float(rec_h.detach()), step, copy.deepcopy(decoder.state_dict()))
            (zh.grad,) = torch.autograd.grad(rec_h + _penalty(zh, config), [zh])
            opt_h.step()
        if step == config.steps:
            break
        rec = error(z, data)
        opt.zero_grad(set_to_none=True)
        (rec + _penalty(z, config)).backward()
        opt.step()
    stats: dict[str, Any] = {"rmse": round(float((rec.detach() / data[0].numel()).sqrt()), 4)}
    if best[2] is not None:
        decoder.load_state_dict(best[2])
        stats["heldout_rmse"] = round(float(np.sqrt(best[0] / held[0].numel())), 4)
        stats["stopped_at"] = best[1]
    decoder.eval().requires_grad_(False)
    return stats


def _penalty(z: torch.Tensor, config: FinetuneConfig) -> torch.Tensor:
    return config.latent_weight * 0.5 * (z**2).sum(1).mean()
