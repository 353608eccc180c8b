"""DP-SGD for the face targets: the accountant, the noise search, per-example clipping,
training on digits, the model card and ``mlinvert train --dp-epsilon``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mpmath
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from typer.testing import CliRunner

from mlinvert.cli.main import build_app, main
from mlinvert.data.base import ImageDataset
from mlinvert.errors import ConfigError
from mlinvert.targets import dp_sgd as dp_sgd_module
from mlinvert.targets import load, save
from mlinvert.targets._torch import seeded
from mlinvert.targets.dp import DPConfig, default_delta, epsilon_spent, noise_for
from mlinvert.targets.dp_sgd import clipped_gradient_sum, dp_sgd
from mlinvert.targets.training import dp_config, train_target

from .conftest import Trained


def _rdp(q: float, sigma: float, steps: int, orders: list[float]) -> np.ndarray:
    from opacus.accountants.analysis.rdp import compute_rdp

    return np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders))


def test_rdp_matches_published_values() -> None:
    # google/differential-privacy dp_accounting, rdp_privacy_accountant_test.py
    # (test_compute_rdp_poisson_sampled_gaussian): q 0.01, sigma 2.5, 50 steps
    rdp = _rdp(0.01, 2.5, 50, [5.0, 50.0, 100.0, 1.5, 2.5])
    np.testing.assert_allclose(rdp[:3], [2.18075656e-03, 2.38460375e-02, 1.67416308e02], rtol=1e-4)
    # at fractional orders dp_accounting publishes a slightly looser upper bound
    # (6.7058e-4, 1.08549e-3); Opacus gives the exact value (high-precision integral)
    np.testing.assert_allclose(rdp[3:], [6.5007090e-04, 1.0854181e-03], rtol=1e-6)
    assert rdp[3] <= 6.70579741e-04 and rdp[4] <= 1.08548710e-03


@pytest.mark.parametrize(
    ("q", "sigma", "order"), [(0.1, 1.0, 2.0), (0.05, 2.0, 7.5), (0.3, 3.0, 3.3), (0.01, 0.8, 1.2)]
)
def test_rdp_matches_the_definition_by_numerical_integration(
    q: float, sigma: float, order: float
) -> None:
    # A_alpha = E_{z ~ N(0, sigma^2)} [((1 - q) + q exp((2z - 1) / (2 sigma^2)))^alpha],
    # RDP = log(A_alpha) / (alpha - 1) (Mironov, Talwar, Zhang 2019, Section 3.3)
    mpmath.mp.dps = 30

    def integrand(z: Any) -> Any:
        ratio = (1 - q) + q * mpmath.exp((2 * z - 1) / (2 * sigma**2))
        return mpmath.npdf(z, 0, sigma) * ratio**order

    a = mpmath.quad(integrand, [-mpmath.inf, 0, mpmath.inf])
    want = float(mpmath.log(a)) / (order - 1)
    assert _rdp(q, sigma, 1, [order])[0] == pytest.approx(want, rel=1e-6)


def test_epsilon_matches_published_values() -> None:
    # Opacus' reference run (accountants_test.py): sigma 1.5, q 0.04, 90 epochs
    assert epsilon_spent(1.5, 0.04, 2250, 1e-5) == pytest.approx(7.32911117, abs=1e-4)
    # one full-batch Gaussian step with sigma 4.530877 is exactly (1, 1e-6)-DP (Balle and
    # Wang 2018); the RDP conversion may only be looser, and not by much
    assert 1.0 <= epsilon_spent(4.530877117, 1.0, 1, 1e-6) < 1.1
    # more steps, more noise, more sampling all move epsilon the right way
    assert epsilon_spent(1.0, 0.01, 2000, 1e-5) > epsilon_spent(1.0, 0.01, 1000, 1e-5)
    assert epsilon_spent(2.0, 0.01, 1000, 1e-5) < epsilon_spent(1.0, 0.01, 1000, 1e-5)
    assert epsilon_spent(1.0, 0.02, 1000, 1e-5) > epsilon_spent(1.0, 0.01, 1000, 1e-5)


@pytest.mark.parametrize(
    ("epsilon", "q", "steps"), [(8.0, 0.25, 120), (1.0, 0.25, 120), (0.5, 0.01, 3000)]
)
def test_noise_search_hits_the_target_epsilon(epsilon: float, q: float, steps: int) -> None:
    sigma = noise_for(epsilon, 1e-5, q, steps)
    spent = epsilon_spent(sigma, q, steps, 1e-5)
    assert epsilon - 0.011 <= spent <= epsilon
    assert epsilon_spent(sigma * 0.97, q, steps, 1e-5) > spent  # not needlessly noisy


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_unreachable_epsilon_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="raise epsilon"):
        noise_for(1e-9, 1e-12, 1.0, 10_000)


def test_default_delta_is_far_below_one_over_n() -> None:
    assert default_delta(280) == 1e-5
    assert default_delta(10**6) == pytest.approx(1e-6**1.1)
    assert all(default_delta(n) < 1 / n for n in (10, 280, 10**5, 10**7, 10**9))


def _mlp(d: int = 12, hidden: int = 7, k: int = 3) -> nn.Module:
    with seeded(0):
        return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, k))


def _norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.pow(2).sum()) for t in tensors))


def _batch(n: int = 9, d: int = 12, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, d // 3, generator=g), torch.randint(0, k, (n,), generator=g)


def _assert_clipped_exactly(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """``clipped_gradient_sum`` equals clipping autograd's gradients one example at a
    time; example 0's gradient is far above the clip norm."""
    clip = 0.5
    sums, norms = clipped_gradient_sum(net, x, y, clip)
    params = list(net.parameters())
    want = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]), params)
        norm = _norm(list(grads))
        assert float(norms[i]) == pytest.approx(norm, rel=1e-4)
        for w, g in zip(want, grads, strict=True):
            w += g * min(1.0, clip / norm)
    assert float(norms[0]) > 10 * clip
    for got, w in zip(sums, want, strict=True):
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-6)


