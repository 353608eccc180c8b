"""``mlinvert export``: the white-box document of a saved tree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mlinvert.cli.main import build_app, main
from mlinvert.data.surveys import SurveyDataset
from mlinvert.targets.tree import DecisionTreeTarget, train_tree


def test_export_writes_document_with_counts(steak: SurveyDataset, tmp_path: Path) -> None:
    io = pytest.importorskip("mlinvert.targets.io")
    model, card = train_tree(steak, seed=0, quick=True)
    io.save(model, tmp_path / "tree", card=card)
    out = tmp_path / "doc.json"
    result = CliRunner().invoke(
        build_app(), ["export", "--model", str(tmp_path / "tree"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert len(doc["nodes"]) == model.n_nodes_
    assert sum(doc["nodes"][0]["counts"]) == steak.split.train.size
    again = DecisionTreeTarget.from_document(doc)
    assert np.array_equal(again.predict_proba(steak.X), model.predict_proba(steak.X))


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("folder", "is a folder"),
        ("/proc/no-such-dir/doc.json", "cannot write"),
        ("tree/model.json", "would overwrite the model folder's own model.json"),
    ],
)
def test_export_to_a_path_it_cannot_write_is_one_clear_line(
    out: str,
    message: str,
    steak: SurveyDataset,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mlinvert.targets import io

    model, card = train_tree(steak, seed=0, quick=True)
    io.save(model, tmp_path / "tree", card=card)
    (tmp_path / "folder").mkdir()
    card_text = (tmp_path / "tree" / "model.json").read_text()
    target = tmp_path / out if not out.startswith("/") else Path(out)
    with pytest.raises(SystemExit) as stop:
        main(["export", "--model", str(tmp_path / "tree"), "--out", str(target)])
    assert stop.value.code == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.glob("**/*.tmp"))  # no temporary file left behind
    assert (tmp_path / "tree" / "model.json").read_text() == card_text
