"""A no-op ASGI app: reads the whole request body and answers how many bytes came.

``benchmarks/service_forms.py`` serves it under uvicorn (the same httptools parser and
uvloop loop as ``mlinvert serve``) to measure the transport floor: what moving a body
to a Python web server and back costs with no work done on it.
"""

from __future__ import annotations

from typing import Any


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Read the body, answer ``{"bytes": N}``."""
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    answer = b'{"bytes": %d}' % size
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})
