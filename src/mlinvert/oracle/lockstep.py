"""Lockstep batching: several attacks share one oracle, their probes sent together.

A served model's forward costs nearly the same for 1 input as for 40 (and an HTTP
request has its own fixed cost), so k black-box attacks that each send a batch of 11
probes per step are k times cheaper per query when their batches travel in one
request. :class:`Coalescer` owns the real oracle and hands out *lanes*: each lane is
an :class:`~mlinvert.oracle.Oracle` for one attack (one thread), counting exactly its
own inputs. ``lane.query(x)`` waits until every open lane is waiting, then one combined
request carries every lane's inputs (in lane order) and each lane gets back its own rows:
how many requests a run sends depends on the attacks alone, never on thread scheduling
or on how long a lane computes between its queries. The one exception is a lane blocked
on something else than its next query: after ``max_wait`` seconds (counted from the
later of the oldest waiting batch's arrival and the end of the last request) the waiting
batches go without it, a warning says so, and every lane open then counts it in its
``stalled`` (the audit's records: ``lanes_stalled``). An
error of the combined request (Blocked, OracleError, ...) is raised in every lane whose
inputs it carried; a batch refused as bad input (QueryRejected) or by a rate limit it
overdraws (RateLimited) is re-sent lane by lane, so only the lane that sent the bad input
sees the refusal and the lanes whose own batches still fit the account's remaining
budget are answered. :func:`map_lanes` runs a function over many items on ``lanes``
worker threads, one lane each.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from mlinvert.core import OracleInfo, Response
from mlinvert.errors import ConfigError, OracleError, QueryRejected, RateLimited
from mlinvert.oracle.base import Oracle

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: The most lanes (people attacked at once) a caller may ask for.
MAX_LANES = 64


def check_lanes(lanes: object) -> int:
    """``lanes`` if it is a whole number in 1..MAX_LANES, else a ConfigError saying so."""
    if isinstance(lanes, bool) or not isinstance(lanes, int):
        raise ConfigError(f"--lanes must be a whole number, got {lanes!r}")
    if not 1 <= lanes <= MAX_LANES:
        raise ConfigError(
            f"--lanes must be between 1 (one person at a time) and {MAX_LANES}, got {lanes}"
        )
    return lanes


#: Seconds a waiting batch is held for a lane that has not asked yet, by default: a
#: safety valve for a lane blocked on something else, far above any attack's step.
STALL_S = 10.0


@dataclass(eq=False)
class _Item:
    """One lane's waiting batch and, once sent, its answer or error."""

    lane: Lane
    x: np.ndarray
    arrived: float
    response: Response | None = None
    error: BaseException | None = None
    done: bool = False


def batch_limit(oracle: Oracle) -> int | None:
    """The most inputs one request to ``oracle`` may carry (None: no known limit).

    An HTTP oracle's info says it (``max_batch``, which the service already lowers to a
    rate limit's burst); a LocalOracle's predictor has ``max_batch`` and its guards.
    """
    limit = oracle.info.extra.get("max_batch")
    if limit is not None:
        return int(limit)
    predictor = getattr(oracle, "predictor", None)
    if predictor is None:
        return None
    out = int(predictor.max_batch)
    for guard in getattr(predictor, "guards", ()):
        rate = getattr(guard, "rate", None)
        if rate is not None:
            out = min(out, int(rate.count))
    return out


def _slice(response: Response, start: int, stop: int) -> Response:
    return Response(
        labels=response.labels[start:stop],
        probs=None if response.probs is None else response.probs[start:stop],
        confidence=None if response.confidence is None else response.confidence[start:stop],
        label_names=None if response.label_names is None else response.label_names[start:stop],
    )


