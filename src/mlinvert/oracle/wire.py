"""Wire formats: how an :class:`~mlinvert.oracle.http.HttpOracle` speaks to a server.

One frozen :class:`WireConfig` says which protocol a prediction API speaks, and front
ends (``attack --target``, ``audit --api``) pass that one object down:

- ``mlinvert``: ``mlinvert serve``'s own API (``/v1/models/NAME``), with accounts.
- ``v2``: the Open Inference Protocol (KServe v2; MLServer, KServe, Triton, Seldon):
  ``GET /v2/models/NAME`` for the input's name, shape and datatype and the outputs,
  ``POST /v2/models/NAME/infer`` with one tensor input; the probability output chosen
  by name or the single output; an endpoint that answers labels only is recognised.
  The tensors travel as bytes after a JSON header (the binary tensor data extension,
  ``Inference-Header-Content-Length``) when the server lists ``binary_tensor_data`` in
  ``GET /v2`` and takes such a request; as JSON otherwise (``info.extra["tensors"]``
  says which).
- ``rest``: any JSON API, by a request template (``$INPUTS`` stands for the batch as
  nested lists) and a path to the scores in the answer (``predictions[*].probabilities``).
- ``auto``: the first of those that answers, or an error naming what was tried.

The wire objects here (:class:`MlinvertWire`, :class:`V2Wire`, :class:`RestWire`)
encode a batch and decode an answer; the HttpOracle keeps the transport (retries,
429 waits, key headers), the batching and the one query count.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlsplit

import numpy as np

from mlinvert.core import OracleInfo, Response
from mlinvert.defenses.policies import score_step
from mlinvert.errors import BadRequest, ConfigError, OracleError, QueryRejected, UnknownModel

if TYPE_CHECKING:
    from mlinvert.oracle.http import HttpOracle

log = logging.getLogger(__name__)

PROTOCOLS = ("mlinvert", "v2", "rest", "auto")
#: The output MLServer's scikit-learn runtime answers probabilities on (labels otherwise).
PREDICT_PROBA = "predict_proba"
_FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64"})
_NUMPY_TYPES = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
#: What a binary output tensor's bytes hold, by its v2 datatype (little-endian).
_BINARY_TYPES = {
    **_NUMPY_TYPES,
    **{f"INT{b}": f"<i{b // 8}" for b in (8, 16, 32, 64)},
    **{f"UINT{b}": f"<u{b // 8}" for b in (8, 16, 32, 64)},
}
#: The header that gives the JSON header's length when binary tensor data follows it.
HEADER_LENGTH = "Inference-Header-Content-Length"
#: The v2 server extension of binary tensors (listed in ``GET /v2``).
BINARY_EXTENSION = "binary_tensor_data"
#: Rows of a probability output sum to 1 within this tolerance.
_SUM_TOL = 1e-3


@dataclass(frozen=True)
class Raw:
    """A raw request body (array bytes), its query parameters and extra headers."""

    data: bytes
    params: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Binary:
    """An answer of the binary tensor data extension: the JSON header and the bytes
    that follow it."""

    doc: Any
    data: bytes


def split_binary(content: bytes, length: str) -> Binary:
    """A body whose first ``length`` bytes are JSON (``Inference-Header-Content-Length``)."""
    try:
        n = int(length)
        return Binary(json.loads(content[:n]), content[n:])
    except ValueError:
        raise OracleError(
            f"an answer with {HEADER_LENGTH} {length[:20]!r} does not start with a JSON "
            "header of that length"
        ) from None


Payload = Raw | bytes | dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class WireConfig:
    """Which protocol a prediction API speaks, and what the attacker knows of it.

    ``output``: the v2 output tensor to read (default: the single output, or
    ``predict_proba`` when the server declares none). ``request`` / ``scores``: the
    ``rest`` request template (JSON with ``$INPUTS``) and the path to the scores.
    ``headers``: extra request headers (``Name: value``, e.g. an auth token).
    ``input_shape`` / ``class_names``: the model's input shape and classes when the
    server does not declare them (an audit takes them from its ``--data``).
    ``max_batch``: inputs per request for the v2 and rest protocols. ``binary`` (v2):
    None sends binary tensors when the server supports them, False always JSON.
    """

    protocol: Literal["mlinvert", "v2", "rest", "auto"] = "mlinvert"
    output: str | None = None
    request: str | None = None
    scores: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    input_shape: tuple[int, ...] | None = None
    class_names: tuple[str, ...] | None = None
    max_batch: int = 64
    binary: bool | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}"
            )
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.input_shape is not None and any(d < 1 for d in self.input_shape):
            raise ConfigError(f"input shape {self.input_shape} must have positive sizes")
        if self.protocol == "rest" and (self.request is None or self.scores is None):
            raise ConfigError(
                "--protocol rest needs --request TEMPLATE (JSON with $INPUTS) and --scores "
                "PATH (e.g. --request '{\"instances\": $INPUTS}' --scores "
                "'predictions[*].probabilities')"
            )
        if self.request is not None:
            _check_template(self.request)
        if self.scores is not None:
            parse_path(self.scores)
        if self.output is not None and self.protocol not in ("v2", "auto"):
            raise ConfigError(
                f"--output names a v2 output tensor; not for --protocol {self.protocol}"
            )

    @staticmethod
    def parse_headers(specs: list[str] | tuple[str, ...]) -> tuple[tuple[str, str], ...]:
        """``["Name: value", ...]`` (``--header``) as pairs; ConfigError if malformed."""
        pairs = []
        for spec in specs:
            name, sep, value = spec.partition(":")
            if not sep or not re.fullmatch(r"[A-Za-z0-9-]+", name.strip()):
                raise ConfigError(f"--header must look like 'Name: value', got {spec!r}")
            pairs.append((name.strip(), value.strip()))
        return tuple(pairs)

    @staticmethod
    def parse_shape(spec: str) -> tuple[int, ...]:
        """``112x92`` (or ``10304``) as a shape; ConfigError if malformed."""
        try:
            shape = tuple(int(d) for d in spec.lower().split("x"))
        except ValueError:
            raise ConfigError(f"an input shape looks like 112x92, got {spec!r}") from None
        if not shape or any(d < 1 for d in shape):
            raise ConfigError(f"an input shape looks like 112x92, got {spec!r}")
        return shape

    def to_dict(self) -> dict[str, Any]:
        """What a result records of the wire (header names only: values may be secrets)."""
        return {
            "protocol": self.protocol,
            "output": self.output,
            "request": self.request,
            "scores": self.scores,
            "headers": [name for name, _ in self.headers],
            "max_batch": self.max_batch,
            "binary": self.binary,
        }


class Wire(Protocol):
    """One protocol: describe the model, encode a batch, decode an answer."""

    #: what an error message suggests when the server's answer is not understood
    hint: str

    def describe(self, http: HttpOracle) -> OracleInfo:
        """The model's description (may spend counted probe queries through ``http``)."""
        ...

    def encode(self, x: np.ndarray) -> tuple[str, Payload]:
        """The URL to POST and the body for batch ``x``."""
        ...

    def decode(self, doc: Any, n: int) -> Response:
        """The Response in the answer ``doc`` to ``n`` inputs."""
        ...


