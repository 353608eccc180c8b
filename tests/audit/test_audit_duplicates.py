"""An audit of a face folder as real collections come, with copies of photos (the same
file filed twice, and one photo under two people's names): it completes and attacks
every person, its copies stay on one side of the split, and no attack is refused for
an auxiliary photo that coincides with a private one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mlinvert.audit.config import AuditConfig
from mlinvert.audit.runner import run_audit
from mlinvert.data import load
from mlinvert.data.base import ImageDataset, Split
from mlinvert.targets.io import read_card

ATT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "att_faces"
PEOPLE = 3


def _collection(root: Path) -> Path:
    """Three AT&T people, their photos 1-3 filed a second time ('1 copy.pgm'), and one
    photo of s1 also filed under s2."""
    if not (ATT / "s1" / "1.pgm").is_file():
        pytest.skip("../shared/data/att_faces not present")
    for p in range(1, PEOPLE + 1):
        person = root / f"s{p}"
        person.mkdir(parents=True)
        for k in range(1, 11):
            shutil.copy(ATT / f"s{p}" / f"{k}.pgm", person / f"{k}.pgm")
        for k in (1, 2, 3):
            shutil.copy(ATT / f"s{p}" / f"{k}.pgm", person / f"{k} copy.pgm")
    shutil.copy(ATT / "s1" / "5.pgm", root / "s2" / "from s1.pgm")
    return root


def test_an_audit_of_a_folder_with_copied_photos_attacks_every_person(tmp_path: Path) -> None:
    data = f"folder:{_collection(tmp_path / 'faces')}?size=56,46"
    out = tmp_path / "audit"
    run_audit(
        AuditConfig(
            data=data,
            out=out,
            targets=("softmax",),
            attacks=("whitebox", "blackbox"),
            defenses=("none",),
            budget=200,
            quick=True,
            in_process=True,
            seed=0,
        )
    )
    doc = json.loads((out / "results.json").read_text())
    assert doc["status"] == "complete"
    records = {(r["attack"], r["label"]): r for r in doc["records"]}
    assert set(records) == {(a, p) for a in ("whitebox", "blackbox") for p in range(PEOPLE)}
    for key, r in records.items():
        # attacked: ran to its end ('failed' without an error: no image the model takes
        # for the person), nothing refused
        assert r["error"] is None and r["n_queries"] > 0, (key, r["status"], r["error"])
        assert r["measured"], key  # and judged
    # the model's split (its card) kept each photo's copies on one side
    card = read_card(Path(doc["targets"]["softmax"]["model_dir"]))
    split = Split.from_dict(card["split"])
    ds = load(card["dataset"])
    assert isinstance(ds, ImageDataset)
    assert card["dataset"] == f"{data}&fit=crop"
    assert "10 copies of another photo kept on its side" in split.rule
    train = set(split.train.tolist())
    assert len([g for g in ds.meta["copies"] if len(g["people"]) == 1]) == 3 * PEOPLE
    same = ds.labels[:, None] == ds.labels[None, :]
    for i, j in zip(*np.nonzero(np.triu(same, 1)), strict=True):
        if np.array_equal(ds.images[i], ds.images[j]):
            assert (int(i) in train) == (int(j) in train), (i, j)
