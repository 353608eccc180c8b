"""The synchronous part of a prediction request (run in the thread pool): admit it
before its body is read, answer it after, refuse it (logged and counted) otherwise."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import orjson
from starlette.responses import JSONResponse, Response

from mlinvert.core import Response as Answer
from mlinvert.defenses.predictor import Predictor
from mlinvert.defenses.ratelimit import redis_deadline
from mlinvert.errors import InputTooLarge, MlinvertError, RateLimited, Unauthorized, UnknownModel
from mlinvert.service.bodies import (
    RAW_TYPE,
    RawSpec,
    check_content_type,
    decode_json,
    decode_raw,
    json_body_limit,
    raw_spec,
    too_large,
)
from mlinvert.service.errors import error_body, error_response, status_of
from mlinvert.service.metrics import Metrics
from mlinvert.service.predictors import rate_headers
from mlinvert.service.settings import ServiceSettings
from mlinvert.service.store import Store, input_digests

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Head:
    """A prediction request before its body is read."""

    name: str
    key: str | None
    key_problem: str | None
    content_type: str
    declared: int | None  # Content-Length; None for a chunked body
    started: float
    #: The raw form's query parameters (/v1 predict only).
    shape: str | None = None
    dtype: str | None = None
    #: The Open Inference Protocol's Inference-Header-Content-Length (v2 routes only).
    header_length: str | None = None


@dataclass(frozen=True)
class Admitted:
    """A request whose key, model, type and declared size passed: its body may be read."""

    account: str
    predictor: Predictor
    limit: int
    raw: RawSpec | None


@dataclass
class Outcome:
    """A request's answer, built in the thread pool: ``render`` writes ``error``."""

    status: int
    body: bytes | None = None
    error: MlinvertError | None = None
    headers: dict[str, str] = field(default_factory=dict)
    media_type: str = "application/json"
    render: Callable[[MlinvertError], Response] = error_response

    def response(self) -> Response:
        """The answer: the prediction, the error document, or a bare 500."""
        if self.error is not None:
            response: Response = self.render(self.error)
            response.headers.update(self.headers)
            return response
        if self.status == 500:
            return JSONResponse(
                error_body("InternalError", 500, "internal error; see the service log"),
                status_code=500,
            )
        return Response(self.body, media_type=self.media_type, headers=self.headers)


PREDICT_ROUTE = "/v1/models/{name}/predict"


