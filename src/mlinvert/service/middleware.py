"""ASGI layer around the routes: a server error is logged once, counted and answered 500."""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlinvert.service.handler import Outcome
from mlinvert.service.metrics import Metrics

log = logging.getLogger(__name__)


class ServerErrors:
    """ASGI layer around the routes: an exception no handler took is logged once (with
    its traceback), counted in ``/metrics`` and answered 500. It does not travel on to
    Starlette's and uvicorn's own handlers, which would log it twice more."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            route = getattr(scope.get("route"), "path", "-")
            log.exception("internal error on %s %s", scope.get("method"), route)
            self.metrics.server_error(route)
            if not started:
                await Outcome(500).response()(scope, receive, send)
