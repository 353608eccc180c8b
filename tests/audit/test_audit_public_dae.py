"""Audit target specs for the DAE pre-trained on public faces (``dae@public:lfw``,
``dae@dp:8+public:lfw:finetune``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlinvert.audit.config import AuditConfig, parse_target, parse_target_spec
from mlinvert.audit.runner import run_audit
from mlinvert.errors import ConfigError
from mlinvert.targets.io import read_card


def test_public_dae_specs_parse_and_bad_ones_say_how_to_write_them() -> None:
    assert parse_target_spec("dae@public:lfw") == (
        "dae-public-lfw-head",
        "dae",
        None,
        ("lfw", "head"),
    )
    assert parse_target_spec(" DAE@dp:8+public:LFW:finetune ") == (
        "dae-dp8-public-lfw-finetune",
        "dae",
        8.0,
        ("lfw", "finetune"),
    )
    assert parse_target_spec("dae@dp:8") == ("dae-dp8", "dae", 8.0, None)
    assert parse_target("dae@dp:1+public:lfw") == ("dae-dp1-public-lfw-head", "dae", 1.0)
    for bad, words in [
        ("softmax@public:lfw", "dae only"),
        ("dae@public:cifar", "unknown public face set"),
        ("dae@public:lfw:decoder", "private must be one of head, finetune"),
        ("dae@dp:8+public:lfw+public:lfw", "KIND@dp:EPSILON"),
        ("dae@dp:8+noise:1", "KIND@dp:EPSILON"),
        ("dae@dp:0+public:lfw", "epsilon must be a finite number > 0"),
    ]:
        with pytest.raises(ConfigError, match=words):
            parse_target_spec(bad)
    AuditConfig(targets=("dae", "dae@dp:8", "dae@dp:8+public:lfw"))


def test_a_public_dp_dae_is_audited_and_its_card_names_the_public_stages(tmp_path: Path) -> None:
    run_audit(
        AuditConfig(
            out=tmp_path,
            targets=("dae@dp:8+public:lfw",),
            labels=2,
            quick=True,
            in_process=True,
            defenses=("none",),
            attacks=("whitebox",),
            seed=1,
        )
    )
    doc = json.loads((tmp_path / "results.json").read_text())
    target = doc["targets"]["dae-dp8-public-lfw-head"]
    assert [s["name"] for s in target["privacy"]["stages"]] == ["head"]
    card = read_card(target["model_dir"])
    assert card["training_stages"]["public"] == ["layer1", "layer2", "decoder"]
    assert card["training_stages"]["private"] == ["head"]
    assert {r["target_model"] for r in doc["records"]} == {"dae-dp8-public-lfw-head"}