class PredictHandler:
    """The synchronous parts of a prediction request (they run in the thread pool):
    :meth:`admit` before the body is read, :meth:`answer` after, :meth:`refuse` for
    every refusal (logged and counted).

    What a protocol reads and writes are its hooks: :meth:`limits` (the body allowed
    before it is read), :meth:`decode`, :meth:`encode`, :meth:`status` and ``render``
    (a refusal); this class speaks the mlinvert protocol of ``POST /v1/models/{name}/predict``.
    """

    route = PREDICT_ROUTE
    render = staticmethod(error_response)

    def __init__(
        self,
        predictors: Mapping[str, Predictor],
        store: Store,
        metrics: Metrics,
        settings: ServiceSettings,
    ) -> None:
        self.predictors = predictors
        self.store = store
        self.metrics = metrics
        self.max_body = settings.max_body_bytes
        self.redis_timeout = settings.redis_timeout

    def admit(self, head: Head) -> Admitted | Outcome:
        """Check the key, the model, the body type and its declared size; nothing is read."""
        account: str | None = None
        try:
            if head.key_problem is not None:
                raise Unauthorized(head.key_problem)
            try:
                account = self.store.authenticate(head.key)
            except Unauthorized:
                account = self.store.key_account(head.key)
                raise
            predictor = self.predictors.get(head.name)
            if predictor is None:
                raise UnknownModel(
                    f"no model named {clip(head.name)!r}; served: "
                    f"{', '.join(sorted(self.predictors))} (GET /v1/models lists them)"
                )
            limit, raw = self.limits(head, predictor)
            return Admitted(account, predictor, limit, raw)
        except Exception as exc:
            return self.refuse(exc, head, account)

    def limits(self, head: Head, predictor: Predictor) -> tuple[int, RawSpec | None]:
        """The largest body ``head`` may send (refused when it declares more), and what a
        raw body's query parameters announce."""
        check_content_type(head.content_type)
        if head.content_type == RAW_TYPE:
            raw = raw_spec(head.shape, head.dtype, predictor)
            if raw.nbytes > self.max_body:
                raise too_large(raw.nbytes, limit=self.max_body, predictor=predictor, raw=True)
            if head.declared is not None:
                raw.check_length(head.declared)
            return raw.nbytes, raw
        limit = json_body_limit(predictor, self.max_body)
        if head.declared is not None and head.declared > limit:
            raise too_large(head.declared, limit=limit, predictor=predictor, raw=False)
        return limit, None

    def raw_body(self, head: Head) -> bool:
        """Whether ``head``'s body is array bytes (reserved 1x in the body budget, not 3x)."""
        return head.content_type == RAW_TYPE

    def body_too_large(self, head: Head, admitted: Admitted) -> Callable[[int], InputTooLarge]:
        """The error for a body that runs past ``admitted.limit`` while it is read."""
        return partial(
            too_large,
            limit=admitted.limit,
            predictor=admitted.predictor,
            raw=self.raw_body(head),
        )

    def handle(self, head: Head, body: bytearray | MlinvertError) -> Outcome:
        """:meth:`admit` and :meth:`answer` a request whose body was read before its key
        was checked, or refuse it for the error that kept its body from being read."""
        admitted = self.admit(head)
        if isinstance(admitted, Outcome):
            return admitted
        if isinstance(body, MlinvertError):
            return self.refuse(body, head, admitted.account)
        return self.answer(head, admitted, body)

    def answer(self, head: Head, admitted: Admitted, data: bytearray) -> Outcome:
        """Decode the body and answer it as the predictor allows; its Redis calls (the
        rate limiter, the detector, the RateLimit fields) share one deadline."""
        with redis_deadline(self.redis_timeout):
            return self._answer(head, admitted, data)

    def _answer(self, head: Head, admitted: Admitted, data: bytearray) -> Outcome:
        account, predictor = admitted.account, admitted.predictor
        x: np.ndarray | None = None
        try:
            x, asked = self.decode(data, admitted, head)
            del data  # the caller's reference goes too once this returns
            response = predictor.predict(x, account=account)
            for values in (response.probs, response.confidence):
                if values is not None and not np.isfinite(values).all():  # orjson writes null
                    raise RuntimeError(f"{predictor.info.policy!r} answered NaN or infinity")
        except Exception as exc:
            return self.refuse(exc, head, account, x)
        n_inputs = int(x.shape[0])
        self.store.log_query(
            account=account,
            model=head.name,
            n_inputs=n_inputs,
            outcome="ok",
            status=200,
            digests=input_digests(x),
        )
        outcome = self.encode(head, predictor, response, asked)
        self.metrics.observe(
            model=head.name,
            status=200,
            n_inputs=n_inputs,
            reason=None,
            seconds=time.perf_counter() - head.started,
        )
        outcome.headers.update(rate_headers(predictor, account))
        return outcome

    def decode(self, data: bytearray, admitted: Admitted, head: Head) -> tuple[np.ndarray, Any]:
        """The batch a body holds, and what else the request asks of the answer (here
        nothing: the mlinvert answer is always the same document)."""
        if admitted.raw is not None:
            return decode_raw(data, admitted.raw), None
        return decode_json(data, admitted.predictor), None

    def encode(self, head: Head, predictor: Predictor, response: Answer, asked: Any) -> Outcome:
        """The 200 answer: one prediction per input, as the policy allows."""
        probs = None if response.probs is None else response.probs.tolist()
        conf = None if response.confidence is None else response.confidence.tolist()
        names = response.label_names or tuple(str(v) for v in response.labels)
        predictions = [
            {
                "label": label,
                "label_name": names[i],
                "scores": None if probs is None else probs[i],
                "confidence": None if conf is None else conf[i],
            }
            for i, label in enumerate(response.labels.tolist())
        ]
        info = predictor.info
        body_out = orjson.dumps(
            {
                "model": head.name,
                "policy": info.policy,
                "carries": info.carries,
                "predictions": predictions,
            }
        )
        return Outcome(200, body=body_out)

    def status(self, error: MlinvertError) -> int:
        """The HTTP status of a refusal (see :data:`mlinvert.service.errors.ERROR_TABLE`)."""
        return status_of(error)

    def refuse(
        self,
        exc: BaseException,
        head: Head,
        account: str | None,
        x: np.ndarray | None = None,
    ) -> Outcome:
        """Log and count a refused request; an exception that is no MlinvertError is a
        server error (500, logged once with its traceback)."""
        error = exc if isinstance(exc, MlinvertError) else None
        if error is None:
            log.error("internal error on POST %s", self.route, exc_info=exc)
            self.metrics.server_error(self.route)
        status = 500 if error is None else self.status(error)
        reason = "InternalError" if error is None else type(error).__name__
        n_inputs = int(x.shape[0]) if x is not None and x.ndim else 0
        if account is not None:  # without a valid key: counted below, never logged
            self.store.log_query(
                account=account,
                model=clip(head.name),
                n_inputs=n_inputs,
                outcome=reason,
                status=status,
                detail="internal error" if error is None else str(error),
                digests=safe_digests(x),
            )
        self.metrics.observe(
            model=head.name if head.name in self.predictors else "-",
            status=status,
            n_inputs=n_inputs,
            reason=reason,
            seconds=time.perf_counter() - head.started,
        )
        headers = {}
        if isinstance(error, RateLimited) and account is not None and head.name in self.predictors:
            headers = rate_headers(self.predictors[head.name], account, error.retry_after)
        return Outcome(status, error=error, headers=headers, render=self.render)


def clip(name: str, most: int = 100) -> str:
    """A name a client sent, cut to ``most`` characters for messages and the log."""
    return name if len(name) <= most else name[:most] + "..."


def safe_digests(x: np.ndarray | None) -> tuple[str, ...]:
    if x is None or x.dtype.kind not in "fiu" or x.ndim == 0:
        return ()
    return input_digests(x)


class BodyBudget:
    """The bytes the service holds at once for request bodies and their decoding (used
    on the event loop only). A body that alone needs the whole budget is reserved the
    whole budget, so it is read when nothing else is."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held = 0

    def take(self, n: int) -> bool:
        """Reserve ``n`` bytes, or False when they would pass the budget."""
        if self.held + n > self.budget:
            return False
        self.held += n
        return True

    def release(self, n: int) -> None:
        """Give back what :meth:`take` reserved."""
        self.held -= n
