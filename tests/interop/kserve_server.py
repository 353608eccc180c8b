"""KServe's Python model server serving scikit-learn classifiers on loopback, run with
the Python of KServe's own virtual environment (tests/interop/kserve_box.py):

    python kserve_server.py --http_port 8080 --enable_grpc false \\
        --proba faces=model.joblib --labels faces-labels=model.joblib

KServe's scikit-learn server (``sklearnserver``) is not on PyPI, so each model here is a
small ``kserve.Model`` that does what its ``SKLearnModel`` does: the input through
KServe's ``get_predict_input``, ``predict`` (labels; sklearnserver's default) or
``predict_proba`` (sklearnserver with ``PREDICT_PROBA=true``), the answer through
``get_predict_response``. ``--proba NAME=FILE`` serves probabilities, ``--labels
NAME=FILE`` labels. Each model also counts the rows it predicts in the Prometheus
counter ``mlinvert_inputs_total`` on KServe's ``/metrics``, beside KServe's own
per-model histograms. ``--http_port`` and ``--enable_grpc`` are KServe's own options.
KServe's REST server binds 0.0.0.0; this one binds 127.0.0.1.
"""

import argparse
from typing import Any

import joblib
from kserve import Model, ModelServer, model_server
from kserve.utils.utils import get_predict_input, get_predict_response
from prometheus_client import Counter

INPUTS = Counter("mlinvert_inputs", "rows of the input tensors predicted", ["model_name"])


class LoopbackRESTServer(model_server.RESTServer):
    """KServe's REST server on 127.0.0.1 instead of every interface."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config.host = "127.0.0.1"


class CountingSKLearnModel(Model):
    """A scikit-learn classifier answering labels, or probabilities if ``proba``."""

    def __init__(self, name: str, path: str, proba: bool) -> None:
        super().__init__(name)
        self.path = path
        self.proba = proba
        self.estimator: Any = None

    def load(self) -> bool:
        self.estimator = joblib.load(self.path)
        self.ready = True
        return bool(self.ready)

    def predict(self, payload: Any, headers: Any = None) -> Any:
        x = get_predict_input(payload)
        answer = self.estimator.predict_proba(x) if self.proba else self.estimator.predict(x)
        INPUTS.labels(model_name=self.name).inc(len(x))
        return get_predict_response(payload, answer, self.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--proba", action="append", default=[], metavar="NAME=FILE")
    parser.add_argument("--labels", action="append", default=[], metavar="NAME=FILE")
    args, _ = parser.parse_known_args()  # KServe's ModelServer reads its own options
    models = []
    for specs, proba in ((args.proba, True), (args.labels, False)):
        for spec in specs:
            name, _, path = spec.partition("=")
            model = CountingSKLearnModel(name, path, proba)
            model.load()
            models.append(model)
    model_server.RESTServer = LoopbackRESTServer
    ModelServer().start(models)


if __name__ == "__main__":
    main()
