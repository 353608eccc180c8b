"""A real MLServer (Seldon's Open Inference Protocol server) for the interop tests.

MLServer pins its own dependencies, so it lives in its own virtual environment, built
once into a cache folder keyed by the pinned versions and reused by every later run
(tests/interop/box.py, shared with KServe's). The scikit-learn, numpy and joblib there
are pinned to ours, so the model file we write is the model it reads.

The served model runs MLServer's own scikit-learn runtime, subclassed only to count the
rows of every input tensor in MLServer's Prometheus metrics: the server's own count of
the inputs it answered, next to its own request counter.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from . import box

MLSERVER = "1.7.1"
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
    return [f"mlserver=={MLSERVER}", f"mlserver-sklearn=={MLSERVER}", *box.ours()]


def environment() -> Path:
    """The MLServer virtual environment, built on first use (tests/interop/box.py)."""
    return box.environment(f"mlserver-{MLSERVER}", pins())


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
        return {
            "requests": box.metric(text, "model_infer_request_success_total", label),
            "inputs": box.metric(text, f"{INPUTS_METRIC}_total", label),
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
    http, grpc, metrics = box.free_port(), box.free_port(), box.free_port()
    settings = {
        "parallel_workers": 0,  # its worker pool's processes die here
        "host": "127.0.0.1",
        "http_port": http,
        "grpc_port": grpc,
        "metrics_port": metrics,
    }
    (repo / "settings.json").write_text(json.dumps(settings, indent=1))
    root = f"http://127.0.0.1:{http}"
    command = [str(venv / "bin" / "mlserver"), "start", str(repo)]
    ready = f"{root}/v2/models/{name}/ready"
    with box.running(
        "MLServer", command, cwd=repo, log=log, ready=ready, start_timeout=START_TIMEOUT
    ) as process:
        yield MLServer(root, name, f"http://127.0.0.1:{metrics}/metrics", process)
