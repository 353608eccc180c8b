"""Lockstep batching: several attacks share one oracle, their probes sent together.

A served model's forward costs nearly the same for 1 input as for 40 (and an HTTP
request has its own fixed cost), so k black-box attacks that each send a batch of 11
probes per step are k times cheaper per query when their batches travel in one
request. :class:`Coalescer` owns the real oracle and hands out *lanes*: each lane is
an :class:`~mlinvert.oracle.Oracle` for one attack (one thread), counting exactly its
own inputs. ``lane.query(x)`` waits until every open lane is waiting (or ``max_wait``
seconds have passed since the oldest waiting batch arrived and the last request ended,
so a lane that is busy computing cannot stall the others for long), then one combined
request carries every waiting lane's inputs and each lane gets back its own rows. An
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

from mlinvert.errors import ConfigError, OracleError, QueryRejected, RateLimited
from mlinvert.oracle.base import Oracle, OracleInfo, Response

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

    ``max_wait`` (seconds) bounds how long a waiting batch is held for lanes that have
    not asked yet; ``max_batch`` caps the inputs of one combined request (default: what
    :func:`batch_limit` finds; a single batch larger than that is passed on whole, for
    the oracle to split or refuse as it would without lanes). Requests to ``oracle``
    are made one at a time, by whichever waiting lane thread flushes. ``requests``
    counts the requests sent and ``inputs`` the rows they carried.
    """

    def __init__(
        self,
        oracle: Oracle,
        lanes: int,
        *,
        max_wait: float = 0.05,
        max_batch: int | None = None,
    ) -> None:
        if lanes < 1:
            raise ConfigError(f"lanes must be >= 1, got {lanes}")
        if not max_wait >= 0:
            raise ConfigError(f"max_wait must be >= 0 seconds, got {max_wait}")
        if max_batch is not None and max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        self.oracle = oracle
        self.lanes = lanes
        self.max_wait = max_wait
        self.max_batch = max_batch if max_batch is not None else batch_limit(oracle)
        self.requests = 0
        self.inputs = 0
        self._cond = threading.Condition()
        self._queue: list[_Item] = []
        self._open = 0
        self._busy = False
        self._carry = False  # the queue holds the rest of a batch that was ready
        self._closed = False
        self._last_done = 0.0  # time.monotonic() at the end of the last request

    @property
    def info(self) -> OracleInfo:
        """The shared oracle's info."""
        return self.oracle.info

    def lane(self) -> Lane:
        """Open a lane (at most ``lanes`` at once); close it when its attack ends."""
        with self._cond:
            if self._closed:
                raise OracleError("this Coalescer is closed; create a new one")
            if self._open >= self.lanes:
                raise ConfigError(
                    f"all {self.lanes} lanes are open; close one first or create the "
                    "Coalescer with more lanes"
                )
            self._open += 1
        return Lane(self)

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
    def _release(self) -> None:
        with self._cond:
            self._open -= 1
            self._cond.notify_all()

    def _ready(self, now: float) -> bool:
        if not self._queue or self._busy:
            return False
        if self._carry or len(self._queue) >= self._open:
            return True
        if self.max_batch is not None and sum(len(i.x) for i in self._queue) >= self.max_batch:
            return True
        return now >= self._deadline()

    def _deadline(self) -> float:
        """When the oldest waiting batch goes without the lanes still computing.

        Counted from the later of its arrival and the end of the last request: lanes
        answered by that request are about to ask again, and waiting for them keeps all
        lanes in one request (otherwise two halves can settle into alternating requests).
        """
        return max(self._queue[0].arrived, self._last_done) + self.max_wait

    def _take(self) -> list[_Item]:
        """The first waiting batches that fit in one request (at least one)."""
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
                        timeout = max(self._deadline() - now, 0.0)
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
    """One attack's view of a :class:`Coalescer`: an Oracle counting its own inputs."""

    def __init__(self, coalescer: Coalescer) -> None:
        self._coalescer = coalescer
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
        if not self._closed:
            self._closed = True
            self._coalescer._release()

    def __enter__(self) -> Lane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def map_lanes(
    fn: Callable[[T, Oracle], R],
    items: Iterable[T],
    oracle: Oracle,
    *,
    lanes: int,
    max_wait: float = 0.05,
    on_done: Callable[[T, Future[R]], None] | None = None,
) -> list[Future[R]]:
    """Run ``fn(item, lane)`` for every item, ``lanes`` at a time, probes coalesced.

    Each call gets a fresh lane of one :class:`Coalescer` over ``oracle`` (closed when
    the call returns or raises). ``on_done(item, future)`` is called in the caller's
    thread as each call finishes (completion order); the futures are returned in item
    order. If the caller's thread is interrupted (an exception in ``on_done``, Ctrl-C),
    the coalescer is closed, so the running calls fail fast, and the rest never start.
    """
    todo = list(items)
    coalescer = Coalescer(oracle, lanes, max_wait=max_wait)

    def call(item: T) -> R:
        with coalescer.lane() as lane:
            return fn(item, lane)

    pool = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="lane")
    futures: list[Future[R]] = []
    try:
        futures = [pool.submit(call, item) for item in todo]
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
        pool.shutdown(wait=True, cancel_futures=True)
    log.debug(
        "%d calls on %d lanes: %d requests, %d inputs",
        len(todo),
        lanes,
        coalescer.requests,
        coalescer.inputs,
    )
    return futures
