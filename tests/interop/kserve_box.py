"""A real KServe model server (``kserve.ModelServer``, no Kubernetes) for the interop tests.

KServe pins its own dependencies, so it lives in its own virtual environment, built once
into a cache folder keyed by the pinned versions and reused by every later run
(tests/interop/box.py, shared with MLServer's). Its scikit-learn, numpy and joblib are
pinned to ours, so the model file we write is the model it reads.

The server (tests/interop/kserve_server.py) runs as a plain process on loopback and
serves one ``model.joblib`` twice: ``NAME`` answers probabilities and ``NAME-labels``
labels, as KServe's scikit-learn server does with and without ``PREDICT_PROBA=true``.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from . import box

KSERVE = "0.21.0"
#: Seconds KServe may take to load the models and answer ``ready``.
START_TIMEOUT = 120.0
#: The served models' counter: rows of the input tensors predicted.
INPUTS_METRIC = "mlinvert_inputs"
SERVER = Path(__file__).with_name("kserve_server.py")


def pins() -> list[str]:
    """The packages of the environment, scikit-learn, numpy and joblib pinned to ours."""
    return [f"kserve=={KSERVE}", *box.ours()]


def environment() -> Path:
    """The KServe virtual environment, built on first use (tests/interop/box.py)."""
    return box.environment(f"kserve-{KSERVE}", pins())


@dataclass
class KServe:
    """A running KServe model server; its log holds its access log."""

    root: str
    log: Path
    process: subprocess.Popen[bytes]

    def url(self, name: str) -> str:
        """The v2 model URL an HttpOracle takes."""
        return f"{self.root}/v2/models/{name}"

    def counts(self, name: str) -> dict[str, float]:
        """What KServe reports of model ``name``: ``predicted`` (its
        ``request_predict_seconds`` histogram's count: predict calls), ``inputs`` (rows
        predicted), and from its access log the inference requests it ``answered`` (200)
        and ``refused`` (4xx), for which it may have predicted all the same."""
        text = httpx.get(f"{self.root}/metrics", timeout=10).text
        label = f'model_name="{name}"'
        statuses = re.findall(
            rf'"POST /v2/models/{re.escape(name)}/infer HTTP/1\.1" (\d+)', self.log.read_text()
        )
        return {
            "predicted": box.metric(text, "request_predict_seconds_count", label),
            "inputs": box.metric(text, f"{INPUTS_METRIC}_total", label),
            "answered": float(statuses.count("200")),
            "refused": float(sum(s.startswith("4") for s in statuses)),
        }


@contextlib.contextmanager
def serve(model_file: Path, name: str, log: Path) -> Iterator[KServe]:
    """Run KServe on a free loopback port, serving ``model_file`` as ``name``
    (probabilities) and ``name-labels`` (labels), until the block ends."""
    venv = environment()
    port = box.free_port()
    command = [str(venv / "bin" / "python"), str(SERVER), "--http_port", str(port)]
    command += ["--enable_grpc", "false", "--proba", f"{name}={model_file}"]
    command += ["--labels", f"{name}-labels={model_file}"]
    root = f"http://127.0.0.1:{port}"
    ready = f"{root}/v2/models/{name}/ready"
    with box.running(
        "KServe", command, cwd=log.parent, log=log, ready=ready, start_timeout=START_TIMEOUT
    ) as process:
        yield KServe(root, log, process)
