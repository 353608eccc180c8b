"""DP-SGD for the stacked denoising autoencoder: four private stages, one noise
multiplier, the epsilon composed over the stages, no closed-form (non-private) refit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mlinvert.cli.main import build_app
from mlinvert.data.base import ImageDataset
from mlinvert.errors import ConfigError
from mlinvert.targets import dp_sgd as dp_sgd_module
from mlinvert.targets import load, save
from mlinvert.targets.dae import DP_STAGES, DAEConfig, StackedDAE, _DAENet
from mlinvert.targets.dp import (
    PUBLIC_PIXEL_STATS,
    DPConfig,
    DPStage,
    epsilon_composed,
    epsilon_spent,
    noise_for,
    noise_for_schedule,
)
from mlinvert.targets.training import dp_config, train_target


def _epsilon_by_hand(sigma: float, schedule: list[tuple[float, int]], delta: float) -> float:
    """RDP of each stage from Opacus' analysis functions, added order by order, then one
    conversion: composition computed without the RDPAccountant."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from mlinvert.targets.dp import ORDERS

    orders = list(ORDERS)
    total = sum(
        np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=k, orders=orders))
        for q, k in schedule
    )
    eps, _ = get_privacy_spent(orders=orders, rdp=total, delta=delta)
    return float(eps)


def test_composed_epsilon_adds_the_stages_rdp() -> None:
    schedule = [(0.05, 200), (0.25, 40)]
    composed = epsilon_composed(1.3, schedule, 1e-5)
    assert composed == pytest.approx(_epsilon_by_hand(1.3, schedule, 1e-5), rel=1e-9)
    alone = [epsilon_spent(1.3, q, k, 1e-5) for q, k in schedule]
    assert composed > max(alone)
    # the conversion happens once, so the composition is below the sum of epsilons
    assert composed < sum(alone)
    # one sampling rate: the stages compose exactly like one run of their total steps
    assert epsilon_composed(1.3, [(0.1, 30), (0.1, 70)], 1e-5) == pytest.approx(
        epsilon_spent(1.3, 0.1, 100, 1e-5), rel=1e-9
    )
    assert epsilon_composed(1.3, [(0.1, 30), (0.5, 0)], 1e-5) == epsilon_spent(1.3, 0.1, 30, 1e-5)


def test_noise_search_over_stages_meets_the_composed_target() -> None:
    epsilon, schedule = 1.0, [(0.05, 200), (0.25, 40)]
    sigma = noise_for_schedule(epsilon, 1e-5, schedule)
    spent = epsilon_composed(sigma, schedule, 1e-5)
    assert epsilon - 0.011 <= spent <= epsilon
    assert epsilon_composed(sigma * 0.97, schedule, 1e-5) > epsilon  # not needlessly noisy
    # more noise than any one stage alone would need
    assert all(sigma > noise_for(epsilon, 1e-5, q, k) for q, k in schedule)
    # stages sharing a rate: the single-run search over the total steps
    assert noise_for_schedule(epsilon, 1e-5, [(0.25, 40), (0.25, 80)]) == noise_for(
        epsilon, 1e-5, 0.25, 120
    )


def test_a_schedule_without_steps_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least one stage"):
        noise_for_schedule(1.0, 1e-5, [(0.1, 0)])


def _tiny(
    epsilon: float = 8.0, *, epochs: tuple[int, int, int, int] = (2, 2, 6, 4), **kwargs: Any
) -> DAEConfig:
    """A small DAE for 8x8 digits, its four stages at short schedules."""
    stages = tuple(
        DPStage(name=name, epochs=e, batch_size=100, lr=lr, clip=clip)
        for name, e, lr, clip in zip(
            DP_STAGES, epochs, (1.0, 1.0, 0.5, 1.0), (0.1, 0.05, 1.0, 0.05), strict=True
        )
    )
    dp = DPConfig(epsilon=epsilon, batch_size=100, stages=stages)
    return DAEConfig(seed=0, hidden=32, code=16, dp=dp, **kwargs)


def _fit(digits: ImageDataset, config: DAEConfig) -> StackedDAE:
    x, y = digits.train()
    return StackedDAE(config).fit(x, y, class_names=digits.class_names)


