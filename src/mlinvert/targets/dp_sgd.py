"""The DP-SGD engine (torch): per-example clipping without per-example gradients,
Poisson sampling, Gaussian noise; the settings and the accountant live in
:mod:`mlinvert.targets.dp` (Abadi et al., CCS 2016)."""

from __future__ import annotations

import logging

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


def _linear_layers(net: nn.Module) -> list[nn.Linear]:
    """The Linear layers of ``net``; ConfigError if any other parameter is trainable."""
    layers = [m for m in net.modules() if isinstance(m, nn.Linear)]
    covered = {id(p) for m in layers for p in m.parameters()}
    other = [n for n, p in net.named_parameters() if p.requires_grad and id(p) not in covered]
    if other or not layers:
        raise ConfigError(
            "this DP-SGD implementation clips per-example gradients of nn.Linear layers "
            f"only; the network also trains {other[:3]}"
        )
    return layers


def clipped_gradient_sum(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sum over the batch of each example's cross-entropy gradient clipped to norm ``clip``.

    Returns the sums in the order of ``net.parameters()`` (trainable only) and the
    per-example gradient norms before clipping ``(n,)``. ``net`` must train only
    ``nn.Linear`` layers, each applied once to ``(n, d)`` inputs (see
    :mod:`mlinvert.targets.dp`).
    """
    layers = _linear_layers(net)
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
) -> None:
    """Run ``steps`` DP-SGD steps on ``net`` in place (torch's global generator draws the
    batches and the noise: call it inside :func:`mlinvert.targets._torch.seeded`)."""
    n = X.shape[0]
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    expected = sample_rate * n
    std = noise_multiplier * clip
    for step in range(steps):
        idx = torch.nonzero(torch.rand(n) < sample_rate).flatten()
        if idx.numel():
            sums, _ = clipped_gradient_sum(net, X[idx], y[idx], clip)
        else:  # an empty Poisson batch still releases (pure) noise
            sums = [torch.zeros_like(p) for p in params]
        for p, s in zip(params, sums, strict=True):
            p.grad = (s + torch.randn_like(s) * std) / expected
        opt.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log.info("dp-sgd step %d/%d batch %d", step + 1, steps, idx.numel())


def train_dp(net: nn.Module, X: torch.Tensor, y: torch.Tensor, config: DPConfig) -> PrivacySpent:
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
