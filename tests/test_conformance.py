"""One contract for every Oracle, every output policy and every attack.

Oracles: LocalOracle, WhiteBoxOracle, HttpOracle against a real ``mlinvert serve`` on
loopback, the wrappers of :mod:`mlinvert.oracle.wrappers` and a lockstep Coalescer lane,
each under every output policy kind (full, round:N, round-to:R, top:K, labels, noise,
reverse-sigmoid and chains). Each answers exactly what the Predictor answers, in the
documented shapes and dtypes, with ``info`` saying what the answers carry and
``n_queries`` counting exactly the inputs that reached the model. Attacks (MI-Face
white-box and black-box with each gradient source, label-only, the tree estimators) stay
within their budget, return images in [0, 1] of the input shape (guesses in the
sensitive domain for trees), and refuse with an MlinvertError where they cannot run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from mlinvert.attacks import LabelOnly, LabelOnlyConfig, MIFace, MIFaceConfig
from mlinvert.attacks.base import AttackResult
from mlinvert.attacks.gradients import NES, SPSA, Broyden, Exact, FiniteDifferences
from mlinvert.attacks.spaces import PCAPrior
from mlinvert.attacks.tree_inversion import (
    BlackBox2014,
    ConfidenceBlackBox,
    Knowledge,
    LabelOnlyMatch,
    TreeAttackConfig,
    WhiteBoxCounts,
    training_confusion,
)
from mlinvert.core import OracleInfo, Response
from mlinvert.data import load
from mlinvert.data.base import ImageDataset
from mlinvert.data.surveys import SurveyDataset
from mlinvert.defenses import Predictor, parse_policy
from mlinvert.defenses.policies import Chain, LabelsOnly, Round, RoundTo, TopK
from mlinvert.errors import (
    AttackError,
    BudgetExhausted,
    ConfigError,
    GradientUnavailable,
    MlinvertError,
)
from mlinvert.oracle import HttpOracle, LocalOracle, WhiteBoxOracle
from mlinvert.oracle.base import Oracle
from mlinvert.oracle.lockstep import Coalescer
from mlinvert.oracle.wrappers import (
    Blinded,
    Budgeted,
    Cached,
    Recording,
    Rotating,
    escalating,
    has_gradient,
)
from mlinvert.service import Store
from mlinvert.service.runner import ServiceProcess
from mlinvert.targets import load as load_model
from mlinvert.targets import save, train_target
from mlinvert.targets.tree import train_tree

POLICIES = (
    "full",
    "round:2",
    "round-to:0.05",
    "top:3",
    "labels",
    "noise:0.05:1",
    "reverse-sigmoid:0.6:0.4",
    "top:3+round:2",
    "round:1+labels",
)
#: Every oracle kind: the base ones and each wrapper (over a LocalOracle) and a lane.
ORACLES = (
    "local",
    "whitebox",
    "http",
    "budgeted",
    "budgeted-whitebox",
    "recording",
    "cached",
    "blinded",
    "rotating",
    "escalating",
    "lane",
)
#: Oracles whose inputs reach the model unchanged (Blinded adds noise to every probe).
EXACT = tuple(k for k in ORACLES if k not in ("blinded", "escalating"))
BUDGET = 40
LABEL = 3


@dataclass
class World:
    """The digits target (saved and loaded back, as the service loads it), the service
    that serves it once per policy, a key, and the tree target on the Fair survey."""

    model: Any
    service: ServiceProcess
    key: str
    tree: Any
    fair: Any


@pytest.fixture(scope="module")
def world(digits: ImageDataset, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A quick softmax on digits behind ``mlinvert serve`` (one model name per policy, no
    guard), and a quick tree on the embedded Fair survey."""
    root = tmp_path_factory.mktemp("conformance")
    trained = train_target(digits, "softmax", seed=0, quick=True)
    save(trained.model, root / "softmax", card=trained.card)
    store = Store(root / "service.db")
    key, _ = store.create_key("conformance")
    store.close()
    names = {_name(spec): spec for spec in POLICIES}
    with ServiceProcess(
        [f"{name}={root / 'softmax'}" for name in names],
        db=root / "service.db",
        model_policies=names,
    ) as service:
        fair = load("fair", seed=0)
        assert isinstance(fair, SurveyDataset)
        tree, _ = train_tree(fair, seed=0, quick=True)
        yield World(
            model=load_model(root / "softmax"),
            service=service,
            key=key,
            tree=tree,
            fair=fair,
        )


def _name(spec: str) -> str:
    return f"m{POLICIES.index(spec)}"


def _predictor(world: World, spec: str) -> Predictor:
    return Predictor(world.model, name=_name(spec), policy=parse_policy(spec))


