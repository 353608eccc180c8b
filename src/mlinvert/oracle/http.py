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

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import numpy as np

from mlinvert.core import OracleInfo, Response
from mlinvert.errors import (
    BadRequest,
    Blocked,
    ConfigError,
    InputTooLarge,
    MlinvertError,
    OracleError,
    QueryRejected,
    RateLimited,
    Unauthorized,
    UnknownModel,
    UnsupportedMediaType,
)
from mlinvert.oracle.wire import (
    HEADER_LENGTH,
    MlinvertWire,
    Payload,
    Raw,
    Wire,
    WireConfig,
    candidates,
    make_wire,
    split_binary,
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


class HttpOracle:
    """An oracle on a prediction API at ``url``, spoken to as ``wire`` says.

    ``wire`` (a :class:`~mlinvert.oracle.wire.WireConfig`; default: mlinvert's own API)
    picks the protocol: ``mlinvert`` (``http://HOST:PORT/v1/models/NAME``), ``v2``
    (``http://HOST:PORT/v2/models/NAME``), ``rest`` (any JSON endpoint) or ``auto``.
    ``api_key`` goes as ``Authorization: Bearer KEY`` (None: no such header; the wire's
    headers are sent too). ``encoding`` (mlinvert's API only) is ``"binary"`` (float32
    bytes as ``application/octet-stream``; exact and fastest), ``"base64"`` or ``"json"``.
    ``client`` may be a pre-built ``httpx.Client`` (its base URL is ignored). Raises
    Unauthorized, Blocked, UnknownModel, InputTooLarge, BadRequest, QueryRejected,
    RateLimited (after waiting up to ``max_wait`` seconds) or OracleError (server error,
    retries used up, an answer the wire cannot read).
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        client: httpx.Client | None = None,
        *,
        wire: WireConfig | None = None,
        encoding: Literal["binary", "base64", "json"] = "binary",
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.2,
        max_wait: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_retries < 0 or backoff < 0 or max_wait < 0:
            raise ConfigError("max_retries, backoff and max_wait must be >= 0")
        self.wire_config = wire or WireConfig()
        self._encoding = encoding
        self._wire: Wire | None = None
        if self.wire_config.protocol != "auto":
            self._wire = make_wire(url, self.wire_config, encoding)
        self.url = getattr(self._wire, "url", url)
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_wait = max_wait
        self._sleep = sleep
        self._owns_client = client is None
        self.client = client if client is not None else httpx.Client(timeout=timeout)
        self._headers = dict(self.wire_config.headers)
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._info: OracleInfo | None = None
        self._n = 0
        #: inference requests answered (a batch is one request)
        self.n_requests = 0

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
    def protocol(self) -> str:
        """The protocol spoken (``auto`` until the description has detected it)."""
        return str(self.info.extra.get("protocol", self.wire_config.protocol))

    @property
    def info(self) -> OracleInfo:
        """The served model's description, fetched once (v2 and rest: it may spend a
        counted probe query, when the server does not declare what its answers hold)."""
        if self._info is None:
            if self._wire is None:
                self._info = self._detect()
                self.url = getattr(self._wire, "url", self.url)
            else:
                self._info = self._wire.describe(self)
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
        parts = [self.answer(x[i : i + step]) for i in range(0, max(len(x), 1), step)]
        return parts[0] if len(parts) == 1 else _concat(parts)

    def query_records(self, records: list[dict[str, Any]]) -> Response:
        """Answer survey records ``{feature: value}`` (tabular models), counted like rows."""
        wire = self._mlinvert("survey records")
        step = int(self.info.extra["max_batch"])
        parts = []
        for i in range(0, max(len(records), 1), step):
            chunk = records[i : i + step]
            doc = self.request("POST", f"{wire.url}/predict", {"records": chunk})
            parts.append(self._count(wire.decode(doc, len(chunk))))
        return parts[0] if len(parts) == 1 else _concat(parts)

    def account(self) -> Account:
        """The key's account as ``GET /v1/account`` tells it, spending no query.

        Raises Unauthorized (the service's reason: missing, unknown or revoked key) if
        the service refuses the key, OracleError if it has no such route (or the API
        is not mlinvert's: other protocols have no accounts).
        """
        wire = self._mlinvert("an account route")
        url = f"{wire.root}/v1/account"
        try:
            doc = self.request("GET", url, None)
        except UnknownModel:  # a 404: the route itself is missing
            raise OracleError(
                f"{url} does not exist: the service is not `mlinvert serve` (or an older "
                "version without the account route)"
            ) from None
        try:
            limit = doc["rate_limit"]
            return Account(
                name=str(doc["account"]),
                blocked=wire.name in doc["blocked_models"],
                rate_limit=None if limit is None else str(limit["limit"]),
                remaining=None if limit is None else int(limit["remaining"]),
                reset_in=None if limit is None else float(limit["reset_in"]),
                inputs_answered=int(doc["inputs_answered"]),
            )
        except (KeyError, TypeError, ValueError):
            raise OracleError(f"{url} answered {str(doc)[:200]!r}, not an account") from None

    def check_key(self) -> None:
        """Check that the service accepts ``api_key`` without spending a query.

        mlinvert's API: reads ``GET /v1/account``, Unauthorized with the service's
        reason for a missing, malformed, unknown or revoked key (a blocked or
        rate-limited account passes). Other protocols have no account route: the
        description (already read) is the check, and a refused key shows at the first
        query.
        """
        if self.protocol == "mlinvert":
            self.account()

    def answer(self, x: np.ndarray) -> Response:
        """One request for the batch ``x`` (at most ``max_batch`` inputs), counted."""
        wire = self._wire
        assert wire is not None  # set before any description or query
        url, payload = wire.encode(x)
        return self._count(wire.decode(self.request("POST", url, payload), x.shape[0]))

    # internals ----------------------------------------------------------------
    def _count(self, response: Response) -> Response:
        self._n += len(response)
        self.n_requests += 1
        return response

    def _detect(self) -> OracleInfo:
        """``--protocol auto``: the first wire whose description succeeds; OracleError
        naming each protocol tried and why it failed."""
        tried = []
        for protocol, wire in candidates(self.url, self.wire_config, self._encoding):
            if isinstance(wire, str):
                tried.append(f"{protocol} ({wire})")
                continue
            self._wire = wire
            try:
                return wire.describe(self)
            except MlinvertError as exc:
                tried.append(f"{protocol} ({exc})")
        self._wire = None
        raise OracleError(
            f"cannot tell which protocol {self.url} speaks; tried "
            + "; ".join(tried)
            + ". Pass --protocol mlinvert, v2 or rest (with --request and --scores)"
        )

    def _mlinvert(self, what: str) -> MlinvertWire:
        self.info  # noqa: B018 - resolve an auto-detected wire
        if not isinstance(self._wire, MlinvertWire):
            raise OracleError(
                f"{self.url} speaks {self.protocol}, which has no {what}; "
                "only `mlinvert serve` (--protocol mlinvert) has"
            )
        return self._wire

    def request(self, method: str, url: str, payload: Payload | None) -> Any:
        """One HTTP exchange with retries, 429 waits and errors mapped; the JSON answer."""
        attempt = 0
        waited = 0.0
        while True:
            try:
                if payload is None:
                    r = self.client.request(method, url, headers=self._headers)
                elif isinstance(payload, Raw):
                    r = self.client.request(
                        method,
                        url,
                        params=payload.params,
                        content=payload.data,
                        headers={
                            **self._headers,
                            "Content-Type": "application/octet-stream",
                            **payload.headers,
                        },
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
                if HEADER_LENGTH in r.headers:  # binary tensors after a JSON header
                    return split_binary(r.content, r.headers[HEADER_LENGTH])
                try:
                    return r.json()
                except ValueError:
                    raise OracleError(
                        f"{method} {url} answered 200 with a body that is not JSON "
                        f"({r.text[:80]!r}); {self._hint}"
                    ) from None
            message = _error_message(r, self._hint)
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

    @property
    def _hint(self) -> str:
        """What an error suggests when the server's answer is not understood."""
        return self._wire.hint if self._wire is not None else "check the URL and --protocol"

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


def _error_message(r: httpx.Response, hint: str) -> str:
    """The service's error message, or for another server's answer what came back
    (an Open Inference Protocol ``{"error": "..."}`` body's text) and ``hint``."""
    if not _foreign(r):
        return str(r.json()["error"]["message"])
    try:
        said = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        said = None
    if isinstance(said, str):  # the Open Inference Protocol's error body
        return f"HTTP {r.status_code} from {r.request.url}: {said!r}; {hint}"
    body = r.text[:200].strip()
    return (
        f"HTTP {r.status_code} from {r.request.url} without an mlinvert error body"
        + (f" ({body!r})" if body else "")
        + f"; {hint}"
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
