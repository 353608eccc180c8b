"""Output policies: exactness, restriction, seeding, argmax preservation, parsing."""

from __future__ import annotations

import numpy as np
import pytest

from mlinvert.defenses import (
    Chain,
    FullScores,
    GaussianNoise,
    LabelsOnly,
    ReverseSigmoid,
    Round,
    RoundTo,
    TopK,
    parse_policy,
)
from mlinvert.defenses.policies import score_step
from mlinvert.errors import ConfigError


@pytest.fixture
def probs() -> np.ndarray:
    rng = np.random.default_rng(7)
    flat = rng.dirichlet(np.ones(10), size=200)
    peaked = rng.dirichlet(np.full(10, 0.05), size=200)
    return np.concatenate([flat, peaked])


def test_full_is_identity(probs: np.ndarray) -> None:
    assert FullScores()(probs) is probs


@pytest.mark.parametrize("decimals", [0, 1, 2, 4])
def test_round_is_exact_nearest_multiple(probs: np.ndarray, decimals: int) -> None:
    out = Round(decimals=decimals)(probs)
    assert out is not None
    scaled = out * 10**decimals
    assert np.all(np.abs(scaled - np.round(scaled)) < 1e-9)
    assert np.max(np.abs(out - probs)) <= 0.5 * 10**-decimals + 1e-12
    assert len(np.unique(out.round(12))) <= 10**decimals + 1


@pytest.mark.parametrize("granularity", [0.05, 0.01, 0.2, 0.3])
def test_round_to_granularity(probs: np.ndarray, granularity: float) -> None:
    out = RoundTo(granularity=granularity)(probs)
    assert out is not None
    steps = out / granularity
    assert np.all(np.abs(steps - np.round(steps)) < 1e-9)
    assert np.max(np.abs(out - probs)) <= granularity / 2 + 1e-12
    if granularity == 0.05:  # 1/20: answers are exactly the doubles k/20
        assert np.array_equal(out, np.round(out * 20) / 20)


def test_top_k_keeps_exactly_the_k_largest(probs: np.ndarray) -> None:
    out = TopK(k=3)(probs)
    assert out is not None
    assert np.all((out > 0).sum(axis=1) == 3)
    top = np.sort(probs, axis=1)[:, -3:]
    assert np.array_equal(np.sort(out, axis=1)[:, -3:], top)
    kept = out > 0
    assert np.array_equal(out[kept], probs[kept])
    assert np.array_equal(out.argmax(axis=1), probs.argmax(axis=1))
    wide = TopK(k=50)(probs)
    assert wide is not None and np.array_equal(wide, probs)


def test_labels_only_withholds_scores(probs: np.ndarray) -> None:
    policy = LabelsOnly()
    assert policy(probs) is None
    assert policy.carries == "label"


def test_noise_is_seeded_keyed_and_a_distribution(probs: np.ndarray) -> None:
    a = GaussianNoise(sigma=0.05, seed=1)(probs)
    b = GaussianNoise(sigma=0.05, seed=1)(probs)
    c = GaussianNoise(sigma=0.05, seed=2)(probs)
    assert a is not None and b is not None and c is not None
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)
    assert np.all(a >= 0) and np.allclose(a.sum(axis=1), 1.0)
    # keyed on the row: the same input gets the same answer wherever it sits in a batch
    again = GaussianNoise(sigma=0.05, seed=1)(probs[::-1].copy())
    assert again is not None and np.array_equal(again[::-1], a)
    assert 0.01 < np.mean(np.abs(a - probs)) < 0.1


@pytest.mark.parametrize(("beta", "gamma"), [(0.5, 0.3), (0.9, 0.1), (0.2, 2.0), (3.0, 0.5)])
def test_reverse_sigmoid_keeps_argmax(probs: np.ndarray, beta: float, gamma: float) -> None:
    out = ReverseSigmoid(beta=beta, gamma=gamma)(probs)
    assert out is not None
    assert np.array_equal(out.argmax(axis=1), probs.argmax(axis=1))
    assert np.all(out >= 0) and np.allclose(out.sum(axis=1), 1.0)
    assert np.mean(np.abs(out - probs)) > 1e-3  # it does perturb


def test_chain_composes_left_to_right(probs: np.ndarray) -> None:
    policy = parse_policy("top:3+round:2")
    assert isinstance(policy, Chain)
    assert policy.carries == "top-k"
    top = TopK(k=3)(probs)
    assert top is not None
    expected = Round(decimals=2)(top)
    out = policy(probs)
    assert out is not None and expected is not None and np.array_equal(out, expected)
    assert parse_policy("round:2+labels")(probs) is None
    assert parse_policy("round:2+labels").carries == "label"


@pytest.mark.parametrize(
    "spec",
    [
        "full",
        "round:2",
        "round-to:0.05",
        "top:3",
        "labels",
        "noise:0.01:4",
        "reverse-sigmoid:0.5:0.3",
        "top:3+round:2",
    ],
)
def test_spec_names_round_trip(spec: str) -> None:
    assert parse_policy(spec).name == spec
    assert parse_policy(parse_policy(spec).name).name == spec


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "+",
        "round",
        "round:x",
        "round:99",
        "round-to:0",
        "round-to:2",
        "top:0",
        "top:1.5",
        "noise:-1",
        "noise",
        "reverse-sigmoid:1",
        "reverse-sigmoid:0:1",
        "blur:3",
        "round:2+",
    ],
)
def test_bad_specs_name_the_grammar(spec: str) -> None:
    with pytest.raises(ConfigError, match="grammar: full"):
        parse_policy(spec)


@pytest.mark.parametrize(
    ("spec", "step"),
    [
        ("full", 0.0),
        ("round:2", 0.01),
        ("round:0", 1.0),
        ("round-to:0.05", 0.05),
        ("top:3+round:3", 0.001),
        ("round:1+round-to:0.05", 0.1),
        ("top:1", 0.0),
        ("labels", 0.0),
        ("not a policy", 0.0),
    ],
)
def test_score_step_reads_the_rounding_of_a_policy_spec(spec: str, step: float) -> None:
    assert score_step(spec) == pytest.approx(step)
    if step:  # what the policy returns really moves in steps of that size
        out = parse_policy(spec)(np.asarray([[0.123456, 0.876544]]))
        assert out is not None
        assert np.allclose(out / step, np.round(out / step))