@pytest.fixture
def oracle_of(world: World) -> Iterator[Callable[[str, str], tuple[Oracle, Callable[[], int]]]]:
    """``oracle_of(kind, policy)`` -> (the oracle, the count of inputs that reached the
    model through it, read from the base oracles)."""
    with ExitStack() as stack:

        def make(kind: str, spec: str) -> tuple[Oracle, Callable[[], int]]:
            local = LocalOracle(_predictor(world, spec))
            base = lambda: local.n_queries  # noqa: E731
            if kind == "local":
                return local, base
            if kind in ("whitebox", "budgeted-whitebox"):
                white = WhiteBoxOracle(_predictor(world, spec))
                wrapped = white if kind == "whitebox" else Budgeted(white, 10_000)
                return wrapped, lambda: white.n_queries
            if kind == "http":
                url = world.service.model_url(_name(spec))
                http = stack.enter_context(HttpOracle(url, world.key))
                return http, lambda: http.n_queries
            if kind in ("rotating", "escalating"):
                accounts = [local, LocalOracle(_predictor(world, spec), account="second")]
                many = (
                    Rotating(accounts) if kind == "rotating" else escalating(accounts, 0.02, seed=0)
                )
                return many, lambda: sum(a.n_queries for a in accounts)
            if kind == "lane":
                coalescer = Coalescer(local, lanes=1, max_wait=None)
                stack.callback(coalescer.close)
                return stack.enter_context(coalescer.lane()), base
            wrappers: dict[str, Callable[[Oracle], Oracle]] = {
                "budgeted": lambda o: Budgeted(o, 10_000),
                "recording": Recording,
                "cached": Cached,
                "blinded": lambda o: Blinded(o, 0.02, seed=0),
            }
            return wrappers[kind](local), base

        yield make


def _inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 8, 8), dtype=np.float32)


def _step(spec: str) -> float:
    """The coarsest rounding step of a policy (0: no rounding)."""
    policy = parse_policy(spec)
    parts = policy.policies if isinstance(policy, Chain) else (policy,)
    steps = [
        10.0**-p.decimals if isinstance(p, Round) else p.granularity
        for p in parts
        if isinstance(p, Round | RoundTo)
    ]
    return max(steps, default=0.0)


def _top_k(spec: str) -> int | None:
    policy = parse_policy(spec)
    parts = policy.policies if isinstance(policy, Chain) else (policy,)
    return min((p.k for p in parts if isinstance(p, TopK)), default=None)


def check_response(response: Response, n: int, spec: str, info: OracleInfo) -> None:
    """Shapes and dtypes, answers that carry what ``info`` says, and what ``spec`` lets
    through: no scores for labels only, zeros outside the k, multiples of the step."""
    k = info.n_classes
    assert response.labels.dtype == np.int64 and response.labels.shape == (n,)
    assert ((response.labels >= 0) & (response.labels < k)).all()
    if response.label_names is not None:
        assert response.label_names == tuple(info.class_names[i] for i in response.labels)
    assert info.carries == parse_policy(spec).carries or info.kind == "tree"
    if info.carries == "label":
        assert response.probs is None and response.confidence is None
        return
    probs = response.probs
    assert probs is not None and probs.dtype == np.float64 and probs.shape == (n, k)
    assert np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1 + 1e-9).all()
    if info.carries == "top-k":
        top = _top_k(spec)
        assert top is not None and ((probs > 0).sum(axis=1) <= top).all()  # zeros outside
    if (step := _step(spec)) > 0:
        assert np.allclose(probs / step, np.round(probs / step), atol=1e-6)  # multiples
    if spec in ("full", "noise:0.05:1", "reverse-sigmoid:0.6:0.4"):
        assert np.allclose(probs.sum(axis=1), 1.0)
    if spec in ("full", "reverse-sigmoid:0.6:0.4"):
        assert (probs.argmax(axis=1) == response.labels).all()


@pytest.mark.parametrize("spec", POLICIES)
@pytest.mark.parametrize("kind", ORACLES)
def test_oracle_answers_and_counts(
    kind: str, spec: str, world: World, oracle_of: Callable[..., Any]
) -> None:
    oracle, reached = oracle_of(kind, spec)
    policy = parse_policy(spec)
    info = oracle.info
    assert info.input_shape == (8, 8) and info.n_classes == 10
    assert info.class_names == tuple(world.model.class_names_)
    assert info.carries == policy.carries and info.policy == policy.name
    reference = _predictor(world, spec)
    before, sent = oracle.n_queries, 0
    for n, seed in ((1, 0), (5, 1), (3, 2)):
        x = _inputs(n, seed)
        response = oracle.query(x)
        sent += n
        check_response(response, n, spec, info)
        if kind in EXACT:  # the same answers as the Predictor, to the bit
            want = reference.predict(x, account="reference")
            assert np.array_equal(response.labels, want.labels)
            assert (response.probs is None) == (want.probs is None)
            if want.probs is not None:
                assert np.array_equal(response.probs, want.probs)
        assert oracle.n_queries - before == sent == reached()
    if kind == "cached":  # repeated inputs come from memory and reach nobody
        again = oracle.query(_inputs(5, 1))
        assert oracle.n_queries - before == sent == reached()
        check_response(again, 5, spec, info)
    x = _inputs(2, 3)
    if has_gradient(oracle):
        grad = oracle.class_gradient(x, np.asarray([LABEL, 0]))
        assert grad.shape == x.shape and np.isfinite(grad).all()
        assert oracle.n_queries - before == sent + 2  # one model evaluation per input
    elif hasattr(oracle, "class_gradient"):
        with pytest.raises(GradientUnavailable):
            oracle.class_gradient(x, np.asarray([LABEL, 0]))


