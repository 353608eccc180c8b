"""Token-bucket rate limiting: exact accounting, injected clock, memory and Redis stores."""

from __future__ import annotations

import threading
from types import ModuleType

import numpy as np
import pytest

from mlinvert.defenses import (
    MemoryBuckets,
    Predictor,
    Rate,
    RateLimiter,
    RedisBuckets,
    parse_rate,
)
from mlinvert.errors import ConfigError, InputTooLarge, RateLimited
from mlinvert.oracle import LocalOracle
from mlinvert.service.runner import RedisServer


def batch(n: int) -> np.ndarray:
    return np.zeros((n, 2), dtype=np.float32)


@pytest.mark.parametrize(
    ("spec", "count", "period"),
    [
        ("2000/hour", 2000, 3600.0),
        ("50/minute", 50, 60.0),
        ("10/s", 10, 1.0),
        ("100/30s", 100, 30.0),
        ("7/days", 7, 86400.0),
        (" 5 / hours ", 5, 3600.0),
    ],
)
def test_parse_rate(spec: str, count: int, period: float) -> None:
    assert parse_rate(spec) == Rate(count=count, period=period)


@pytest.mark.parametrize(
    ("count", "period", "text"),
    [
        (300, 3600.0, "300/hour"),
        (300, 30 * 86400.0, "300/30d"),
        (9, 1e7, "9/10000000s"),
        (5, 2.5, "5/2.5s"),
        (1, 1e-4, "1/0.0001s"),
    ],
)
def test_a_rate_is_written_as_the_parser_reads_it(count: int, period: float, text: str) -> None:
    # the service advertises str(rate) and an attacker or an --api audit parses it back
    rate = Rate(count=count, period=period)
    assert str(rate) == text and parse_rate(str(rate)) == rate


