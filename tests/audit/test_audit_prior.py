"""The audit's attacker searches in a learned prior given with --prior (and says so in
results.json and the report); a prior that holds a private photo is refused before any
attack."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlinvert.attacks.priors import PriorConfig, train_prior
from mlinvert.cli.main import main
from mlinvert.data import load

ARGS = ["--data", "digits", "--labels", "2", "--quick", "--in-process", "--defenses", "none"]


def _prior(folder: Path, images: np.ndarray) -> Path:
    config = PriorConfig(kind="pca", shape=(8, 8), latent=12, mirror=False)
    train_prior(images, config, source="digits held-out", n_people=10).save(folder)
    return folder


def test_the_audit_attacks_in_the_given_prior(tmp_path: Path) -> None:
    held_out = load("digits", seed=0).test()[0]  # not a private photo of the target
    prior = _prior(tmp_path / "prior", held_out)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        main(["audit", "--out", str(out), "--prior", str(prior), *ARGS])
    assert done.value.code == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["prior"]["kind"] == "pca" and doc["prior"]["path"] == str(prior)
    assert doc["prior"]["latent"] == 12 and doc["config"]["prior"] == str(prior)
    records = doc["records"]
    assert records and all(r["measured"] and r["image"] for r in records)
    assert "face prior: pca from digits held-out" in (out / "index.html").read_text()
    # without --prior the default eigenfaces are named
    plain = tmp_path / "plain"
    with pytest.raises(SystemExit):
        main(["audit", "--out", str(plain), *ARGS, "--attacks", "whitebox"])
    assert json.loads((plain / "results.json").read_text())["prior"]["path"] is None


def test_a_prior_holding_a_private_photo_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private = load("digits", seed=0).train()[0]
    prior = _prior(tmp_path / "leaky", private[:200])
    with pytest.raises(SystemExit) as done:
        main(["audit", "--out", str(tmp_path / "run"), "--prior", str(prior), *ARGS])
    assert done.value.code == 2
    assert "private training photo" in " ".join(capsys.readouterr().err.split())
