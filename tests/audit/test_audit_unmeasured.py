"""A failed measurement never reads as a defence's success: an attack that raises under
one defence leaves that cell "not measured" in results.json and the report, the audit
exits 3, and --resume re-runs exactly the unmeasured runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mlinvert.cli.audit import EXIT_UNMEASURED
from mlinvert.cli.main import main
from mlinvert.errors import AttackError

ARGS = [
    "--data",
    "digits",
    "--labels",
    "2",
    "--quick",
    "--in-process",
    "--defenses",
    "none,round:2",
    "--attacks",
    "blackbox",
    "--budget",
    "300",
]


def test_a_failing_attack_is_not_measured_and_the_audit_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlinvert.audit.matrix as matrix

    real = matrix.build_attack

    def broken(attack: str, preset: Any, budget: int, space: Any, *, policy: str = "full") -> Any:
        if policy == "round:2":
            raise AttackError("the prior could not be built (a test's deliberate failure)")
        return real(attack, preset, budget, space, policy=policy)

    monkeypatch.setattr(matrix, "build_attack", broken)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        main(["audit", "--out", str(out), *ARGS])
    assert done.value.code == EXIT_UNMEASURED == 3
    said = capsys.readouterr()  # 2 targets x 2 people under round:2
    assert "4 attack run(s) could not be measured" in " ".join((said.out + said.err).split())

    doc = json.loads((out / "results.json").read_text())
    assert doc["status"] == "complete"
    by = {(r["target_model"], r["defense"], r["label"]): r for r in doc["records"]}
    for target in ("softmax", "mlp"):
        for lab in (0, 1):
            failed = by[(target, "round:2", lab)]
            assert failed["measured"] is False and failed["status"] == "error"
            assert "deliberate failure" in failed["error"]
            assert by[(target, "none", lab)]["measured"] is True
    html = " ".join((out / "index.html").read_text().split())
    assert 'lvl lvl-not-measured">not measured' in html
    assert "Not measured, so not shown to protect anything: &#39;round:2&#39;" in html
    assert "serve with &#39;round:2&#39;" not in html

    # fixed: --resume runs the two unmeasured runs again and nothing else
    monkeypatch.setattr(matrix, "build_attack", real)
    kept = [r for r in doc["records"] if r["defense"] == "none"]
    with pytest.raises(SystemExit) as again:
        main(["audit", "--out", str(out), "--resume", *ARGS])
    assert again.value.code == 0
    final = json.loads((out / "results.json").read_text())
    assert all(r["measured"] for r in final["records"]) and len(final["records"]) == 8
    assert [r for r in final["records"] if r["defense"] == "none"] == kept  # not re-run
    assert "Not measured, so not shown" not in (out / "index.html").read_text()


class _FakeRecogniser:
    """Stands in for dlib on digits: a fixed random projection as the descriptor."""

    def embed(self, images: Any) -> Any:
        import numpy as np

        x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
        w = np.random.default_rng(0).normal(size=(x.shape[1], 128))
        return x @ w, np.ones(len(x), dtype=bool)


def test_a_judge_that_fails_leaves_the_record_unmeasured_not_unrecovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlinvert.audit.faces as faces
    import mlinvert.evaluation.recogniser as recogniser
    from mlinvert.errors import DataError

    monkeypatch.setattr(faces, "is_faces", lambda dataset: True)  # judge digits as faces
    monkeypatch.setattr(recogniser, "shared_recogniser", _FakeRecogniser)
    real = recogniser.IndependentJudge.score

    def flaky(self: Any, images: Any, labels: Any) -> Any:
        if len(labels) == 1:  # the references (all people at once) pass; every record fails
            raise DataError("the recogniser crashed")
        return real(self, images, labels)

    monkeypatch.setattr(recogniser.IndependentJudge, "score", flaky)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        main(["audit", "--out", str(out), *ARGS, "--defenses", "none"])
    assert done.value.code == EXIT_UNMEASURED
    doc = json.loads((out / "results.json").read_text())
    assert doc["thresholds"]["judge"] == "independent"
    for r in doc["records"]:
        assert r["measured"] is False and r["recovered"] is False
        assert r["error"] == "the judge failed: the recogniser crashed"
        assert r["image"]  # the attack ran; only its measurement is missing
    html = " ".join((out / "index.html").read_text().split())
    assert "Not measured, so not shown to protect anything: &#39;none&#39;" in html