def test_budgeted_refuses_a_batch_that_does_not_fit_and_sends_nothing(world: World) -> None:
    local = LocalOracle(_predictor(world, "full"))
    oracle = Budgeted(local, 8)
    oracle.query(_inputs(5, 0))
    with pytest.raises(BudgetExhausted) as exc:
        oracle.query(_inputs(5, 1))
    assert isinstance(exc.value, MlinvertError) and "budget" in str(exc.value)
    assert local.n_queries == oracle.n_queries == 5 and oracle.remaining == 3


def _miface(gradient: Any) -> Callable[[np.ndarray], MIFace]:
    return lambda aux: MIFace(
        MIFaceConfig.improved(max_iter=5), gradient=gradient, space=PCAPrior(aux, 10)
    )


#: Each attack as a factory of the attacker's auxiliary images (other classes' digits).
ATTACKS: dict[str, Callable[[np.ndarray], Any]] = {
    "miface-exact": _miface(Exact()),
    "miface-fd": _miface(FiniteDifferences()),
    "miface-nes": _miface(NES(samples=4)),
    "miface-spsa": _miface(SPSA(samples=4)),
    "miface-broyden": _miface(Broyden()),
    "label-only": lambda aux: LabelOnly(
        LabelOnlyConfig(max_iter=10, n_directions=4, start_samples=20, batch_size=10),
        space=PCAPrior(aux, 10),
    ),
}


@pytest.fixture(scope="module")
def aux(digits: ImageDataset) -> np.ndarray:
    """The attacker's auxiliary images: held-out digits of the other classes."""
    X, y = digits.test()
    return X[y != LABEL]


@pytest.fixture(scope="module")
def plain_runs(world: World, aux: np.ndarray) -> Callable[[str], AttackResult]:
    """``plain_runs(attack)``: its seeded run through a plain Local (or WhiteBox) oracle
    under ``full``, run once per module."""
    done: dict[str, AttackResult] = {}

    def get(attack: str) -> AttackResult:
        if attack not in done:
            make = WhiteBoxOracle if attack == "miface-exact" else LocalOracle
            oracle = make(_predictor(world, "full"))
            done[attack] = ATTACKS[attack](aux).run(oracle, LABEL, seed=0, budget=BUDGET)
        return done[attack]

    return get


def check_attack(result: AttackResult, oracle: Oracle, before: int) -> None:
    """Within budget, every query counted, images in [0, 1] of the input shape, JSON."""
    assert result.n_queries <= BUDGET and oracle.n_queries - before == result.n_queries
    assert result.reconstructions.shape == (1, *oracle.info.input_shape)
    assert np.isfinite(result.reconstructions).all()
    assert result.reconstructions.min() >= 0.0 and result.reconstructions.max() <= 1.0
    assert result.labels.tolist() == [LABEL]
    assert result.status in ("succeeded", "failed", "budget_exhausted")
    back = AttackResult.from_json(result.to_json())
    np.testing.assert_array_equal(back.reconstructions, result.reconstructions)
    assert back.n_queries == result.n_queries and back.status == result.status


@pytest.mark.parametrize("spec", POLICIES)
@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_under_every_policy(
    attack: str, spec: str, oracle_of: Callable[..., Any], aux: np.ndarray
) -> None:
    oracle, _ = oracle_of("whitebox" if attack == "miface-exact" else "local", spec)
    before = oracle.n_queries
    if attack.startswith("miface") and parse_policy(spec).carries == "label":
        with pytest.raises(AttackError, match="label-only"):  # no scores to climb
            ATTACKS[attack](aux).run(oracle, LABEL, seed=0, budget=BUDGET)
        assert oracle.n_queries == before
        return
    result = ATTACKS[attack](aux).run(oracle, LABEL, seed=0, budget=BUDGET)
    check_attack(result, oracle, before)


