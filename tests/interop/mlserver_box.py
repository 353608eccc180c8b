"""A real MLServer (Seldon's Open Inference Protocol server) for the interop tests.

MLServer pins its own dependencies, so it lives in its own virtual environment, built
once into a cache folder (``$MLINVERT_TEST_CACHE``, default ``~/.cache/mlinvert-tests``)
keyed by the pinned versions and reused by every later run; a build is bounded by
:data:`BUILD_TIMEOUT`. The scikit-learn, numpy and joblib there are pinned to ours, so
the model file we write is the model it reads.

The served model runs MLServer's own scikit-learn runtime, subclassed only to count the
rows of every input tensor in MLServer's Prometheus metrics: the server's own count of
the inputs it answered, next to its own request counter.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

MLSERVER = "1.7.1"
#: Seconds a build of the environment may take (about 20 s to 2 min here).
BUILD_TIMEOUT = 600.0
#: Seconds MLServer may take to load the model and answer ``ready``.
START_TIMEOUT = 120.0
#: The custom metric: rows of the answered input tensors (a counter).
INPUTS_METRIC = "mlinvert_inputs"

RUNTIME = f'''
from prometheus_client import REGISTRY, Counter
from mlserver_sklearn import SKLearnModel

# prometheus_client's default registry: the one MLServer's /metrics shows when it runs
# without parallel workers (mlserver.log's histograms go elsewhere then)
try:
    INPUTS = Counter("{INPUTS_METRIC}", "rows of the input tensors answered", ["model"])
except ValueError:  # MLServer imports this module twice: the counter is there already
    INPUTS = REGISTRY._names_to_collectors["{INPUTS_METRIC}_total"]


class CountingSKLearnModel(SKLearnModel):
    """MLServer's scikit-learn runtime; counts the rows of each input it answers."""

    async def predict(self, payload):
        response = await super().predict(payload)
        INPUTS.labels(model=self.name).inc(payload.inputs[0].shape[0])
        return response
'''


def pins() -> list[str]:
    """The packages of the environment, scikit-learn, numpy and joblib pinned to ours."""
    import joblib
    import numpy
    import sklearn

    return [
        f"mlserver=={MLSERVER}",
        f"mlserver-sklearn=={MLSERVER}",
        f"scikit-learn=={sklearn.__version__}",
        f"numpy=={numpy.__version__}",
        f"joblib=={joblib.__version__}",
    ]


def environment() -> Path:
    """The MLServer virtual environment, built on first use (RuntimeError if it cannot be)."""
    cache = Path(os.environ.get("MLINVERT_TEST_CACHE", Path.home() / ".cache" / "mlinvert-tests"))
    cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(" ".join([*pins(), sys.version]).encode()).hexdigest()[:12]
    venv = cache / f"mlserver-{MLSERVER}-{key}"
    with open(cache / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build, however many test processes wait
        if not (venv / "complete").exists():
            _build(venv)
    return venv


def _build(venv: Path) -> None:
    shutil.rmtree(venv, ignore_errors=True)  # an interrupted build starts afresh
    deadline = time.monotonic() + BUILD_TIMEOUT
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    done = subprocess.run(
        [*pip, "--disable-pip-version-check", *pins()],
        capture_output=True,
        text=True,
        timeout=max(deadline - time.monotonic(), 1.0),
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip could not build MLServer's environment: {done.stderr[-800:]}")
    (venv / "complete").write_text(json.dumps(pins()) + "\n")


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    from mlinvert.service.runner import free_port as free

    return free()


@dataclass
class MLServer:
    """A running MLServer serving the scikit-learn model in ``repo/NAME/model.joblib``."""

    root: str
    name: str
    metrics_url: str
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        """The v2 model URL an HttpOracle takes."""
        return f"{self.root}/v2/models/{self.name}"

    def counts(self) -> dict[str, float]:
        """What MLServer reports of the model: ``requests`` (its successful inference
        requests) and ``inputs`` (rows of the input tensors it answered)."""
        text = httpx.get(self.metrics_url, timeout=10).text
        label = f'model="{self.name}"'

        def metric(name: str) -> float:
            pattern = rf"^{name}\{{[^}}]*{label}[^}}]*\}} (\S+)$"
            found = re.findall(pattern, text, flags=re.M)
            return sum(float(v) for v in found)

        return {
            "requests": metric("model_infer_request_success_total"),
            "inputs": metric(f"{INPUTS_METRIC}_total"),
        }


def write_repository(repo: Path, name: str, estimator: Any) -> Path:
    """An MLServer model repository serving ``estimator`` as ``name`` (joblib)."""
    import joblib

    folder = repo / name
    folder.mkdir(parents=True, exist_ok=True)
    joblib.dump(estimator, folder / "model.joblib")
    (folder / "counting.py").write_text(RUNTIME)
    settings = {
        "name": name,
        "implementation": "counting.CountingSKLearnModel",
        "parameters": {"uri": "./model.joblib"},
    }
    (folder / "model-settings.json").write_text(json.dumps(settings, indent=1))
    return repo


@contextlib.contextmanager
def serve(repo: Path, name: str, log: Path) -> Iterator[MLServer]:
    """Run MLServer on free loopback ports over ``repo`` until the block ends."""
    venv = environment()
    http, grpc, metrics = free_port(), free_port(), free_port()
    settings = {
        "parallel_workers": 0,  # its worker pool's processes die here
        "host": "127.0.0.1",
        "http_port": http,
        "grpc_port": grpc,
        "metrics_port": metrics,
    }
    (repo / "settings.json").write_text(json.dumps(settings, indent=1))
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(venv / "bin" / "mlserver"), "start", str(repo)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=repo,
            env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
        )
    server = MLServer(
        f"http://127.0.0.1:{http}", name, f"http://127.0.0.1:{metrics}/metrics", process
    )
    try:
        _wait_ready(server, log)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(server: MLServer, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"MLServer exited ({server.process.returncode}): {log.read_text()[-800:]}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"MLServer was not ready in {START_TIMEOUT:.0f} s: {log.read_text()[-800:]}")
