"""Shared machinery of the torch face recognisers (scikit-learn conventions).

A :class:`TorchTarget` takes grey images ``(n, h, w)`` float32 in [0, 1]. Its network
starts with a fixed :class:`Standardise` layer (training-set pixel mean and standard
deviation, stored with the weights), so normalisation lives inside the model and
gradients are taken w.r.t. the raw [0, 1] pixels. Randomness comes from the config's
``seed`` inside :func:`torch.random.fork_rng`, so nothing is seeded globally.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Self

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mlinvert.errors import ConfigError, DataError, ModelError, NotFittedError
from mlinvert.targets.dp import PUBLIC_PIXEL_STATS, PrivacySpent, config_dict

log = logging.getLogger(__name__)

#: Largest batch pushed through a network at once when predicting (bounds memory).
PREDICT_CHUNK = 256


class Standardise(nn.Module):
    """``(x - mean) / std`` with the training set's scalar pixel statistics (buffers)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([float(mean)]))
        self.register_buffer("std", torch.tensor([float(std)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standardise a batch."""
        return (x - self.mean) / self.std


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's CPU generator set to ``seed``, restoring it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` torch intra-op threads (None: leave as is), then restore.

    On a shared machine one thread per training job is several times faster than two
    threads that fight other jobs for the cores (measured here: 6-10x).
    """
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_seed(seed: object) -> None:
    """ConfigError unless ``seed`` is a non-negative int."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int, got {seed!r}")


def check_positive(**values: float) -> None:
    """ConfigError naming the first value that is not > 0."""
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{name} must be > 0, got {value!r}")


def check_nonnegative(**values: float) -> None:
    """ConfigError naming the first value that is < 0."""
    for name, value in values.items():
        if not value >= 0:
            raise ConfigError(f"{name} must be >= 0, got {value!r}")


def check_images(X: Any, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Return ``X`` as float32 ``(n, h, w)``; DataError naming the problem otherwise."""
    x = np.asarray(X)
    if x.ndim != 3:
        raise DataError(f"expected a batch of grey images (n, h, w), got shape {x.shape}")
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise DataError(
            f"this model takes images of shape {tuple(shape)}, got {tuple(x.shape[1:])}; "
            "resize the images or train a model on data of this size"
        )
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"images must be numbers, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise DataError("images contain NaN or infinity")
    return x


def augment(x: torch.Tensor, *, shift: int, flip: bool, brightness: float) -> torch.Tensor:
    """Random small shifts (replicate padding), horizontal flips and brightness/contrast.

    ``x`` is ``(n, h, w)`` in [0, 1]; the result stays in [0, 1].
    """
    n, h, w = x.shape
    if shift > 0:
        s = min(shift, h // 8, w // 8)
        if s > 0:
            padded = F.pad(x[:, None], (s, s, s, s), mode="replicate")[:, 0]
            dy = torch.randint(0, 2 * s + 1, (n,))
            dx = torch.randint(0, 2 * s + 1, (n,))
            rows = (dy[:, None] + torch.arange(h)[None, :])[:, :, None]
            cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, :]
            x = padded[torch.arange(n)[:, None, None], rows, cols]
    if flip:
        mask = torch.rand(n) < 0.5
        x = torch.where(mask[:, None, None], x.flip(-1), x)
    if brightness > 0:
        gain = 1.0 + (torch.rand(n, 1, 1) * 2 - 1) * brightness
        offset = (torch.rand(n, 1, 1) * 2 - 1) * brightness / 2
        x = (x * gain + offset).clamp(0.0, 1.0)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of ``x`` ``(n, h, w)`` with its own Gaussian ``sigma`` ``(n,)`` (pixels;
    0 leaves the image unchanged). Separable kernels, replicate padding."""
    n = x.shape[0]
    radius = int(torch.ceil(3.0 * sigma.max()).item()) if n else 0
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    s = sigma.clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (t[None, :] / s) ** 2)
    k = k / k.sum(dim=1, keepdim=True)
    k = torch.where((sigma > 0)[:, None], k, (t == 0).to(x.dtype)[None, :])
    # grouped convolution: one channel (and one kernel) per image
    y = F.pad(x[None], (radius, radius, 0, 0), mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=n)
    y = F.pad(y, (0, 0, radius, radius), mode="replicate")
    y = F.conv2d(y, k[:, None, :, None], groups=n)
    return y[0]


def same_identity_mix(
    x: torch.Tensor, y: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, p: float, max_n: int
) -> torch.Tensor:
    """With probability ``p``, replace an image by the mean of itself and 1..``max_n - 1``
    random training images ``X`` of the same label (an identity's "average face")."""
    out = x.clone()
    for i in torch.nonzero(torch.rand(x.shape[0]) < p).flatten().tolist():
        same = torch.nonzero(y[i] == Y).flatten()
        k = int(torch.randint(1, max(max_n, 2), (1,)))
        pick = same[torch.randint(0, same.numel(), (k,))]
        out[i] = (x[i] + X[pick].sum(dim=0)) / (k + 1)
    return out


def adam_train(
    params: list[nn.Parameter],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    what: str,
) -> None:
    """Mini-batch Adam (decoupled weight decay) with a cosine learning-rate schedule."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n = X.shape[0]
    steps_per_epoch = max(1, -(-n // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for epoch in range(epochs):
        order = torch.randperm(n)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(X[idx], y[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * idx.numel()
        if epoch % 10 == 0 or epoch == epochs - 1:
            log.info("%s epoch %d/%d loss %.4f", what, epoch + 1, epochs, total / n)


class TorchTarget:
    """Base of the torch face recognisers: fit/predict_proba/class_gradient and state.

    Subclasses set ``kind`` and ``config_cls`` and implement :meth:`_build` (the
    network from input shape and class count) and :meth:`_train`. ``threads`` is the
    number of torch threads used while fitting (restored afterwards; None keeps
    torch's setting); predictions use torch's setting. ``privacy_`` is what DP training
    spent (:class:`~mlinvert.targets.dp.PrivacySpent`), None for a model trained without DP.
    """

    kind: ClassVar[str]
    config_cls: ClassVar[type]

    def __init__(self, config: Any = None, *, threads: int | None = 1) -> None:
        self.threads = threads
        self.config = self.config_cls() if config is None else config
        if not isinstance(self.config, self.config_cls):
            raise ConfigError(
                f"{type(self).__name__} needs a {self.config_cls.__name__}, "
                f"got {type(self.config).__name__}"
            )
        self.class_names_: tuple[str, ...] = ()
        self.classes_: np.ndarray = np.empty(0, dtype=np.int64)
        self.input_shape_: tuple[int, int] = (0, 0)
        self.net_: nn.Module | None = None
        self.privacy_: PrivacySpent | None = None

    # -- to implement -------------------------------------------------------------
    def _build(self, shape: tuple[int, int], n_classes: int, mean: float, std: float) -> nn.Module:
        """The network: ``(n, h, w)`` raw pixels -> ``(n, k)`` logits."""
        raise NotImplementedError

    def _train(self, net: nn.Module, X: torch.Tensor, y: torch.Tensor) -> None:
        """Fit ``net`` in place (inside a seeded context)."""
        raise NotImplementedError

    def _pixel_stats(self, x: np.ndarray) -> tuple[float, float]:
        """Mean and std for the Standardise layer: the training set's, or fixed public
        values when the config asks for DP training (the statistics are private data)."""
        if getattr(self.config, "dp", None) is not None:
            return PUBLIC_PIXEL_STATS
        return float(x.mean()), float(x.std()) or 1.0

    # -- scikit-learn face ------------------------------------------------------------
    def fit(
        self, X: np.ndarray, y: np.ndarray, *, class_names: tuple[str, ...] | None = None
    ) -> Self:
        """Train on images ``X`` ``(n, h, w)`` in [0, 1] and labels ``y`` (0 .. k-1)."""
        x = check_images(X)
        labels = np.asarray(y)
        if labels.shape != (x.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"y must hold one integer label per image, got shape {labels.shape}")
        if labels.min(initial=0) < 0:
            raise DataError("labels must be 0 .. k-1")
        k = int(labels.max()) + 1 if class_names is None else len(class_names)
        if labels.max() >= k:
            raise DataError(f"labels reach {int(labels.max())} but only {k} class names given")
        if k < 2:
            raise DataError("need at least 2 classes to train a classifier")
        names = tuple(str(i) for i in range(k)) if class_names is None else tuple(class_names)
        shape = (int(x.shape[1]), int(x.shape[2]))
        self.privacy_ = None
        with seeded(self.config.seed), torch_threads(self.threads):
            net = self._build(shape, k, *self._pixel_stats(x))
            net.train()
            self._train(net, torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64)))
        net.eval()
        self.net_ = net
        self.class_names_ = names
        self.classes_ = np.arange(k, dtype=np.int64)
        self.input_shape_ = shape
        return self

    def _check_fitted(self) -> nn.Module:
        if self.net_ is None:
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet; call fit(X, y) or load a "
                "trained model folder with mlinvert.targets.load(path)"
            )
        return self.net_

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._check_fitted()(x)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, k)`` float64."""
        self._check_fitted()
        # torch refuses to wrap a read-only array quietly (a request body decoded by
        # np.frombuffer is one): copy only those
        x = np.require(check_images(X, self.input_shape_), requirements="W")
        out = []
        with torch.no_grad():
            for start in range(0, x.shape[0], PREDICT_CHUNK):
                chunk = torch.from_numpy(x[start : start + PREDICT_CHUNK])
                out.append(torch.softmax(self._logits(chunk), dim=1).double().numpy())
        return np.concatenate(out) if out else np.empty((0, len(self.classes_)))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Most likely class index per image (int64)."""
        return self.predict_proba(X).argmax(axis=1).astype(np.int64)

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        """Accuracy on ``(X, y)``."""
        return float((self.predict(X) == np.asarray(y)).mean())

    def class_gradient(self, X: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Gradient of the softmax probability of ``labels`` w.r.t. the pixels (autograd)."""
        self._check_fitted()
        x = torch.from_numpy(check_images(X, self.input_shape_).copy()).requires_grad_(True)
        lab = self._check_labels(labels, x.shape[0])
        p = torch.softmax(self._logits(x), dim=1)
        # only d p / d x: backward() would also compute (and accumulate) every weight's
        # gradient, 20x the cost for the 3000-unit MLP
        (grad,) = torch.autograd.grad(p[torch.arange(x.shape[0]), lab].sum(), x)
        return grad.double().numpy()

    def _check_labels(self, labels: np.ndarray, n: int) -> torch.Tensor:
        lab = np.asarray(labels)
        if lab.ndim == 0:
            lab = np.full(n, int(lab))
        if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer):
            raise DataError(f"labels must be {n} class indices, got {lab.shape} {lab.dtype}")
        if lab.min() < 0 or lab.max() >= len(self.classes_):
            raise DataError(f"labels must lie in 0 .. {len(self.classes_) - 1}")
        return torch.from_numpy(lab.astype(np.int64))

    # -- model folders -------------------------------------------------------------
    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Tensors (the network's state dict) and JSON parameters for a model folder."""
        net = self._check_fitted()
        tensors = {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}
        params = {
            "config": config_dict(self.config),
            "class_names": list(self.class_names_),
            "input_shape": list(self.input_shape_),
        }
        if self.privacy_ is not None:
            params["privacy"] = self.privacy_.to_dict()
        return tensors, params

    @classmethod
    def from_state(cls, tensors: dict[str, np.ndarray], params: dict[str, Any]) -> Self:
        """Rebuild a fitted model from :meth:`get_state` output; ModelError if it mismatches."""
        try:
            config = cls.config_cls(**params["config"])
            names = tuple(str(n) for n in params["class_names"])
            h, w = (int(v) for v in params["input_shape"])
            privacy = params.get("privacy")
            spent = None if privacy is None else PrivacySpent.from_dict(privacy)
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise ModelError(
                f"model parameters for kind {cls.kind!r} are malformed: {exc}"
            ) from exc
        model = cls(config)
        with seeded(0):
            net = model._build((h, w), len(names), 0.0, 1.0)
        expected = net.state_dict()
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise ModelError(
                f"weights do not match a {cls.kind!r} model: missing {missing[:5]}, "
                f"unexpected {extra[:5]}"
            )
        for name, ref in expected.items():
            shape = tuple(tensors[name].shape)
            if ref.ndim == 0 and shape == (1,):  # safetensors stores scalars as (1,)
                tensors = {**tensors, name: tensors[name].reshape(())}
            elif shape != tuple(ref.shape):
                raise ModelError(
                    f"tensor {name!r} has shape {tuple(tensors[name].shape)}, a {cls.kind!r} "
                    f"model for {h}x{w} images and {len(names)} classes needs {tuple(ref.shape)}"
                )
        net.load_state_dict(
            {k: torch.from_numpy(np.array(v)).to(expected[k].dtype) for k, v in tensors.items()}
        )
        net.eval()
        model.net_ = net
        model.class_names_ = names
        model.classes_ = np.arange(len(names), dtype=np.int64)
        model.input_shape_ = (h, w)
        model.privacy_ = spent
        return model


def lbfgs_first_layer(
    first: nn.Linear,
    head: nn.Module,
    xs: torch.Tensor,
    y: torch.Tensor,
    *,
    l2: float,
    max_iter: int,
    init_scale: float | None,
) -> float:
    """Fit ``head(first(xs))`` by full-batch L-BFGS on cross-entropy + ``l2/2 * ||W||^2``.

    ``xs`` are the flattened, standardised training inputs ``(n, d)``. When ``n < d``
    (AT&T: 280 images of 10304 pixels) the L2-regularised optimum of ``first.weight``
    lies in the span of the training inputs (representer theorem), so the weights are
    trained as ``W = B @ xs`` with ``B`` of shape ``(m, n)``: every step then costs
    ``n x n`` instead of ``n x d`` per unit. The result is written back into ``first``,
    which stays an ordinary ``Linear(d, m)``. ``init_scale`` None starts from zero
    weights (convex softmax); otherwise the first layer starts random with
    pre-activations of that standard deviation. Returns the final loss.
    """
    n, d = xs.shape
    m = first.out_features
    head_params = [p for p in head.parameters() if p.requires_grad]
    head_weights = [p for p in head_params if p.ndim > 1]
    span = n < d
    gram = xs @ xs.T if span else None
    coef = nn.Parameter(torch.zeros(m, n)) if span else first.weight
    nn.init.zeros_(first.bias)
    if init_scale is None:
        with torch.no_grad():
            coef.zero_()
    else:
        with torch.no_grad():
            coef.normal_()
            pre = coef @ gram if gram is not None else coef @ xs.T
            coef.mul_(init_scale / float(pre.std()))

    def pre_activation() -> tuple[torch.Tensor, torch.Tensor]:
        if gram is not None:
            kb = gram @ coef.T  # (n, m): training pre-activations
            norm2 = (coef.T * kb).sum()  # tr(B K B^T) = ||B xs||^2
            return kb + first.bias, norm2
        return xs @ coef.T + first.bias, coef.pow(2).sum()

    params = [coef, first.bias, *head_params]
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        history_size=10,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        pre, norm2 = pre_activation()
        penalty = norm2 + sum((w.pow(2).sum() for w in head_weights), torch.zeros(()))
        loss = F.cross_entropy(head(pre), y) + 0.5 * l2 * penalty
        loss.backward()
        return loss

    loss = float(opt.step(closure).detach())
    if gram is not None:
        with torch.no_grad():
            first.weight.copy_(coef @ xs)
    return loss
