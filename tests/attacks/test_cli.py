"""``mlinvert attack miface`` end to end on a tiny model folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlinvert.attacks import AttackResult
from mlinvert.cli.main import build_app, main
from mlinvert.data import load
from mlinvert.targets import save, train_target


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ds = load("digits", seed=0)
    trained = train_target(ds, "softmax", seed=0, quick=True)
    folder = tmp_path_factory.mktemp("models") / "digits-softmax"
    save(trained.model, folder, card=trained.card)
    return folder


def test_cli_blackbox_writes_pngs_and_result(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = CliRunner().invoke(
        build_app(),
        [
            "attack",
            "miface",
            "--model",
            str(model_dir),
            "--label",
            "3",
            "--mode",
            "blackbox",
            "--gradient",
            "spsa",
            "--space",
            "dct:4",
            "--budget",
            "600",
            "--samples",
            "5",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    result = AttackResult.from_json((out / "result.json").read_text())
    assert result.labels.tolist() == [3] and result.n_queries <= 600
    assert result.config["gradient"]["name"] == "spsa"
    assert (out / "3.png").exists()
    doc = json.loads((out / "result.json").read_text())
    assert doc["per_label"][0]["n_queries"] == result.n_queries


def test_cli_whitebox_all_labels_and_errors(model_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    app = build_app()
    res = runner.invoke(
        app,
        [
            "attack",
            "miface",
            "--model",
            str(model_dir),
            "--all-labels",
            "--max-iter",
            "50",
            "--out",
            str(tmp_path / "wb"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "wb").glob("*.png"))) == 10
    bad = runner.invoke(
        app,
        [
            "attack",
            "miface",
            "--model",
            str(model_dir),
            "--label",
            "3",
            "--mode",
            "guess",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert bad.exit_code != 0


def test_cli_pca_prior_with_detail_and_radius(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--aux builds the eigenface prior; --detail/--radius reach it; a bad radius is one
    clear error line."""
    out = tmp_path / "pca"
    base = ["attack", "miface", "--model", str(model_dir), "--label", "5", "--out", str(out)]
    prior = ["--space", "pca", "--aux", "digits", "--pca-k", "10", "--detail", "3", "--augment"]
    res = CliRunner().invoke(build_app(), [*base, *prior, "--radius", "0.8", "--max-iter", "30"])
    assert res.exit_code == 0, res.output
    space = AttackResult.from_json((out / "result.json").read_text()).config["space"]
    assert space == {
        "name": "pca",
        "k": 10,
        "n_aux": 1797,
        "source": "digits",
        "detail": 3,
        "radius": 0.8,
        "augment": True,
    }
    with pytest.raises(SystemExit) as stop:
        main([*base, *prior, "--radius", "-1"])
    assert stop.value.code == 2
    assert "radius must be > 0" in capsys.readouterr().err
