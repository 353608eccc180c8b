"""``mlinvert train`` end to end on the embedded digits, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mlinvert.cli.main import build_app, main
from mlinvert.data import load as load_data
from mlinvert.targets import load


def test_train_digits_writes_a_loadable_folder(tmp_path: Path) -> None:
    out = tmp_path / "digits-softmax"
    result = CliRunner().invoke(build_app(), ["train", "--out", str(out), "--seed", "3", "--quick"])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and str(out) in result.output
    card = json.loads((out / "model.json").read_text())
    assert card["dataset"] == "digits" and card["seed"] == 3 and card["kind"] == "softmax"
    assert card["test_accuracy"] > 0.85
    ds = load_data("digits", seed=3)
    assert card["split"]["test"] == ds.split.test.tolist()
    x, y = ds.test()
    assert np.mean(load(out).predict(x) == y) == pytest.approx(card["test_accuracy"])


def test_train_does_not_replace_a_model_already_in_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m"
    with pytest.raises(SystemExit) as first:
        main(["train", "--out", str(out), "--quick"])
    assert first.value.code == 0
    card = (out / "model.json").read_text()
    with pytest.raises(SystemExit) as again:
        main(["train", "--out", str(out), "--quick", "--model", "mlp"])
    assert again.value.code == 2
    assert "already holds a trained model" in " ".join(capsys.readouterr().err.split())
    assert (out / "model.json").read_text() == card


def test_help_explains_the_options() -> None:
    result = CliRunner().invoke(build_app(), ["train", "--help"])
    assert result.exit_code == 0
    for word in ("--data", "--model", "--out", "--seed", "att:PATH", "dae"):
        assert word in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "svm"], "unknown model kind"),
        (["--data", "att:/no/such/dir"], "does not exist"),
        (["--data", "nonsense"], "unknown data spec"),
        (["--model", "tree"], "surveys"),
        (["--seed", "-1"], "--seed"),
        (["--seed", "99999999999999999999"], "--seed must be between 0 and"),
        (["--out", "/proc/no-such-dir/m"], "cannot write into --out"),
        (["--out", __file__], "is a file"),
    ],
)
def test_bad_input_is_one_clear_line(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path / "m"), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err  # rich wraps lines
    assert len([line for line in err.splitlines() if line.strip()]) <= 3


def test_ctrl_c_while_training_says_so_and_writes_no_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlinvert.targets.job as job

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "train_target", interrupted)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path / "m"), "--quick"])
    assert exc.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "no model was written" in err and "Traceback" not in err
    assert not (tmp_path / "m" / "model.json").exists()


def test_ctrl_c_before_any_command_runs_is_exit_130_with_a_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlinvert.cli.main as cli_main

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_main, "build_app", interrupted)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 130 and "interrupted" in capsys.readouterr().err
