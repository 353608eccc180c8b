"""The service's request forms side by side: inputs/s at batch 1, 16 and 64 for the JSON
form (nested lists), base64 in JSON, the raw octet-stream form, and in process.

Trains the AT&T softmax target (``train_target(att, "softmax", seed=0)``), saves it and
serves it with ``mlinvert serve`` in a subprocess (ServiceProcess, one BLAS thread,
``--max-batch 64``, no defence). One client per form sends the same pre-encoded body
again and again (keep-alive httpx), so the rows measure the service, not the client's
encoder: the JSON body is byte for byte what ``HttpOracle(encoding="json")`` sends
(``json.dumps({"inputs": x.tolist()})``, float32 values written as float64, about 20
characters a number); "JSON, orjson client" is the same batch written by orjson (float32
written short, about 10). Every answer must be 200, or the run stops.
In process = the same Predictor called in this process (the ceiling). All cells of one
batch size take turns, one request at a time, so they meet the same load. The client's own
encoding time per batch (``json.dumps`` of ``tolist`` vs ``orjson`` with numpy) is
reported apart.

"transport floor" posts the raw and the JSON body with the same client to a no-op app
(``benchmarks/noop_asgi.py``) under uvicorn with the service's HTTP parser and event loop:
the cost of moving the body with no work done on it, which no change to the service can
remove (the raw path's remainder: raw p50 - floor p50 - in-process p50); "raw, socket
client" posts the raw body there through a plain socket (HTTP/1.1 written by hand), to
tell the client library's share of the floor.

``--before SRC`` also serves the same model from another checkout's ``src`` folder
(e.g. one made by ``git archive COMMIT src | tar -x -C DIR``), measured in the same
run, alternating with the current code. Results go to ``--out`` (JSON) first, then a
Markdown table is printed.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/service_forms.py \
        [--seconds 1.5] [--repeats 3] [--before DIR/src] [--out benchmarks/out/forms.json]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from mlinvert.data import load as load_data
from mlinvert.defenses import Predictor, parse_policy
from mlinvert.oracle import LocalOracle
from mlinvert.service import Store
from mlinvert.service.runner import ServiceProcess, free_port
from mlinvert.service.store import input_digests
from mlinvert.targets.io import save
from mlinvert.targets.training import train_target
from service_throughput import BATCHES, ONE_THREAD

FORMS = ("JSON", "JSON, orjson client", "base64", "raw")
#: The bodies posted to the no-op app (the transport floor).
FLOOR_FORMS = ("raw", "JSON", "raw, socket client")


@contextmanager
def transport_floor() -> Iterator[str]:
    """The URL of ``noop_asgi:app`` served by uvicorn on loopback (one BLAS thread, as
    the service), stopped on exit."""
    port = free_port()
    args = ["-m", "uvicorn", "noop_asgi:app", "--app-dir", str(Path(__file__).parent)]
    args += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    args += ["--timeout-keep-alive", "3600"]  # the socket client keeps one connection
    process = subprocess.Popen([sys.executable, *args], env={**os.environ, **ONE_THREAD})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.post(url, content=b"x")
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def request(x: np.ndarray, form: str) -> tuple[bytes, dict[str, str], dict[str, str]]:
    """The body, headers and query parameters of one prediction request."""
    if form == "raw":
        shape = ",".join(map(str, x.shape))
        return (
            x.astype("<f4").tobytes(),
            {"Content-Type": "application/octet-stream"},
            {"shape": shape, "dtype": "float32"},
        )
    if form == "JSON, orjson client":  # float32 written short: about half the bytes
        body = orjson.dumps({"inputs": x}, option=orjson.OPT_SERIALIZE_NUMPY)
        return body, {"Content-Type": "application/json"}, {}
    if form == "base64":
        doc: dict[str, Any] = {
            "binary": {
                "dtype": "float32",
                "shape": list(x.shape),
                "data": base64.b64encode(x.astype("<f4").tobytes()).decode(),
            }
        }
    else:
        doc = {"inputs": x.tolist()}
    return json.dumps(doc).encode(), {"Content-Type": "application/json"}, {}


def poster(client: httpx.Client, url: str, x: np.ndarray, form: str) -> Callable[[], None]:
    """One request of ``form`` with batch ``x`` to ``url``; SystemExit unless 200."""
    body, headers, params = request(x, form)

    def post() -> None:
        r = client.post(url, content=body, headers=headers, params=params)
        if r.status_code != 200:
            raise SystemExit(f"{form} batch {x.shape[0]}: HTTP {r.status_code}: {r.text[:300]}")

    return post


def socket_poster(url: str, x: np.ndarray, stack: ExitStack) -> Callable[[], None]:
    """The raw body of ``x`` posted to ``url`` through one plain keep-alive socket, the
    HTTP/1.1 written and read by hand (closed with ``stack``)."""
    where = httpx.URL(url)
    sock = stack.enter_context(socket.create_connection((where.host, where.port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    body, _, _ = request(x, "raw")
    head = b"POST / HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\n"
    head += b"Content-Length: %d\r\n\r\n" % len(body)

    def post() -> None:
        sock.sendall(head)
        sock.sendall(body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        status, _, rest = data.partition(b"\r\n\r\n")
        length = re.search(rb"content-length: *(\d+)", status, re.I)
        if not status.startswith(b"HTTP/1.1 200") or length is None:
            raise SystemExit(f"socket client: {status[:300]!r}")
        while len(rest) < int(length.group(1)):
            rest += sock.recv(65536)

    return post


def round_robin(
    cells: dict[tuple[str, str], Callable[[], object]], batch: int, seconds: float
) -> dict[tuple[str, str], tuple[float, float, float]]:
    """inputs/s, p50 ms and p99 ms of each call, the calls taking turns one request at a
    time for about ``seconds`` each (after one warm-up each), so every cell meets the
    same load on a shared machine."""
    for call in cells.values():
        call()
    latencies: dict[tuple[str, str], list[float]] = {cell: [] for cell in cells}
    start = time.perf_counter()
    while (
        time.perf_counter() - start < seconds * len(cells) or min(map(len, latencies.values())) < 5
    ):
        for cell, call in cells.items():
            t = time.perf_counter()
            call()
            latencies[cell].append(time.perf_counter() - t)
    out = {}
    for cell, times in latencies.items():
        ms = np.array(times) * 1000
        out[cell] = (
            batch * len(ms) / (ms.sum() / 1000),
            float(np.percentile(ms, 50)),
            float(np.percentile(ms, 99)),
        )
    return out


def server_parts(predictor: Predictor, x: np.ndarray, db: Path, repeats: int = 200) -> dict:
    """Median seconds of the parts of one raw request the service does besides moving
    the body, in this process: the prediction, the query log's digests (BLAKE3 now;
    SHA-256 cut to 128 bits, as before, for comparison) and the log commit."""
    store = Store(db)
    rows = np.ascontiguousarray(x, dtype="<f4").reshape(len(x), -1).data.cast("B")
    step = rows.nbytes // len(x)
    ways: dict[str, Callable[[], object]] = {
        "Predictor.predict": partial(predictor.predict, x, account="bench"),
        "input_digests (BLAKE3/128)": partial(input_digests, x),
        "SHA-256/128 per input (the former digest)": lambda: [
            hashlib.sha256(rows[i * step : (i + 1) * step]).digest()[:16] for i in range(len(x))
        ],
        "query-log commit": lambda: store.log_query(
            account="bench", model="att", n_inputs=len(x), outcome="ok", status=200
        ),
    }
    out = median_seconds(ways, repeats)
    store.close()
    return out


def median_seconds(ways: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Each way's median wall-clock seconds over ``repeats`` calls."""
    out = {}
    for name, way in ways.items():
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            way()
            times.append(time.perf_counter() - t)
        out[name] = float(np.median(times))
    return out