def test_clipped_sum_equals_per_example_clipping_by_autograd() -> None:
    net, (x, y) = _mlp(), _batch()
    x[0] *= 1e3  # one example with a huge gradient
    _assert_clipped_exactly(net, x, y)


def test_one_example_changes_the_clipped_sum_by_at_most_clip() -> None:
    net, (x, y) = _mlp(), _batch()
    outlier = x[:1] * 1e4
    clip = 0.3
    without, _ = clipped_gradient_sum(net, x, y, clip)
    with_it, _ = clipped_gradient_sum(net, torch.cat([x, outlier]), torch.cat([y, y[:1]]), clip)
    change = _norm([a - b for a, b in zip(with_it, without, strict=True)])
    assert 0.9 * clip < change <= clip * (1 + 1e-5)


def test_a_dp_step_moves_the_weights_by_at_most_lr_clip_plus_noise() -> None:
    x, y = _batch(n=6)
    x = x * 1e4  # every gradient huge: plain SGD jumps far
    lr, clip = 0.1, 1.0
    plain = _mlp()
    F.cross_entropy(plain(x), y).backward()
    plain_move = lr * _norm([p.grad for p in plain.parameters() if p.grad is not None])
    assert plain_move > 100 * lr * clip
    start = [p.detach().clone() for p in _mlp().parameters()]
    dims = sum(p.numel() for p in start)
    for sigma in (0.0, 0.5):
        net = _mlp()
        with seeded(3):
            dp_sgd(
                net,
                x,
                y,
                noise_multiplier=sigma,
                clip=clip,
                sample_rate=1.0,
                steps=1,
                lr=lr,
                momentum=0.0,
            )
        move = _norm([p.detach() - s for p, s in zip(net.parameters(), start, strict=True)])
        # the clipped mean moves at most lr * clip; the noise adds lr * sigma * clip / 6
        # per coordinate, whose norm stays below (sqrt(dims) + 4) of that
        assert move <= lr * clip * (1 + sigma * (math.sqrt(dims) + 4) / 6) + 1e-6
        if sigma == 0.0:  # exactly the clipped mean, not skipped
            sums, _ = clipped_gradient_sum(_mlp(), x, y, clip)
            assert move == pytest.approx(lr * _norm(sums) / 6, rel=1e-4)
            assert move > 0.01 * lr * clip


