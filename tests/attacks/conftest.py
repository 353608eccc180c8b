"""Tiny differentiable toy targets on scikit-learn digits (8x8) for the attack tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlinvert.data.base import ImageDataset
from mlinvert.defenses import Predictor


class TorchToy:
    """A small torch classifier on (n, h, w) images with autograd ``class_gradient``."""

    def __init__(
        self, net: torch.nn.Module, shape: tuple[int, int], names: tuple[str, ...], kind: str
    ) -> None:
        self.net = net
        self.kind = kind
        self.input_shape_: tuple[int, ...] = shape
        self.class_names_ = names
        self.classes_ = np.arange(len(names))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(X), dtype=torch.float32).reshape(len(X), -1)
            return torch.softmax(self.net(x), dim=1).double().numpy()

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.predict_proba(X).argmax(axis=1).astype(np.int64)

    def class_gradient(self, X: np.ndarray, labels: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(X), dtype=torch.float32).reshape(len(X), -1)
        x.requires_grad_(True)
        p = torch.softmax(self.net(x), dim=1)
        p[torch.arange(len(X)), torch.as_tensor(labels)].sum().backward()
        assert x.grad is not None
        return x.grad.numpy().reshape(np.shape(X)).astype(np.float64)


def _train(ds: ImageDataset, kind: str, seed: int) -> TorchToy:
    X, y = ds.train()
    torch.manual_seed(seed)
    d = X[0].size
    net: torch.nn.Module
    if kind == "softmax":
        net = torch.nn.Linear(d, ds.n_classes)
    else:
        net = torch.nn.Sequential(
            torch.nn.Linear(d, 32), torch.nn.Sigmoid(), torch.nn.Linear(32, ds.n_classes)
        )
    opt = torch.optim.Adam(net.parameters(), lr=0.05, weight_decay=1e-4)
    xt = torch.as_tensor(X.reshape(len(X), -1))
    yt = torch.as_tensor(y)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    return TorchToy(net, ds.image_shape, ds.class_names, kind)


@pytest.fixture(scope="session")
def toy_softmax(digits: ImageDataset) -> TorchToy:
    return _train(digits, "softmax", 0)


@pytest.fixture(scope="session")
def toy_mlp(digits: ImageDataset) -> TorchToy:
    return _train(digits, "mlp", 0)


@pytest.fixture()
def predictor(toy_softmax: TorchToy) -> Predictor:
    return Predictor(toy_softmax, name="toy")
