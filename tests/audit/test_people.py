"""One attacker's people in lockstep lanes: an outcome says when its shared requests
went without a lane (the stall valve), so a record can warn that a seeded re-run may
differ; when every lane keeps pace, nothing is said."""

from __future__ import annotations

import functools
import threading
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from mlinvert.audit import people
from mlinvert.audit.people import Outcome, run_people
from mlinvert.defenses import Predictor
from mlinvert.oracle import LocalOracle
from mlinvert.oracle.base import Oracle


class _Probe:
    """An attack that sends two probes; person 2 first waits for the others to end."""

    def __init__(self, others_done: threading.Event | None) -> None:
        self.others_done = others_done

    def run(self, oracle: Oracle, label: int, **_: Any) -> int:
        if self.others_done is not None:
            assert self.others_done.wait(10.0)
        for step in range(2):
            oracle.query(np.full((1, 6, 5), 0.1 * (label + step), dtype=np.float32))
        return label


def _outcomes(toys: ModuleType, *, stall: bool, monkeypatch: pytest.MonkeyPatch) -> list[Outcome]:
    if stall:  # the valve at 50 ms; otherwise the default, far above any step here
        monkeypatch.setattr(people, "map_lanes", functools.partial(people.map_lanes, max_wait=0.05))
    base = LocalOracle(Predictor(toys.ToySoftmax(), name="toy"))
    others_done = threading.Event()
    got: list[Outcome] = []

    def done(o: Outcome) -> None:
        got.append(o)
        if len(got) == 2 and stall:
            others_done.set()

    attacks: Any = {i: _Probe(others_done if stall and i == 2 else None) for i in range(3)}
    run_people(attacks, base, lanes=3, seed=0, budget=None, adapt=lambda _, o: o, done=done)
    return sorted(got, key=lambda o: o.label)


def test_an_outcome_counts_the_requests_that_went_without_a_lane(
    toys: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    stalled = _outcomes(toys, stall=True, monkeypatch=monkeypatch)
    assert [o.outcome for o in stalled] == [0, 1, 2]
    assert all(o.stalled >= 1 for o in stalled)
    steady = _outcomes(toys, stall=False, monkeypatch=monkeypatch)
    assert [o.stalled for o in steady] == [0, 0, 0]
