"""The DP-SGD engine (torch): per-example clipping without per-example gradients,
Poisson sampling, Gaussian noise; the settings and the accountant live in
:mod:`mlinvert.targets.dp` (Abadi et al., CCS 2016)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mlinvert.errors import ConfigError
from mlinvert.targets.dp import (
    DPConfig,
    PrivacySpent,
    StageSpent,
    accountant_name,
    default_delta,
    epsilon_composed,
    epsilon_spent,
    noise_for_schedule,
)

log = logging.getLogger(__name__)

#: A per-batch input transformation (data augmentation) applied before clipping.
Augment = Callable[[torch.Tensor], torch.Tensor]

#: ``loss(output, y)``: the network's output on a batch and the batch's targets -> the
#: **sum** over the batch of per-example losses, example ``i``'s depending on row ``i`` of
#: the output and of ``y`` only (so each example has a gradient of its own to clip).
Loss = Callable[[Any, torch.Tensor], torch.Tensor]


def cross_entropy_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default :data:`Loss`: summed cross-entropy of logits against class labels."""
    return F.cross_entropy(logits, y, reduction="sum")


#: Examples whose per-example gradients are materialised at once (general path).
_CHUNK = 32


def _linear_layers(net: nn.Module) -> list[nn.Linear] | None:
    """The Linear layers of ``net`` if they hold every trainable parameter, else None."""
    layers = [
        m
        for m in net.modules()
        if isinstance(m, nn.Linear) and any(p.requires_grad for p in m.parameters())
    ]
    covered = {id(p) for m in layers for p in m.parameters()}
    other = [n for n, p in net.named_parameters() if p.requires_grad and id(p) not in covered]
    return None if other or not layers else layers