@pytest.mark.parametrize("kind", ORACLES)
@pytest.mark.parametrize("attack", ["miface-exact", "miface-nes", "label-only"])
def test_attack_through_every_oracle(
    attack: str,
    kind: str,
    oracle_of: Callable[..., Any],
    aux: np.ndarray,
    plain_runs: Callable[[str], AttackResult],
) -> None:
    """Through any oracle whose inputs reach the model unchanged, a seeded attack gets
    what it gets through a LocalOracle, to the bit; the white-box one needs a gradient."""
    oracle, reached = oracle_of(kind, "full")
    before = oracle.n_queries
    if attack == "miface-exact" and not has_gradient(oracle):
        with pytest.raises(GradientUnavailable, match="white-box"):
            ATTACKS[attack](aux).run(oracle, LABEL, seed=0, budget=BUDGET)
        return
    result = ATTACKS[attack](aux).run(oracle, LABEL, seed=0, budget=BUDGET)
    check_attack(result, oracle, before)
    assert reached() <= BUDGET + before
    if kind in EXACT:
        want = plain_runs(attack)
        if kind == "cached":  # a repeated input is answered from memory, not paid for
            assert result.n_queries <= want.n_queries
        else:
            assert result.n_queries == want.n_queries
        if result.n_queries == want.n_queries:
            np.testing.assert_array_equal(result.reconstructions, want.reconstructions)


@pytest.mark.parametrize("attack", ["miface-nes", "label-only"])
def test_image_attacks_refuse_a_tabular_target(attack: str, world: World, aux: np.ndarray) -> None:
    oracle = LocalOracle(Predictor(world.tree, name="tree"))
    with pytest.raises(ConfigError, match="grey images"):
        ATTACKS[attack](aux).run(oracle, 0, seed=0, budget=BUDGET)
    assert oracle.n_queries == 0


TREE_POLICIES = ("full", "round:2", "top:1", "labels")


def _estimators(world: World) -> dict[str, Any]:
    confusion = training_confusion(world.tree, *world.fair.members())
    config = TreeAttackConfig(batch_size=64)  # a budget of 100 answers one batch
    return {
        "black-box-2014": BlackBox2014(confusion, config),
        "black-box-confidence": ConfidenceBlackBox(config),
        "label-only": LabelOnlyMatch(config),
        "white-box": WhiteBoxCounts(world.tree.to_document()),
    }


@pytest.mark.parametrize("budget", [None, 100])
@pytest.mark.parametrize("spec", TREE_POLICIES)
@pytest.mark.parametrize(
    "estimator", ["black-box-2014", "black-box-confidence", "label-only", "white-box"]
)
def test_tree_inversion_on_a_tree_target(
    estimator: str, spec: str, budget: int | None, world: World
) -> None:
    knowledge = Knowledge.of(world.fair, "non-members")
    base = LocalOracle(Predictor(world.tree, name="tree", policy=parse_policy(spec)))
    oracle: Oracle = base if budget is None else Budgeted(base, budget)
    attack = _estimators(world)[estimator]
    labels_only = isinstance(parse_policy(spec), LabelsOnly)
    if estimator == "black-box-confidence" and labels_only:
        with pytest.raises(AttackError, match="needs confidences"):
            attack.run(oracle, knowledge, seed=0)
        assert base.n_queries == 0  # a declared labels-only API costs no query
        return
    result = attack.run(oracle, knowledge, seed=0)
    assert result.guesses.shape == (knowledge.n,) and result.guesses.dtype == np.int64
    assert ((result.guesses >= 0) & (result.guesses < knowledge.m)).all()
    assert result.n_queries == base.n_queries
    if estimator == "white-box":  # reads the downloaded tree, asks nothing
        assert result.n_queries == 0 and result.status == "succeeded"
    elif budget is None:
        assert result.n_queries == knowledge.n * knowledge.m * knowledge.n_combos
        assert result.status == "succeeded" and result.n_answered == knowledge.n
    else:
        assert result.n_queries <= budget and result.status == "budget_exhausted"
        assert result.n_answered < knowledge.n


@pytest.mark.parametrize("spec", TREE_POLICIES)
def test_a_tree_oracle_answers_one_confidence_per_row(spec: str, world: World) -> None:
    oracle = LocalOracle(Predictor(world.tree, name="tree", policy=parse_policy(spec)))
    rows = Knowledge.of(world.fair, "non-members").candidates(0, 2)
    response = oracle.query(rows)
    n = rows.shape[0]
    assert oracle.n_queries == n and oracle.info.input_shape == rows.shape[1:]
    check_response(response, n, spec, oracle.info)
    if spec == "labels":
        assert oracle.info.carries == "label" and response.confidence is None
    else:
        assert oracle.info.carries == ("top-k" if spec.startswith("top") else "confidence")
        conf = response.confidence
        assert conf is not None and conf.shape == (n,) and conf.dtype == np.float64
        assert ((conf >= 0) & (conf <= 1)).all()