# --------------------------------------------------------------------------- mlinvert
class MlinvertWire:
    """``mlinvert serve``'s API on ``http://HOST:PORT/v1/models/NAME``."""

    hint = "is this the URL of an `mlinvert serve` service?"

    def __init__(self, url: str, encoding: str = "binary") -> None:
        if encoding not in ("binary", "base64", "json"):
            raise ConfigError(f"encoding must be 'binary', 'base64' or 'json', got {encoding!r}")
        self.root, self.name = split_url(url, "/v1/models/")
        self.url = f"{self.root}/v1/models/{self.name}"
        self.encoding = encoding

    def describe(self, http: HttpOracle) -> OracleInfo:
        """The model's entry in ``GET /v1/models``."""
        listing = http.request("GET", f"{self.root}/v1/models", None)
        for m in listing.get("models", []) if isinstance(listing, dict) else []:
            if m.get("name") == self.name:
                return OracleInfo(
                    model=m["name"],
                    kind=m["kind"],
                    input_shape=tuple(m["input_shape"]),
                    class_names=tuple(m["class_names"]),
                    carries=m["carries"],
                    policy=m["policy"],
                    score_step=score_step(str(m["policy"])),
                    extra={
                        "max_batch": int(m["max_batch"]),
                        "rate_limit": m.get("rate_limit"),
                        "detector": m.get("detector"),
                        "feature_names": m.get("feature_names"),
                        "url": self.url,
                        "protocol": "mlinvert",
                    },
                )
        if not isinstance(listing, dict) or "models" not in listing:
            raise OracleError(f"GET {self.root}/v1/models answered no model listing; {self.hint}")
        served = ", ".join(m.get("name", "?") for m in listing.get("models", []))
        raise UnknownModel(f"{self.root} serves no model {self.name!r}; served: {served}")

    def encode(self, x: np.ndarray) -> tuple[str, Payload]:
        """Raw float32 bytes, base64 in JSON, or nested lists, as ``encoding`` says."""
        data = np.ascontiguousarray(x, dtype="<f4")
        url = f"{self.url}/predict"
        if self.encoding == "binary":
            shape = ",".join(str(d) for d in data.shape)
            return url, Raw(data.tobytes(), {"shape": shape, "dtype": "float32"})
        if self.encoding == "base64":
            return url, (
                b'{"binary":{"dtype":"float32","shape":'
                + json.dumps(list(data.shape)).encode()
                + b',"data":"'
                + base64.b64encode(data.tobytes())
                + b'"}}'
            )
        return url, json.dumps({"inputs": x.tolist()}).encode()

    def decode(self, doc: Any, n: int) -> Response:
        """``{"predictions": [{"label", "label_name", "scores", "confidence"}, ...]}``."""
        preds = doc["predictions"]
        if len(preds) != n:
            raise OracleError(f"the service answered {len(preds)} predictions for {n} inputs")
        scores = [p["scores"] for p in preds]
        conf = [p["confidence"] for p in preds]
        return Response(
            labels=np.array([p["label"] for p in preds], dtype=np.int64),
            probs=None if any(s is None for s in scores) else np.array(scores, dtype=np.float64),
            confidence=None if any(c is None for c in conf) else np.array(conf, dtype=np.float64),
            label_names=tuple(p["label_name"] for p in preds),
        )


