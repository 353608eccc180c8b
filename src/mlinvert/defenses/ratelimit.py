"""Per-account rate limiting: a token bucket that counts inputs, not requests.

A batch of 64 inputs costs 64 tokens, so batching cannot dodge the limit; a batch is
admitted whole or refused whole (RateLimited with ``retry_after``). Buckets live in a
storage backend: :class:`MemoryBuckets` (one process, thread-safe) or
:class:`RedisBuckets` (an atomic Lua script, so several service processes share one
budget); ``peek`` reads a bucket without taking from it (what
:meth:`RateLimiter.allowance` reports to an account). Rate limiting as a model-extraction
and inversion defence: Tramèr et al., USENIX Security 2016, Section 8; Fredrikson et al.,
CCS 2015, Section 7.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mlinvert.errors import ConfigError, InputTooLarge, RateLimited

log = logging.getLogger(__name__)

_PERIODS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*(?:\.\d+)?)\s*([a-z]+?)s?\s*$")


@dataclass(frozen=True, kw_only=True)
class Rate:
    """``count`` inputs per ``period`` seconds; the bucket holds at most ``count``."""

    count: int
    period: float

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(f"a rate limit needs a count >= 1, got {self.count}")
        if not (math.isfinite(self.period) and self.period > 0):
            raise ConfigError(f"a rate limit needs a period > 0 seconds, got {self.period}")

    @property
    def per_second(self) -> float:
        """Refill speed in tokens per second."""
        return self.count / self.period

    def __str__(self) -> str:
        for unit in ("day", "hour", "minute", "second"):
            if self.period == _PERIODS[unit]:
                return f"{self.count}/{unit}"
        return f"{self.count}/{self.period:g}s"


def parse_rate(spec: str) -> Rate:
    """Parse ``"2000/hour"``, ``"50/minute"``, ``"10/s"`` or ``"100/30s"`` into a Rate."""
    match = _RATE.match(spec.lower())
    unit = match.group(3) if match else ""
    if match is None or unit not in _PERIODS:
        raise ConfigError(
            f"rate limit {spec!r} not understood; write COUNT/PERIOD with PERIOD one of "
            "second, minute, hour, day (or s, m, h, d, optionally with a number: 100/30s), "
            "e.g. 2000/hour"
        )
    multiple = float(match.group(2)) if match.group(2) else 1.0
    return Rate(count=int(match.group(1)), period=multiple * _PERIODS[unit])


@dataclass(frozen=True)
class Admission:
    """Outcome of one attempt to take tokens."""

    allowed: bool
    remaining: float
    retry_after: float


@dataclass(frozen=True)
class Allowance:
    """An account's bucket at one moment, read without taking anything from it."""

    rate: Rate
    tokens: float

    @property
    def remaining(self) -> int:
        """Inputs the account may send now."""
        return math.floor(self.tokens)

    @property
    def refill_in(self) -> float:
        """Seconds until one more input is allowed (0 when the bucket is full)."""
        if self.tokens >= self.rate.count:
            return 0.0
        return (self.remaining + 1 - self.tokens) / self.rate.per_second

    @property
    def reset_in(self) -> float:
        """Seconds until the bucket is full again (0 when it is)."""
        return max(0.0, self.rate.count - self.tokens) / self.rate.per_second


class BucketStore(Protocol):
    """Where token buckets live; ``take`` must be atomic."""

    def take(self, key: str, cost: int, rate: Rate, now: float) -> Admission:
        """Take ``cost`` tokens from ``key``'s bucket at time ``now`` or refuse."""
        ...

    def peek(self, key: str, rate: Rate, now: float) -> float:
        """The tokens in ``key``'s bucket at time ``now``, taking none."""
        ...

    def reset(self, key: str) -> None:
        """Forget ``key``'s bucket (it starts full again)."""
        ...


def _refill(tokens: float, last: float, rate: Rate, now: float) -> float:
    if now > last:
        return min(float(rate.count), tokens + (now - last) * rate.per_second)
    return tokens


class MemoryBuckets:
    """In-process buckets, guarded by one lock (thread-safe, not shared across processes)."""

    def __init__(self) -> None:
        self._state: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str, cost: int, rate: Rate, now: float) -> Admission:
        """Take ``cost`` tokens atomically."""
        with self._lock:
            tokens, last = self._state.get(key, (float(rate.count), now))
            tokens = _refill(tokens, last, rate, now)
            last = max(last, now)
            if tokens >= cost:
                self._state[key] = (tokens - cost, last)
                return Admission(True, tokens - cost, 0.0)
            self._state[key] = (tokens, last)
            return Admission(False, tokens, (cost - tokens) / rate.per_second)

    def peek(self, key: str, rate: Rate, now: float) -> float:
        """The tokens in the bucket at ``now`` (a bucket never used is full)."""
        with self._lock:
            tokens, last = self._state.get(key, (float(rate.count), now))
        return _refill(tokens, last, rate, now)

    def reset(self, key: str) -> None:
        """Forget a bucket."""
        with self._lock:
            self._state.pop(key, None)


