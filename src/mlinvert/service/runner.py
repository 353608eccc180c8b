"""Start the real service (``mlinvert serve``) as a subprocess, for tests and audits.

It runs ``python -m mlinvert.cli.serve`` (the serve command alone, the same code as
``mlinvert serve``), so it does not depend on every other command importing cleanly.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx

from mlinvert.errors import ConfigError, OracleError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """Context manager running ``mlinvert serve`` on a free loopback port.

    ``models`` are model folders (``DIR`` or ``NAME=DIR``); ``model_policies`` maps a
    model name to its own policy spec; the other arguments are the serve flags.
    ``url`` is the service root (``http://127.0.0.1:PORT``) and ``model_url(name)`` the
    HttpOracle URL of a model. The process is always stopped on exit; its output goes
    to ``log_path`` (deleted after a clean exit).
    """

    def __init__(
        self,
        models: Sequence[str | Path],
        *,
        db: str | Path,
        policy: str = "full",
        model_policies: Mapping[str, str] | None = None,
        rate_limit: str | None = None,
        detector: str | None = None,
        redis_url: str | None = None,
        max_batch: int | None = None,
        max_body_bytes: int | None = None,
        protocol: str | None = None,
        account_rate: str | None = None,
        header_timeout: float | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.startup_timeout = startup_timeout
        args = [sys.executable, "-m", "mlinvert.cli.serve", "--db", str(db), "--policy", policy]
        args += ["--host", host, "--port", str(self.port)]
        for model in models:
            args += ["--model", str(model)]
        for name, spec in (model_policies or {}).items():
            args += ["--model-policy", f"{name}={spec}"]
        if rate_limit is not None:
            args += ["--rate-limit", rate_limit]
        if detector is not None:
            args += ["--detect", detector]
        if redis_url is not None:
            args += ["--redis", redis_url]
        if max_batch is not None:
            args += ["--max-batch", str(max_batch)]
        if max_body_bytes is not None:
            args += ["--max-body", str(max_body_bytes)]
        if protocol is not None:
            args += ["--protocol", protocol]
        if account_rate is not None:
            args += ["--account-rate", account_rate]
        if header_timeout is not None:
            args += ["--header-timeout", str(header_timeout)]
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.log_path = Path(tempfile.mkstemp(prefix="mlinvert-serve-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None

    def model_url(self, name: str) -> str:
        """The URL an HttpOracle takes for model ``name``."""
        return f"{self.url}/v1/models/{name}"

    def start(self) -> ServiceProcess:
        """Start the process and wait until ``/healthz`` answers (OracleError otherwise).

        The process is stopped again if the wait ends any other way, Ctrl-C included (a
        ``with`` block whose ``__enter__`` raises never reaches ``__exit__``).
        """
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                self.args, stdout=log_file, stderr=subprocess.STDOUT, env=self.env
            )
        try:
            self._wait_healthy(self.process)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise OracleError(
                        f"mlinvert serve exited with code {process.returncode}: "
                        f"{self.log()[-2000:]}"
                    )
                try:
                    if client.get(f"{self.url}/healthz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise OracleError(
            f"mlinvert serve did not answer /healthz within {self.startup_timeout:.0f} s: "
            f"{self.log()[-2000:]}"
        )

    def log(self) -> str:
        """What the process printed so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 10 s); idempotent."""
        _terminate(self.process)

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if exc_type is None:  # keep the log only when something went wrong
            self.log_path.unlink(missing_ok=True)


class RedisServer:
    """Context manager running a throw-away ``redis-server`` on a free loopback port.

    No persistence, data in a temporary folder; ``url`` is ``redis://127.0.0.1:PORT/0``.
    ConfigError if the ``redis-server`` binary (Debian package redis-server) is absent.
    """

    def __init__(self, *, binary: str = "redis-server", startup_timeout: float = 10.0) -> None:
        import shutil

        path = shutil.which(binary)
        if path is None:
            raise ConfigError(
                f"{binary!r} not found: install the Debian package redis-server (make system-deps)"
            )
        self.binary = path
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.startup_timeout = startup_timeout
        self._dir = tempfile.TemporaryDirectory(prefix="mlinvert-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        """Start redis-server and wait until it answers PING."""
        import redis

        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir.name,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1.0)
        deadline = time.monotonic() + self.startup_timeout
        try:
            while time.monotonic() < deadline:
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        raise OracleError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        """Stop redis-server and remove its folder; idempotent."""
        _terminate(self.process)
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _terminate(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM a running child, SIGKILL it after 10 s; nothing if it already ended."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
