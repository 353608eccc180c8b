"""What the interop tests' third-party servers (MLServer, KServe) share.

A server that pins its own dependencies lives in its own virtual environment, built once
into a cache folder (``$MLINVERT_TEST_CACHE``, default ``~/.cache/mlinvert-tests``) keyed
by the pinned packages and the Python version, under a lock (one build, however many
test processes wait) and bounded by :data:`BUILD_TIMEOUT`, then reused by every later
run. Its scikit-learn, numpy and joblib are pinned to ours (:func:`ours`), so the model
file we write is the model it reads. When pip cannot reach the package index the build
raises :class:`IndexUnreachable`, which the test modules turn into a skip.

:func:`running` starts such a server on loopback, waits until it answers ``ready`` and
stops it; :func:`metric` reads one of its Prometheus counters.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

#: Seconds a build of an environment may take (20 s to 2 min here).
BUILD_TIMEOUT = 600.0
#: What pip prints when it cannot reach the package index: its retries' connection
#: errors, and "from versions: none" for a package the index has (or would have).
_UNREACHABLE = re.compile(
    r"NewConnectionError|Failed to establish a new connection|Temporary failure in name "
    r"resolution|Name or service not known|Network is unreachable|No route to host|"
    r"Connection refused|ConnectTimeoutError|ReadTimeoutError|Could not fetch URL|"
    r"from versions: none",
    flags=re.I,
)


class IndexUnreachable(RuntimeError):
    """pip could not reach the package index to build a server's environment."""


def ours() -> list[str]:
    """scikit-learn, numpy and joblib pinned to the versions of this environment."""
    import joblib
    import numpy
    import sklearn

    return [
        f"scikit-learn=={sklearn.__version__}",
        f"numpy=={numpy.__version__}",
        f"joblib=={joblib.__version__}",
    ]


def environment(prefix: str, packages: list[str]) -> Path:
    """The virtual environment ``prefix-KEY`` with ``packages``, built on first use
    (IndexUnreachable without the package index, RuntimeError if pip fails otherwise)."""
    cache = Path(os.environ.get("MLINVERT_TEST_CACHE", Path.home() / ".cache" / "mlinvert-tests"))
    cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(" ".join([*packages, sys.version]).encode()).hexdigest()[:12]
    venv = cache / f"{prefix}-{key}"
    with open(cache / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build, however many test processes wait
        if not (venv / "complete").exists():
            _build(venv, packages)
    return venv


def _build(venv: Path, packages: list[str]) -> None:
    shutil.rmtree(venv, ignore_errors=True)  # an interrupted build starts afresh
    deadline = time.monotonic() + BUILD_TIMEOUT
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    done = subprocess.run(
        [*pip, "--disable-pip-version-check", *packages],
        capture_output=True,
        text=True,
        timeout=max(deadline - time.monotonic(), 1.0),
    )
    if done.returncode != 0:
        why = unreachable(done.stderr)
        if why is not None:
            raise IndexUnreachable(
                f"pip could not reach the package index to build {venv.name}: {why[:300]}"
            )
        raise RuntimeError(f"pip could not build {venv.name}: {done.stderr[-800:]}")
    (venv / "complete").write_text(json.dumps(packages) + "\n")


def unreachable(stderr: str) -> str | None:
    """The first line of pip's ``stderr`` that says it could not reach the index."""
    return next((line for line in stderr.splitlines() if _UNREACHABLE.search(line)), None)


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    from mlinvert.service.runner import free_port as free

    return free()


@contextlib.contextmanager
def running(
    what: str, command: list[str], *, cwd: Path, log: Path, ready: str, start_timeout: float
) -> Iterator[subprocess.Popen[bytes]]:
    """The server ``what`` run by ``command`` (one BLAS thread, output to ``log``) until
    the block ends, once ``ready`` answers 200; RuntimeError with the log's tail if it
    exits or never does."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
        )
    try:
        deadline = time.monotonic() + start_timeout
        while not _answers(ready):
            if process.poll() is not None:
                raise RuntimeError(
                    f"{what} exited ({process.returncode}): {log.read_text()[-800:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{what} was not ready in {start_timeout:.0f} s: {log.read_text()[-800:]}"
                )
            time.sleep(0.3)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _answers(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=2).status_code == 200
    return False


def metric(text: str, name: str, label: str) -> float:
    """The sum of the Prometheus samples ``name{...label...}`` in ``text`` (a /metrics
    page); ``label`` is one ``key="value"`` pair."""
    pattern = rf"^{name}\{{[^}}]*{re.escape(label)}[^}}]*\}} (\S+)$"
    return sum(float(v) for v in re.findall(pattern, text, flags=re.M))
