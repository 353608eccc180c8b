"""Coalescer lanes: exact per-lane counts, the right rows back, few combined requests,
errors in every lane of a request (lane by lane for bad input and an overdrawn rate
limit), no deadlock when a lane stops early, and request counts that do not depend on
how the threads are scheduled."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pytest

from mlinvert.core import OracleInfo, Response
from mlinvert.defenses import Predictor
from mlinvert.defenses.ratelimit import RateLimiter
from mlinvert.errors import (
    Blocked,
    BudgetExhausted,
    ConfigError,
    OracleError,
    QueryRejected,
    RateLimited,
)
from mlinvert.oracle import LocalOracle, Oracle
from mlinvert.oracle.lockstep import Coalescer, Lane, batch_limit, map_lanes
from mlinvert.oracle.wrappers import Budgeted

SHAPE = (2, 2)


class _Echo:
    """An oracle whose answer identifies the input: label = round(1000 * x[0, 0]),
    probs = the first three pixels, confidence = the last pixel. Records each request."""

    def __init__(self, fail: Callable[[int, np.ndarray], None] | None = None) -> None:
        self.batches: list[int] = []
        self.fail = fail
        self._n = 0
        self._lock = threading.Lock()
        self.concurrent = 0
        self.max_concurrent = 0

    @property
    def info(self) -> OracleInfo:
        return OracleInfo(
            model="echo",
            kind="toy",
            input_shape=SHAPE,
            class_names=("a", "b", "c"),
            carries="probs",
        )

    @property
    def n_queries(self) -> int:
        return self._n

    def query(self, x: np.ndarray) -> Response:
        with self._lock:
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            time.sleep(0.001)
            if self.fail is not None:
                self.fail(len(self.batches), x)
            self.batches.append(len(x))
            flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
            labels = np.rint(flat[:, 0] * 1000).astype(np.int64)
            self._n += len(x)
            return Response(
                labels=labels,
                probs=flat[:, :3],
                confidence=flat[:, 3],
                label_names=tuple(str(v) for v in labels),
            )
        finally:
            with self._lock:
                self.concurrent -= 1


class _Rows:
    """A two-class model to serve behind a Predictor: p = (mean pixel, 1 - mean pixel)."""

    kind = "toy"
    classes_ = np.arange(2)
    class_names_: tuple[str, ...] = ("a", "b")
    input_shape_: tuple[int, ...] = SHAPE

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        m = np.asarray(X).reshape(len(X), -1).mean(axis=1)
        return np.stack([m, 1 - m], axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.predict_proba(X).argmax(axis=1)


def _inputs(lane: int, step: int, n: int) -> np.ndarray:
    """Rows whose first pixel encodes (lane, step, row) and whose last pixel is random."""
    x = np.zeros((n, *SHAPE), dtype=np.float32)
    x[:, 0, 0] = (lane * 100 + step * 5 + np.arange(n)) / 1000.0
    x[:, 1, 1] = np.random.default_rng(lane * 1000 + step).uniform(size=n)
    return x


def _in_threads(fns: list[Callable[[], Any]], timeout: float = 10.0) -> list[Any]:
    out: list[Any] = [None] * len(fns)

    def run(i: int) -> None:
        try:
            out[i] = fns[i]()
        except BaseException as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a lane deadlocked"
    return out


def test_lanes_get_their_own_rows_exact_counts_and_one_request_per_step() -> None:
    inner = _Echo()
    co = Coalescer(inner, lanes=4)
    lanes = [co.lane() for _ in range(4)]
    steps = 12

    def work(i: int, lane: Lane) -> int:
        sent = 0
        for s in range(steps):
            n = 1 + (i + s) % 4
            x = _inputs(i, s, n)
            r = lane.query(x)
            expected = np.rint(x[:, 0, 0].astype(np.float64) * 1000).astype(np.int64)
            assert np.array_equal(r.labels, expected)
            assert r.probs is not None and r.confidence is not None
            np.testing.assert_allclose(r.confidence, x[:, 1, 1])
            assert r.label_names == tuple(str(v) for v in expected)
            sent += n
            assert lane.n_queries == sent  # other lanes' rows never count here
        lane.close()
        return sent

    sent = _in_threads([partial(work, i, lane) for i, lane in enumerate(lanes)])
    assert all(isinstance(s, int) for s in sent), sent
    assert len(inner.batches) == steps  # k lanes x n steps = n combined requests
    assert inner.n_queries == co.inputs == sum(sent)
    assert co.requests == steps
    assert inner.max_concurrent == 1  # requests go one at a time


def test_a_lane_that_finishes_or_raises_early_does_not_stall_the_others() -> None:
    """No stall valve (max_wait=None): a lane that ended and was not replaced would hang
    the rest. Each request carries one batch of every running worker, so the requests
    are exactly the longest worker's queries: 3 + 15 | 2 (raises) + 15 | 15 → 18."""
    inner = _Echo()

    def fn(item: int, lane: Oracle) -> int:
        for s in range(3 if item < 2 else 15):
            lane.query(_inputs(item, s, 2))
            if item == 1 and s == 1:
                raise ValueError("attack bug in lane 1")
        return lane.n_queries

    done: list[int] = []
    futures = map_lanes(
        fn, range(5), inner, lanes=3, max_wait=None, on_done=lambda i, f: done.append(i)
    )
    assert sorted(done) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="lane 1"):
        futures[1].result()
    assert [futures[i].result() for i in (0, 2, 3, 4)] == [6, 30, 30, 30]
    assert len(inner.batches) == 18


