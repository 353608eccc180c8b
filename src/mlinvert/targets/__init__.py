"""Target models: the paper's face recognisers (torch), a small CNN, the evaluation
model and BigML-style decision trees, with self-describing model folders.

Importing this package does not import torch; the model classes load lazily.
"""

from __future__ import annotations

from mlinvert.targets.io import load, save
from mlinvert.targets.training import KINDS, TrainedTarget, train_target

__all__ = ["KINDS", "TrainedTarget", "load", "save", "train_target"]
