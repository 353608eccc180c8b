"""The DP-SGD engine (torch): per-example clipping without per-example gradients,
Poisson sampling, Gaussian noise; the settings and the accountant live in
:mod:`mlinvert.targets.dp` (Abadi et al., CCS 2016)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from mlinvert.errors import ConfigError
from mlinvert.targets.dp import (
    DPConfig,
    PrivacySpent,
    accountant_name,
    default_delta,
    epsilon_spent,
    noise_for,
)

log = logging.getLogger(__name__)

#: A per-batch input transformation (data augmentation) applied before clipping.
Augment = Callable[[torch.Tensor], torch.Tensor]


#: Examples whose per-example gradients are materialised at once (general path).
_CHUNK = 32


def _linear_layers(net: nn.Module) -> list[nn.Linear] | None:
    """The Linear layers of ``net`` if they hold every trainable parameter, else None."""
    layers = [m for m in net.modules() if isinstance(m, nn.Linear)]
    covered = {id(p) for m in layers for p in m.parameters()}
    other = [n for n, p in net.named_parameters() if p.requires_grad and id(p) not in covered]
    return None if other or not layers else layers


def clipped_gradient_sum(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sum over the batch of each example's cross-entropy gradient clipped to norm ``clip``.

    Returns the sums in the order of ``net.parameters()`` (trainable only) and the
    per-example gradient norms before clipping ``(n,)``. A network that trains only
    ``nn.Linear`` layers, each applied once to ``(n, d)`` inputs, is clipped by the
    ghost-norm identity (no per-example gradient is materialised; see
    :mod:`mlinvert.targets.dp`); any other network (convolutions) by per-example
    gradients from ``torch.func``, a chunk of examples at a time.
    """
    layers = _linear_layers(net)
    if layers is None:
        return _per_example_clipped_sum(net, x, y, clip)
    seen: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if args[0].ndim != 2:
            raise ConfigError(
                f"DP-SGD per-example clipping needs (n, d) inputs to every Linear layer, "
                f"got shape {tuple(args[0].shape)}"
            )
        assert isinstance(module, nn.Linear)
        if module in seen:
            raise ConfigError("DP-SGD per-example clipping needs each Linear layer used once")
        seen[module] = (args[0].detach(), output)

    hooks = [layer.register_forward_hook(keep) for layer in layers]
    try:
        loss = F.cross_entropy(net(x), y, reduction="sum")
    finally:
        for h in hooks:
            h.remove()
    outputs = [seen[layer][1] for layer in layers]
    deltas = torch.autograd.grad(loss, outputs)
    norm2 = torch.zeros(x.shape[0], dtype=loss.dtype)
    for layer, d in zip(layers, deltas, strict=True):
        a = seen[layer][0]
        extra = 1.0 if layer.bias is not None else 0.0
        norm2 = norm2 + d.pow(2).sum(1) * (a.pow(2).sum(1) + extra)
    norms = norm2.sqrt()
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    grads: dict[int, torch.Tensor] = {}
    for layer, d in zip(layers, deltas, strict=True):
        cd = d * factor[:, None]
        grads[id(layer.weight)] = cd.T @ seen[layer][0]
        if layer.bias is not None:
            grads[id(layer.bias)] = cd.sum(0)
    params = [p for p in net.parameters() if p.requires_grad]
    return [grads[id(p)] for p in params], norms


def _per_example_clipped_sum(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """:func:`clipped_gradient_sum` by explicit per-example gradients (vmap of grad).

    Batch normalisation mixes the examples of a batch, so no example has a gradient of
    its own: such networks are refused. Dropout draws independently per example.
    """
    from torch.func import functional_call, grad, vmap

    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        raise ConfigError(
            "DP-SGD needs per-example gradients, and batch normalisation mixes the "
            "examples of a batch: train a network without BatchNorm layers"
        )
    params = {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}
    names = list(params)
    frozen = {n: p.detach() for n, p in net.named_parameters() if not p.requires_grad}
    buffers = dict(net.named_buffers())

    def loss_one(ps: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(net, ({**ps, **frozen}, buffers), (xi[None],))
        return F.cross_entropy(out, yi[None], reduction="sum")

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="different")
    sums = {n: torch.zeros_like(params[n]) for n in names}
    norms = []
    for start in range(0, x.shape[0], _CHUNK):
        g = per_example(params, x[start : start + _CHUNK], y[start : start + _CHUNK])
        norm = torch.sqrt(sum(g[n].flatten(1).pow(2).sum(1) for n in names))
        factor = (clip / (norm + 1e-6)).clamp(max=1.0)
        for n in names:
            sums[n] += torch.tensordot(factor, g[n], dims=1)
        norms.append(norm)
    return [sums[n] for n in names], torch.cat(norms)


def dp_sgd(
    net: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    noise_multiplier: float,
    clip: float,
    sample_rate: float,
    steps: int,
    lr: float,
    momentum: float,
    augment: Augment | None = None,
) -> None:
    """Run ``steps`` DP-SGD steps on ``net`` in place (torch's global generator draws the
    batches and the noise: call it inside :func:`mlinvert.targets._torch.seeded`).

    ``augment`` transforms each sampled batch first (shifts, brightness): every example
    still contributes one clipped gradient, of its own transformed copy."""
    net.train()
    n = X.shape[0]
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    expected = sample_rate * n
    std = noise_multiplier * clip
    for step in range(steps):
        idx = torch.nonzero(torch.rand(n) < sample_rate).flatten()
        if idx.numel():
            xb = X[idx] if augment is None else augment(X[idx])
            sums, _ = clipped_gradient_sum(net, xb, y[idx], clip)
        else:  # an empty Poisson batch still releases (pure) noise
            sums = [torch.zeros_like(p) for p in params]
        for p, s in zip(params, sums, strict=True):
            p.grad = (s + torch.randn_like(s) * std) / expected
        opt.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log.info("dp-sgd step %d/%d batch %d", step + 1, steps, idx.numel())


def train_dp(
    net: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    config: DPConfig,
    *,
    augment: Augment | None = None,
) -> PrivacySpent:
    """Train ``net`` by DP-SGD to the privacy target of ``config``; what it spent."""
    n = int(X.shape[0])
    delta = default_delta(n) if config.delta is None else config.delta
    if delta >= 1.0 / n:
        raise ConfigError(
            f"DP delta {delta} is not below 1/n = {1.0 / n:.3g} for {n} training examples; "
            "such a delta allows publishing a whole example — use a smaller delta"
        )
    sample_rate = min(1.0, config.batch_size / n)
    steps = max(1, round(config.epochs / sample_rate))
    sigma = noise_for(config.epsilon, delta, sample_rate, steps)
    log.info(
        "DP-SGD: epsilon %.3g delta %.3g -> noise multiplier %.4f (q %.4f, %d steps)",
        config.epsilon,
        delta,
        sigma,
        sample_rate,
        steps,
    )
    dp_sgd(
        net,
        X,
        y,
        noise_multiplier=sigma,
        clip=config.clip,
        sample_rate=sample_rate,
        steps=steps,
        lr=config.lr,
        momentum=config.momentum,
        augment=augment,
    )
    return PrivacySpent(
        epsilon=epsilon_spent(sigma, sample_rate, steps, delta),
        delta=delta,
        noise_multiplier=sigma,
        clip=config.clip,
        sample_rate=sample_rate,
        steps=steps,
        accountant=accountant_name(),
    )
