"""DP-SGD targets in the audit: ``KIND@dp:EPS`` trains a private model that is audited
beside the plain one, and the report compares the two."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mlinvert.audit.config import AuditConfig, parse_target
from mlinvert.audit.runner import run_audit
from mlinvert.errors import ConfigError
from mlinvert.targets.io import read_card


def test_target_specs_parse_and_bad_ones_say_how_to_write_them() -> None:
    assert parse_target("softmax") == ("softmax", "softmax", None)
    assert parse_target(" MLP@dp:0.5 ") == ("mlp-dp0.5", "mlp", 0.5)
    assert parse_target("dae@dp:8") == ("dae-dp8", "dae", 8.0)
    for bad, words in [
        ("softmax@dp:x", "KIND@dp:EPSILON"),
        ("softmax@noise:8", "KIND@dp:EPSILON"),
        ("evaluation@dp:8", "available for softmax, mlp, cnn, dae, not 'evaluation'"),
        ("softmax@dp:0", "epsilon must be a finite number > 0"),
        ("softmax@dp:inf", "epsilon must be a finite number > 0"),
    ]:
        with pytest.raises(ConfigError, match=words):
            parse_target(bad)
    with pytest.raises(ConfigError, match="targets listed twice"):
        AuditConfig(targets=("softmax@dp:8", "softmax@dp:8.0"))


def test_a_dp_target_is_audited_beside_the_plain_one(tmp_path: Path) -> None:
    index = run_audit(
        AuditConfig(
            out=tmp_path,
            targets=("softmax", "softmax@dp:1"),
            labels=2,
            quick=True,
            in_process=True,
            defenses=("none",),
            attacks=("whitebox",),
            seed=1,
        )
    )
    doc = json.loads((tmp_path / "results.json").read_text())
    plain, private = doc["targets"]["softmax"], doc["targets"]["softmax-dp1"]
    assert plain["privacy"] is None
    assert 0.9 < private["privacy"]["epsilon"] <= 1.0
    assert private["privacy"]["noise_multiplier"] > 0
    # the card of the saved model says the same, and DP costs accuracy
    card = read_card(private["model_dir"])
    assert card["privacy"]["epsilon"] == private["privacy"]["epsilon"]
    assert private["test_accuracy"] < plain["test_accuracy"]
    targets = {r["target_model"] for r in doc["records"]}
    assert targets == {"softmax", "softmax-dp1"}
    html = index.read_text()
    eps = f"{private['privacy']['epsilon']:.2f}"
    assert f"trained by DP-SGD, &epsilon; = {eps}" in html
    assert re.search(r"softmax-dp1: DP-SGD at epsilon 0?\.99?\d* — with no output defence", html)
