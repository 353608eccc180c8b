"""HttpOracle: query a model served by ``mlinvert serve`` over HTTP (httpx).

Same :class:`~mlinvert.oracle.Oracle` protocol and the same counting as
:class:`~mlinvert.oracle.LocalOracle`: ``n_queries`` grows by the number of inputs
answered. One pooled connection is reused; big batches are split to the service's
``max_batch``; transient failures (connection errors, 502/503/504) are retried with
exponential backoff; a 429 is waited out as its ``Retry-After`` says, up to
``max_wait`` seconds per query, after which RateLimited is raised. :meth:`HttpOracle.account`
reads the key's account (``GET /v1/account``: its rate limit, what it may still send,
whether it is blocked) without spending a query.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import numpy as np

from mlinvert.core import OracleInfo, Response
from mlinvert.defenses.policies import score_step
from mlinvert.errors import (
    BadRequest,
    Blocked,
    ConfigError,
    InputTooLarge,
    OracleError,
    QueryRejected,
    RateLimited,
    Unauthorized,
    UnknownModel,
    UnsupportedMediaType,
)

log = logging.getLogger(__name__)


def key_fingerprint(key: str) -> str:
    """What results and checkpoints say of an API key: the start of its SHA-256 (the key
    is a secret and is never written)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:12]


