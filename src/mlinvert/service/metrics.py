"""Prometheus text-format metrics: requests, inputs, rejections by reason, latency."""

from __future__ import annotations

import bisect
import threading
from collections import Counter

LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def _labels(**labels: str) -> str:
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in labels.items()
    )
    return "{" + inner + "}"


class Metrics:
    """Thread-safe counters and one latency histogram for this service process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str]] = Counter()
        self.inputs: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self.server_errors: Counter[str] = Counter()
        self.header_timeouts = 0
        self._buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self._sum = 0.0
        self._count = 0

    def observe(
        self, *, model: str, status: int, n_inputs: int, reason: str | None, seconds: float
    ) -> None:
        """Record one prediction request."""
        with self._lock:
            self.requests[(model, str(status))] += 1
            if reason is None:
                self.inputs[model] += n_inputs
            else:
                self.rejections[reason] += 1
            self._buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self._sum += seconds
            self._count += 1

    def server_error(self, route: str) -> None:
        """Record one 5xx answer (an internal error) on ``route`` (its path template)."""
        with self._lock:
            self.server_errors[route] += 1

    def header_timeout(self) -> int:
        """Record one connection closed because its request headers came too slowly;
        how many so far."""
        with self._lock:
            self.header_timeouts += 1
            return self.header_timeouts

    def render(self) -> str:
        """The metrics in the Prometheus text exposition format (version 0.0.4)."""
        lines = [
            "# HELP mlinvert_requests_total Prediction requests by model and status code.",
            "# TYPE mlinvert_requests_total counter",
        ]
        with self._lock:
            for (model, status), n in sorted(self.requests.items()):
                lines.append(f"mlinvert_requests_total{_labels(model=model, status=status)} {n}")
            lines += [
                "# HELP mlinvert_inputs_total Inputs answered by model.",
                "# TYPE mlinvert_inputs_total counter",
            ]
            for model, n in sorted(self.inputs.items()):
                lines.append(f"mlinvert_inputs_total{_labels(model=model)} {n}")
            lines += [
                "# HELP mlinvert_rejections_total Refused prediction requests by reason.",
                "# TYPE mlinvert_rejections_total counter",
            ]
            for reason, n in sorted(self.rejections.items()):
                lines.append(f"mlinvert_rejections_total{_labels(reason=reason)} {n}")
            lines += [
                "# HELP mlinvert_server_errors_total Internal errors (5xx) by route.",
                "# TYPE mlinvert_server_errors_total counter",
            ]
            for route, n in sorted(self.server_errors.items()):
                lines.append(f"mlinvert_server_errors_total{_labels(route=route)} {n}")
            lines += [
                "# HELP mlinvert_header_timeouts_total Connections closed because their "
                "request headers were not complete in time.",
                "# TYPE mlinvert_header_timeouts_total counter",
                f"mlinvert_header_timeouts_total {self.header_timeouts}",
                "# HELP mlinvert_request_latency_seconds Prediction request latency.",
                "# TYPE mlinvert_request_latency_seconds histogram",
            ]
            cumulative = 0
            for bound, n in zip(LATENCY_BUCKETS, self._buckets, strict=False):
                cumulative += n
                lines.append(
                    f'mlinvert_request_latency_seconds_bucket{{le="{bound}"}} {cumulative}'
                )
            lines.append(f'mlinvert_request_latency_seconds_bucket{{le="+Inf"}} {self._count}')
            lines.append(f"mlinvert_request_latency_seconds_sum {self._sum}")
            lines.append(f"mlinvert_request_latency_seconds_count {self._count}")
        return "\n".join(lines) + "\n"
