"""Defences: output policies, guards (rate limit, detector) and the Predictor."""

from mlinvert.defenses.base import Guard, OutputPolicy
from mlinvert.defenses.detector import (
    DETECTOR_GRAMMAR,
    DetectorConfig,
    Flag,
    FlagStore,
    HistoryStore,
    MemoryFlags,
    MemoryHistory,
    QueryDetector,
    RedisHistory,
    parse_detector,
)
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
    "DETECTOR_GRAMMAR",
    "POLICY_GRAMMAR",
    "Chain",
    "DetectorConfig",
    "Flag",
    "FlagStore",
    "FullScores",
    "GaussianNoise",
    "Guard",
    "HistoryStore",
    "LabelsOnly",
    "MemoryBuckets",
    "MemoryFlags",
    "MemoryHistory",
    "OutputPolicy",
    "Predictor",
    "QueryDetector",
    "Rate",
    "RateLimiter",
    "RedisBuckets",
    "RedisHistory",
    "ReverseSigmoid",
    "Round",
    "RoundTo",
    "TopK",
    "parse_detector",
    "parse_policy",
    "parse_rate",
]