class Coalescer:
    """Share ``oracle`` among up to ``lanes`` concurrent attacks, one request per step.

    A request goes when every open lane waits with its batch. ``max_wait`` (seconds;
    None: forever) bounds how long the waiting batches are held for a lane that has not
    asked yet, which only a lane blocked on something else than its queries reaches;
    ``stalls`` counts the requests sent without such a lane, and every lane open at
    such a request counts it in its own ``stalled``. ``max_batch`` caps the
    inputs of one combined request (default: what :func:`batch_limit` finds): the
    waiting batches, in lane order, are then sent in as many requests as they need (a
    single batch larger than that is passed on whole, for the oracle to split or refuse
    as it would without lanes). Requests to ``oracle`` are made one at a time, by
    whichever waiting lane thread flushes. ``requests`` counts the requests sent and
    ``inputs`` the rows they carried.
    """

    def __init__(
        self,
        oracle: Oracle,
        lanes: int,
        *,
        max_wait: float | None = STALL_S,
        max_batch: int | None = None,
    ) -> None:
        if lanes < 1:
            raise ConfigError(f"lanes must be >= 1, got {lanes}")
        if max_wait is not None and not max_wait >= 0:
            raise ConfigError(f"max_wait must be >= 0 seconds, got {max_wait}")
        if max_batch is not None and max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        self.oracle = oracle
        self.lanes = lanes
        self.max_wait = max_wait
        self.max_batch = max_batch if max_batch is not None else batch_limit(oracle)
        self.requests = 0
        self.inputs = 0
        self.stalls = 0
        self._live: set[Lane] = set()  # the open lanes
        self._cond = threading.Condition()
        self._queue: list[_Item] = []
        self._open = 0
        self._opened = 0  # lanes opened so far: the default order of the next lane
        self._busy = False
        self._carry = False  # the queue holds the rest of a batch that was ready
        self._closed = False
        self._last_done = 0.0  # time.monotonic() at the end of the last request

    @property
    def info(self) -> OracleInfo:
        """The shared oracle's info."""
        return self.oracle.info

    def lane(self, *, order: int | None = None, replacing: Lane | None = None) -> Lane:
        """Open a lane (at most ``lanes`` at once); close it when its attack ends.

        ``order`` places the lane's batches within a combined request (default: the
        order the lanes were opened in). ``replacing`` closes that lane in the same step,
        so the other lanes never send without the next attack of the same worker.
        """
        with self._cond:
            if self._closed:
                raise OracleError("this Coalescer is closed; create a new one")
            if replacing is not None and not replacing._closed:
                replacing._closed = True
                self._live.discard(replacing)
            elif self._open >= self.lanes:
                raise ConfigError(
                    f"all {self.lanes} lanes are open; close one first or create the "
                    "Coalescer with more lanes"
                )
            else:
                self._open += 1
            self._opened += 1
            lane = Lane(self, self._opened if order is None else order)
            self._live.add(lane)
            return lane

    def close(self) -> None:
        """Refuse new lanes and abort every waiting batch (OracleError in its lane)."""
        with self._cond:
            self._closed = True
            for item in self._queue:
                item.error = OracleError("the shared oracle was closed while this batch waited")
                item.done = True
            self._queue.clear()
            self._cond.notify_all()

    # -- internals (called by lanes) ----------------------------------------------
    def _release(self, lane: Lane) -> None:
        with self._cond:
            if not lane._closed:
                lane._closed = True
                self._live.discard(lane)
                self._open -= 1
                self._cond.notify_all()

    def _ready(self, now: float) -> bool:
        if not self._queue or self._busy:
            return False
        if self._carry or len(self._queue) >= self._open:
            return True
        deadline = self._deadline()
        if deadline is None or now < deadline:
            return False
        self.stalls += 1
        for lane in self._live:  # the requests' make-up now differs for every open lane
            lane.stalled += 1
        log.warning(
            "%d of %d lanes did not ask for %.1f s; sending the other lanes' batches without them",
            self._open - len(self._queue),
            self._open,
            self.max_wait,
        )
        return True

    def _deadline(self) -> float | None:
        """When the waiting batches go without a lane that has not asked (None: never).

        Counted from the later of the oldest batch's arrival and the end of the last
        request: lanes answered by that request are computing their next step.
        """
        if self.max_wait is None:
            return None
        return max(self._queue[0].arrived, self._last_done) + self.max_wait

    def _take(self) -> list[_Item]:
        """The first waiting batches, in lane order, that fit in one request (at least one)."""
        if not self._carry:
            self._queue.sort(key=lambda item: item.lane.order)
        batch: list[_Item] = []
        n = 0
        for item in self._queue:
            if batch and self.max_batch is not None and n + len(item.x) > self.max_batch:
                break
            batch.append(item)
            n += len(item.x)
        del self._queue[: len(batch)]
        self._carry = bool(self._queue)
        return batch

    def _submit(self, lane: Lane, x: np.ndarray) -> Response:
        item = _Item(lane=lane, x=x, arrived=time.monotonic())
        with self._cond:
            if self._closed:
                raise OracleError("the shared oracle was closed; no more queries")
            self._queue.append(item)
            self._cond.notify_all()
        while not item.done:
            batch: list[_Item] | None = None
            with self._cond:
                while not item.done:
                    now = time.monotonic()
                    if self._ready(now):
                        batch = self._take()
                        self._busy = True
                        break
                    timeout = None
                    if self._queue and not self._busy:
                        deadline = self._deadline()
                        if deadline is not None:
                            timeout = max(deadline - now, 0.0)
                    self._cond.wait(timeout)
            if batch is not None:  # this thread sends the next request (maybe not its own)
                try:
                    self._send(batch)
                except BaseException as exc:  # a fault of ours: fail the batch, not the run
                    for it in batch:
                        if it.response is None and it.error is None:
                            it.error = exc
                finally:
                    with self._cond:
                        self._busy = False
                        self._last_done = time.monotonic()
                        for it in batch:
                            it.done = True
                        self._cond.notify_all()
        if item.error is not None:
            raise item.error
        assert item.response is not None  # set by _send whenever no error is
        return item.response

    def _send(self, batch: list[_Item]) -> None:
        """One request for ``batch``; each item gets its rows or the request's error."""
        before = self.oracle.n_queries
        x = batch[0].x if len(batch) == 1 else np.concatenate([i.x for i in batch])
        try:
            response = self.oracle.query(x)
        except (QueryRejected, RateLimited) as exc:
            # bad input of one lane: only that lane is refused; a rate limit that the
            # combined batch overdraws may still admit some lanes' own batches
            if len(batch) > 1:
                for it in batch:
                    self._send([it])
                return
            self._fail(batch, exc, self.oracle.n_queries - before)
            return
        except BaseException as exc:  # every lane in the request sees the same outcome
            self._fail(batch, exc, self.oracle.n_queries - before)
            return
        if len(response) != len(x):
            self._fail(
                batch,
                OracleError(f"the oracle answered {len(response)} rows for {len(x)} inputs"),
                self.oracle.n_queries - before,
            )
            return
        self.requests += 1
        self.inputs += len(x)
        start = 0
        for it in batch:
            stop = start + len(it.x)
            it.response = _slice(response, start, stop)
            it.lane._count(stop - start)
            start = stop

    def _fail(self, batch: list[_Item], exc: BaseException, answered: int) -> None:
        """Raise ``exc`` in every lane of ``batch``; rows the oracle answered before it
        failed (a split request) are counted to the lanes that sent them, in order."""
        if answered > 0:
            self.requests += 1
            self.inputs += answered
        for it in batch:
            paid = min(answered, len(it.x))
            it.lane._count(paid)
            answered -= paid
            it.error = exc


