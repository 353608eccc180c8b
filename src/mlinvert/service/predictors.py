"""The served Predictors: how they are built from models and settings, and what the
routes read off them (their rate limiter, largest batch, the RateLimit fields)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from mlinvert.defenses.detector import FlagStore, HistoryStore, QueryDetector, RedisHistory
from mlinvert.defenses.predictor import Predictor
from mlinvert.defenses.ratelimit import (
    BucketStore,
    MemoryBuckets,
    RateLimiter,
    RedisBuckets,
    redis_client,
)
from mlinvert.defenses.spec import build_guards, build_predictor
from mlinvert.errors import RateLimited
from mlinvert.service.settings import ServiceSettings
from mlinvert.targets.base import Target


def build_predictors(
    models: Mapping[str, Target],
    settings: ServiceSettings,
    *,
    bucket_store: BucketStore | None = None,
    flags: FlagStore | None = None,
) -> dict[str, Predictor]:
    """Wrap each model in a Predictor with its policy, one rate limiter and one detector.

    One :class:`RateLimiter` serves every model, so an account has one budget; its
    buckets live in Redis when ``settings.redis_url`` is set. The clock is wall time,
    which every process sharing Redis agrees on. One :class:`QueryDetector` (when
    ``settings.detector`` is set) sees an account's inputs to every image model; it runs
    after the rate limiter, so it fingerprints only admitted batches; its fingerprint
    history lives in Redis too when ``settings.redis_url`` is set (so every process sees
    all of an account's inputs), and it records its flags in ``flags`` (the service
    passes its SQLite store, so every process sees a flag). Survey (tabular) models get
    no detector: its pixel-window fingerprints would call any two short rows of category
    codes near duplicates.
    """
    url = settings.redis_url
    # one connection pool for both stores
    client = redis_client(url, timeout=settings.redis_timeout) if url else None
    if settings.rate_limit is not None and bucket_store is None:
        bucket_store = (
            RedisBuckets(url, client=client, refuse_lost=settings.redis_loss == "refuse")
            if url
            else MemoryBuckets()
        )
    history: HistoryStore | None = None
    if settings.detector is not None and url:
        history = RedisHistory(url, client=client)
    guards = build_guards(
        settings.rate_limit, settings.detector, buckets=bucket_store, history=history, flags=flags
    )
    return {
        name: build_predictor(
            model,
            name=name,
            policy=settings.policy_for(name),
            guards=guards,
            max_batch=settings.max_batch,
            clock=time.time,
        )
        for name, model in models.items()
    }


def limiter_of(predictor: Predictor) -> RateLimiter | None:
    """``predictor``'s rate limiter, if it has one."""
    return next((g for g in predictor.guards if isinstance(g, RateLimiter)), None)


def max_batch_of(predictor: Predictor) -> int:
    """The largest batch ``predictor`` may answer: its own limit, or its bucket's capacity."""
    limiter = limiter_of(predictor)
    return predictor.max_batch if limiter is None else min(predictor.max_batch, limiter.rate.count)


def refuses(predictor: Predictor, account: str) -> bool:
    """Whether ``predictor``'s query detector refuses ``account`` now (a standing flag)."""
    return any(
        isinstance(g, QueryDetector)
        and g.config.action == "block"
        and g.flags.flagged(account) is not None
        for g in predictor.guards
    )


def rate_headers(
    predictor: Predictor, account: str, retry_after: float | None = None
) -> dict[str, str]:
    """The RateLimit fields (draft-ietf-httpapi-ratelimit-headers-06) of ``account``'s
    bucket now, read without taking from it: its capacity, the inputs it may send, the
    seconds until it is full (``retry_after``, rounded up as Retry-After is, when a batch
    was refused) and the refill window. No fields without a rate limit, or when the
    bucket's store cannot be read (the answer then goes out without them)."""
    limiter = limiter_of(predictor)
    if limiter is None:
        return {}
    try:
        allowance = limiter.allowance(account, predictor.clock())
    except RateLimited:
        return {}
    rate = limiter.rate
    reset = allowance.reset_in if retry_after is None else retry_after
    return {
        "RateLimit-Limit": str(rate.count),
        "RateLimit-Remaining": str(allowance.remaining),
        "RateLimit-Reset": str(math.ceil(reset)),
        "RateLimit-Policy": f"{rate.count};w={math.ceil(rate.period)}",
    }