def split_url(url: str, prefix: str) -> tuple[str, str]:
    """``http://HOST:PORT/ROOT{prefix}NAME`` as (``http://HOST:PORT/ROOT``, NAME)."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    if parts.scheme not in ("http", "https") or not parts.netloc or prefix not in path:
        raise ConfigError(f"the URL {url!r} must look like http://HOST:PORT{prefix}NAME")
    root, name = path.rsplit(prefix, 1)
    if not name or "/" in name:
        raise ConfigError(f"the URL {url!r} must end in {prefix}NAME")
    return f"{parts.scheme}://{parts.netloc}{root}", name


# --------------------------------------------------------------------------- answers
def probs_or_labels(
    values: np.ndarray, n: int, what: str, *, integral: bool
) -> tuple[np.ndarray | None, np.ndarray]:
    """(probs, labels) of an answer ``values`` to ``n`` inputs: a float ``(n, k>1)``
    array whose rows are probability vectors, or ``(n,)`` / ``(n, 1)`` class indices.

    ``integral``: the server declared an integer type. OracleError naming ``what``
    otherwise (an output that is neither).
    """
    if values.ndim == 0 or values.shape[0] != n:
        raise OracleError(f"{what} holds {values.shape} values for {n} inputs")
    flat = values.reshape(n, -1)
    if flat.shape[1] == 1 or integral:
        labels = flat[:, 0] if flat.shape[1] == 1 else None
        if labels is None or not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise OracleError(
                f"{what} is neither a probability vector per input nor a class index "
                f"(shape {values.shape}); choose the probability output"
            )
        return None, labels.astype(np.int64)
    probs = flat.astype(np.float64)
    sums = probs.sum(axis=1)
    if not np.all(np.isfinite(probs)) or probs.min() < -_SUM_TOL or probs.max() > 1 + _SUM_TOL:
        raise OracleError(
            f"{what} is not a probability vector per input (values outside [0, 1]); "
            "choose the probability output"
        )
    if np.any(np.abs(sums - 1) > _SUM_TOL):
        raise OracleError(
            f"{what} is not a probability vector per input (rows sum to {sums.min():.3g}.."
            f"{sums.max():.3g}, not 1): choose the probability output, not logits or scores"
        )
    return probs, probs.argmax(axis=1).astype(np.int64)


def _classes(config: WireConfig, k: int | None, url: str) -> tuple[str, ...]:
    """The class names: the config's (checked against ``k``), else ``0..k-1``."""
    if config.class_names is not None:
        if k is not None and k != len(config.class_names):
            raise OracleError(
                f"{url} answers {k} probabilities per input, the classes given are "
                f"{len(config.class_names)}: pass the data (or --classes) the model was trained on"
            )
        return config.class_names
    if k is None:
        raise ConfigError(
            f"{url} answers labels only and does not say its classes: pass --classes N "
            "(or audit with --data, whose classes are the model's)"
        )
    return tuple(str(i) for i in range(k))


