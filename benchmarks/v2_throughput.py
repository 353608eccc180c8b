"""The Open Inference Protocol (``--protocol v2``) beside the mlinvert raw form: inputs/s
at batch 64 on the digits softmax, every cell in one run.

Trains the digits softmax target (``train_target(digits, "softmax", seed=0)``, 8x8
inputs, 10 classes), saves it and serves it with ``mlinvert serve --protocol v2`` in a
subprocess (ServiceProcess, one BLAS thread, ``--max-batch 64``, no defence). The bodies
are what ``tritonclient[http]`` sends (``InferenceServerClient.generate_request_body``):
"v2 JSON" a flat ``data`` list with the outputs asked as JSON, "v2 binary" the tensor's
bytes after the JSON header (``Inference-Header-Content-Length``) with the outputs asked
as binary; "mlinvert raw" is ``POST /v1/models/digits/predict`` with the octet-stream
body. These three are posted pre-encoded with one keep-alive httpx client, so they
measure the service. "v2 binary, tritonclient" is the real client end to end
(``InferenceServerClient.infer``: it encodes the batch and decodes the answer each
time). In process = the same Predictor called in this process (the ceiling). The cells
take turns one request at a time (``service_forms.round_robin``), so they meet the same
load. Every answer must be 200, or the run stops. Results go to ``--out`` (JSON) first,
then a Markdown table is printed.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/v2_throughput.py \
        [--seconds 1.5] [--repeats 3] [--out benchmarks/out/v2_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Protocol

import httpx
import numpy as np
import tritonclient.http as triton

from mlinvert.data import load as load_data
from mlinvert.defenses import Predictor, parse_policy
from mlinvert.oracle import LocalOracle
from mlinvert.service import Store
from mlinvert.service.runner import ServiceProcess
from mlinvert.targets.io import save
from mlinvert.targets.training import train_target
from service_forms import round_robin
from service_throughput import ONE_THREAD

BATCH = 64
CELLS = ("v2 JSON", "v2 binary", "mlinvert raw", "v2 binary, tritonclient")


def v2_body(x: np.ndarray, *, binary: bool) -> tuple[bytes, dict[str, str]]:
    """What tritonclient sends for ``x``: the body and its extra headers."""
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [
        triton.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "label")
    ]
    body, json_size = triton.InferenceServerClient.generate_request_body([tensor], outputs)
    headers = {} if json_size is None else {"Inference-Header-Content-Length": str(json_size)}
    return body, headers


def poster(
    client: httpx.Client, url: str, body: bytes, headers: dict[str, str], **params: str
) -> Callable[[], None]:
    def post() -> None:
        r = client.post(url, content=body, headers=headers, params=params)
        if r.status_code != 200:
            raise SystemExit(f"{url}: HTTP {r.status_code}: {r.text[:300]}")

    return post


class Closable(Protocol):
    """A client to close at the end (httpx's, tritonclient's)."""

    def close(self) -> None: ...


def cells_for(
    service: ServiceProcess, key: str, x: np.ndarray, stack: list[Closable]
) -> dict[tuple[str, str], Callable[[], object]]:
    """One call per cell, each sending ``x`` once."""
    client = httpx.Client(timeout=120.0, headers={"X-API-Key": key})
    stack.append(client)
    infer = f"{service.url}/v2/models/digits/infer"
    json_body, json_headers = v2_body(x, binary=False)
    bin_body, bin_headers = v2_body(x, binary=True)
    shape = ",".join(map(str, x.shape))
    raw_headers = {"Content-Type": "application/octet-stream"}
    triton_client = triton.InferenceServerClient(url=f"{service.host}:{service.port}")
    stack.append(triton_client)

    def end_to_end() -> None:
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        result = triton_client.infer("digits", [tensor], headers={"X-API-Key": key})
        result.as_numpy("probabilities")

    return {
        ("v2 JSON", "-"): poster(client, infer, json_body, json_headers),
        ("v2 binary", "-"): poster(client, infer, bin_body, bin_headers),
        ("mlinvert raw", "-"): poster(
            client,
            service.model_url("digits") + "/predict",
            x.astype("<f4").tobytes(),
            raw_headers,
            shape=shape,
            dtype="float32",
        ),
        ("v2 binary, tritonclient", "-"): end_to_end,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/v2_throughput.json"))
    args = parser.parse_args()
    trained = train_target(load_data("digits", seed=0), "softmax", seed=0)
    model = trained.model
    x = np.random.default_rng(0).random((BATCH, *model.input_shape_), dtype=np.float32)
    local = LocalOracle(Predictor(model, name="digits", policy=parse_policy("full"), max_batch=64))
    runs: dict[str, list[list[float]]] = {}
    load_before = os.getloadavg()
    opened: list[Closable] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "digits-softmax"
        save(model, folder, card=trained.card)
        db = Path(tmp) / "service.db"
        key, _ = Store(db).create_key("bench")
        with ServiceProcess(
            [f"digits={folder}"], db=db, max_batch=64, protocol="v2", env=ONE_THREAD
        ) as service:
            cells: dict[tuple[str, str], Callable[[], object]] = {
                ("in-process", "-"): partial(local.query, x)
            }
            cells |= cells_for(service, key, x, opened)
            for _ in range(args.repeats):
                for (name, _), stats in round_robin(cells, BATCH, args.seconds).items():
                    runs.setdefault(name, []).append(list(stats))
            for thing in opened:
                thing.close()
    load_after = os.getloadavg()
    medians = {name: np.median(np.array(r), axis=0).tolist() for name, r in runs.items()}
    doc = {
        "model": f"digits softmax {tuple(model.input_shape_)} -> {len(model.classes_)} classes",
        "batch": BATCH,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_before": load_before,
        "load_after": load_after,
        "seconds": args.seconds,
        "repeats": args.repeats,
        "medians": medians,  # cell -> [inputs/s, p50 ms, p99 ms]
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(f"results: {args.out}")
    print(
        f"{doc['model']}, batch {BATCH}, {doc['machine']}; load average "
        f"{'/'.join(f'{v:.1f}' for v in load_before)} before, "
        f"{'/'.join(f'{v:.1f}' for v in load_after)} after; medians of {args.repeats} "
        f"repeats of {args.seconds:g} s"
    )
    print("| cell | inputs/s | p50 ms | p99 ms | / in-process |")
    print("|---|---:|---:|---:|---:|")
    ceiling = medians["in-process"][0]
    for name in ("in-process", *CELLS):
        rate, p50, p99 = medians[name]
        print(f"| {name} | {rate:,.0f} | {p50:.1f} | {p99:.1f} | {rate / ceiling:.2f} |")


if __name__ == "__main__":
    main()
