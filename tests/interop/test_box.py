"""The interop servers' environments: an unreachable package index is told apart from
another pip failure (the first skips the server's tests, the second fails them)."""

from __future__ import annotations

from . import box

REFUSED = (
    "WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) "
    "after connection broken by 'NewConnectionError('<pip._vendor.urllib3.connection."
    "HTTPConnection object at 0x7f>: Failed to establish a new connection: [Errno 111] "
    "Connection refused')': /simple/kserve/\n"
    "ERROR: Could not find a version that satisfies the requirement kserve==0.21.0 "
    "(from versions: none)\n"
)


def test_pip_s_connection_errors_and_an_empty_listing_mean_the_index_is_unreachable() -> None:
    assert box.unreachable(REFUSED) == REFUSED.splitlines()[0]
    # no retries: pip says only that the index listed nothing
    assert box.unreachable(REFUSED.split("\n", 1)[1]) == REFUSED.splitlines()[1]
    dns = "WARNING: Retrying (...) after connection broken by 'NameResolutionError(...: "
    assert box.unreachable(dns + "Temporary failure in name resolution)'\n") is not None


def test_a_missing_version_or_a_failed_build_is_not_an_unreachable_index() -> None:
    missing = (
        "ERROR: Could not find a version that satisfies the requirement numpy==9.9 "
        "(from versions: 2.3.0, 2.4.6)\nERROR: No matching distribution found for numpy==9.9\n"
    )
    assert box.unreachable(missing) is None
    assert box.unreachable("error: subprocess-exited-with-error\n  gcc failed\n") is None