def test_dp_dae_spends_the_composition_of_its_four_stages(digits: ImageDataset) -> None:
    model = _fit(digits, _tiny(4.0))
    spent = model.privacy_
    assert spent is not None
    n = digits.train()[0].shape[0]
    assert [s.name for s in spent.stages] == list(DP_STAGES)
    schedule = [(s.sample_rate, s.steps) for s in spent.stages]
    assert all(q == pytest.approx(100 / n) for q, _ in schedule)
    assert [k for _, k in schedule] == [round(e * n / 100) for e in (2, 2, 6, 4)]
    assert spent.steps == sum(k for _, k in schedule)
    # the reported epsilon is the composed one, at most the target, computed by hand
    assert 4.0 - 0.011 <= spent.epsilon <= 4.0
    sigma, delta = spent.noise_multiplier, spent.delta
    assert spent.epsilon == pytest.approx(_epsilon_by_hand(sigma, schedule, delta), rel=1e-9)
    for stage, (q, k) in zip(spent.stages, schedule, strict=True):
        alone = epsilon_spent(sigma, q, k, delta)
        assert stage.epsilon_alone == pytest.approx(alone)
        assert alone < spent.epsilon - 0.5
    # the noise is what the composition needs, more than one stage alone would need
    assert sigma == noise_for_schedule(4.0, delta, schedule)
    assert sigma > noise_for(4.0, delta, *schedule[2])
    # public normalisation, not the private set's pixel statistics
    net = model.net_
    assert isinstance(net, _DAENet)
    assert float(net.standardise.mean) == PUBLIC_PIXEL_STATS[0]
    assert float(net.standardise.std) == PUBLIC_PIXEL_STATS[1]


def test_a_skipped_stage_spends_nothing(digits: ImageDataset) -> None:
    spent = _fit(digits, _tiny(epochs=(2, 0, 6, 4))).privacy_
    assert spent is not None
    stages = {s.name: s for s in spent.stages}
    assert stages["layer2"].steps == 0 and stages["layer2"].epsilon_alone == 0.0
    ran = [(s.sample_rate, s.steps) for s in spent.stages if s.steps]
    assert len(ran) == 3
    assert spent.epsilon == pytest.approx(
        epsilon_composed(spent.noise_multiplier, ran, spent.delta), rel=1e-12
    )