def test_a_linear_layer_used_twice_is_refused() -> None:
    shared = nn.Linear(2, 2)
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(ConfigError, match="used once"):
        clipped_gradient_sum(twice, torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), 1.0)


def _conv(batchnorm: bool = False) -> nn.Module:
    with seeded(0):
        layers: list[nn.Module] = [nn.Conv2d(1, 3, 3, padding=1)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(3))
        return nn.Sequential(*layers, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 4, 3))


def test_conv_nets_are_clipped_per_example_exactly() -> None:
    # more examples than one chunk, so the chunked path is exercised too
    net, (x, y) = _conv(), _batch(n=dp_sgd_module._CHUNK + 5)
    x = x[:, None]  # (n, 1, 3, 4) images
    x[0] *= 1e3  # a huge gradient: scaled up and labelled as its least likely class
    y[0] = net(x[:1]).argmin()
    _assert_clipped_exactly(net, x, y)


def test_the_per_example_path_agrees_with_the_ghost_norm() -> None:
    net, (x, y) = _mlp(), _batch()
    ghost, ghost_norms = clipped_gradient_sum(net, x, y, 0.3)
    explicit, norms = dp_sgd_module._per_example_clipped_sum(net, x, y, 0.3)
    torch.testing.assert_close(norms, ghost_norms, rtol=1e-4, atol=1e-6)
    for a, b in zip(explicit, ghost, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_batch_normalisation_is_refused() -> None:
    x = torch.zeros(2, 1, 3, 4)
    with pytest.raises(ConfigError, match="batch normalisation"):
        clipped_gradient_sum(_conv(batchnorm=True), x, torch.zeros(2, dtype=torch.long), 1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": math.inf}, "epsilon"),
        ({"epsilon": math.nan}, "epsilon"),
        ({"epsilon": 1.0, "delta": 1.0}, "delta"),
        ({"epsilon": 1.0, "clip": -1.0}, "clip"),
        ({"epsilon": 1.0, "batch_size": 0}, "batch_size"),
        ({"epsilon": 1.0, "momentum": 1.0}, "momentum"),
    ],
)
def test_dp_config_is_validated(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DPConfig(**kwargs)  # type: ignore[arg-type]


def _test_accuracy(
    digits: ImageDataset, epsilon: float, kind: str = "softmax"
) -> tuple[float, dict[str, Any]]:
    trained = train_target(
        digits, kind, seed=0, quick=True, dp=dp_config(kind, epsilon, quick=True)
    )
    return float(trained.card["test_accuracy"]), trained.card


def test_dp_softmax_learns_at_a_loose_epsilon_and_less_at_a_tight_one(digits: ImageDataset) -> None:
    loose, card = _test_accuracy(digits, 8.0)
    tight, _ = _test_accuracy(digits, 0.1)
    assert loose > 0.85
    assert tight < loose - 0.2
    assert card["privacy"]["epsilon"] <= 8.0


def test_dp_mlp_learns_on_digits(digits: ImageDataset) -> None:
    acc, card = _test_accuracy(digits, 8.0, "mlp")
    assert acc > 0.6
    assert card["privacy"]["steps"] == round(15 / card["privacy"]["sample_rate"])


def test_card_records_the_privacy_spent_and_survives_a_round_trip(
    digits: ImageDataset, tmp_path: Path
) -> None:
    trained = train_target(
        digits, "softmax", seed=2, quick=True, dp=dp_config("softmax", 2.0, delta=1e-6, quick=True)
    )
    privacy = trained.card["privacy"]
    assert set(privacy) >= {
        "epsilon",
        "delta",
        "noise_multiplier",
        "clip",
        "sample_rate",
        "steps",
        "accountant",
    }
    n = trained.card["n_train"]
    assert 2.0 - 0.011 <= privacy["epsilon"] <= 2.0 and privacy["delta"] == 1e-6
    assert privacy["sample_rate"] == pytest.approx(70 / n) and privacy["sampling"] == "poisson"
    assert privacy["noise_multiplier"] > 0.5 and "opacus" in privacy["accountant"]
    assert trained.card["config"]["dp"]["epsilon"] == 2.0
    folder = save(trained.model, tmp_path / "m", card=trained.card)
    again = load(folder)
    assert again.privacy_ == trained.model.privacy_
    assert again.config == trained.model.config
    x, _ = digits.test()
    np.testing.assert_array_equal(again.predict_proba(x), trained.model.predict_proba(x))
    on_disk = json.loads((folder / "model.json").read_text())
    assert on_disk["privacy"]["epsilon"] == privacy["epsilon"]


def test_dp_training_is_seeded(digits: ImageDataset) -> None:
    dp = dp_config("softmax", 4.0, quick=True)
    a = train_target(digits, "softmax", seed=5, quick=True, dp=dp).model
    b = train_target(digits, "softmax", seed=5, quick=True, dp=dp).model
    c = train_target(digits, "softmax", seed=6, quick=True, dp=dp).model
    x, _ = digits.test()
    np.testing.assert_array_equal(a.predict_proba(x), b.predict_proba(x))
    assert not np.array_equal(a.predict_proba(x), c.predict_proba(x))


def test_training_without_dp_writes_no_privacy_fields(trained: Trained) -> None:
    card = trained("softmax").card
    assert "privacy" not in card and "dp" not in card["config"]
    _, params = trained("softmax").model.get_state()
    assert "privacy" not in params and "dp" not in params["config"]


def test_dp_cnn_learns_on_digits_and_reloads(digits: ImageDataset, tmp_path: Path) -> None:
    trained = train_target(digits, "cnn", seed=0, quick=True, dp=dp_config("cnn", 8.0))
    card = trained.card
    assert card["test_accuracy"] > 0.6
    assert card["privacy"]["epsilon"] <= 8.0
    assert card["config"]["dp"]["epsilon"] == 8.0
    assert list(card["config"]["channels"]) == [8, 16]  # the small DP network (DP_CNN)
    save(trained.model, tmp_path / "cnn", card=card)
    x, _ = digits.test()
    again = load(tmp_path / "cnn")
    np.testing.assert_allclose(again.predict_proba(x[:50]), trained.model.predict_proba(x[:50]))


def test_dp_is_refused_for_kinds_it_cannot_train(digits: ImageDataset) -> None:
    # the dae trains by DP-SGD in stages since session 9 (tests/targets/test_dp_dae.py)
    with pytest.raises(ConfigError, match="softmax, mlp, cnn, dae, not 'evaluation'"):
        train_target(digits, "evaluation", seed=0, quick=True, dp=DPConfig(epsilon=1.0))
    with pytest.raises(ConfigError, match="softmax, mlp, cnn, dae, not 'evaluation'"):
        dp_config("evaluation", 1.0)
    assert dp_config("dae", 1.0).stage("decoder").epochs > 0
    # the judge's batch normalisation has no per-example gradient
    from mlinvert.targets.torch_models import EvaluationConfig, EvaluationNet

    judge = EvaluationNet(EvaluationConfig(channels=(2,), epochs=1, dp=DPConfig(epsilon=8.0)))
    x, y = digits.train()
    with pytest.raises(ConfigError, match="batch normalisation"):
        judge.fit(x[:20], y[:20] % 2)


def test_cli_trains_with_dp(tmp_path: Path) -> None:
    out = tmp_path / "dp"
    args = ["train", "--out", str(out), "--quick", "--dp-epsilon", "3", "--dp-delta", "1e-6"]
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 0, result.output
    text = result.output
    assert "DP-SGD: epsilon" in text and "noise multiplier" in text
    card = json.loads((out / "model.json").read_text())
    assert card["privacy"]["epsilon"] <= 3 and card["privacy"]["delta"] == 1e-6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dp-epsilon", "0"], "epsilon"),
        (["--dp-epsilon", "-2"], "epsilon"),
        (["--dp-epsilon", "inf"], "epsilon"),
        (["--dp-delta", "1e-6"], "--dp-delta needs --dp-epsilon"),
        (["--dp-epsilon", "1", "--dp-delta", "2"], "delta"),
        (["--dp-epsilon", "1", "--dp-delta", "0.01"], "1/n"),
        (["--dp-epsilon", "1", "--model", "evaluation"], "softmax, mlp, cnn, dae"),
    ],
)
def test_cli_bad_dp_input_is_one_clear_line(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path / "m"), "--quick", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) <= 3
