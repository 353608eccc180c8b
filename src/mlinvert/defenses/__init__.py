"""Defences: output policies, guards (rate limit, detector) and the Predictor."""

from mlinvert.defenses.base import Guard, OutputPolicy
from mlinvert.defenses.policies import (
    POLICY_GRAMMAR,
    Chain,
    FullScores,
    GaussianNoise,
    LabelsOnly,
    ReverseSigmoid,
    Round,
    RoundTo,
    TopK,
    parse_policy,
)
from mlinvert.defenses.predictor import Predictor
from mlinvert.defenses.ratelimit import (
    MemoryBuckets,
    Rate,
    RateLimiter,
    RedisBuckets,
    parse_rate,
)

__all__ = [
    "POLICY_GRAMMAR",
    "Chain",
    "FullScores",
    "GaussianNoise",
    "Guard",
    "LabelsOnly",
    "MemoryBuckets",
    "OutputPolicy",
    "Predictor",
    "Rate",
    "RateLimiter",
    "RedisBuckets",
    "ReverseSigmoid",
    "Round",
    "RoundTo",
    "TopK",
    "parse_policy",
    "parse_rate",
]
