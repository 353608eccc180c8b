"""Slow request headers (slowloris) against a real ``mlinvert serve`` on loopback: a
connection whose headers are not complete in ``--header-timeout`` seconds is answered
408 and closed, counted in /metrics and logged once; an honest keep-alive connection
is not touched between its requests."""

from __future__ import annotations

import re
import select
import socket
import time
from pathlib import Path
from typing import Any

import httpx

from mlinvert.service import Store
from mlinvert.service.runner import ServiceProcess

TIMEOUT = 0.5
#: Only a safety net: the server closes after TIMEOUT; this bounds a broken server.
SAFETY = 30.0


def _connect(service: ServiceProcess) -> socket.socket:
    sock = socket.create_connection((service.host, service.port), timeout=SAFETY)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_to_close(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def _one_request(sock: socket.socket) -> bytes:
    """A whole GET /healthz on ``sock``, and its whole answer (the connection stays open)."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    found = re.search(rb"content-length: (\d+)", head, re.I)
    assert found is not None, head
    length = int(found.group(1))
    while len(body) < length:
        body += sock.recv(4096)
    return head


def _trickle_until_closed(sock: socket.socket) -> float:
    """Send a request's headers a byte at a time (one header line after another, never
    the blank line that ends them) until the server closes; the seconds that took."""
    start = time.monotonic()
    header = b"POST /v1/models/faces/predict HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: 1\r\n" * 1000
    for i in range(len(header)):
        if time.monotonic() - start > SAFETY:
            break
        readable, _, _ = select.select([sock], [], [], 0.05)
        if readable:  # the answer, or the close
            return time.monotonic() - start
        try:
            sock.send(header[i : i + 1])
        except OSError:  # closed between the select and the send
            return time.monotonic() - start
    raise AssertionError(f"the server kept a trickling connection open for {SAFETY} s")


def _header_timeouts(service: ServiceProcess) -> int:
    text = httpx.get(f"{service.url}/metrics").text
    found = re.search(r"^mlinvert_header_timeouts_total (\d+)$", text, re.M)
    assert found is not None, text
    return int(found.group(1))


def test_slow_headers_are_cut_off_and_counted_and_honest_keep_alive_is_not(
    tmp_path: Path, model_dir: tuple[Path, Any]
) -> None:
    folder, _ = model_dir
    db = tmp_path / "service.db"
    key, _ = Store(db).create_key("alice")
    with ServiceProcess([f"faces={folder}"], db=db, header_timeout=TIMEOUT) as service:
        assert _header_timeouts(service) == 0
        with _connect(service) as silent:  # opens and says nothing
            answer = _read_to_close(silent)
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert answer.endswith(b"the request headers came too slowly\n")
        with _connect(service) as slow:
            took = _trickle_until_closed(slow)
        assert took >= TIMEOUT * 0.8  # never before the deadline
        with _connect(service) as later:  # slow only from its second request on
            assert _one_request(later).startswith(b"HTTP/1.1 200")
            _trickle_until_closed(later)
        assert _header_timeouts(service) == 3
        # an honest keep-alive connection, idle past the header deadline between requests
        with httpx.Client(headers={"X-API-Key": key}) as client:
            assert client.get(f"{service.url}/v1/account").status_code == 200
            time.sleep(TIMEOUT * 3)
            assert client.get(f"{service.url}/v1/account").status_code == 200
        assert _header_timeouts(service) == 3  # the idle connection was not cut off
        log = service.log()
    assert log.count("closed a connection from") == 1
    assert "Traceback" not in log
