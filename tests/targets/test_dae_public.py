"""Public pre-training for the DAE: both autoencoder layers and the decoder learn from
public faces at no privacy cost; only the stage that reads the private images is DP-SGD
and in the composition; nothing private reaches a public stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mlinvert.cli.main import build_app, main
from mlinvert.data.base import ImageDataset
from mlinvert.data.public import public_faces
from mlinvert.errors import ConfigError
from mlinvert.targets import _torch as torch_module
from mlinvert.targets import dae as dae_module
from mlinvert.targets import dp_sgd as dp_sgd_module
from mlinvert.targets import load, save
from mlinvert.targets.dae import DAEConfig, PublicPretrain, StackedDAE
from mlinvert.targets.dp import DPConfig, DPStage, epsilon_spent, noise_for
from mlinvert.targets.training import dp_config, public_pretrain, train_target


def _tiny(private: str, epsilon: float | None = 8.0, **kwargs: Any) -> DAEConfig:
    """A small DAE for 8x8 digits, pre-trained on LFW, one short private DP stage."""
    dp = None
    if epsilon is not None:
        stage = DPStage(name=private, epochs=3, batch_size=100, lr=1.0, clip=1.0)
        dp = DPConfig(epsilon=epsilon, batch_size=100, stages=(stage,))
    public = PublicPretrain(data="lfw", private=private, epochs=3)
    return DAEConfig(seed=0, hidden=32, code=16, finetune_epochs=3, dp=dp, public=public, **kwargs)


def _fit(digits: ImageDataset, config: DAEConfig) -> StackedDAE:
    x, y = digits.train()
    return StackedDAE(config).fit(x, y, class_names=digits.class_names)


def test_public_faces_are_the_lfw_face_crops_resized() -> None:
    from skimage.data import lfw_subset

    faces = public_faces("LFW", (8, 8))
    assert faces.shape == (100, 8, 8) and faces.dtype == np.float32
    assert faces.min() >= 0.0 and faces.max() <= 1.0
    assert not faces.flags.writeable
    # the first 100 images of lfw_subset (the faces), not the 100 non-faces after them
    full = public_faces("lfw", (25, 25))
    np.testing.assert_allclose(full, lfw_subset()[:100], atol=1e-6)


@pytest.mark.parametrize("private", ["head", "finetune"])
def test_only_the_private_stage_spends_and_is_composed(digits: ImageDataset, private: str) -> None:
    model = _fit(digits, _tiny(private, 4.0))
    spent = model.privacy_
    assert spent is not None
    # one DP-SGD stage: the public ones are not in the composition
    assert [s.name for s in spent.stages] == [private]
    n = digits.train()[0].shape[0]
    q, steps = 100 / n, round(3 * n / 100)
    assert spent.stages[0].steps == steps == spent.steps
    assert spent.epsilon == pytest.approx(
        epsilon_spent(spent.noise_multiplier, q, steps, spent.delta)
    )
    assert 4.0 - 0.011 <= spent.epsilon <= 4.0
    # the noise is what that one stage needs (less than the four-stage DAE needs)
    assert spent.noise_multiplier == noise_for(4.0, spent.delta, q, steps)
    # normalised with the public faces' statistics
    net = model.net_
    assert isinstance(net, dae_module._DAENet)
    faces = public_faces("lfw", digits.image_shape)
    assert float(net.standardise.mean) == pytest.approx(float(faces.mean()))
    assert float(net.standardise.std) == pytest.approx(float(faces.std()))


@pytest.mark.parametrize("private", ["head", "finetune"])
def test_public_stages_see_only_public_faces_and_private_ones_only_private_images(
    digits: ImageDataset, monkeypatch: pytest.MonkeyPatch, private: str
) -> None:
    x, _ = digits.train()
    faces = torch.from_numpy(np.array(public_faces("lfw", digits.image_shape)))
    adam: list[tuple[str, torch.Tensor]] = []
    refits: list[torch.Tensor] = []
    dp_calls: list[tuple[str, torch.Tensor, set[str]]] = []
    real_adam, real_refit, real_dp = (
        torch_module.adam_train,
        StackedDAE._refit_decoder,
        dp_sgd_module.dp_sgd,
    )

    def adam_spy(params: Any, loss: Any, X: torch.Tensor, y: torch.Tensor, **kw: Any) -> None:
        adam.append((kw["what"], X.clone()))
        real_adam(params, loss, X, y, **kw)

    def refit_spy(self: StackedDAE, net: Any, X: torch.Tensor, **kw: Any) -> None:
        refits.append(X.clone())
        real_refit(self, net, X, **kw)

    def dp_spy(net: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, **kw: Any) -> None:
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        real_dp(net, X, y, **kw)
        moved = {
            n.split(".")[0] for n, p in net.named_parameters() if not torch.equal(p, before[n])
        }
        dp_calls.append((kw["what"], X.clone(), moved))

    monkeypatch.setattr(dae_module, "adam_train", adam_spy)
    monkeypatch.setattr(StackedDAE, "_refit_decoder", refit_spy)
    monkeypatch.setattr(dp_sgd_module, "dp_sgd", dp_spy)
    model = _fit(digits, _tiny(private))
    # the public stages: Adam on the public faces (and mirror images) only
    public = torch.cat([faces, faces.flip(-1)])
    assert [w for w, _ in adam] == ["dae public (lfw) layer 1", "dae public (lfw) layer 2"]
    assert torch.equal(adam[0][1], public)
    assert adam[1][1].shape[0] == public.shape[0]  # the public faces' activations
    # every ridge refit of the decoder is on the public faces, never on private images
    assert refits and all(torch.equal(r, public) for r in refits)
    assert len(refits) == (1 if private == "head" else 2)
    # one DP-SGD stage, one row per private image
    assert [c[0] for c in dp_calls] == [f"dp-sgd {private}"]
    _, X_dp, moved = dp_calls[0]
    assert X_dp.shape[0] == x.shape[0]
    if private == "head":  # the private codes under the public encoder; the head alone moves
        assert moved == {"head"}
        net = model.net_
        assert isinstance(net, dae_module._DAENet)
        with torch.no_grad():
            codes = net.encode(torch.from_numpy(x))
        torch.testing.assert_close(X_dp, codes)
    else:
        assert moved == {"enc1", "enc2", "dec2", "head"}
        assert torch.equal(X_dp, torch.from_numpy(x))


def test_the_card_records_the_public_data_and_which_stages_were_public(
    digits: ImageDataset, tmp_path: Path
) -> None:
    trained = train_target(
        digits,
        "dae",
        seed=0,
        quick=True,
        dp=dp_config("dae", 8.0, quick=True, private="head"),
        public=public_pretrain("lfw", "head", quick=True),
    )
    card = trained.card
    stages = card["training_stages"]
    assert stages["public_data"]["name"] == "lfw"
    assert "lfw_subset" in stages["public_data"]["description"]
    assert stages["public_data"]["images"] == 100
    assert stages["public_data"]["resized_to"] == list(digits.image_shape)
    assert stages["public"] == ["layer1", "layer2", "decoder"]
    assert stages["private"] == ["head"] and stages["private_training"] == "dp-sgd"
    assert [s["name"] for s in card["privacy"]["stages"]] == ["head"]
    assert card["config"]["public"] == {"data": "lfw", "private": "head", "epochs": 10}
    # saved and reloaded, the model says the same
    folder = save(trained.model, tmp_path / "dae", card=card)
    again = load(folder)
    assert isinstance(again, StackedDAE)
    assert again.stages_ == trained.model.stages_ and again.config == trained.model.config
    on_disk = json.loads((folder / "model.json").read_text())
    assert on_disk["training_stages"]["public"] == ["layer1", "layer2", "decoder"]
    x, _ = digits.test()
    np.testing.assert_array_equal(again.predict_proba(x[:10]), trained.model.predict_proba(x[:10]))


def test_without_dp_public_pretraining_keeps_the_usual_private_finetuning(
    digits: ImageDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    refits: list[int] = []
    real_refit = StackedDAE._refit_decoder

    def refit_spy(self: StackedDAE, net: Any, X: torch.Tensor, **kw: Any) -> None:
        refits.append(int(X.shape[0]))
        real_refit(self, net, X, **kw)

    monkeypatch.setattr(StackedDAE, "_refit_decoder", refit_spy)
    model = _fit(digits, _tiny("finetune", None))
    assert model.privacy_ is None
    n = digits.train()[0].shape[0]
    assert refits == [200, n]  # public faces, then (not private) the training images
    assert model.stages_ is not None
    assert model.stages_["private"] == ["finetune", "decoder"]
    assert model.stages_["private_training"] == "adamw (not private)"
    head = _fit(digits, _tiny("head", None))
    assert head.stages_ is not None and head.stages_["private"] == ["head"]


def test_a_plain_dae_card_has_no_public_fields(digits: ImageDataset) -> None:
    trained = train_target(digits, "dae", seed=0, quick=True)
    assert "public" not in trained.card["config"]
    assert "training_stages" not in trained.card


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: PublicPretrain(data="imagenet"), r"unknown public face set 'imagenet'.*lfw"),
        (lambda: PublicPretrain(private="layer1"), r"private must be one of head, finetune"),
        (lambda: PublicPretrain(epochs=0), "epochs must be an int >= 1"),
        # the forms a card's JSON or the CLI give (untyped): DAEConfig reads or refuses them
        (lambda: DAEConfig(public=cast(Any, 3)), "public must be a PublicPretrain"),
        (lambda: DAEConfig(public=cast(Any, {"data": "lfw", "bogus": 1})), "malformed public"),
        (
            lambda: DAEConfig(public=cast(Any, "lfw"), dp=dp_config("dae", 8.0)),
            r"unknown DP stage.*after public pre-training \(private='head'\).*DP stages are head",
        ),
        (
            lambda: DAEConfig(
                public=PublicPretrain(private="finetune"), dp=dp_config("dae", 8.0, private="head")
            ),
            r"unknown DP stage\(s\) \['head'\]",
        ),
        (
            lambda: DAEConfig(
                public=cast(Any, "lfw"),
                dp=DPConfig(
                    epsilon=1.0, stages=(DPStage(name="head", epochs=0, batch_size=8, lr=0.1),)
                ),
            ),
            "'head' needs epochs >= 1",
        ),
        (lambda: dp_config("dae", 8.0, private="decoder"), "private stage is one of head"),
        (lambda: dp_config("softmax", 8.0, private="head"), "dae only"),
    ],
)
def test_bad_public_pretraining_settings_are_config_errors(make: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


def test_public_pretraining_is_refused_for_other_kinds(digits: ImageDataset) -> None:
    with pytest.raises(ConfigError, match="dae only"):
        train_target(digits, "softmax", seed=0, quick=True, public=PublicPretrain())


def test_cli_trains_a_dp_dae_after_public_pretraining(tmp_path: Path) -> None:
    out = tmp_path / "dae"
    args = ["train", "--out", str(out), "--quick", "--model", "dae", "--dp-epsilon", "8"]
    args += ["--public-pretrain", "lfw", "--private-stages", "finetune"]
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 0, result.output
    assert "public stages layer1, layer2, decoder" in result.output
    card = json.loads((out / "model.json").read_text())
    assert [s["name"] for s in card["privacy"]["stages"]] == ["finetune"]
    assert card["training_stages"]["private"] == ["finetune"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "softmax", "--public-pretrain", "lfw"], "dae only"),
        (["--model", "dae", "--private-stages", "head"], "needs --public-pretrain"),
        (["--model", "dae", "--public-pretrain", "cifar"], "unknown public face set"),
        (
            ["--model", "dae", "--public-pretrain", "lfw", "--private-stages", "all"],
            "head, finetune",
        ),
    ],
)
def test_bad_public_pretraining_flags_are_one_clear_line(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path / "m"), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