def probe_input(shape: tuple[int, ...]) -> np.ndarray:
    """The one mid-grey input a description sends when the server declares too little."""
    return np.full((1, *shape), 0.5, dtype=np.float32)


# --------------------------------------------------------------------------- v2
class V2Wire:
    """The Open Inference Protocol on ``http://HOST:PORT/v2/models/NAME``."""

    hint = "is this the URL of an Open Inference Protocol (v2) model?"

    def __init__(self, url: str, config: WireConfig) -> None:
        self.root, self.name = split_url(url, "/v2/models/")
        self.url = f"{self.root}/v2/models/{self.name}"
        self.config = config
        self.input_name = "input-0"
        self.datatype = "FP32"
        self.tensor_shape: tuple[int, ...] | None = None
        self.output: str | None = config.output
        #: tensors as bytes after the JSON header (the binary tensor data extension)
        self.binary = False

    def describe(self, http: HttpOracle) -> OracleInfo:
        """Read ``GET /v2/models/NAME``; probe once when it declares no outputs' sizes."""
        meta = self._metadata(http)
        shape = self._read_input(meta)
        self.binary = self.config.binary is not False and (
            self.config.binary is True or self._lists_binary(http)
        )
        outputs = [str(o.get("name")) for o in meta.get("outputs") or [] if isinstance(o, dict)]
        if self.output is not None and outputs and self.output not in outputs:
            raise ConfigError(
                f"{self.url} has no output {self.output!r}; its outputs: {', '.join(outputs)}"
            )
        if self.output is None and len(outputs) == 1:
            self.output = outputs[0]
        elif self.output is None and outputs:
            raise ConfigError(
                f"{self.url} has several outputs ({', '.join(outputs)}): choose the "
                "probability output with --output NAME"
            )
        probe = self._first_answer(http, shape, asked=not outputs and self.output is None)
        k = None if probe.probs is None else int(probe.probs.shape[1])
        log.info("%s: %s tensors", self.url, "binary" if self.binary else "JSON")
        if probe.probs is None:
            log.warning(
                "%s answers labels only (output %s): score-based attacks cannot run",
                self.url,
                self.output or "the default",
            )
        return OracleInfo(
            model=self.name,
            kind=str(meta.get("platform") or "v2"),
            input_shape=shape,
            class_names=_classes(self.config, k, self.url),
            carries="probs" if k is not None else "label",
            extra={
                "max_batch": self.config.max_batch,
                "url": self.url,
                "protocol": "v2",
                "output": self.output,
                "input": self.input_name,
                "tensors": "binary" if self.binary else "json",
                "rate_limit": None,
                "detector": None,
            },
        )

    def _metadata(self, http: HttpOracle) -> dict[str, Any]:
        try:
            meta = http.request("GET", self.url, None)
        except UnknownModel as exc:
            raise UnknownModel(
                f"the v2 server at {self.root} has no model {self.name!r} ({exc})"
                + self._served(http)
            ) from None
        if not isinstance(meta, dict) or "name" not in meta:
            raise OracleError(f"GET {self.url} answered {str(meta)[:120]!r}; {self.hint}")
        return meta

    def _lists_binary(self, http: HttpOracle) -> bool:
        """Whether ``GET /v2`` (the server's metadata) lists the binary tensor extension."""
        try:
            server = http.request("GET", f"{self.root}/v2", None)
        except OracleError as exc:
            log.info("GET %s/v2 failed (%s); sending JSON tensors", self.root, exc)
            return False
        extensions = server.get("extensions") if isinstance(server, dict) else None
        return isinstance(extensions, list) and BINARY_EXTENSION in extensions

    def _first_answer(self, http: HttpOracle, shape: tuple[int, ...], *, asked: bool) -> Response:
        """The probe (:meth:`_probe`), in binary tensors if chosen; a server that lists
        the extension but refuses such a request (unless ``binary=True`` insists) is
        spoken to in JSON from then on."""
        if not self.binary:
            return self._probe(http, shape, asked=asked)
        try:
            return self._probe(http, shape, asked=asked)
        except (BadRequest, QueryRejected) as exc:
            if self.config.binary is True:
                raise
            log.warning("%s refused binary tensors (%s); sending JSON", self.url, exc)
        self.binary = False
        self.output = self.config.output
        return self._probe(http, shape, asked=asked)

    def _served(self, http: HttpOracle) -> str:
        """``; served: ...`` from the repository index, where the server has one."""
        try:
            index = http.request("POST", f"{self.root}/v2/repository/index", {})
            names = [str(m["name"]) for m in index]
        except (OracleError, KeyError, TypeError):
            return "; check the model name at the end of the URL"
        return f"; served: {', '.join(names) or 'none'}"

    def _read_input(self, meta: dict[str, Any]) -> tuple[int, ...]:
        """The attacker's input shape; sets the tensor's name, datatype and shape."""
        inputs = [i for i in meta.get("inputs") or [] if isinstance(i, dict)]
        if len(inputs) > 1:
            names = ", ".join(str(i.get("name")) for i in inputs)
            raise ConfigError(f"{self.url} takes several inputs ({names}); mlinvert sends one")
        declared: tuple[int, ...] | None = None
        if inputs:
            self.input_name = str(inputs[0].get("name") or self.input_name)
            self.datatype = str(inputs[0].get("datatype") or "FP32").upper()
            dims = tuple(int(d) for d in inputs[0].get("shape") or ())
            declared = dims[1:] if dims and all(d > 0 for d in dims[1:]) else None
        if self.datatype not in _FLOAT_TYPES:
            raise ConfigError(
                f"{self.url} takes {self.datatype} inputs; mlinvert sends images or features "
                "as floats (FP16, FP32, FP64)"
            )
        shape = self.config.input_shape or declared
        if shape is None:
            raise ConfigError(
                f"{self.url} does not declare its input shape: pass --input-shape "
                "(e.g. 112x92), or audit with --data whose images the model reads"
            )
        if declared is not None and math.prod(declared) != math.prod(shape):
            raise ConfigError(
                f"{self.url} takes inputs of shape {declared}, not {shape} "
                f"({math.prod(declared)} vs {math.prod(shape)} values)"
            )
        # undeclared: a flat row per input, as scikit-learn runtimes read them
        self.tensor_shape = declared or (math.prod(shape),)
        return shape

    def _probe(self, http: HttpOracle, shape: tuple[int, ...], *, asked: bool) -> Response:
        """One counted query: what the answers carry. ``asked``: no output is declared,
        so first ask for ``predict_proba`` (MLServer's scikit-learn runtime answers
        labels otherwise) and fall back to the server's default output."""
        x = probe_input(shape)
        if not asked:
            return http.answer(x)
        self.output = PREDICT_PROBA
        try:
            return http.answer(x)
        except (BadRequest, QueryRejected) as exc:
            reason = str(exc)
        except OracleError as exc:  # a 500: e.g. a classifier without predict_proba
            if type(exc) is not OracleError:
                raise
            reason = str(exc)
        log.info("%s refused %s (%s); reading its default output", self.url, PREDICT_PROBA, reason)
        self.output = None
        return http.answer(x)

    def encode(self, x: np.ndarray) -> tuple[str, Payload]:
        """``{"inputs": [one tensor]}`` and the chosen output: JSON, or a JSON header
        followed by the tensor's bytes (and asking for binary outputs)."""
        assert self.tensor_shape is not None  # set by describe, which query calls first
        data = np.ascontiguousarray(x, dtype=_NUMPY_TYPES[self.datatype])
        tensor: dict[str, Any] = {
            "name": self.input_name,
            "shape": [int(x.shape[0]), *self.tensor_shape],
            "datatype": self.datatype,
        }
        body: dict[str, Any] = {"inputs": [tensor]}
        if self.binary:
            tensor["parameters"] = {"binary_data_size": data.nbytes}
            body["parameters"] = {"binary_data_output": True}
        else:
            tensor["data"] = data.reshape(-1).tolist()
        if self.output is not None:
            body["outputs"] = [{"name": self.output}]
            if self.binary:
                body["outputs"][0]["parameters"] = {"binary_data": True}
        header = json.dumps(body).encode()
        if not self.binary:
            return f"{self.url}/infer", header
        return f"{self.url}/infer", Raw(
            header + data.tobytes(), {}, {HEADER_LENGTH: str(len(header))}
        )

    def decode(self, doc: Any, n: int) -> Response:
        """The chosen (or single) output tensor as probabilities or labels."""
        tail = b""
        if isinstance(doc, Binary):
            doc, tail = doc.doc, doc.data
        outputs = doc.get("outputs") if isinstance(doc, dict) else None
        if not isinstance(outputs, list) or not outputs:
            raise OracleError(f"{self.url}/infer answered no outputs ({str(doc)[:120]!r})")
        chosen = [o for o in outputs if self.output is None or o.get("name") == self.output]
        if len(chosen) != 1:
            names = ", ".join(str(o.get("name")) for o in outputs)
            raise OracleError(
                f"{self.url}/infer answered the outputs {names}, not one "
                f"{self.output or 'output'}: choose one with --output NAME"
            )
        out = chosen[0]
        what = f"the output {out.get('name')!r} of {self.url}"
        dtype = str(out.get("datatype", "")).upper()
        try:
            if "data" in out:
                values = np.asarray(out["data"], dtype=np.float64).reshape(out["shape"])
            else:
                values = _binary_output(outputs, out, tail).reshape(out["shape"])
        except (KeyError, TypeError, ValueError):
            raise OracleError(f"{what} is not a numeric tensor ({dtype}) of its shape") from None
        probs, labels = probs_or_labels(values, n, what, integral=dtype not in _FLOAT_TYPES)
        return Response(labels=labels, probs=probs)