def test_every_stage_is_dp_sgd_on_its_own_layers_and_the_ridge_refit_is_not_used(
    digits: ImageDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refit(*args: Any) -> None:
        raise AssertionError("the closed-form decoder refit is not private")

    monkeypatch.setattr(StackedDAE, "_refit_decoder", refit)
    calls: list[tuple[str, set[str], float, dict[str, torch.Tensor]]] = []
    real = dp_sgd_module.dp_sgd

    def spy(net: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, **kw: Any) -> None:
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        real(net, X, y, **kw)
        moved = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
        calls.append((kw["what"], moved, kw["noise_multiplier"], before))

    monkeypatch.setattr(dp_sgd_module, "dp_sgd", spy)
    model = _fit(digits, _tiny())
    assert model.privacy_ is not None
    assert [c[0] for c in calls] == [f"dp-sgd {name}" for name in DP_STAGES]
    moved = [{n.split(".")[0] for n in c[1]} for c in calls]
    assert moved == [
        {"enc1", "dec1"},
        {"enc2", "dec2"},
        {"enc1", "enc2", "dec2", "head"},
        {"dec1"},  # the pixel layer: by DP-SGD, in place of the ridge refit
    ]
    assert {c[2] for c in calls} == {model.privacy_.noise_multiplier}
    # the model's final pixel layer is the one the last DP-SGD stage produced
    net = model.net_
    assert isinstance(net, _DAENet)
    assert not torch.equal(net.dec1.weight, calls[3][3]["dec1.weight"])


def test_dp_dae_learns_on_digits_with_loose_privacy(digits: ImageDataset) -> None:
    trained = train_target(digits, "dae", seed=0, quick=True, dp=dp_config("dae", 8.0, quick=True))
    card = trained.card
    assert card["privacy"]["epsilon"] <= 8.0
    assert len(card["privacy"]["stages"]) == 4
    assert card["config"]["dp"]["stages"][0]["name"] == "layer1"
    # well above chance (0.1) at epsilon 8 on 1 257 digits
    assert card["test_accuracy"] > 0.25
    assert card["test_reconstruction_mse"] < 0.2


def test_dp_dae_card_and_folder_round_trip(digits: ImageDataset, tmp_path: Path) -> None:
    model = _fit(digits, _tiny(2.0))
    folder = save(model, tmp_path / "dae")
    again = load(folder)
    assert isinstance(again, StackedDAE)
    assert again.privacy_ == model.privacy_ and again.config == model.config
    assert again.config.dp is not None and again.config.dp.stages[3].name == "decoder"
    x, _ = digits.test()
    np.testing.assert_array_equal(again.predict_proba(x[:20]), model.predict_proba(x[:20]))
    np.testing.assert_array_equal(
        again.decode(again.encode(x[:5])), model.decode(model.encode(x[:5]))
    )
    on_disk = json.loads((folder / "model.json").read_text())
    assert [s["name"] for s in on_disk["params"]["privacy"]["stages"]] == list(DP_STAGES)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: DAEConfig(
                dp=DPConfig(
                    epsilon=1.0,
                    # a stage as a card's JSON gives it (a dict): DPConfig reads it
                    stages=cast(
                        Any, ({"name": "layer3", "epochs": 1, "batch_size": 8, "lr": 0.1},)
                    ),
                )
            ),
            r"unknown DP stage.*layer3.*layer1, layer2, finetune, decoder",
        ),
        (
            lambda: DAEConfig(
                dp=DPConfig(
                    epsilon=1.0,
                    stages=(DPStage(name="finetune", epochs=0, batch_size=8, lr=0.1),),
                )
            ),
            "'finetune' needs epochs >= 1",
        ),
        (
            lambda: DPConfig(
                epsilon=1.0,
                stages=(
                    DPStage(name="layer1", epochs=1, batch_size=8, lr=0.1),
                    DPStage(name="layer1", epochs=2, batch_size=8, lr=0.1),
                ),
            ),
            "named once each",
        ),
        (
            lambda: DPConfig(epsilon=1.0, stages=cast(Any, ({"name": "layer1"},))),
            "malformed DP stage",
        ),
        (lambda: DPStage(name="layer1", epochs=-1, batch_size=8, lr=0.1), "epochs must be"),
        (lambda: DPStage(name="", epochs=1, batch_size=8, lr=0.1), "needs a name"),
        (lambda: DPStage(name="decoder", epochs=1, batch_size=8, lr=0.1, clip=0.0), "clip"),
        (lambda: DPStage(name="decoder", epochs=1, batch_size=0, lr=0.1), "batch_size"),
        (lambda: DPStage(name="decoder", epochs=1, batch_size=8, lr=float("nan")), "lr"),
    ],
)
def test_bad_dp_dae_settings_are_config_errors(make: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


def test_stages_are_refused_for_a_model_trained_in_one_stage(digits: ImageDataset) -> None:
    dp = DPConfig(epsilon=8.0, stages=(DPStage(name="layer1", epochs=1, batch_size=70, lr=0.1),))
    with pytest.raises(ConfigError, match=r"per-stage DP schedules.*dae"):
        train_target(digits, "softmax", seed=0, quick=True, dp=dp)


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_an_unreachable_dp_dae_target_says_how_to_fix_it(digits: ImageDataset) -> None:
    x, y = digits.train()
    config = _tiny(1e-9)
    with pytest.raises(ConfigError, match="raise epsilon"):
        StackedDAE(config).fit(x[:50], y[:50])


def test_cli_trains_a_dp_dae(tmp_path: Path) -> None:
    out = tmp_path / "dae"
    args = ["train", "--out", str(out), "--quick", "--model", "dae", "--dp-epsilon", "8"]
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 0, result.output
    assert "composed over the stages" in result.output
    for name in DP_STAGES:
        assert f"  {name}: clip" in result.output
    card = json.loads((out / "model.json").read_text())
    assert card["privacy"]["epsilon"] <= 8
    assert max(s["epsilon_alone"] for s in card["privacy"]["stages"]) < card["privacy"]["epsilon"]
