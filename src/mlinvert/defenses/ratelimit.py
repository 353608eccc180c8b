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

import functools
import logging
import math
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mlinvert.errors import ConfigError, InputTooLarge, RateLimited, Unavailable

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
        """The rate as :func:`parse_rate` reads it back: ``300/hour``, ``300/30d``, ``5/2.5s``."""
        for unit in ("day", "hour", "minute", "second"):
            if self.period == _PERIODS[unit]:
                return f"{self.count}/{unit}"
        for unit in ("d", "h", "m"):
            if (self.period / _PERIODS[unit]).is_integer():
                return f"{self.count}/{int(self.period / _PERIODS[unit])}{unit}"
        # positional, never an exponent (which the parser would refuse)
        seconds = np.format_float_positional(self.period, trim="-")
        return f"{self.count}/{seconds}s"


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
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[2]) == 0 then
  return {-1, '0', '0'}
end
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

_LUA_PEEK = """
if ARGV[1] == '1' and redis.call('EXISTS', KEYS[2]) == 0 then
  return {-1}
end
return redis.call('HMGET', KEYS[1], 'tokens', 'ts')
"""

#: Seconds the Redis calls of one request may take together (``--redis-timeout``): a
#: hung Redis must refuse requests, not hold them. Connecting gets at most 2 s.
REDIS_TIMEOUT = 2.0
#: The key whose absence tells that Redis lost its data (see :class:`RedisBuckets`).
EPOCH_KEY = "mlinvert:epoch"


@dataclass
class RedisDeadline:
    """When the Redis calls of one request must be done, and why the rest are not tried."""

    ends: float  # time.monotonic()
    failed: str | None = None


_DEADLINE: ContextVar[RedisDeadline | None] = ContextVar("mlinvert_redis_deadline", default=None)


@contextmanager
def redis_deadline(seconds: float) -> Iterator[RedisDeadline]:
    """One deadline for every Redis call made inside the block (on this thread/task).

    A call made after the deadline, or after an earlier call in the block could not
    reach Redis (timeout or connection error), fails at once with ``redis.TimeoutError``
    instead of waiting its own socket timeout: a frozen Redis costs a request one
    timeout, not one per call.
    """
    deadline = RedisDeadline(time.monotonic() + seconds)
    token = _DEADLINE.set(deadline)
    try:
        yield deadline
    finally:
        _DEADLINE.reset(token)


@functools.cache
def _deadline_client_class() -> Any:
    import redis

    class DeadlineRedis(redis.Redis):
        """redis.Redis whose every command honours the :func:`redis_deadline` in force."""

        def execute_command(self, *args: Any, **options: Any) -> Any:
            deadline = _DEADLINE.get()
            if deadline is not None:
                if deadline.failed is None and time.monotonic() >= deadline.ends:
                    deadline.failed = "the request's Redis deadline passed"
                if deadline.failed is not None:
                    raise redis.TimeoutError(f"not tried: {deadline.failed}")
            try:
                return super().execute_command(*args, **options)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if deadline is not None:
                    deadline.failed = f"an earlier Redis call failed ({type(exc).__name__})"
                raise

    return DeadlineRedis


def redis_client(url: str, *, timeout: float = REDIS_TIMEOUT) -> Any:
    """A Redis client for ``url`` whose commands give up after ``timeout`` seconds, and
    share the deadline of the :func:`redis_deadline` block they run in."""
    return _deadline_client_class().from_url(
        url, socket_timeout=timeout, socket_connect_timeout=min(timeout, 2.0)
    )


def redis_persistence(client: Any) -> str | None:
    """What Redis keeps across a restart (``"AOF"``, ``"RDB snapshots"``, both), None
    when nothing, or ``"unknown"`` when CONFIG is not allowed (managed Redis)."""
    import redis

    try:
        config = client.config_get("appendonly")
        config.update(client.config_get("save"))
    except redis.ResponseError:
        return "unknown"
    kept = [
        name
        for name, on in (
            ("AOF", str(config.get("appendonly", "no")).lower() == "yes"),
            ("RDB snapshots", bool(str(config.get("save", "")).strip())),
        )
        if on
    ]
    return " and ".join(kept) or None


