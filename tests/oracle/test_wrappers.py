"""Budgeted, Recording, Cached and Blinded keep the Oracle interface; counting stays in
the base."""

from __future__ import annotations

import numpy as np
import pytest

from mlinvert.data import load
from mlinvert.data.base import ImageDataset
from mlinvert.defenses import Predictor
from mlinvert.errors import BudgetExhausted, ConfigError, GradientUnavailable
from mlinvert.oracle import LocalOracle, Oracle
from mlinvert.oracle.wrappers import Blinded, Budgeted, Cached, Recording, has_gradient


class _Mean:
    """A fixed 3-class model on 4x4 images: scores from the image mean."""

    kind = "toy"
    classes_ = np.arange(3)
    class_names_: tuple[str, ...] = ("a", "b", "c")
    input_shape_: tuple[int, ...] = (4, 4)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        m = np.asarray(X).reshape(len(X), -1).mean(axis=1)
        logits = np.stack([m, 1 - m, 0.5 * np.ones_like(m)], axis=1) * 4
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.predict_proba(X).argmax(axis=1)


@pytest.fixture()
def base() -> LocalOracle:
    return LocalOracle(Predictor(_Mean(), name="mean"))


def _batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(n, 4, 4)).astype(np.float32)


def test_budget_refuses_whole_batch_before_exceeding(base: LocalOracle) -> None:
    oracle = Budgeted(base, 10)
    assert isinstance(oracle, Oracle)
    oracle.query(_batch(6))
    with pytest.raises(BudgetExhausted, match="budget of 10"):
        oracle.query(_batch(5))
    assert base.n_queries == 6  # refused batch never reached the model
    oracle.query(_batch(4))
    assert oracle.n_queries == base.n_queries == 10 and oracle.remaining == 0
    with pytest.raises(BudgetExhausted):
        oracle.query(_batch(1))


def test_budget_counts_earlier_spending_and_rejects_bad_budget(base: LocalOracle) -> None:
    oracle = Budgeted(base, 10, already_spent=8)
    oracle.query(_batch(2))
    with pytest.raises(BudgetExhausted):
        oracle.query(_batch(1))
    with pytest.raises(ConfigError):
        Budgeted(base, 0)


def test_recording_keeps_every_query_and_answer(base: LocalOracle) -> None:
    rec = Recording(base)
    a, b = _batch(3, 1), _batch(2, 2)
    ra = rec.query(a)
    rec.query(b)
    assert rec.n_queries == 5
    np.testing.assert_array_equal(rec.all_inputs(), np.concatenate([a, b]))
    np.testing.assert_array_equal(rec.responses[0].probs, ra.probs)
    assert len(set(rec.fingerprints())) == 5


def test_cached_answers_repeats_without_querying(base: LocalOracle) -> None:
    cached = Cached(base)
    x = _batch(4)
    first = cached.query(x)
    assert base.n_queries == 4
    # two repeats and one new row, duplicated inside the batch
    new = _batch(1, 9)
    second = cached.query(np.concatenate([x[:2], new, new]))
    assert base.n_queries == 5 and cached.n_queries == 5 and cached.hits == 3
    assert first.probs is not None and second.probs is not None
    np.testing.assert_array_equal(second.probs[:2], first.probs[:2])
    np.testing.assert_array_equal(second.probs[2], second.probs[3])
    again = base.query(new).probs
    assert again is not None
    np.testing.assert_allclose(second.probs[2], again[0])


def test_stack_keeps_interface_and_gradient_passthrough(base: LocalOracle) -> None:
    stack = Budgeted(Recording(Cached(base)), 100)
    assert stack.info.class_names == ("a", "b", "c")
    assert not has_gradient(stack)
    with pytest.raises(GradientUnavailable, match="black-box gradient source"):
        stack.class_gradient(_batch(1), np.asarray([0]))


def test_cached_on_real_loader_shapes() -> None:
    ds = load("digits", seed=0)
    assert isinstance(ds, ImageDataset)
    shape = ds.image_shape

    class _Digits(_Mean):
        input_shape_: tuple[int, ...] = shape

    cached = Cached(LocalOracle(Predictor(_Digits(), name="d")))
    x = ds.images[:3]
    cached.query(x)
    cached.query(x)
    assert cached.n_queries == 3 and cached.hits == 3


