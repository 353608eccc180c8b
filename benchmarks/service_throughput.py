"""Prediction-service throughput: inputs/s and p50/p99 latency over HTTP on loopback.

Trains the AT&T softmax target (``mlinvert.targets.training.train_target``), saves it,
serves it with ``mlinvert serve`` in a subprocess (ServiceProcess, one BLAS thread) and
queries it with one HttpOracle client at batch 1, 16 and 64 in the three request forms
(JSON nested lists, base64 in JSON, raw application/octet-stream bytes; plus four
concurrent raw clients at batch 64), with no defence vs rounding + a rate limit (set
high enough never to refuse, so only its cost shows), next to the in-process
LocalOracle rate through the same Predictor (the ceiling). ``--detector SPEC`` adds the
query detector to the defended service (e.g. ``detect:flag:1000000000``: it fingerprints
and matches every input but never refuses; the benchmark re-sends the same inputs, so
every input is a near duplicate: the detector's most expensive path).

The machine is shared, so both services run at once and every measurement alternates
no defence / defences, ``--repeats`` times; the table gives the medians of the repeats
and the load average before and after.

    nice .venv/bin/python benchmarks/service_throughput.py [--seconds 1.5] [--repeats 3] \
        [--detector detect:flag:1000000000]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mlinvert.data import load as load_data
from mlinvert.defenses import Predictor, QueryDetector, RateLimiter, parse_policy
from mlinvert.oracle import HttpOracle, LocalOracle
from mlinvert.service import Store
from mlinvert.service.runner import ServiceProcess
from mlinvert.targets.io import save
from mlinvert.targets.training import train_target

BATCHES = (1, 16, 64)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def measure(call: Callable[[], object], batch: int, seconds: float) -> tuple[float, float, float]:
    """inputs/s, p50 ms, p99 ms of ``call`` repeated for ``seconds`` after a warm-up."""
    for _ in range(3):
        call()
    latencies: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(latencies) < 5:
        t = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return len(lat) * batch / elapsed, float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


def measure_clients(
    url: str, key: str, x: np.ndarray, seconds: float, clients: int
) -> tuple[float, float, float]:
    """Like :func:`measure` with ``clients`` concurrent raw-binary HttpOracles (own connections)."""
    results: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)

    def run(i: int) -> None:
        with HttpOracle(url, key) as oracle:
            oracle.query(x)
            start.wait()
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                t = time.perf_counter()
                oracle.query(x)
                results[i].append(time.perf_counter() - t)

    pool = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in pool:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    lat = np.concatenate([np.array(r) for r in results]) * 1000
    return (
        len(lat) * x.shape[0] / elapsed,
        float(np.percentile(lat, 50)),
        float(np.percentile(lat, 99)),
    )


Row = tuple[str, int]  # (path, batch)
ENCODINGS: tuple[tuple[Literal["json", "base64", "binary"], str], ...] = (
    ("json", "HTTP JSON"),
    ("base64", "HTTP base64"),
    ("binary", "HTTP raw binary"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/att_faces")
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--detector", default=None, help="add this query detector when defended")
    args = parser.parse_args()
    defended = "round:2 + rate limit" + (f" + {args.detector}" if args.detector else "")
    # label -> (policy, rate limit, detector): the two configurations every row alternates
    defences = {
        "none": ("full", None, None),
        defended: ("round:2", "1000000000/hour", args.detector),
    }

    dataset = load_data(f"att:{args.data}", seed=0)
    trained = train_target(dataset, "softmax", seed=0)
    model = trained.model
    rng = np.random.default_rng(0)
    inputs = {b: rng.random((b, *model.input_shape_), dtype=np.float32) for b in BATCHES}
    # results[(path, batch)][defence] = list of (inputs/s, p50, p99), one per repeat
    results: dict[Row, dict[str, list[tuple[float, float, float]]]] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        folder = Path(tmp) / "att-softmax"
        save(model, folder, card=trained.card)
        db = Path(tmp) / "service.db"
        key, _ = Store(db).create_key("bench")
        local: dict[str, LocalOracle] = {}
        urls: dict[str, str] = {}
        for label, (policy, rate, detector) in defences.items():
            guards: list[Any] = [RateLimiter(rate)] if rate else []
            if detector:
                guards.append(QueryDetector(detector))
            local[label] = LocalOracle(
                Predictor(
                    model, name="att", policy=parse_policy(policy), guards=guards, max_batch=64
                )
            )
            service = stack.enter_context(
                ServiceProcess(
                    [f"att={folder}"],
                    db=db,
                    policy=policy,
                    rate_limit=rate,
                    detector=detector,
                    max_batch=64,
                    env=ONE_THREAD,
                )
            )
            urls[label] = service.model_url("att")
        oracles = {
            (label, encoding): stack.enter_context(HttpOracle(urls[label], key, encoding=encoding))
            for label in defences
            for encoding, _ in ENCODINGS
        }

        def jobs() -> Iterator[tuple[Row, str, Callable[[], tuple[float, float, float]]]]:
            for label in defences:
                for b in BATCHES:
                    call = partial(local[label].query, inputs[b])
                    yield ("in-process", b), label, partial(measure, call, b, args.seconds)
                for encoding, path in ENCODINGS:
                    for b in BATCHES:
                        call = partial(oracles[label, encoding].query, inputs[b])
                        yield (path, b), label, partial(measure, call, b, args.seconds)
                yield (
                    ("HTTP raw binary, 4 clients", 64),
                    label,
                    partial(measure_clients, urls[label], key, inputs[64], args.seconds, 4),
                )

        n_jobs = sum(1 for _ in jobs()) // len(defences)
        for _ in range(args.repeats):
            per_defence = [list(jobs())[i * n_jobs : (i + 1) * n_jobs] for i in range(2)]
            for pair in zip(*per_defence, strict=True):  # no defence, then defences, alternating
                for row, label, run in pair:
                    results.setdefault(row, {}).setdefault(label, []).append(run())
    load_after = os.getloadavg()
    print(
        f"AT&T softmax ({model.input_shape_} -> {len(model.classes_)} classes), "
        f"{platform.machine()}, {os.cpu_count()} cores; load average (1/5/15 min) "
        f"{'/'.join(f'{v:.1f}' for v in load_before)} before, "
        f"{'/'.join(f'{v:.1f}' for v in load_after)} after; one client unless said; "
        f"medians of {args.repeats} alternating repeats of {args.seconds:g} s each"
    )
    none = "none"
    print(
        "| path | batch | none inputs/s | none p50 ms | none p99 ms "
        "| defended inputs/s | defended p50 ms | defended p99 ms | defence cost |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (path, b), by_label in results.items():
        a = np.median(np.array(by_label[none]), axis=0)
        d = np.median(np.array(by_label[defended]), axis=0)
        print(
            f"| {path} | {b} | {a[0]:,.0f} | {a[1]:.1f} | {a[2]:.1f} "
            f"| {d[0]:,.0f} | {d[1]:.1f} | {d[2]:.1f} | {100 * (1 - d[0] / a[0]):+.0f} % |"
        )
    print(f"defended = {defended}")


if __name__ == "__main__":
    main()