def _binary_output(outputs: list[Any], out: dict[str, Any], tail: bytes) -> np.ndarray:
    """The bytes of ``out`` among the binary outputs that follow the JSON header, in the
    order of ``outputs`` (each ``parameters.binary_data_size`` long); ValueError if they
    do not add up."""
    start = 0
    for o in outputs:
        params = {} if "data" in o else o.get("parameters") or {}
        size = int(params.get("binary_data_size", 0))
        if o is out:
            if start + size > len(tail):
                raise ValueError("binary output past the end of the body")
            dtype = _BINARY_TYPES[str(out.get("datatype", "")).upper()]
            return np.frombuffer(tail[start : start + size], dtype=dtype).astype(np.float64)
        start += size
    raise ValueError("output not found")


# --------------------------------------------------------------------------- rest
_STEP = re.compile(r"\.?([A-Za-z_][A-Za-z0-9_-]*)|\[(\*|\d+)\]")


def parse_path(path: str) -> tuple[str | int | None, ...]:
    """``predictions[*].probabilities`` as steps: a key, an index, or None for ``[*]``."""
    steps: list[str | int | None] = []
    pos = 0
    while pos < len(path):
        m = _STEP.match(path, pos)
        if m is None or (pos == 0 and m.group(0).startswith(".")):
            raise ConfigError(
                f"--scores {path!r} is not a path like predictions[*].probabilities "
                f"(keys, [N] and [*]); stuck at {path[pos:]!r}"
            )
        key, index = m.groups()
        steps.append(key if key is not None else None if index == "*" else int(index))
        pos = m.end()
    if not steps:
        raise ConfigError("--scores is empty; give a path like predictions[*].probabilities")
    return tuple(steps)


