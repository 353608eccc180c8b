"""The tree behind the real FastAPI app: records, 422s naming the field, HTTP parity."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlinvert.attacks.tree_inversion import BlackBox2014, Knowledge, training_confusion
from mlinvert.data.surveys import SurveyDataset
from mlinvert.defenses import Predictor
from mlinvert.oracle import LocalOracle
from mlinvert.oracle.http import HttpOracle
from mlinvert.service import ServiceSettings, Store, create_app
from mlinvert.targets.tree import DecisionTreeTarget, train_tree

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


@pytest.fixture(scope="module")
def tree(steak: SurveyDataset) -> DecisionTreeTarget:
    return train_tree(steak, seed=0)[0]


@pytest.fixture
def served(tree: DecisionTreeTarget, tmp_path: Path) -> tuple[TestClient, str]:
    store = Store(tmp_path / "keys.db")
    key, _ = store.create_key("auditor")
    settings = ServiceSettings(db=store.path, max_batch=1024)
    app = create_app(settings, [Predictor(tree, name="steak", max_batch=1024)], store=store)
    return TestClient(app, base_url="http://testserver"), key


def _post(client: TestClient, key: str, records: list[dict[str, Any]]) -> Any:
    return client.post(
        "/v1/models/steak/predict",
        json={"records": records},
        headers={"Authorization": f"Bearer {key}"},
    )


def test_records_answered_with_label_and_wilson_confidence(
    served: tuple[TestClient, str], steak: SurveyDataset, tree: DecisionTreeTarget
) -> None:
    client, key = served
    records = steak.decode(steak.X[:3])
    r = _post(client, key, records)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["label"] for p in preds] == tree.predict(steak.X[:3]).tolist()
    assert np.allclose([p["confidence"] for p in preds], tree.confidence(steak.X[:3]))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"age": "150"}, "age"),
        ({"smoke": True}, "smoke"),
        ({"colour": "red"}, "colour"),
        ({"gender": None}, "gender"),
        ("drop", "income"),
    ],
)
def test_bad_records_get_422_naming_the_field(
    served: tuple[TestClient, str], steak: SurveyDataset, change: Any, field: str
) -> None:
    client, key = served
    record = steak.decode(steak.X[:1])[0]
    if change == "drop":
        del record[field]
    else:
        record.update(change)
    r = _post(client, key, [record])
    assert r.status_code == 422, r.text
    assert f"'{field}'" in r.json()["error"]["message"]


def test_black_box_over_http_matches_local(
    served: tuple[TestClient, str], steak: SurveyDataset, tree: DecisionTreeTarget
) -> None:
    client, key = served
    knowledge = Knowledge.of(steak, "non-members")
    attack = BlackBox2014(training_confusion(tree, *steak.members()))
    local = attack.run(LocalOracle(Predictor(tree, name="steak")), knowledge)
    with HttpOracle("http://testserver/v1/models/steak", key, client=client) as oracle:
        remote = attack.run(oracle, knowledge)
        assert oracle.n_queries == 2 * knowledge.n
    assert np.array_equal(remote.guesses, local.guesses)
    assert remote.n_queries == local.n_queries