_LUA_TAKE = """
local capacity = tonumber(ARGV[1])
local per_second = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = capacity
  ts = now
end
if now > ts then
  tokens = math.min(capacity, tokens + (now - ts) * per_second)
  ts = now
end
local allowed = 0
local retry = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  retry = (cost - tokens) / per_second
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'ts', string.format('%.17g', ts))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / per_second * 1000) + 60000)
return {allowed, string.format('%.17g', tokens), string.format('%.17g', retry)}
"""


#: Seconds a Redis command may take before the store counts as failing (a hung Redis
#: must refuse requests with 429, not hold them); connecting gets 2 s.
REDIS_TIMEOUT = 10.0


def redis_client(url: str, *, timeout: float = REDIS_TIMEOUT) -> Any:
    """A Redis client for ``url`` whose commands give up after ``timeout`` seconds."""
    import redis

    return redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=min(timeout, 2.0)
    )


class RedisBuckets:
    """Buckets in Redis, updated by one Lua script so every take is atomic.

    Several service processes pointing at the same Redis share one budget per account.
    They must share a clock too: the service passes wall-clock time (``time.time``).
    """

    def __init__(self, url: str, *, prefix: str = "mlinvert:rl:", client: Any = None) -> None:
        self.url = url
        self.prefix = prefix
        self.client = client if client is not None else redis_client(url)
        self._script = self.client.register_script(_LUA_TAKE)

    def take(self, key: str, cost: int, rate: Rate, now: float) -> Admission:
        """Take ``cost`` tokens atomically (one EVALSHA).

        Fails closed: if Redis cannot be reached the batch is refused with RateLimited
        (retry after 1 s), never admitted unmetered.
        """
        import redis

        try:
            allowed, remaining, retry = self._script(
                keys=[self.prefix + key], args=[rate.count, repr(rate.per_second), cost, repr(now)]
            )
        except redis.RedisError as exc:
            raise self._unreachable(exc, "the batch was refused, ") from None
        return Admission(bool(int(allowed)), float(remaining), float(retry))

    def _unreachable(self, exc: Exception, what: str = "") -> RateLimited:
        """Logged, the refusal a client gets while Redis cannot be reached."""
        log.error("rate-limit store %s unreachable: %s", self.url, exc)
        return RateLimited(
            f"the rate limiter's store is unreachable ({type(exc).__name__}); {what}retry in "
            "a second",
            retry_after=1.0,
        )

    def peek(self, key: str, rate: Rate, now: float) -> float:
        """The tokens in the bucket at ``now`` (one HMGET, nothing written; a bucket
        never used, or expired, is full). RateLimited if Redis cannot be reached."""
        import redis

        try:
            tokens, ts = self.client.hmget(self.prefix + key, ["tokens", "ts"])
        except redis.RedisError as exc:
            raise self._unreachable(exc) from None
        if tokens is None or ts is None:
            return float(rate.count)
        return _refill(float(tokens), float(ts), rate, now)

    def reset(self, key: str) -> None:
        """Forget a bucket."""
        self.client.delete(self.prefix + key)


class RateLimiter:
    """Guard: a per-account token bucket of ``rate`` that counts inputs.

    ``check`` takes the batch's tokens atomically (so concurrent requests cannot both
    pass on the same tokens) and raises RateLimited, with ``retry_after`` seconds,
    when the bucket holds too few; a batch larger than the bucket can ever hold is
    refused with InputTooLarge. ``observe`` has nothing left to do.
    """

    name = "rate-limit"

    def __init__(self, rate: Rate | str, store: BucketStore | None = None) -> None:
        self.rate = parse_rate(rate) if isinstance(rate, str) else rate
        self.store: BucketStore = store if store is not None else MemoryBuckets()

    def check(self, account: str, x: np.ndarray, now: float) -> None:
        """Admit the whole batch (taking its tokens) or refuse it."""
        cost = int(x.shape[0])
        if cost > self.rate.count:
            raise InputTooLarge(
                f"batch of {cost} inputs exceeds the rate limit's burst of {self.rate.count} "
                f"({self.rate}); send at most {self.rate.count} inputs per batch"
            )
        admission = self.store.take(account, cost, self.rate, now)
        if not admission.allowed:
            raise RateLimited(
                f"rate limit {self.rate} reached for account {account!r}: the batch needs "
                f"{cost} inputs, {int(admission.remaining)} left; retry after "
                f"{admission.retry_after:.1f} s or send smaller batches",
                retry_after=admission.retry_after,
            )

    def observe(self, account: str, x: np.ndarray, now: float) -> None:
        """Nothing to do: the tokens were taken in ``check``."""

    def allowance(self, account: str, now: float) -> Allowance:
        """What ``account`` may send at ``now`` and when it refills, taking nothing."""
        return Allowance(self.rate, self.store.peek(account, self.rate, now))