class Lane:
    """One attack's view of a :class:`Coalescer`: an Oracle counting its own inputs.

    ``order`` places its batches within a combined request. ``stalled`` counts the
    requests sent without some lane while this one was open (the stall valve): this
    lane's later requests then carried other rows than in a run where every lane kept
    pace, and a model whose scores depend on the batch (float rounding in a batched
    forward) may answer it in other last bits, so a seeded re-run may differ."""

    def __init__(self, coalescer: Coalescer, order: int) -> None:
        self._coalescer = coalescer
        self.order = order
        self.stalled = 0
        self._n = 0
        self._closed = False

    @property
    def info(self) -> OracleInfo:
        """The shared oracle's info."""
        return self._coalescer.info

    @property
    def n_queries(self) -> int:
        """Inputs of this lane answered so far (other lanes' inputs never count here)."""
        return self._n

    def _count(self, n: int) -> None:
        self._n += n

    def query(self, x: np.ndarray) -> Response:
        """Answer ``x`` in the next combined request (blocks until it is answered)."""
        if self._closed:
            raise OracleError("this lane is closed; open a new one from the Coalescer")
        try:
            arr = np.asarray(x, dtype=np.float32)
        except (ValueError, TypeError):
            raise QueryRejected("inputs must be an array of numbers") from None
        shape = tuple(self.info.input_shape)
        if arr.ndim != len(shape) + 1 or arr.shape[1:] != shape:
            raise QueryRejected(
                f"model {self.info.model!r} expects a batch of shape "
                f"(n, {', '.join(map(str, shape))}), got {arr.shape}"
            )
        if arr.shape[0] == 0:
            raise QueryRejected("empty batch: send at least one input")
        return self._coalescer._submit(self, arr)

    def close(self) -> None:
        """Leave the coalescer: the other lanes stop waiting for this one."""
        self._coalescer._release(self)

    def __enter__(self) -> Lane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def map_lanes(
    fn: Callable[[T, Lane], R],
    items: Iterable[T],
    oracle: Oracle,
    *,
    lanes: int,
    max_wait: float | None = STALL_S,
    on_done: Callable[[T, Future[R]], None] | None = None,
) -> list[Future[R]]:
    """Run ``fn(item, lane)`` for every item, ``lanes`` at a time, probes coalesced.

    Each call gets a fresh lane of one :class:`Coalescer` over ``oracle`` (closed when
    the call returns or raises), placed in requests by the item's position. The workers'
    lanes are open before any call starts, and a worker takes the next item as its call
    ends and opens that item's lane in the same step as it closes the last one, so the
    requests sent depend on the calls' queries alone: each carries one batch of every
    running worker, and their number is the most queries any worker's items send.
    ``on_done(item, future)`` is called in the caller's thread as each call finishes
    (completion order); the futures are returned in item order. If the caller's thread
    is interrupted (an exception in ``on_done``, Ctrl-C), the coalescer is closed, so
    the running calls fail fast, and the rest never start.
    """
    todo = list(items)
    coalescer = Coalescer(oracle, lanes, max_wait=max_wait)
    futures: list[Future[R]] = [Future() for _ in todo]
    upcoming = iter(range(len(todo)))
    pick = threading.Lock()

    def worker(lane: Lane) -> None:
        try:
            while True:
                with pick:
                    i = next(upcoming, None)
                if i is None:
                    return
                if not futures[i].set_running_or_notify_cancel():
                    continue  # cancelled: the caller was interrupted
                try:
                    lane = coalescer.lane(order=i, replacing=lane)
                    futures[i].set_result(fn(todo[i], lane))
                except BaseException as exc:
                    futures[i].set_exception(exc)
        finally:
            lane.close()

    workers = min(lanes, len(todo))
    pool = ThreadPoolExecutor(max_workers=max(workers, 1), thread_name_prefix="lane")
    try:
        # every worker's lane is open before any asks: no first request goes alone
        for lane in [coalescer.lane() for _ in range(workers)]:
            pool.submit(worker, lane)
        index = {id(f): i for i, f in enumerate(futures)}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in sorted(finished, key=lambda f: index[id(f)]):
                if on_done is not None:
                    on_done(todo[index[id(f)]], f)
    except BaseException:
        for f in futures:
            f.cancel()
        coalescer.close()
        raise
    finally:
        pool.shutdown(wait=True)
    log.debug(
        "%d calls on %d lanes: %d requests, %d inputs",
        len(todo),
        lanes,
        coalescer.requests,
        coalescer.inputs,
    )
    return futures
