"""The state one audit run shares between its rooms: targets, judge, search spaces."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from threadpoolctl import threadpool_limits

from mlinvert.attacks.presets import Preset
from mlinvert.audit.config import AuditConfig
from mlinvert.audit.results import ResultsFile
from mlinvert.data.base import ImageDataset
from mlinvert.defenses.spec import Defense

log = logging.getLogger(__name__)


Event = Callable[[str, Mapping[str, Any]], None]


def no_event(kind: str, data: Mapping[str, Any]) -> None:
    """Default event sink: log at debug level."""
    log.debug("%s %s", kind, data)


def serialised(events: Event) -> Event:
    """``events`` called by one thread at a time (lanes report progress concurrently)."""
    lock = threading.Lock()

    def emit(kind: str, data: Mapping[str, Any]) -> None:
        with lock:
            events(kind, data)

    return emit


@dataclass
class AuditTarget:
    name: str
    model: Any
    card: dict[str, Any]
    folder: Path


@dataclass
class AuditContext:
    config: AuditConfig
    results: ResultsFile
    dataset: ImageDataset
    preset: Preset
    targets: list[AuditTarget]
    judge: Any
    labels: list[int]
    defenses: list[Defense]
    events: Event
    spaces: dict[int, Any] = field(default_factory=dict)
    #: the search space of the attacker's learned prior (``--prior``), bound once and
    #: shared by every person; None: eigenfaces of the others, per person
    prior: Any = None
    #: False once the API the attacks talk to has gone away (then an error is the
    #: run's problem, not an attack outcome: the run stops instead of recording it)
    api_alive: Callable[[], bool] = lambda: True
    #: ``--api``: one HttpOracle per attacker key, shared by the utility measurement and
    #: every attack (their counts are per attack differences), as one attacker's keys are
    api_oracles: list[Any] = field(default_factory=list)


def blinding(ctx: AuditContext, attack: str, defense: Defense) -> float | None:
    """The blinding amplitude the API attacker uses under ``defense`` (None: none).

    The attacker reads the service's documentation (``/v1/models`` advertises the
    detector) as it reads the output policy, and adapts: against a query detector it
    blinds every probe (``AuditConfig.blind``)."""
    if attack == "whitebox" or defense.detector is None or ctx.config.blind <= 0:
        return None
    return ctx.config.blind


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """One torch and one BLAS thread for the block, restored afterwards.

    An audit makes hundreds of thousands of tiny predictions; on a small shared machine
    two intra-op threads that fight other processes for the cores were measured here
    ~600x slower per small batch (30 ms instead of 0.05 ms).
    """

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)