def test_blinded_adds_fresh_bounded_noise_and_counts_in_the_base(base: LocalOracle) -> None:
    rec = Recording(base)
    blind = Blinded(rec, 0.05, seed=3)
    x = np.full((2, 4, 4), 0.5, dtype=np.float32)
    x[1] = 0.99  # near the top: the noise is clipped to [0, 1]
    blind.query(x)
    blind.query(x)
    sent = rec.all_inputs()
    assert blind.n_queries == base.n_queries == 4
    assert np.abs(sent[0] - 0.5).max() <= 0.05 + 1e-6 and sent.max() <= 1.0
    assert np.abs(sent[0] - 0.5).max() > 0.01  # really noisy
    assert not np.array_equal(sent[0], sent[2])  # fresh noise for a repeated probe
    again = Recording(LocalOracle(Predictor(_Mean(), name="mean")))
    Blinded(again, 0.05, seed=3).query(x)
    np.testing.assert_array_equal(again.all_inputs(), sent[:2])  # seeded
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="amplitude"):
            Blinded(base, bad)


def test_blinding_gets_probes_past_the_query_detector() -> None:
    """Probes a blocking detector refuses pass once each carries noise of +-0.1."""
    from mlinvert.defenses import QueryDetector
    from mlinvert.errors import Blocked

    rng = np.random.default_rng(0)
    face = np.kron(rng.random((6, 5)), np.ones((8, 8)))[:46, :38].astype(np.float32)
    probes = np.clip(face + rng.normal(0, 0.005, (60, 46, 38)), 0, 1).astype(np.float32)

    def attacker(blind: float | None) -> Oracle:
        model = _Mean()
        model.input_shape_ = (46, 38)
        oracle = LocalOracle(
            Predictor(model, name="m", guards=[QueryDetector("detect:block:20")]), account="m"
        )
        return oracle if blind is None else Blinded(oracle, blind, seed=1)

    plain = attacker(None)
    with pytest.raises(Blocked):
        for i in range(0, 60, 10):
            plain.query(probes[i : i + 10])
    blinded = attacker(0.1)
    for i in range(0, 60, 10):
        blinded.query(probes[i : i + 10])
    assert blinded.n_queries == 60


def test_a_blinding_sybil_doubles_its_noise_each_time_an_account_is_blocked() -> None:
    """Behind a blocking detector, +-0.0125 noise is seen through and every one of four
    accounts is blocked; the escalating Sybil re-sends a refused batch through the next
    account with twice the noise, is blocked twice and then no more (+-0.05 gets past),
    answering all 300 probes."""
    from mlinvert.defenses import QueryDetector
    from mlinvert.errors import Blocked
    from mlinvert.oracle.wrappers import Rotating, escalating, largest_blinding

    rng = np.random.default_rng(0)
    face = np.kron(rng.random((6, 5)), np.ones((8, 8)))[:46, :38].astype(np.float32)
    probes = np.clip(face + rng.normal(0, 0.005, (300, 46, 38)), 0, 1).astype(np.float32)

    def accounts() -> list[LocalOracle]:
        model = _Mean()
        model.input_shape_ = (46, 38)
        predictor = Predictor(model, name="m", guards=[QueryDetector("detect:block:20")])
        return [LocalOracle(predictor, account=f"sybil-{i}") for i in range(4)]

    fixed_accounts = Rotating(accounts())
    fixed = Blinded(fixed_accounts, 0.0125, seed=1)
    with pytest.raises(Blocked):
        for i in range(0, 300, 10):
            fixed.query(probes[i : i + 10])
    assert fixed_accounts.blocked == 3 and largest_blinding(fixed) == 0.0125
    sybil = escalating(accounts(), 0.0125, seed=1)
    for i in range(0, 300, 10):
        sybil.query(probes[i : i + 10])
    assert sybil.n_queries == 300
    assert sybil.blocked == 2 and sybil.accounts_used == 3
    assert largest_blinding(sybil) == 0.05
    amplitudes = [a.amplitude if isinstance(a, Blinded) else None for a in sybil.oracles]
    assert amplitudes == [0.05] * 4  # shared: what comes next
    assert largest_blinding(Rotating(accounts())) is None  # no blinding at all
    assert Blinded(fixed_accounts, 0.3, caught=lambda: 3).amplitude == 1.0  # capped