@pytest.mark.parametrize("spec", ["", "2000", "x/hour", "10/fortnight", "0/hour", "10/0s"])
def test_parse_rate_rejects(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_rate(spec)


def test_bucket_counts_inputs_and_refills_with_the_clock() -> None:
    limiter = RateLimiter("10/minute")
    limiter.check("a", batch(6), now=100.0)
    with pytest.raises(RateLimited) as info:
        limiter.check("a", batch(6), now=100.0)
    assert info.value.retry_after == pytest.approx(12.0)  # 2 missing tokens at 1 per 6 s
    limiter.check("b", batch(10), now=100.0)  # accounts are separate
    with pytest.raises(RateLimited):
        limiter.check("a", batch(6), now=111.0)
    limiter.check("a", batch(6), now=112.0 + 1e-9)
    with pytest.raises(InputTooLarge, match="burst of 10"):
        limiter.check("c", batch(11), now=0.0)


def test_a_refused_batch_costs_nothing() -> None:
    limiter = RateLimiter("10/hour")
    limiter.check("a", batch(8), now=0.0)
    for _ in range(5):
        with pytest.raises(RateLimited):
            limiter.check("a", batch(3), now=0.0)
    limiter.check("a", batch(2), now=0.0)


def _check_allowance_reads_without_taking(store: MemoryBuckets | RedisBuckets) -> None:
    limiter = RateLimiter("10/minute", store)  # one input every 6 s
    fresh = limiter.allowance("a", now=50.0)
    assert (fresh.remaining, fresh.refill_in, fresh.reset_in) == (10, 0.0, 0.0)
    limiter.check("a", batch(7), now=100.0)
    for _ in range(3):  # reading spends nothing, however often
        seen = limiter.allowance("a", now=103.0)
        assert seen.remaining == 3 and seen.tokens == pytest.approx(3.5)
        assert seen.refill_in == pytest.approx(3.0) and seen.reset_in == pytest.approx(39.0)
    limiter.check("a", batch(3), now=103.0)
    with pytest.raises(RateLimited):
        limiter.check("a", batch(1), now=103.0)
    assert limiter.allowance("a", now=103.0).remaining == 0
    assert limiter.allowance("a", now=200.0).reset_in == 0.0  # refilled with the clock
    assert limiter.allowance("b", now=103.0).remaining == 10  # accounts are separate


def test_memory_allowance_reads_without_taking() -> None:
    _check_allowance_reads_without_taking(MemoryBuckets())


@pytest.mark.redis
def test_redis_allowance_reads_without_taking(redis_url: str) -> None:
    _check_allowance_reads_without_taking(RedisBuckets(redis_url, prefix="t4:"))


@pytest.mark.redis
def test_redis_allowance_fails_closed() -> None:
    try:
        server = RedisServer()
    except ConfigError as exc:
        pytest.skip(f"redis-server binary absent: {exc}")
    with server:
        limiter = RateLimiter("10/minute", RedisBuckets(server.url, prefix="t5:"))
        assert limiter.allowance("a", now=0.0).remaining == 10
    with pytest.raises(RateLimited, match="unreachable"):
        limiter.allowance("a", now=1.0)


def _hammer(limiter: RateLimiter, threads: int, per_thread: int, size: int) -> int:
    admitted = [0] * threads
    start = threading.Barrier(threads)

    def worker(i: int) -> None:
        start.wait()
        for _ in range(per_thread):
            try:
                limiter.check("shared", batch(size), now=5.0)
                admitted[i] += size
            except RateLimited:
                pass

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(admitted)


def test_memory_store_is_exact_under_threads() -> None:
    assert _hammer(RateLimiter("300/hour", MemoryBuckets()), 20, 50, 3) == 300


@pytest.mark.redis
def test_redis_store_shares_one_budget(redis_url: str) -> None:
    first = RateLimiter("10/minute", RedisBuckets(redis_url, prefix="t1:"))
    second = RateLimiter("10/minute", RedisBuckets(redis_url, prefix="t1:"))
    first.check("a", batch(6), now=100.0)
    with pytest.raises(RateLimited) as info:
        second.check("a", batch(6), now=100.0)
    assert info.value.retry_after == pytest.approx(12.0)
    second.check("a", batch(6), now=112.0 + 1e-6)


@pytest.mark.redis
def test_redis_store_is_exact_under_threads(redis_url: str) -> None:
    limiter = RateLimiter("300/hour", RedisBuckets(redis_url, prefix="t2:"))
    assert _hammer(limiter, 20, 20, 3) == 300


@pytest.mark.redis
def test_redis_store_fails_closed() -> None:
    try:
        server = RedisServer()
    except ConfigError as exc:
        pytest.skip(f"redis-server binary absent: {exc}")
    with server:
        limiter = RateLimiter("10/minute", RedisBuckets(server.url, prefix="t3:"))
        limiter.check("a", batch(2), now=0.0)
    with pytest.raises(RateLimited, match="unreachable") as info:
        limiter.check("a", batch(2), now=1.0)
    assert info.value.retry_after == 1.0


def test_predictor_guard_refuses_through_local_oracle(toys: ModuleType) -> None:
    clock = [0.0]
    predictor = Predictor(
        toys.ToySoftmax(), name="faces", guards=[RateLimiter("20/minute")], clock=lambda: clock[0]
    )
    oracle = LocalOracle(predictor, account="eve")
    x = np.full((8, 6, 5), 0.5, dtype=np.float32)
    oracle.query(x)
    oracle.query(x)
    with pytest.raises(RateLimited):
        oracle.query(x)
    assert oracle.n_queries == 16
    clock[0] = 60.0
    oracle.query(x)
    assert oracle.n_queries == 24


def test_a_hung_redis_refuses_with_429_instead_of_holding_the_request() -> None:
    """A Redis that accepts connections and never answers (a stalled host): the rate
    limiter and the detector's history make one attempt, give up after their socket
    timeout and fail closed. What is asserted is the attempts (connections the stalled
    host accepted), not the seconds, so a loaded machine cannot fail it; a client that
    waited for ever fails the generous join instead of hanging the suite."""
    import socket

    from mlinvert.defenses.detector import QueryDetector, RedisHistory
    from mlinvert.defenses.ratelimit import redis_client

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held: list[socket.socket] = []  # accepted, never read or written

    def accept() -> None:
        while True:
            try:
                held.append(silent.accept()[0])
            except OSError:  # closed at the end of the test
                return

    threading.Thread(target=accept, daemon=True).start()
    url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
    try:
        limiter = RateLimiter("10/hour", RedisBuckets(url, client=redis_client(url, timeout=0.3)))
        history = RedisHistory(url, client=redis_client(url, timeout=0.3))
        detector = QueryDetector("detect:block", history=history)
        images = np.random.default_rng(0).random((2, 46, 38)).astype(np.float32)

        def check(
            guard: RateLimiter | QueryDetector, x: np.ndarray, raised: list[Exception]
        ) -> None:
            try:
                guard.check("alice", x, 0.0)
            except Exception as exc:  # handed to the test's thread
                raised.append(exc)

        for guard, x in ((limiter, batch(1)), (detector, images)):
            before = len(held)
            raised: list[Exception] = []
            worker = threading.Thread(target=check, args=(guard, x, raised), daemon=True)
            worker.start()
            worker.join(timeout=120)
            assert not worker.is_alive(), "the guard waited on a silent Redis without a deadline"
            assert len(raised) == 1 and isinstance(raised[0], RateLimited), raised
            assert "retry in a second" in str(raised[0])
            assert len(held) - before == 1  # one attempt, no retry behind the timeout
    finally:
        silent.close()
        for conn in held:
            conn.close()
