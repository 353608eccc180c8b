"""``mlinvert attack miface`` end to end on a tiny model folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mlinvert.attacks import AttackResult
from mlinvert.cli.main import build_app, main
from mlinvert.data import load
from mlinvert.errors import ConfigError
from mlinvert.targets import save, train_target


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ds = load("digits", seed=0)
    trained = train_target(ds, "softmax", seed=0, quick=True)
    folder = tmp_path_factory.mktemp("models") / "digits-softmax"
    save(trained.model, folder, card=trained.card)
    return folder


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI on ``argv``, expect exit code 2, return its stderr (no traceback)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


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


def test_cli_objective_reaches_the_attack_and_is_checked(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--objective prob against rounded scores (where BENCHMARKS finds it can beat the
    margin) is what the attack climbs; a wrong name or label-only mode is one line."""
    args = ["attack", "miface", "--model", str(model_dir), "--label", "3", "--mode", "blackbox"]
    args += ["--policy", "round:2", "--space", "dct:4", "--budget", "200", "--samples", "5"]
    for objective in ("prob", "margin"):
        out = tmp_path / objective
        res = CliRunner().invoke(build_app(), [*args, "--objective", objective, "--out", str(out)])
        assert res.exit_code == 0, res.output
        result = AttackResult.from_json((out / "result.json").read_text())
        assert result.config["objective"] == objective
        assert result.per_label[0]["score_floor"] == pytest.approx(0.005)
    bad = _one_line_error([*args, "--objective", "odds", "--out", str(tmp_path / "x")], capsys)
    assert "objective must be prob, log or margin" in bad
    label_only = [*args[:6], "--mode", "label-only", "--objective", "prob"]
    assert "label-only attack has no scores" in _one_line_error(
        [*label_only, "--out", str(tmp_path / "y")], capsys
    )