def encode_seconds(x: np.ndarray, repeats: int = 5) -> dict[str, float]:
    """Median client-side encoding time of a JSON body: the stdlib vs orjson."""
    ways = {
        "json.dumps(x.tolist())": lambda: json.dumps({"inputs": x.tolist()}).encode(),
        "orjson (OPT_SERIALIZE_NUMPY)": lambda: orjson.dumps(
            {"inputs": x}, option=orjson.OPT_SERIALIZE_NUMPY
        ),
    }
    return median_seconds(ways, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/att_faces")
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", type=Path, default=None, help="another checkout's src")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/service_forms.json"))
    args = parser.parse_args()
    if args.before is not None and not (args.before / "mlinvert" / "__init__.py").is_file():
        raise SystemExit(f"--before {args.before}: no mlinvert package there")

    dataset = load_data(f"att:{args.data}", seed=0)
    trained = train_target(dataset, "softmax", seed=0)
    model = trained.model
    rng = np.random.default_rng(0)
    inputs = {b: rng.random((b, *model.input_shape_), dtype=np.float32) for b in BATCHES}
    local = LocalOracle(Predictor(model, name="att", policy=parse_policy("full"), max_batch=64))
    versions = {"current": None} | ({"before": args.before} if args.before else {})
    # results[version][form][batch] = [inputs/s, p50 ms, p99 ms] per repeat
    results: dict[str, dict[str, dict[int, list[list[float]]]]] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        folder = Path(tmp) / "att-softmax"
        save(model, folder, card=trained.card)
        calls: dict[tuple[str, str, int], Callable[[], None]] = {}
        for version, src in versions.items():
            db = Path(tmp) / f"{version}.db"
            key, _ = Store(db).create_key("bench")
            env = dict(ONE_THREAD) | ({"PYTHONPATH": str(src.resolve())} if src else {})
            service = stack.enter_context(
                ServiceProcess([f"att={folder}"], db=db, max_batch=64, env=env)
            )
            client = stack.enter_context(httpx.Client(timeout=120.0, headers={"X-API-Key": key}))
            url = service.model_url("att") + "/predict"
            for form in FORMS:
                for b in BATCHES:
                    calls[version, form, b] = poster(client, url, inputs[b], form)
        floor = stack.enter_context(transport_floor())
        floor_client = stack.enter_context(httpx.Client(timeout=120.0))
        for form in FLOOR_FORMS:
            for b in BATCHES:
                calls["transport floor", form, b] = (
                    socket_poster(floor, inputs[b], stack)
                    if form == "raw, socket client"
                    else poster(floor_client, floor, inputs[b], form)
                )
        versions_and_floor = [*versions, "transport floor"]
        for _ in range(args.repeats):
            for b in BATCHES:
                cells: dict[tuple[str, str], Callable[[], object]] = {
                    ("in-process", "-"): partial(local.query, inputs[b])
                }
                cells |= {
                    (v, f): calls[v, f, b]
                    for v in versions_and_floor
                    for f in (FLOOR_FORMS if v == "transport floor" else FORMS)
                }
                for (version, form), stats in round_robin(cells, b, args.seconds).items():
                    per = results.setdefault(version, {}).setdefault(form, {})
                    per.setdefault(b, []).append(list(stats))
        load_after = os.getloadavg()
        parts = server_parts(local.predictor, inputs[64], Path(tmp) / "parts.db")
    medians = {
        version: {
            form: {b: np.median(np.array(runs), axis=0).tolist() for b, runs in per.items()}
            for form, per in forms.items()
        }
        for version, forms in results.items()
    }
    doc = {
        "model": f"AT&T softmax {tuple(model.input_shape_)} -> {len(model.classes_)} classes",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_before": load_before,
        "load_after": load_after,
        "seconds": args.seconds,
        "repeats": args.repeats,
        "before": str(args.before) if args.before else None,
        "medians": medians,  # version -> form -> batch -> [inputs/s, p50 ms, p99 ms]
        "client_encode_seconds_batch_64": encode_seconds(inputs[64]),
        "server_parts_seconds_batch_64": parts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(f"results: {args.out}")
    print(
        f"{doc['model']}, {doc['machine']}; load average "
        f"{'/'.join(f'{v:.1f}' for v in load_before)} before, "
        f"{'/'.join(f'{v:.1f}' for v in load_after)} after; medians of {args.repeats} "
        f"repeats of {args.seconds:g} s; inputs/s (p50 ms)"
    )
    columns = [(v, f) for v in versions for f in FORMS]
    columns += [("transport floor", f) for f in FLOOR_FORMS]
    print(
        "| batch | in-process | "
        + " | ".join(f"{f}{'' if v == 'current' else f' ({v})'}" for v, f in columns)
        + " | raw / in-process |"
    )
    print("|---:" * (len(columns) + 3) + "|")
    for b in BATCHES:
        ceiling = medians["in-process"]["-"][b]
        row = [f"{medians[v][f][b][0]:,.0f} ({medians[v][f][b][1]:.1f})" for v, f in columns]
        ratio = medians["current"]["raw"][b][0] / ceiling[0]
        print(
            f"| {b} | {ceiling[0]:,.0f} ({ceiling[1]:.1f}) | "
            + " | ".join(row)
            + f" | {ratio:.2f} |"
        )
    for b in BATCHES:
        floors = medians["transport floor"]
        floor, by_socket = floors["raw"][b][1], floors["raw, socket client"][b][1]
        raw, alone = medians["current"]["raw"][b][1], medians["in-process"]["-"][b][1]
        print(
            f"batch {b}: raw p50 {raw:.1f} ms = in process {alone:.1f} + transport floor "
            f"{floor:.1f} (with a socket client {by_socket:.1f}) + the rest "
            f"{raw - alone - floor:.1f}"
        )
    for name, seconds in doc["client_encode_seconds_batch_64"].items():
        print(f"client encoding of a batch of 64 with {name}: {seconds * 1000:.0f} ms")
    for name, seconds in doc["server_parts_seconds_batch_64"].items():
        print(f"server, one raw batch of 64, in process: {name} {seconds * 1000:.2f} ms")


if __name__ == "__main__":
    main()
