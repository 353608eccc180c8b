"""The HTTP connection of ``mlinvert serve``: uvicorn's httptools protocol with a
deadline on the request headers (slowloris: a client that sends its headers a byte at a
time would otherwise hold a connection, and its slot, forever)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mlinvert.service.metrics import Metrics

log = logging.getLogger(__name__)

_LATE = b"the request headers came too slowly\n"
#: What a connection whose headers came too late is answered before it is closed.
REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_LATE), _LATE)
)


def header_deadline_protocol(timeout: float, metrics: Metrics) -> type[HttpToolsProtocol]:
    """uvicorn's HttpToolsProtocol that closes a connection whose request headers are
    not complete ``timeout`` seconds after it opened (for its first request) or after
    the first byte of a later request on it (between requests the keep-alive timeout
    holds). Such a connection is answered 408 (unless an answer is still being written
    on it) and closed; each one is counted in ``metrics`` (``/metrics``:
    ``mlinvert_header_timeouts_total``), the first one logged."""

    class HeaderDeadline(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self.header_timer is None:
                self.header_timer = self.loop.call_later(timeout, self._headers_late)

        def _disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _headers_late(self) -> None:
            self.header_timer = None
            if self.transport.is_closing():
                return
            if metrics.header_timeout() == 1:
                log.warning(
                    "closed a connection from %s whose request headers were not complete "
                    "within %g s (slow or stalled client); further ones are counted in "
                    "/metrics as mlinvert_header_timeouts_total, not logged",
                    f"{self.client[0]}:{self.client[1]}" if self.client else "?",
                    timeout,
                )
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(REQUEST_TIMEOUT)
            self.transport.close()

    return HeaderDeadline
