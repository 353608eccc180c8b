"""Lockstep runs equal sequential runs (same images, same query counts) on a target whose
answer for a row does not depend on the rest of the batch, with fewer requests."""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np
import pytest

from mlinvert.attacks import DCT, NES, Exact, LabelOnly, LabelOnlyConfig, MIFace, MIFaceConfig
from mlinvert.attacks.base import AttackResult
from mlinvert.attacks.lockstep import run_lockstep
from mlinvert.core import Response
from mlinvert.defenses import Predictor
from mlinvert.defenses.ratelimit import RateLimiter
from mlinvert.errors import ConfigError
from mlinvert.oracle import LocalOracle, WhiteBoxOracle
from mlinvert.oracle.wrappers import Recording


class _RowWise:
    """The toy softmax evaluated row by row in numpy (no BLAS: no batch-size effects)."""

    kind = "softmax"

    def __init__(self, toy: Any) -> None:
        self.w = toy.net.weight.detach().double().numpy()
        self.b = toy.net.bias.detach().double().numpy()
        self.input_shape_ = toy.input_shape_
        self.class_names_ = toy.class_names_
        self.classes_ = toy.classes_

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        flat = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
        logits = (flat[:, None, :] * self.w[None]).sum(axis=2) + self.b
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.predict_proba(X).argmax(axis=1)


class _Counting(LocalOracle):
    """A LocalOracle that counts requests."""

    requests = 0

    def query(self, x: np.ndarray) -> Response:
        self.requests += 1
        return super().query(x)


def _requests_on_lanes(per_label: list[int], lanes: int) -> int:
    """Requests of a lockstep run whose labels send ``per_label`` requests alone: each
    worker takes the next label as its last ends, every request carries one batch of
    each running worker, so it is the most any worker sends (the longest schedule)."""
    ends = [0] * lanes
    for n in per_label:
        heapq.heappush(ends, heapq.heappop(ends) + n)
    return max(ends)


def _same(a: list[AttackResult], b: list[AttackResult]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.status == y.status
        assert x.n_queries == y.n_queries
        assert np.array_equal(x.labels, y.labels)
        np.testing.assert_array_equal(x.reconstructions, y.reconstructions)
        assert x.per_label[0]["iterations"] == y.per_label[0]["iterations"]


@pytest.mark.parametrize("budget", [None, 150])
def test_miface_lockstep_equals_sequential(toy_softmax: Any, budget: int | None) -> None:
    model = _RowWise(toy_softmax)
    labels = list(range(6))

    def make(label: int) -> MIFace:
        return MIFace(
            MIFaceConfig.improved(max_iter=25, start="grey"),
            gradient=NES(samples=5),
            space=DCT(6),
        )

    seq_oracle = _Counting(Predictor(model, name="toy"))
    seq, per_label = [], []
    for lab in labels:
        before = seq_oracle.requests
        seq.append(make(lab).run(seq_oracle, lab, seed=3, budget=budget))
        per_label.append(seq_oracle.requests - before)
    lock_oracle = _Counting(Predictor(model, name="toy"))
    lock = run_lockstep(make, lock_oracle, labels, lanes=3, seed=3, budget=budget)
    _same(seq, lock)
    assert lock_oracle.n_queries == seq_oracle.n_queries == sum(r.n_queries for r in seq)
    # exactly the schedule's requests, whatever the threads' timing
    assert lock_oracle.requests == _requests_on_lanes(per_label, 3)
    assert lock_oracle.requests <= 0.5 * seq_oracle.requests
    if budget is not None:
        assert all(r.status == "budget_exhausted" and r.n_queries <= budget for r in lock)
    else:
        # the reconstructions are class images, not just any answer
        assert sum(r.per_label[0]["predicted"] == r.labels[0] for r in lock) >= 5


def test_label_only_lockstep_equals_sequential(toy_softmax: Any) -> None:
    model = _RowWise(toy_softmax)
    labels = [0, 1, 2, 3]

    def make(label: int) -> LabelOnly:
        cfg = LabelOnlyConfig(n_directions=8, max_iter=10, start_samples=200, batch_size=50)
        return LabelOnly(cfg, space=DCT(6))

    seq_oracle = Recording(LocalOracle(Predictor(model, name="toy")))
    seq = [make(lab).run(seq_oracle, lab, seed=5, budget=300) for lab in labels]
    lock = run_lockstep(
        make, LocalOracle(Predictor(model, name="toy")), labels, lanes=4, seed=5, budget=300
    )
    _same(seq, lock)


def test_run_lockstep_refuses_a_shared_generator(toy_softmax: Any) -> None:
    oracle = LocalOracle(Predictor(_RowWise(toy_softmax), name="toy"))
    with pytest.raises(ConfigError, match="int seed"):
        run_lockstep(lambda lab: LabelOnly(), oracle, [0], lanes=2, seed=np.random.default_rng())
    with pytest.raises(ConfigError, match="lanes"):
        run_lockstep(lambda lab: LabelOnly(), oracle, [0], lanes=0)


def test_a_refused_account_stops_new_labels(toy_softmax: Any) -> None:
    """Two lanes spend a 100-input budget and end rate_limited; with stop_on the six
    labels not yet started are skipped (left out), without it each is tried and refused."""

    def make(label: int) -> MIFace:
        return MIFace(
            MIFaceConfig.improved(max_iter=25, start="grey"), gradient=NES(samples=5), space=DCT(6)
        )

    def oracle() -> LocalOracle:
        limit = RateLimiter("100/hour")
        return LocalOracle(Predictor(_RowWise(toy_softmax), name="toy", guards=[limit]))

    labels = list(range(8))
    stopped = run_lockstep(make, oracle(), labels, lanes=2, seed=0, stop_on=("rate_limited",))
    assert [r.labels[0] for r in stopped] == [0, 1]
    assert all(r.status == "rate_limited" for r in stopped)
    assert sum(r.n_queries for r in stopped) <= 100
    every = run_lockstep(make, oracle(), labels, lanes=2, seed=0)
    assert [r.labels[0] for r in every] == labels
    assert all(r.status == "rate_limited" for r in every)
    assert all(r.n_queries == 0 for r in every[2:])


def test_one_lane_runs_on_the_oracle_itself(toy_softmax: Any) -> None:
    """lanes=1 keeps a white-box oracle's gradients (no Coalescer in between) and accepts
    a Generator seed; MIFace.run_all is that loop and stops at a refused account."""
    make = lambda lab: MIFace(  # noqa: E731
        MIFaceConfig.improved(max_iter=20), gradient=Exact(), space=DCT(6)
    )
    white = WhiteBoxOracle(Predictor(toy_softmax, name="toy"))
    got = run_lockstep(make, white, [0, 1, 2], lanes=1, seed=np.random.default_rng(0))
    assert [r.labels[0] for r in got] == [0, 1, 2]
    assert sum(r.per_label[0]["predicted"] == r.labels[0] for r in got) >= 2
    limit = RateLimiter("100/hour")
    api = LocalOracle(Predictor(_RowWise(toy_softmax), name="toy", guards=[limit]))
    nes = MIFace(
        MIFaceConfig.improved(max_iter=25, start="grey"), gradient=NES(samples=5), space=DCT(6)
    )
    merged = nes.run_all(api, [0, 1, 2, 3], seed=0)
    assert merged.labels.tolist() == [0] and merged.status == "rate_limited"