def test_cli_blind_sends_noisy_probes_and_is_checked(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--blind wraps the API in Blinded (query blinding against a detector): recorded in
    result.json; with white-box, or an amplitude outside (0, 1], it is one line."""
    args = ["attack", "miface", "--model", str(model_dir), "--label", "3", "--mode", "blackbox"]
    args += ["--space", "dct:4", "--budget", "200", "--samples", "5", "--gradient", "nes"]
    out = tmp_path / "blind"
    res = CliRunner().invoke(build_app(), [*args, "--blind", "0.05", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = AttackResult.from_json((out / "result.json").read_text())
    assert result.extra["blind"] == 0.05 and 0 < result.n_queries <= 200
    assert result.extra["blinded_up_to"] == 0.05  # one key: nothing to raise it with
    white = ["attack", "miface", "--model", str(model_dir), "--label", "3", "--blind", "0.05"]
    assert "drop --blind" in _one_line_error([*white, "--out", str(tmp_path / "w")], capsys)
    # raising the noise after a blocked key needs keys to move to
    escalate = [*args, "--blind", "0.05", "--escalate", "--out", str(tmp_path / "e")]
    assert "needs --target URL, --blind A and several keys" in _one_line_error(escalate, capsys)
    assert "amplitude must be" in _one_line_error(
        [*args, "--blind", "2", "--out", str(tmp_path / "b")], capsys
    )


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
    prior = ["--space", "pca", "--aux", "lfw", "--pca-k", "10", "--detail", "3", "--augment"]
    res = CliRunner().invoke(build_app(), [*base, *prior, "--radius", "0.8", "--max-iter", "30"])
    assert res.exit_code == 0, res.output
    space = AttackResult.from_json((out / "result.json").read_text()).config["space"]
    assert space == {
        "name": "pca",
        "k": 10,
        "n_aux": 100,
        "n_aux_dropped": 0,
        "source": "lfw",
        "detail": 3,
        "radius": 0.8,
        "augment": True,
    }
    assert "radius must be > 0" in _one_line_error([*base, *prior, "--radius", "-1"], capsys)


def test_cli_refuses_a_prior_that_holds_the_models_training_photos(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The model card says it trained on digits: --aux digits holds those very images."""
    argv = ["attack", "miface", "--model", str(model_dir), "--label", "5", "--aux", "digits"]
    err = _one_line_error([*argv, "--out", str(tmp_path / "x")], capsys)
    assert "coincides with private training image" in err
    assert not (tmp_path / "x").exists()


def test_cli_lanes_resume_every_label_and_match_one_by_one(model_dir: Path, tmp_path: Path) -> None:
    """--lanes 4 attacks the 10 digits 4 at a time; interrupted by a budget and re-run
    with a larger one, every label resumes from its own checkpoint and ends where an
    uninterrupted one-by-one run ends (same queries per label, same images)."""
    base = ["attack", "miface", "--model", str(model_dir), "--all-labels", "--mode", "blackbox"]
    base += ["--gradient", "nes", "--space", "dct:4", "--samples", "5"]
    runner = CliRunner()
    app = build_app()

    def run(out: str, *extra: str) -> AttackResult:
        res = runner.invoke(app, [*base, "--out", str(tmp_path / out), *extra])
        assert res.exit_code == 0, res.output
        return AttackResult.from_json((tmp_path / out / "result.json").read_text())

    ckpt = str(tmp_path / "ck" / "run.npz")
    part = run("part", "--lanes", "4", "--budget", "110", "--checkpoint", ckpt)
    assert [p["status"] for p in part.per_label] == ["budget_exhausted"] * 10
    assert len(list((tmp_path / "ck").glob("run.label*.npz"))) == 10
    resumed = run("resumed", "--lanes", "4", "--budget", "330", "--checkpoint", ckpt)
    alone = run("alone", "--lanes", "1", "--budget", "330")
    assert resumed.labels.tolist() == alone.labels.tolist() == list(range(10))
    assert [p["n_queries"] for p in resumed.per_label] == [p["n_queries"] for p in alone.per_label]
    assert all(110 < p["n_queries"] <= 330 for p in resumed.per_label)
    np.testing.assert_allclose(resumed.reconstructions, alone.reconstructions, atol=1e-5)
    assert len(list((tmp_path / "resumed").glob("*.png"))) == 10
    # the lanes read the checkpoints: another seed is another attack, refused
    other = runner.invoke(
        app,
        [*base, "--out", str(tmp_path / "o"), "--lanes", "4", "--seed", "1", "--checkpoint", ckpt],
    )
    assert isinstance(other.exception, ConfigError)
    assert "different attack configuration" in str(other.exception)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lanes", "4"], "white-box attack runs in process"),
        (["--lanes", "0", "--mode", "blackbox"], "between 1 (one person at a time) and 64"),
    ],
)
def test_cli_lanes_errors_are_one_line(
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    argv = ["attack", "miface", "--model", str(model_dir), "--all-labels", *extra]
    assert message in _one_line_error([*argv, "--out", str(tmp_path / "x")], capsys)


def test_cli_heldout_prior_per_person(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--aux heldout: each digit's prior is the card's held-out images of the OTHER nine
    digits (the benchmark's prior), so no image of the attacked class is in it, and the
    white-box reconstructions are still classified as their digit."""
    out = tmp_path / "held"
    args = ["attack", "miface", "--model", str(model_dir), "--all-labels", "--aux", "heldout"]
    args += ["--pca-k", "12", "--max-iter", "60", "--out", str(out)]
    res = CliRunner().invoke(build_app(), args)
    assert res.exit_code == 0, res.output
    result = AttackResult.from_json((out / "result.json").read_text())
    assert result.config["space"]["source"] == "held-out photos of other people"
    data = load("digits", seed=0)
    _, y_test = data.test()
    assert result.config["space"]["n_aux"] == int((y_test != 0).sum())  # first label: 0
    predicted = [p["predicted"] for p in result.per_label]
    assert sum(int(p) == lab for p, lab in zip(predicted, result.labels, strict=True)) >= 8
    api = ["--target", "http://127.0.0.1:9/v1/models/x", "--api-key", "k", "--mode", "blackbox"]
    for argv, message in [
        ([*args, "--space", "dct:4"], "use --space pca"),
        ([a for a in args if a not in ("--model", str(model_dir))] + api, "needs --model DIR"),
    ]:
        assert message in _one_line_error(argv, capsys)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seed", "-1"], "--seed must be between 0 and"),
        (["--seed", "99999999999999999999"], "--seed must be between 0 and"),
        (["--out", __file__], "is a file; pass a folder path"),
        (["--out", "/proc/no-such-dir/out"], "cannot write into --out"),
        (["--checkpoint", "/proc/no-such-dir/run.npz"], "cannot write into --checkpoint"),
        (["--checkpoint", "{tmp}/garbage.npz"], "cannot be read"),
        (["--checkpoint", "{tmp}/cut.npz"], "cannot be read"),
    ],
)
def test_cli_bad_seed_output_or_checkpoint_is_one_line_before_any_query(
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    """Paths are checked before the attack spends its queries (an unwritable --out was a
    traceback after the whole attack); a checkpoint that is not one says to delete it."""
    (tmp_path / "garbage.label3.npz").write_text("not a checkpoint\n")
    (tmp_path / "cut.label3.npz").write_bytes(b"PK\x03\x04 cut short")
    argv = ["attack", "miface", "--model", str(model_dir), "--label", "3", "--mode", "blackbox"]
    argv += ["--space", "dct:4", "--budget", "200", "--out", str(tmp_path / "out")]
    err = _one_line_error([*argv, *(e.format(tmp=tmp_path) for e in extra)], capsys)
    assert message in " ".join(err.split())  # rich wraps long lines


def test_cli_refuses_a_survey_model_with_the_command_that_audits_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = train_target(load("fair", seed=0), "tree", seed=0, quick=True)
    save(tree.model, tmp_path / "tree", card=tree.card)
    argv = ["attack", "miface", "--model", str(tmp_path / "tree"), "--label", "0"]
    err = _one_line_error([*argv, "--mode", "blackbox", "--out", str(tmp_path / "x")], capsys)
    assert "mlinvert audit --model DIR" in " ".join(err.split())
    assert not (tmp_path / "x").exists()


def test_cli_ctrl_c_says_whether_the_attack_can_resume(
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import mlinvert.attacks.runner as runner

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_lockstep", interrupted)
    argv = ["attack", "miface", "--model", str(model_dir), "--label", "3", "--mode", "blackbox"]
    argv += ["--out", str(tmp_path / "out")]
    for extra, words in [
        ([], "pass --checkpoint FILE to make an attack resumable"),
        (["--checkpoint", str(tmp_path / "run.npz")], "run the same command to resume"),
    ]:
        with pytest.raises(SystemExit) as stop:
            main([*argv, *extra])
        assert stop.value.code == 130
        err = capsys.readouterr().err
        assert "interrupted" in err and words in " ".join(err.split())
        assert "Traceback" not in err


def test_cli_does_not_replace_an_earlier_result_unless_resuming(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second attack into the same --out replaced the first one's result.json (say, by
    one that a rate limit stopped at 0 queries); resuming with --checkpoint may."""
    out = tmp_path / "out"
    argv = ["attack", "miface", "--model", str(model_dir), "--label", "3", "--mode", "blackbox"]
    argv += ["--space", "dct:4", "--budget", "200", "--samples", "5", "--out", str(out)]
    runner, app = CliRunner(), build_app()
    assert runner.invoke(app, argv).exit_code == 0
    first = (out / "result.json").read_text()
    err = _one_line_error([*argv, "--label", "4"], capsys)
    assert "already holds an attack's result.json" in " ".join(err.split())
    assert (out / "result.json").read_text() == first
    ckpt = ["--checkpoint", str(tmp_path / "run.npz")]
    assert runner.invoke(app, [*argv, "--label", "4", *ckpt]).exit_code == 0
    assert AttackResult.from_json((out / "result.json").read_text()).labels.tolist() == [4]


def test_cli_heldout_prior_names_the_card_when_its_data_set_is_missing(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The path in the error came from the model card, not from the command line."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(model_dir, moved)
    card = json.loads((moved / "model.json").read_text())
    (moved / "model.json").write_text(json.dumps({**card, "dataset": "att:/no/such/faces"}))
    argv = ["attack", "miface", "--model", str(moved), "--label", "3", "--aux", "heldout"]
    err = " ".join(_one_line_error([*argv, "--out", str(tmp_path / "x")], capsys).split())
    assert f"the model card in {moved} names the data set 'att:/no/such/faces'" in err


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("lowres:axb", "write pixel, lowres:WxH (e.g. lowres:23x28)"),
        ("dct:many", "write pixel, lowres:WxH (e.g. lowres:23x28)"),
        ("dct:0", "DCT needs k >= 1"),
        ("teleport", "unknown search space 'teleport'"),
    ],
)
def test_cli_bad_space_spec_says_how_to_write_one(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], space: str, message: str
) -> None:
    argv = ["attack", "miface", "--model", str(model_dir), "--label", "3", "--space", space]
    err = _one_line_error([*argv, "--out", str(tmp_path / "x")], capsys)
    assert message in " ".join(err.split())


def test_cli_says_why_a_label_got_no_query(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--budget 300 is smaller than the label-only attack's first batch: the result said
    'budget_exhausted, 0 queries' and nothing about the batch the budget refused."""
    argv = ["attack", "miface", "--model", str(model_dir), "--label", "3", "--mode"]
    argv += ["label-only", "--budget", "300", "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "budget_exhausted: query budget of 300 reached (0 spent, a batch of" in err
    assert "raise --budget" in err