def test_a_lane_that_computes_long_never_splits_a_request() -> None:
    """A lane that takes longer than a request to reach its next query is waited for:
    every request carries all four lanes, however the threads are scheduled."""

    class _Slow(_Echo):
        def query(self, x: np.ndarray) -> Response:
            time.sleep(0.02)
            return super().query(x)

    inner = _Slow()
    co = Coalescer(inner, lanes=4)
    lanes = [co.lane() for _ in range(4)]
    steps = 6

    def work(i: int, lane: Lane) -> int:
        with lane:
            for s in range(steps):
                if i == 3 and s in (0, 3):
                    time.sleep(0.1)  # this lane's attack computes a long step
                lane.query(_inputs(i, s, 1))
            return lane.n_queries

    assert _in_threads([partial(work, i, lane) for i, lane in enumerate(lanes)]) == [steps] * 4
    assert inner.batches == [4] * steps and co.stalls == 0
    assert all(lane.stalled == 0 for lane in lanes)


def test_the_others_go_on_without_a_lane_blocked_on_something_else() -> None:
    """Lane 2 waits for the other lanes to finish before it asks: only the stall valve
    (max_wait) lets them finish; each such request is counted in ``stalls``."""
    inner = _Echo()
    co = Coalescer(inner, lanes=3, max_wait=0.05)
    lanes = [co.lane() for _ in range(3)]
    others_done = threading.Event()
    finished: list[int] = []

    def work(i: int, lane: Lane) -> list[int]:
        with lane:
            if i == 2:
                assert others_done.wait(10.0)
            got = [int(lane.query(_inputs(i, s, 1)).labels[0]) for s in range(2)]
            finished.append(i)
            if len(finished) == 2:
                others_done.set()
            return got

    out = _in_threads([partial(work, i, lane) for i, lane in enumerate(lanes)])
    assert out == [[0, 5], [100, 105], [200, 205]]
    assert co.stalls >= 1 and sum(inner.batches) == 6
    # every lane open at a stalled request knows it: the waiting ones and the absent one
    assert [lane.stalled for lane in lanes] == [co.stalls] * 3


