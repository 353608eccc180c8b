"""Pure pieces of the audit: defence specs, utility measures, the results file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlinvert.audit.config import AuditConfig, resolve_defenses
from mlinvert.audit.results import Record, ResultsFile
from mlinvert.core import Response
from mlinvert.errors import ConfigError
from mlinvert.evaluation.utility import expected_calibration_error, served_utility


def test_default_matrix_has_a_rate_limit_below_the_budget() -> None:
    names = [d.name for d in resolve_defenses(AuditConfig(), budget=4000)]
    assert names == [
        "none",
        "round:3",
        "round:2",
        "round:1",
        "top:1",
        "labels",
        "rate:1000/hour",
        "detect:block",
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attacks": ("whitebox", "nope")}, "unknown attack"),
        ({"labels": 0}, "--labels"),
        ({"budget": 3}, "--budget"),
        ({"defenses": ("none", "none")}, "twice"),
        ({"targets": ()}, "no target"),
        ({"lanes": 0}, "--lanes"),
        ({"lanes": 1000}, "--lanes"),
        ({"lanes": 2.5}, "--lanes"),
    ],
)
def test_bad_config_is_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AuditConfig(**kwargs)


def test_ece_and_utility() -> None:
    assert expected_calibration_error(np.array([1.0, 1.0]), np.array([1, 1])) == 0.0
    assert expected_calibration_error(np.array([0.9, 0.9]), np.array([0, 0])) == pytest.approx(0.9)
    probs = np.array([[0.7, 0.2, 0.1, 0.0], [0.1, 0.5, 0.4, 0.0], [0.6, 0.3, 0.1, 0.0]])
    y = np.array([0, 2, 1])
    full = served_utility(Response(labels=probs.argmax(1), probs=probs), y, 4, k=2)
    assert full["accuracy"] == pytest.approx(1 / 3)
    assert full["topk_accuracy"] == 1.0
    top1 = probs * (probs == probs.max(1, keepdims=True))
    cut = served_utility(Response(labels=probs.argmax(1), probs=top1), y, 4, k=2)
    assert cut["topk_accuracy"] == pytest.approx(1 / 3)  # withheld scores never rank
    labels = served_utility(Response(labels=probs.argmax(1)), y, 4, k=2)
    assert labels["carries"] == "label" and labels["ece"] == pytest.approx(2 / 3)


def _record(label: int) -> Record:
    return {
        "attack": "blackbox",
        "defense": "none",
        "target_model": "softmax",
        "label": label,
        "status": "succeeded",
    }


def test_results_file_is_rewritten_after_every_record(tmp_path: Path) -> None:
    cfg = AuditConfig(out=tmp_path, seed=3)
    rf = ResultsFile(tmp_path, cfg)
    rf.save()
    for lab in range(3):
        rf.add(_record(lab))
        on_disk = json.loads((tmp_path / "results.json").read_text())
        assert len(on_disk["records"]) == lab + 1
    assert not (tmp_path / "results.json.tmp").exists()
    # a second run without --resume refuses to overwrite
    with pytest.raises(ConfigError, match="--resume"):
        ResultsFile(tmp_path, cfg)
    # resume keeps the records and knows what is done
    again = ResultsFile(tmp_path, AuditConfig(out=tmp_path, seed=3, resume=True))
    assert set(again.done) == {("blackbox", "none", "softmax", lab) for lab in range(3)}
    # resume with other settings is refused, naming the difference
    with pytest.raises(ConfigError, match="seed"):
        ResultsFile(tmp_path, AuditConfig(out=tmp_path, seed=4, resume=True))


def test_a_run_that_failed_before_producing_anything_does_not_block_the_corrected_one(
    tmp_path: Path,
) -> None:
    """A mistyped --data fails at once; the corrected command (other settings, no
    --resume) starts afresh instead of being told to --resume a run that holds nothing."""
    from mlinvert.audit.runner import run_audit
    from mlinvert.errors import DataError

    with pytest.raises(DataError, match="does not exist"):
        run_audit(AuditConfig(out=tmp_path, data="att:/no/such/folder"))
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"
    corrected = ResultsFile(tmp_path, AuditConfig(out=tmp_path, data="digits"))
    assert corrected.doc["config"]["data"] == "digits" and corrected.doc["status"] == "running"
    # a failed run that left something behind (a trained model) is still kept
    corrected.doc["status"] = "failed"
    corrected.save()
    (tmp_path / "models").mkdir()
    with pytest.raises(ConfigError, match="--resume"):
        ResultsFile(tmp_path, AuditConfig(out=tmp_path, data="olivetti"))


def test_a_results_file_that_is_not_an_object_is_a_data_error(tmp_path: Path) -> None:
    from mlinvert.errors import DataError

    (tmp_path / "results.json").write_text("[]\n")
    with pytest.raises(DataError, match="delete it or use another --out"):
        ResultsFile(tmp_path, AuditConfig(out=tmp_path))
