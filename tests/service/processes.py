"""Start several real services at once, for the tests that need more than one."""

from __future__ import annotations

import threading
from contextlib import ExitStack

from mlinvert.service.runner import ServiceProcess


def started(*services: ServiceProcess) -> ExitStack:
    """Start the services at once (each takes a few seconds); stopped when the stack closes."""
    stack = ExitStack()
    threads = [threading.Thread(target=s.start) for s in services]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in services:
        stack.callback(s.stop)
    for s in services:
        if s.process is None or s.process.poll() is not None:
            stack.close()
            raise AssertionError(f"a service did not start: {s.log()[-2000:]}")
    return stack