def test_an_interrupt_in_the_caller_stops_the_running_lanes_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The request after item 0's last is held until the coalescer is closed: once the
    caller's interrupt closes it, no lane sends another."""
    closed = threading.Event()
    close = Coalescer.close

    def closing(self: Coalescer) -> None:
        close(self)
        closed.set()

    monkeypatch.setattr(Coalescer, "close", closing)

    def hold(request: int, x: np.ndarray) -> None:
        if request == 2:
            assert closed.wait(10.0)

    inner = _Echo(hold)
    started: list[int] = []

    def fn(item: int, lane: Oracle) -> int:
        started.append(item)
        for s in range(10_000 if item else 2):  # item 0 ends soon, the others run on
            lane.query(_inputs(item, s % 10, 1))
        return item

    def stop(item: int, future: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        map_lanes(fn, range(6), inner, lanes=3, on_done=stop)
    # the freed lane may have started item 3 before the interrupt; the rest never start
    assert {0, 1, 2} <= set(started) <= {0, 1, 2, 3}
    assert len(inner.batches) <= 3


def test_an_error_of_the_combined_request_reaches_every_lane_in_it() -> None:
    def fail(request: int, x: np.ndarray) -> None:
        if request == 2:
            raise Blocked("account flagged for investigation")

    inner = _Echo(fail)
    co = Coalescer(inner, lanes=3)
    lanes = [co.lane() for _ in range(3)]  # all open before the first query

    def work(i: int) -> tuple[int, Any]:
        with lanes[i] as lane:
            for s in range(5):
                try:
                    lane.query(_inputs(i, s, 2))
                except Blocked as exc:
                    return lane.n_queries, exc
            return lane.n_queries, None

    out = _in_threads([partial(work, i) for i in range(3)])
    for n, exc in out:
        assert n == 4 and isinstance(exc, Blocked)
    assert inner.n_queries == 12


def test_a_rate_limit_the_combined_batch_overdraws_still_admits_the_lanes_that_fit() -> None:
    """A 50-input bucket, 26 inputs spent: three lanes of 8 rows (24) fit, one request of
    all four (32) does not; re-sent lane by lane, three are answered and the fourth sees
    the 429 with its own retry-after, exactly as one-at-a-time attacks would."""
    limited = LocalOracle(Predictor(_Rows(), name="toy", guards=[RateLimiter("50/hour")]))
    limited.query(np.zeros((26, *SHAPE), dtype=np.float32))
    co = Coalescer(limited, lanes=4)
    lanes = [co.lane() for _ in range(4)]

    def work(i: int) -> Any:
        with lanes[i] as lane:
            try:
                return lane.query(_inputs(i, 0, 8)).labels.tolist()
            except RateLimited as exc:
                return exc

    out = _in_threads([partial(work, i) for i in range(4)])
    answered = [o for o in out if isinstance(o, list)]
    refused = [o for o in out if isinstance(o, RateLimited)]
    assert len(answered) == 3 and len(refused) == 1 and refused[0].retry_after > 0
    assert limited.n_queries == 26 + 24


def test_a_short_answer_is_an_error_in_every_lane_not_a_wrong_slice() -> None:
    class _Short(_Echo):
        def query(self, x: np.ndarray) -> Response:
            r = super().query(x)
            return Response(labels=r.labels[:-1], probs=None)

    co = Coalescer(_Short(), lanes=2)
    lanes = [co.lane() for _ in range(2)]

    def work(i: int) -> Any:
        with lanes[i] as lane:
            try:
                return lane.query(_inputs(i, 0, 2))
            except OracleError as exc:
                return exc

    out = _in_threads([partial(work, i) for i in range(2)])
    assert all(isinstance(e, OracleError) and "answered 3 rows for 4" in str(e) for e in out)


def test_bad_input_of_one_lane_is_refused_only_in_that_lane() -> None:
    def fail(request: int, x: np.ndarray) -> None:
        if float(x.max()) > 1.0:
            raise QueryRejected("inputs must lie in [0, 1]")

    inner = _Echo(fail)
    co = Coalescer(inner, lanes=3)
    lanes = [co.lane() for _ in range(3)]

    def work(i: int) -> Any:
        with lanes[i] as lane:
            x = _inputs(i, 0, 2)
            if i == 1:
                x[0, 1, 0] = 7.0
            try:
                return lane.query(x).labels.tolist()
            except QueryRejected as exc:
                return exc

    out = _in_threads([partial(work, i) for i in range(3)])
    assert isinstance(out[1], QueryRejected)
    assert out[0] == [0, 1] and out[2] == [200, 201]
    assert inner.n_queries == 4


def test_wrong_shape_or_empty_batch_is_refused_before_it_reaches_the_queue() -> None:
    inner = _Echo()
    with Coalescer(inner, lanes=2).lane() as lane:
        with pytest.raises(QueryRejected, match="shape"):
            lane.query(np.zeros((3, 4), dtype=np.float32))
        with pytest.raises(QueryRejected, match="empty"):
            lane.query(np.zeros((0, *SHAPE), dtype=np.float32))
        assert lane.n_queries == 0
    assert inner.batches == []


def test_combined_requests_respect_max_batch() -> None:
    inner = _Echo()
    co = Coalescer(inner, lanes=3, max_batch=5)
    lanes = [co.lane() for _ in range(3)]

    def work(i: int) -> int:
        with lanes[i] as lane:
            for s in range(4):
                r = lane.query(_inputs(i, s, 3))
                assert r.labels.tolist() == [i * 100 + s * 5 + j for j in range(3)]
            return lane.n_queries

    assert _in_threads([partial(work, i) for i in range(3)]) == [12, 12, 12]
    # lane by lane, in lane order: 3 + 3 > 5, so each step is three requests
    assert inner.batches == [3] * 12


def test_budgeted_lane_refuses_before_the_coalescer() -> None:
    inner = _Echo()
    with Coalescer(inner, lanes=1).lane() as lane:
        oracle = Budgeted(lane, 5)
        oracle.query(_inputs(0, 0, 4))
        with pytest.raises(BudgetExhausted):
            oracle.query(_inputs(0, 1, 3))
        assert oracle.n_queries == lane.n_queries == 4
    assert inner.batches == [4]


def test_close_aborts_a_waiting_lane_and_bad_settings_are_refused() -> None:
    inner = _Echo()
    co = Coalescer(inner, lanes=2, max_wait=30.0)
    idle = co.lane()  # open, never queries: the other lane would wait 30 s
    busy = co.lane()
    with pytest.raises(ConfigError, match="lanes are open"):
        co.lane()
    timer = threading.Timer(0.2, co.close)
    timer.start()
    with pytest.raises(OracleError, match="closed"):  # not an answer after 30 s
        busy.query(_inputs(0, 0, 1))
    idle.close()
    with pytest.raises(OracleError, match="closed"):
        co.lane()
    for bad in ({"lanes": 0}, {"lanes": 2, "max_wait": -1.0}, {"lanes": 2, "max_batch": 0}):
        with pytest.raises(ConfigError):
            Coalescer(inner, **bad)


def test_batch_limit_of_a_local_oracle_includes_the_rate_limit_burst() -> None:
    plain = LocalOracle(Predictor(_Rows(), name="m", max_batch=64))
    limited = LocalOracle(Predictor(_Rows(), name="m", guards=[RateLimiter("30/hour")]))
    assert batch_limit(plain) == 64
    assert batch_limit(limited) == 30
    assert batch_limit(_Echo()) is None