def redis_epoch(client: Any) -> str | None:
    """The epoch key's value: None when Redis holds none (new, or it lost its data)."""
    value = client.get(EPOCH_KEY)
    return None if value is None else bytes(value).decode()


def mark_redis_epoch(client: Any, epoch: str, *, replace: bool = False) -> str:
    """Write ``epoch`` unless Redis already holds one (or ``replace``); the value kept."""
    client.set(EPOCH_KEY, epoch, nx=not replace)
    kept = redis_epoch(client)
    if kept is None:  # evicted or flushed at that very moment
        raise ConfigError(f"Redis did not keep the {EPOCH_KEY} key; check its eviction policy")
    return kept


def redis_problem(client: Any, *, need_epoch: bool = False) -> str | None:
    """Why Redis cannot serve the service now, or None: it cannot be reached, or (with
    ``need_epoch``) it lost its data since the service first met it."""
    import redis

    try:
        client.ping()
        lost = need_epoch and not client.exists(EPOCH_KEY)
    except redis.RedisError as exc:
        return f"unreachable ({type(exc).__name__}: {exc})"
    if lost:
        return (
            f"lost its data (no {EPOCH_KEY} key): restore Redis's data, or accept that every "
            "budget starts full again with `mlinvert keys accept-budget-reset`"
        )
    return None


class RedisBuckets:
    """Buckets in Redis, updated by one Lua script so every take is atomic.

    Several service processes pointing at the same Redis share one budget per account.
    They must share a clock too: the service passes wall-clock time (``time.time``).

    A Redis restarted without persistence (AOF or RDB) comes back empty: every bucket
    is full again. With ``refuse_lost=True`` the buckets instead refuse every batch
    (Unavailable, 503) while the epoch key (:data:`EPOCH_KEY`, written when the service
    first meets this Redis, see :func:`mark_redis_epoch`) is missing: until Redis's data is
    restored, or an operator accepts the reset (``mlinvert keys accept-budget-reset``).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "mlinvert:rl:",
        client: Any = None,
        refuse_lost: bool = False,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.refuse_lost = refuse_lost
        self.client = client if client is not None else redis_client(url)
        self._take = self.client.register_script(_LUA_TAKE)
        self._peek = self.client.register_script(_LUA_PEEK)

    def take(self, key: str, cost: int, rate: Rate, now: float) -> Admission:
        """Take ``cost`` tokens atomically (one EVALSHA).

        Fails closed: if Redis cannot be reached the batch is refused with RateLimited
        (retry after 1 s), never admitted unmetered.
        """
        import redis

        try:
            allowed, remaining, retry = self._take(
                keys=[self.prefix + key, EPOCH_KEY],
                args=[
                    rate.count,
                    repr(rate.per_second),
                    cost,
                    repr(now),
                    int(self.refuse_lost),
                ],
            )
        except redis.RedisError as exc:
            raise self._unreachable(exc, "the request was refused, ") from None
        if int(allowed) == -1:
            raise self._lost()
        return Admission(bool(int(allowed)), float(remaining), float(retry))

    def _unreachable(self, exc: Exception, what: str = "") -> RateLimited:
        """Logged, the refusal a client gets while Redis cannot be reached."""
        log.error("rate-limit store %s unreachable: %s", self.url, exc)
        return RateLimited(
            f"the rate limiter's store is unreachable ({type(exc).__name__}); {what}retry in "
            "a second",
            retry_after=1.0,
        )

    def _lost(self) -> Unavailable:
        log.error("rate-limit store %s lost its data (no %s key); refusing", self.url, EPOCH_KEY)
        return Unavailable(
            "the rate limiter's store lost the budgets (Redis restarted without its data); "
            "the service refuses queries until an operator restores Redis's data or accepts "
            "the reset",
            retry_after=60.0,
        )

    def peek(self, key: str, rate: Rate, now: float) -> float:
        """The tokens in the bucket at ``now`` (one EVALSHA, nothing written; a bucket
        never used, or expired, is full). RateLimited if Redis cannot be reached."""
        import redis

        try:
            state = self._peek(keys=[self.prefix + key, EPOCH_KEY], args=[int(self.refuse_lost)])
        except redis.RedisError as exc:
            raise self._unreachable(exc) from None
        if state == [-1]:
            raise self._lost()
        tokens, ts = state
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