def clipped_gradient_sum(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float, loss: Loss = cross_entropy_sum
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sum over the batch of each example's gradient of ``loss`` (default cross-entropy;
    see :data:`Loss`) clipped to norm ``clip``.

    Returns the sums in the order of ``net.parameters()`` (trainable only) and the
    per-example gradient norms before clipping ``(n,)``. A network that trains only
    ``nn.Linear`` layers, each applied once to ``(n, d)`` inputs, is clipped by the
    ghost-norm identity (no per-example gradient is materialised; see
    :mod:`mlinvert.targets.dp`); any other network (convolutions) by per-example
    gradients from ``torch.func``, a chunk of examples at a time.
    """
    layers = _linear_layers(net)
    if layers is None:
        return _per_example_clipped_sum(net, x, y, clip, loss)
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
        total = loss(net(x), y)
    finally:
        for h in hooks:
            h.remove()
    missing = [layer for layer in layers if layer not in seen]
    if missing:
        raise ConfigError(
            f"DP-SGD per-example clipping: {len(missing)} trainable Linear layer(s) were not "
            "used by the forward pass; freeze them (requires_grad False) or leave them out"
        )
    outputs = [seen[layer][1] for layer in layers]
    deltas = torch.autograd.grad(total, outputs)
    norm2 = torch.zeros(x.shape[0], dtype=total.dtype)
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
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float, loss: Loss = cross_entropy_sum
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
        return loss(out, yi[None])

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
    loss: Loss = cross_entropy_sum,
    what: str = "dp-sgd",
) -> None:
    """Run ``steps`` DP-SGD steps on ``net`` in place (torch's global generator draws the
    batches and the noise: call it inside :func:`mlinvert.targets._torch.seeded`).

    ``augment`` transforms each sampled batch first (shifts, brightness): every example
    still contributes one clipped gradient, of its own transformed copy. ``loss`` (see
    :data:`Loss`) takes ``net``'s output and the rows of ``y`` (any tensor with one row per
    example: labels, or the images a decoder rebuilds)."""
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
            sums, _ = clipped_gradient_sum(net, xb, y[idx], clip, loss)
        else:  # an empty Poisson batch still releases (pure) noise
            sums = [torch.zeros_like(p) for p in params]
        for p, s in zip(params, sums, strict=True):
            p.grad = (s + torch.randn_like(s) * std) / expected
        opt.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log.info("%s step %d/%d batch %d", what, step + 1, steps, idx.numel())


def _delta_for(config: DPConfig, n: int) -> float:
    delta = default_delta(n) if config.delta is None else config.delta
    if delta >= 1.0 / n:
        raise ConfigError(
            f"DP delta {delta} is not below 1/n = {1.0 / n:.3g} for {n} training examples; "
            "such a delta allows publishing a whole example — use a smaller delta"
        )
    return delta


def train_dp(
    net: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    config: DPConfig,
    *,
    augment: Augment | None = None,
) -> PrivacySpent:
    """Train ``net`` by DP-SGD to the privacy target of ``config``; what it spent."""
    if config.stages:
        raise ConfigError(
            "per-stage DP schedules (DPConfig.stages) are for models trained in stages "
            "(the dae); this model trains in one stage — leave stages empty"
        )
    n = int(X.shape[0])
    delta = _delta_for(config, n)
    sample_rate = min(1.0, config.batch_size / n)
    steps = max(1, round(config.epochs / sample_rate))
    sigma = noise_for_schedule(config.epsilon, delta, [(sample_rate, steps)])
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


class StagedDP:
    """DP-SGD over several training stages on the same ``n`` private examples, with one
    noise multiplier chosen up front so that the **composed** epsilon of all stages is at
    most ``config.epsilon`` (:func:`mlinvert.targets.dp.noise_for_schedule`).

    ``stages`` names the stages in the order they run; each takes its schedule from
    ``config.stage(name)``; a name in ``config.stages`` that is not one of them is a
    ConfigError. Call :meth:`run` once per stage, in order (a stage of 0 epochs is
    skipped and spends nothing), then :meth:`spent`. Each stage may train on what the
    earlier ones learned (RDP composes adaptively), but every row of a stage's inputs
    must come from its own private example only.
    """

    def __init__(self, config: DPConfig, n: int, stages: Sequence[str]) -> None:
        unknown = sorted({s.name for s in config.stages} - set(stages))
        if unknown:
            raise ConfigError(
                f"unknown DP stage(s) {unknown}; this model trains in the stages "
                f"{', '.join(stages)}"
            )
        self.config = config
        self.n = n
        self.delta = _delta_for(config, n)
        self.schedule = [config.stage(name) for name in stages]
        self.rates = [min(1.0, s.batch_size / n) for s in self.schedule]
        self.steps = [
            0 if s.epochs == 0 else max(1, round(s.epochs / q))
            for s, q in zip(self.schedule, self.rates, strict=True)
        ]
        self.noise_multiplier = noise_for_schedule(
            config.epsilon, self.delta, list(zip(self.rates, self.steps, strict=True))
        )
        self._next = 0
        log.info(
            "DP-SGD in %d stages: epsilon %.3g delta %.3g -> noise multiplier %.4f (%s)",
            len(self.schedule),
            config.epsilon,
            self.delta,
            self.noise_multiplier,
            ", ".join(
                f"{s.name}: q {q:.4f}, {k} steps"
                for s, q, k in zip(self.schedule, self.rates, self.steps, strict=True)
            ),
        )

    def run(
        self,
        name: str,
        net: nn.Module,
        X: torch.Tensor,
        y: torch.Tensor,
        *,
        loss: Loss,
        augment: Augment | None = None,
    ) -> None:
        """Run stage ``name`` (the next one in order) on ``net`` with inputs ``X`` and
        targets ``y``, both one row per private example (see :func:`dp_sgd`)."""
        if self._next >= len(self.schedule) or self.schedule[self._next].name != name:
            expected = self.schedule[self._next].name if self._next < len(self.schedule) else "none"
            raise ConfigError(f"DP stage {name!r} run out of order; next is {expected}")
        if X.shape[0] != self.n or y.shape[0] != self.n:
            raise ConfigError(
                f"DP stage {name!r} needs one row per private example ({self.n}), "
                f"got {X.shape[0]} inputs and {y.shape[0]} targets"
            )
        stage, q, steps = self.schedule[self._next], self.rates[self._next], self.steps[self._next]
        self._next += 1
        if steps == 0:
            log.info("DP stage %s skipped (0 epochs)", name)
            return
        dp_sgd(
            net,
            X,
            y,
            noise_multiplier=self.noise_multiplier,
            clip=stage.clip,
            sample_rate=q,
            steps=steps,
            lr=stage.lr,
            momentum=stage.momentum,
            augment=augment,
            loss=loss,
            what=f"dp-sgd {name}",
        )

    def spent(self) -> PrivacySpent:
        """The composed privacy spent by all stages; ConfigError if one has not run."""
        if self._next != len(self.schedule):
            raise ConfigError(
                f"DP stages not all run: {self.schedule[self._next].name!r} and later are missing"
            )
        sigma = self.noise_multiplier
        active = list(zip(self.schedule, self.rates, self.steps, strict=True))
        ran = [(s, q) for s, q, k in active if k]  # at least one: the noise search checks
        return PrivacySpent(
            epsilon=epsilon_composed(sigma, [(q, k) for _, q, k in active], self.delta),
            delta=self.delta,
            noise_multiplier=sigma,
            clip=max(s.clip for s, _ in ran),
            sample_rate=max(q for _, q in ran),
            steps=sum(self.steps),
            accountant=accountant_name(),
            stages=tuple(
                StageSpent(
                    name=s.name,
                    clip=s.clip,
                    sample_rate=q,
                    steps=k,
                    lr=s.lr,
                    momentum=s.momentum,
                    epsilon_alone=epsilon_spent(sigma, q, k, self.delta) if k else 0.0,
                )
                for s, q, k in active
            ),
        )
