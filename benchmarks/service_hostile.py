"""Hostile request bodies against ``mlinvert serve``: the service's peak memory above idle
and another account's latency while 8 connections at once send what a hostile client
can.

Trains the AT&T softmax target (``train_target(att, "softmax", seed=0)``), serves it
with ``mlinvert serve`` in a subprocess (ServiceProcess, ``--max-batch 64``, one BLAS
thread, the default body limits) and runs each scenario with 8 concurrent raw-socket
clients while one honest account sends raw batches of 16 in a loop (at least 30 requests,
and as long as the hostile clients run; latency p50/p99, against the same loop with
nobody else):

* ``60 MB declared, no key`` / ``60 MB declared, valid key``: ``Content-Length`` of
  60 MB of ``0.1,`` (the issue's probe), sent as fast as the server takes it;
* ``60 MB chunked, valid key``: the same body without a length (chunked);
* ``largest JSON batch, valid key``: a valid batch of 64 faces as JSON, written with 16
  decimals (15.8 MB, just under the model's JSON limit): the most a body may cost;
* ``slow body, valid key``: 1 KB a second (the body timeout ends it).

Each client stops sending as soon as the answer arrives. Peak RSS is the service
process's ``VmHWM`` (``/proc/PID/status``, reset through ``/proc/PID/clear_refs``
before each scenario) minus its ``VmRSS`` just before. Results go to ``--out`` (JSON)
first, then a Markdown table is printed.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/service_hostile.py \
        [--out benchmarks/out/service_hostile.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import socket
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from mlinvert.data import load as load_data
from mlinvert.service import Store
from mlinvert.service.runner import ServiceProcess
from mlinvert.targets.io import save
from mlinvert.targets.training import train_target

CLIENTS = 8
MB = 10**6
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Scenario:
    name: str
    body: bytes  # what one client sends (repeated up to ``total``)
    total: int
    keyed: bool
    chunked: bool = False
    pause: float = 0.0  # seconds between pieces


def proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"/proc/{pid}/status has no {field}")


def hostile(port: int, path: str, key: str | None, s: Scenario) -> str:
    """Send one hostile body; the status the server answered and how much was sent."""
    headers = {"Host": "127.0.0.1", "Content-Type": "application/json"}
    if key is not None:
        headers["X-API-Key"] = key
    if s.chunked:
        headers["Transfer-Encoding"] = "chunked"
    else:
        headers["Content-Length"] = str(s.total)
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sent = 0
    answer = b""
    try:
        sock.sendall((head + "\r\n").encode())
        piece = s.body if not s.pause else s.body[:1000]
        while sent < s.total:
            if select.select([sock], [], [], 0)[0]:  # the server answered: stop sending
                break
            part = piece[: s.total - sent]
            sock.sendall(b"%x\r\n%b\r\n" % (len(part), part) if s.chunked else part)
            sent += len(part)
            if s.pause:
                time.sleep(s.pause)
        else:
            if s.chunked:
                sock.sendall(b"0\r\n\r\n")
        answer = sock.recv(4096)
    except OSError as exc:
        return f"{type(exc).__name__} after {sent / MB:.1f} MB"
    finally:
        sock.close()
    status = answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/") else "closed"
    return f"{status} after {sent / MB:.1f} MB"


def honest(
    url: str, key: str, x: np.ndarray, stop: threading.Event, most: int, least: int = 30
) -> list[float]:
    """Latencies (ms) of raw batch requests: at least ``least``, then until ``stop`` or
    ``most`` requests."""
    params = {"shape": ",".join(map(str, x.shape)), "dtype": "float32"}
    body = x.astype("<f4").tobytes()
    latencies = []
    with httpx.Client(timeout=120.0) as client:
        headers = {"X-API-Key": key, "Content-Type": "application/octet-stream"}
        for i in range(most):
            if stop.is_set() and i >= least:
                break
            t = time.perf_counter()
            r = client.post(url, content=body, params=params, headers=headers)
            if r.status_code != 200:
                raise SystemExit(f"the honest account got HTTP {r.status_code}: {r.text[:200]}")
            latencies.append((time.perf_counter() - t) * 1000)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/att_faces")
    parser.add_argument("--baseline-seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/service_hostile.json"))
    args = parser.parse_args()

    dataset = load_data(f"att:{args.data}", seed=0)
    trained = train_target(dataset, "softmax", seed=0)
    model = trained.model
    rng = np.random.default_rng(0)
    x16 = rng.random((16, *model.input_shape_), dtype=np.float32)
    faces = rng.random((64, *model.input_shape_)) * 0.999
    largest = json.dumps({"inputs": np.round(faces, 16).tolist()}).encode()
    comma = b"0.1," * 16384
    scenarios = [
        Scenario("60 MB declared, no key", comma, 60 * MB, keyed=False),
        Scenario("60 MB declared, valid key", comma, 60 * MB, keyed=True),
        Scenario("60 MB chunked, valid key", comma, 60 * MB, keyed=True, chunked=True),
        Scenario("largest JSON batch, valid key", largest, len(largest), keyed=True),
        Scenario("slow body, valid key", comma, 2 * MB, keyed=True, pause=1.0),
    ]
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "att-softmax"
        save(model, folder, card=trained.card)
        db = Path(tmp) / "service.db"
        store = Store(db)
        hostile_key, _ = store.create_key("hostile")
        honest_key, _ = store.create_key("honest")
        store.close()
        with ServiceProcess([f"att={folder}"], db=db, max_batch=64, env=ONE_THREAD) as service:
            assert service.process is not None
            pid, port = service.process.pid, service.port
            url = service.model_url("att") + "/predict"
            path = "/v1/models/att/predict"
            stop = threading.Event()
            threading.Timer(args.baseline_seconds, stop.set).start()
            baseline = honest(url, honest_key, x16, stop, 100_000)
            for s in scenarios:
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak (VmHWM)
                idle_kb = proc_kb(pid, "VmRSS")
                stop = threading.Event()
                latencies: list[float] = []
                other = threading.Thread(
                    target=lambda out=latencies, until=stop: out.extend(
                        honest(url, honest_key, x16, until, 100_000)
                    )
                )
                answers: list[str] = []
                key = hostile_key if s.keyed else None
                clients = [
                    threading.Thread(
                        target=lambda out=answers, k=key, s=s: out.append(hostile(port, path, k, s))
                    )
                    for _ in range(CLIENTS)
                ]
                started = time.perf_counter()
                other.start()
                for c in clients:
                    c.start()
                for c in clients:
                    c.join()
                seconds = time.perf_counter() - started
                stop.set()
                other.join()
                peak_kb = proc_kb(pid, "VmHWM")
                rows.append(
                    {
                        "scenario": s.name,
                        "answers": dict(Counter(a.split(" after ")[0] for a in answers)),
                        "sent_mb": sorted(float(a.split(" after ")[1][:-3]) for a in answers),
                        "seconds": seconds,
                        "idle_rss_mb": idle_kb / 1000,
                        "peak_above_idle_mb": (peak_kb - idle_kb) / 1000,
                        "other_p50_ms": float(np.percentile(latencies, 50)),
                        "other_p99_ms": float(np.percentile(latencies, 99)),
                        "other_requests": len(latencies),
                    }
                )
                print(rows[-1], flush=True)
    doc: dict[str, Any] = {
        "model": f"AT&T softmax {tuple(model.input_shape_)}",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "clients": CLIENTS,
        "baseline": {
            "other_p50_ms": float(np.percentile(baseline, 50)),
            "other_p99_ms": float(np.percentile(baseline, 99)),
            "other_requests": len(baseline),
        },
        "scenarios": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(f"results: {args.out}")
    b = doc["baseline"]
    print(
        f"{doc['model']}, {doc['machine']}; load average "
        f"{'/'.join(f'{v:.1f}' for v in load_before)} before, "
        f"{'/'.join(f'{v:.1f}' for v in doc['load_after'])} after; {CLIENTS} hostile "
        f"clients at once; the other account alone: p50 {b['other_p50_ms']:.1f} ms, "
        f"p99 {b['other_p99_ms']:.1f} ms ({b['other_requests']} raw batches of 16)"
    )
    print(
        "| scenario | answers | MB sent per client | seconds | peak RSS above idle "
        "| other account p50 / p99 ms |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        answered = ", ".join(f"{n}× {status}" for status, n in sorted(r["answers"].items()))
        sent = r["sent_mb"]
        print(
            f"| {r['scenario']} | {answered} | {sent[0]:.1f}–{sent[-1]:.1f} | {r['seconds']:.1f} "
            f"| {r['peak_above_idle_mb']:+.0f} MB (idle {r['idle_rss_mb']:.0f} MB) "
            f"| {r['other_p50_ms']:.1f} / {r['other_p99_ms']:.1f} |"
        )


if __name__ == "__main__":
    main()