_STATUS_ERRORS: dict[int, type[OracleError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Blocked,
    404: UnknownModel,
    413: InputTooLarge,
    415: UnsupportedMediaType,
    422: QueryRejected,
}
_TRANSIENT_STATUS = frozenset({502, 503, 504})


@dataclass(frozen=True, kw_only=True)
class Account:
    """What the service says of an oracle's key (``GET /v1/account``; nothing spent).

    ``blocked``: the query detector refuses the account on this oracle's model.
    ``rate_limit`` is the limit's spec (e.g. ``2000/hour``) or None; ``remaining``
    the inputs the account may send now and ``reset_in`` the seconds until its whole
    allowance is back (both None without a rate limit).
    """

    name: str
    blocked: bool
    rate_limit: str | None
    remaining: int | None
    reset_in: float | None
    inputs_answered: int


@dataclass(frozen=True)
class _Raw:
    """A raw request body (array bytes) and its query parameters."""

    data: bytes
    params: dict[str, str]


def _split_url(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    prefix = "/v1/models/"
    if parts.scheme not in ("http", "https") or not parts.netloc or prefix not in path:
        raise ConfigError(f"HttpOracle url {url!r} must look like http://HOST:PORT/v1/models/NAME")
    root, name = path.rsplit(prefix, 1)
    if not name or "/" in name:
        raise ConfigError(f"HttpOracle url {url!r} must end in /v1/models/NAME")
    return f"{parts.scheme}://{parts.netloc}{root}", name


class HttpOracle:
    """An oracle on ``url`` = ``http://HOST:PORT/v1/models/NAME`` with ``api_key``.

    ``encoding`` is ``"binary"`` (the raw form: float32 bytes as
    ``application/octet-stream`` with ``?shape=...&dtype=float32``; exact and fastest),
    ``"base64"`` (the same bytes base64-encoded in a JSON body) or ``"json"`` (nested
    lists). ``client`` may be a pre-built ``httpx.Client`` (its base URL is ignored:
    requests use absolute URLs). Raises Unauthorized, Blocked, UnknownModel,
    InputTooLarge, BadRequest, QueryRejected, RateLimited (after waiting up to
    ``max_wait`` seconds) or OracleError (server error, retries used up).
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        client: httpx.Client | None = None,
        *,
        encoding: Literal["binary", "base64", "json"] = "binary",
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.2,
        max_wait: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if encoding not in ("binary", "base64", "json"):
            raise ConfigError(f"encoding must be 'binary', 'base64' or 'json', got {encoding!r}")
        if max_retries < 0 or backoff < 0 or max_wait < 0:
            raise ConfigError("max_retries, backoff and max_wait must be >= 0")
        self.root, self.name = _split_url(url)
        self.url = f"{self.root}/v1/models/{self.name}"
        self.encoding = encoding
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_wait = max_wait
        self._sleep = sleep
        self._owns_client = client is None
        self.client = client if client is not None else httpx.Client(timeout=timeout)
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._info: OracleInfo | None = None
        self._n = 0

    # context manager ----------------------------------------------------------
    def close(self) -> None:
        """Close the connection pool (if this oracle created it)."""
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> HttpOracle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Oracle protocol ----------------------------------------------------------
    @property
    def info(self) -> OracleInfo:
        """The served model's description, fetched once from ``GET /v1/models``."""
        if self._info is None:
            listing = self._request("GET", f"{self.root}/v1/models", None)
            for m in listing.get("models", []):
                if m.get("name") == self.name:
                    self._info = OracleInfo(
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
                        },
                    )
                    break
            else:
                served = ", ".join(m.get("name", "?") for m in listing.get("models", []))
                raise UnknownModel(f"{self.root} serves no model {self.name!r}; served: {served}")
        return self._info

    @property
    def n_queries(self) -> int:
        """Inputs answered so far."""
        return self._n

    def query(self, x: np.ndarray) -> Response:
        """Answer a batch, split into chunks of the service's ``max_batch``."""
        try:
            x = np.asarray(x, dtype=np.float32)
        except (ValueError, TypeError):
            raise QueryRejected("inputs must be an array of numbers") from None
        if x.ndim == 0:
            raise QueryRejected(f"inputs must be a batch (n, ...), got a scalar {x!r}")
        step = int(self.info.extra["max_batch"])
        parts = [self._query_chunk(x[i : i + step]) for i in range(0, max(len(x), 1), step)]
        return parts[0] if len(parts) == 1 else _concat(parts)

    def query_records(self, records: list[dict[str, Any]]) -> Response:
        """Answer survey records ``{feature: value}`` (tabular models), counted like rows."""
        step = int(self.info.extra["max_batch"])
        parts = []
        for i in range(0, max(len(records), 1), step):
            chunk = records[i : i + step]
            parts.append(self._answer({"records": chunk}, len(chunk)))
        return parts[0] if len(parts) == 1 else _concat(parts)

    def account(self) -> Account:
        """The key's account as ``GET /v1/account`` tells it, spending no query.

        Raises Unauthorized (the service's reason: missing, unknown or revoked key) if
        the service refuses the key, OracleError if it has no such route.
        """
        url = f"{self.root}/v1/account"
        try:
            doc = self._request("GET", url, None)
        except UnknownModel:  # a 404: the route itself is missing
            raise OracleError(
                f"{url} does not exist: the service is not `mlinvert serve` (or an older "
                "version without the account route)"
            ) from None
        try:
            limit = doc["rate_limit"]
            return Account(
                name=str(doc["account"]),
                blocked=self.name in doc["blocked_models"],
                rate_limit=None if limit is None else str(limit["limit"]),
                remaining=None if limit is None else int(limit["remaining"]),
                reset_in=None if limit is None else float(limit["reset_in"]),
                inputs_answered=int(doc["inputs_answered"]),
            )
        except (KeyError, TypeError, ValueError):
            raise OracleError(f"{url} answered {str(doc)[:200]!r}, not an account") from None

    def check_key(self) -> None:
        """Check that the service accepts ``api_key`` without spending a query.

        Reads ``GET /v1/account``: Unauthorized, with the service's reason, for a
        missing, malformed, unknown or revoked key. A blocked or rate-limited account
        passes: its key is valid, and the service says 403 or 429 when it is used.
        """
        self.account()

    # internals ----------------------------------------------------------------
    def _query_chunk(self, x: np.ndarray) -> Response:
        data = np.ascontiguousarray(x, dtype="<f4")
        if self.encoding == "binary":
            shape = ",".join(str(d) for d in data.shape)
            return self._answer(
                _Raw(data.tobytes(), {"shape": shape, "dtype": "float32"}),
                x.shape[0],
            )
        if self.encoding == "base64":
            body = (
                b'{"binary":{"dtype":"float32","shape":'
                + json.dumps(list(data.shape)).encode()
                + b',"data":"'
                + base64.b64encode(data.tobytes())
                + b'"}}'
            )
        else:
            body = json.dumps({"inputs": x.tolist()}).encode()
        return self._answer(body, x.shape[0])

    def _answer(self, payload: _Raw | bytes | dict[str, Any], n: int) -> Response:
        doc = self._request("POST", f"{self.url}/predict", payload)
        preds = doc["predictions"]
        if len(preds) != n:
            raise OracleError(f"the service answered {len(preds)} predictions for {n} inputs")
        scores = [p["scores"] for p in preds]
        conf = [p["confidence"] for p in preds]
        response = Response(
            labels=np.array([p["label"] for p in preds], dtype=np.int64),
            probs=None if any(s is None for s in scores) else np.array(scores, dtype=np.float64),
            confidence=None if any(c is None for c in conf) else np.array(conf, dtype=np.float64),
            label_names=tuple(p["label_name"] for p in preds),
        )
        self._n += len(response)
        return response

    def _request(self, method: str, url: str, payload: _Raw | bytes | dict[str, Any] | None) -> Any:
        attempt = 0
        waited = 0.0
        while True:
            try:
                if payload is None:
                    r = self.client.request(method, url, headers=self._headers)
                elif isinstance(payload, _Raw):
                    r = self.client.request(
                        method,
                        url,
                        params=payload.params,
                        content=payload.data,
                        headers={**self._headers, "Content-Type": "application/octet-stream"},
                    )
                elif isinstance(payload, bytes):
                    r = self.client.request(
                        method,
                        url,
                        content=payload,
                        headers={**self._headers, "Content-Type": "application/json"},
                    )
                else:
                    r = self.client.request(method, url, json=payload, headers=self._headers)
            except httpx.TransportError as exc:
                if attempt >= self.max_retries:
                    raise OracleError(
                        f"{method} {url} failed after {attempt + 1} attempts: {exc!r}; "
                        "is the service running?"
                    ) from exc
                self._backoff(attempt, repr(exc))
                attempt += 1
                continue
            if r.status_code == 200:
                try:
                    return r.json()
                except ValueError:
                    raise OracleError(
                        f"{method} {url} answered 200 with a body that is not JSON "
                        f"({r.text[:80]!r}); is this the URL of an `mlinvert serve` service?"
                    ) from None
            message = _error_message(r)
            if r.status_code in _TRANSIENT_STATUS and attempt < self.max_retries:
                self._backoff(attempt, f"HTTP {r.status_code}")
                attempt += 1
                continue
            if r.status_code == 429:
                retry_after = _retry_after(r)
                if waited + retry_after <= self.max_wait:
                    log.info("rate limited; waiting %.2f s as Retry-After says", retry_after)
                    self._sleep(retry_after)
                    waited += retry_after
                    continue
                raise RateLimited(message, retry_after=retry_after)
            error = _STATUS_ERRORS.get(r.status_code)
            if error is not None:
                raise error(message)
            raise OracleError(
                message if _foreign(r) else f"HTTP {r.status_code} from {url}: {message}"
            )

    def _backoff(self, attempt: int, why: str) -> None:
        delay = self.backoff * 2**attempt
        log.info("transient failure (%s); retrying in %.2f s", why, delay)
        self._sleep(delay)


def _foreign(r: httpx.Response) -> bool:
    """Whether ``r`` lacks mlinvert's JSON error body (another server answered)."""
    try:
        return not isinstance(r.json()["error"]["message"], str)
    except (ValueError, KeyError, TypeError):
        return True


def _error_message(r: httpx.Response) -> str:
    """The service's error message, or for another server's answer what came back."""
    if not _foreign(r):
        return str(r.json()["error"]["message"])
    body = r.text[:200].strip()
    return (
        f"HTTP {r.status_code} from {r.request.url} without an mlinvert error body"
        + (f" ({body!r})" if body else "")
        + "; is this the URL of an `mlinvert serve` service?"
    )


def _retry_after(r: httpx.Response) -> float:
    try:
        return max(0.0, float(r.json()["error"]["retry_after"]))
    except (ValueError, KeyError, TypeError):
        pass
    try:
        return max(0.0, float(r.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


def _join(arrays: list[np.ndarray | None]) -> np.ndarray | None:
    present = [a for a in arrays if a is not None]
    return np.concatenate(present) if len(present) == len(arrays) else None


def _concat(parts: list[Response]) -> Response:
    names: tuple[str, ...] = sum((p.label_names or () for p in parts), ())
    return Response(
        labels=np.concatenate([p.labels for p in parts]),
        probs=_join([p.probs for p in parts]),
        confidence=_join([p.confidence for p in parts]),
        label_names=names,
    )