def follow(doc: Any, steps: tuple[str | int | None, ...], path: str) -> Any:
    """The value at ``steps`` in ``doc`` (``[*]`` maps over a list); OracleError if absent."""
    if not steps:
        return doc
    step, rest = steps[0], steps[1:]
    if step is None:
        if not isinstance(doc, list):
            raise OracleError(f"--scores {path!r}: [*] met {type(doc).__name__}, not a list")
        return [follow(d, rest, path) for d in doc]
    if isinstance(step, int):
        ok = isinstance(doc, list) and step < len(doc)
    else:
        ok = isinstance(doc, dict) and step in doc
    if not ok:
        raise OracleError(
            f"--scores {path!r} does not match the answer: no {step!r} in "
            f"{json.dumps(doc)[:160]}; fix --scores (or --request)"
        )
    return follow(doc[step], rest, path)


def _check_template(template: str) -> None:
    if "$INPUTS" not in template:
        raise ConfigError(
            f"--request {template!r} has no $INPUTS (where the batch goes), e.g. "
            "'{\"instances\": $INPUTS}'"
        )
    try:
        json.loads(template.replace("$INPUTS", "[]"))
    except ValueError as exc:
        raise ConfigError(
            f"--request {template!r} is not JSON once $INPUTS is a list ({exc})"
        ) from None