def test_rotating_moves_to_a_fresh_account_when_one_is_refused() -> None:
    """Three accounts of 10 inputs an hour each: the batch an account cannot pay for is
    re-sent through the next; the last account's refusal reaches the attacker."""
    from mlinvert.defenses.ratelimit import RateLimiter
    from mlinvert.errors import RateLimited
    from mlinvert.oracle.wrappers import Rotating

    predictor = Predictor(_Mean(), name="mean", guards=[RateLimiter("10/hour")])
    accounts = [LocalOracle(predictor, account=f"sybil-{i}") for i in range(3)]
    oracle = Rotating(accounts)
    assert oracle.info == accounts[0].info
    x = _batch(6)
    first = oracle.query(x)  # account 0: 6 of its 10
    np.testing.assert_array_equal(first.labels, _Mean().predict(x))
    oracle.query(x)  # 12 > 10: refused, re-sent through account 1
    assert oracle.accounts_used == 2
    assert [a.n_queries for a in accounts] == [6, 6, 0]
    oracle.query(x)  # account 1 cannot pay: account 2
    assert [a.n_queries for a in accounts] == [6, 6, 6]
    assert oracle.n_queries == 18
    with pytest.raises(RateLimited):
        oracle.query(x)  # every account spent
    assert oracle.n_queries == 18 and oracle.accounts_used == 3
    assert oracle.blocked == 0  # rate limited, not caught: nothing tells of detection
    with pytest.raises(ConfigError, match="at least one"):
        Rotating([])


def test_rotating_moves_past_an_account_spent_in_an_earlier_run() -> None:
    """A resumed attacker: its first account spent its allowance in the earlier run, so
    the service refuses it from the first batch of this one. With the earlier counts
    that refusal moves on to the next account; without them it reads as "this batch is
    refused by any account" and is raised."""
    from mlinvert.defenses.ratelimit import RateLimiter
    from mlinvert.errors import RateLimited
    from mlinvert.oracle.wrappers import Rotating

    predictor = Predictor(_Mean(), name="mean", guards=[RateLimiter("10/hour")])
    LocalOracle(predictor, account="sybil-0").query(_batch(10))  # the earlier run
    x = _batch(4)
    naive = Rotating([LocalOracle(predictor, account=f"sybil-{i}") for i in range(2)])
    with pytest.raises(RateLimited):
        naive.query(x)
    accounts = [LocalOracle(predictor, account=f"sybil-{i}") for i in range(2)]
    resumed = Rotating(accounts, answered_before=[10, 0])
    resumed.query(x)
    assert [a.n_queries for a in accounts] == [0, 4] and resumed.accounts_used == 2
    with pytest.raises(ConfigError, match="one count per account"):
        Rotating(accounts, answered_before=[10])


def test_rotating_does_not_burn_accounts_on_a_batch_every_account_refuses() -> None:
    """A fresh account blocked by its first batch (ten copies of one image, a
    near-duplicate burst) says the batch is refused, not the account: raised at once."""
    from mlinvert.defenses import QueryDetector
    from mlinvert.errors import Blocked
    from mlinvert.oracle.wrappers import Rotating

    model = _Mean()
    model.input_shape_ = (46, 38)
    predictor = Predictor(model, name="m", guards=[QueryDetector("detect:block:5")])
    oracle = Rotating([LocalOracle(predictor, account=f"sybil-{i}") for i in range(3)])
    image = np.random.default_rng(0).random((46, 38)).astype(np.float32)
    with pytest.raises(Blocked):
        oracle.query(np.repeat(image[None], 10, axis=0))
    assert oracle.accounts_used == 1 and oracle.n_queries == 0
