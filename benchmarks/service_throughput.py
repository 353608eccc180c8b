"""Prediction-service throughput: inputs/s and p50/p99 latency over HTTP on loopback.

Trains the AT&T softmax target (``mlinvert.targets.training.train_target``), saves it,
serves it with ``mlinvert serve`` in a subprocess (ServiceProcess, one BLAS thread) and
queries it with one HttpOracle client at batch 1, 16 and 64, JSON vs binary (plus four
concurrent binary clients at batch 64), with no defence vs
rounding + a rate limit (set high enough never to refuse, so only its cost shows),
next to the in-process LocalOracle rate through the same Predictor (the ceiling).

    nice .venv/bin/python benchmarks/service_throughput.py [--seconds 3] [--data PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from mlinvert.data import load as load_data
from mlinvert.defenses import Predictor, RateLimiter, parse_policy
from mlinvert.oracle import HttpOracle, LocalOracle
from mlinvert.service import Store
from mlinvert.service.runner import ServiceProcess
from mlinvert.targets.io import save
from mlinvert.targets.training import train_target

BATCHES = (1, 16, 64)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
DEFENCES = {"none": ("full", None), "round:2 + rate limit": ("round:2", "1000000000/hour")}


def measure(call: Callable[[], object], batch: int, seconds: float) -> tuple[float, float, float]:
    """inputs/s, p50 ms, p99 ms of ``call`` repeated for ``seconds`` after a warm-up."""
    for _ in range(3):
        call()
    latencies = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(latencies) < 20:
        t = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return len(lat) * batch / elapsed, float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


def measure_clients(
    url: str, key: str, x: np.ndarray, seconds: float, clients: int
) -> tuple[float, float, float]:
    """Like :func:`measure` with ``clients`` concurrent binary HttpOracles (own connections)."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/att_faces")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()

    dataset = load_data(f"att:{args.data}", seed=0)
    trained = train_target(dataset, "softmax", seed=0)
    model = trained.model
    rng = np.random.default_rng(0)
    inputs = {b: rng.random((b, *model.input_shape_), dtype=np.float32) for b in BATCHES}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "att-softmax"
        save(model, folder, card=trained.card)
        db = Path(tmp) / "service.db"
        key, _ = Store(db).create_key("bench")
        for label, (policy, rate) in DEFENCES.items():
            guards = [RateLimiter(rate)] if rate else []
            local = LocalOracle(
                Predictor(
                    model, name="att", policy=parse_policy(policy), guards=guards, max_batch=64
                )
            )
            for b in BATCHES:
                rows.append(
                    (
                        "in-process",
                        label,
                        b,
                        *measure(partial(local.query, inputs[b]), b, args.seconds),
                    )
                )
            with ServiceProcess(
                [f"att={folder}"],
                db=db,
                policy=policy,
                rate_limit=rate,
                max_batch=64,
                env=ONE_THREAD,
            ) as service:
                url = service.model_url("att")
                for encoding in ("json", "binary"):
                    with HttpOracle(url, key, encoding=encoding) as oracle:  # type: ignore[arg-type]
                        for b in BATCHES:
                            result = measure(partial(oracle.query, inputs[b]), b, args.seconds)
                            rows.append((f"HTTP {encoding}", label, b, *result))
                result = measure_clients(url, key, inputs[64], args.seconds, clients=4)
                rows.append(("HTTP binary, 4 clients", label, 64, *result))
    print(
        f"AT&T softmax ({model.input_shape_} -> {len(model.classes_)} classes), "
        f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} "
        f"at the end; one client unless said, {args.seconds:g} s each"
    )
    print("| path | defence | batch | inputs/s | p50 ms | p99 ms |")
    print("|---|---|---:|---:|---:|---:|")
    for path, label, b, rate, p50, p99 in rows:
        print(f"| {path} | {label} | {b} | {rate:,.0f} | {p50:.1f} | {p99:.1f} |")


if __name__ == "__main__":
    main()