class RestWire:
    """Any JSON prediction API: POST the template with ``$INPUTS``, read ``scores``."""

    hint = "check --request and --scores against what the API answers"

    def __init__(self, url: str, config: WireConfig) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"the URL {url!r} must look like http://HOST:PORT/PATH")
        assert config.request is not None and config.scores is not None  # checked by config
        self.url = url
        self.config = config
        self.template = config.request
        self.steps = parse_path(config.scores)

    def describe(self, http: HttpOracle) -> OracleInfo:
        """The config's input shape and classes; one counted probe for the class count."""
        shape = self.config.input_shape
        if shape is None:
            raise ConfigError(
                f"--protocol rest cannot ask {self.url} its input shape: pass --input-shape "
                "(e.g. 112x92), or audit with --data whose images the model reads"
            )
        probe = http.answer(probe_input(shape))
        k = None if probe.probs is None else int(probe.probs.shape[1])
        return OracleInfo(
            model=urlsplit(self.url).path.strip("/").split("/")[-1] or "rest",
            kind="rest",
            input_shape=shape,
            class_names=_classes(self.config, k, self.url),
            carries="probs" if k is not None else "label",
            extra={
                "max_batch": self.config.max_batch,
                "url": self.url,
                "protocol": "rest",
                "rate_limit": None,
                "detector": None,
            },
        )

    def encode(self, x: np.ndarray) -> tuple[str, Payload]:
        """The template with ``$INPUTS`` replaced by the batch as nested lists."""
        return self.url, self.template.replace("$INPUTS", json.dumps(x.tolist())).encode()

    def decode(self, doc: Any, n: int) -> Response:
        """The scores at the path: ``(n, k)`` probabilities or ``n`` class indices."""
        found = follow(doc, self.steps, str(self.config.scores))
        what = f"--scores {self.config.scores!r} in the answer of {self.url}"
        try:
            values = np.asarray(found, dtype=np.float64)
        except (TypeError, ValueError):
            raise OracleError(f"{what} is not an array of numbers: {str(found)[:120]}") from None
        integral = values.ndim == 1
        probs, labels = probs_or_labels(values, n, what, integral=integral)
        return Response(labels=labels, probs=probs)


def make_wire(url: str, config: WireConfig, encoding: str = "binary") -> Wire:
    """The wire for ``config.protocol`` (not ``auto``: see :func:`detect`)."""
    if config.protocol == "v2":
        return V2Wire(url, config)
    if config.protocol == "rest":
        return RestWire(url, config)
    return MlinvertWire(url, encoding)


def candidates(url: str, config: WireConfig, encoding: str) -> list[tuple[str, Wire | str]]:
    """``--protocol auto``: each protocol with its wire for ``url``, or why it cannot be
    one (e.g. the URL's form), in the order to try them: mlinvert, v2, rest."""
    found: list[tuple[str, Wire | str]] = []
    for protocol in ("mlinvert", "v2", "rest"):
        try:
            found.append((protocol, make_wire(url, _as(config, protocol), encoding)))
        except ConfigError as exc:
            found.append((protocol, str(exc)))
    return found


def _as(config: WireConfig, protocol: str) -> WireConfig:
    """``config`` with ``protocol`` instead of ``auto`` (ConfigError if it cannot be)."""
    import dataclasses

    if protocol != "v2" and config.output is not None:
        raise ConfigError("--output is a v2 option")
    return dataclasses.replace(config, protocol=protocol)  # type: ignore[arg-type]
