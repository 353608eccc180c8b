"""Defences: output policies, guards (rate limit, detector) and the Predictor."""

from mlinvert.defenses.base import Guard, OutputPolicy
from mlinvert.defenses.predictor import FullScores, Predictor

__all__ = ["FullScores", "Guard", "OutputPolicy", "Predictor"]
