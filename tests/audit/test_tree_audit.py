"""The survey (decision-tree) route of the audit on the embedded Fair survey: the
black-box estimators query the real HTTP service, one model name per output policy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mlinvert.audit.config import AuditConfig
from mlinvert.audit.runner import run_audit
from mlinvert.data.surveys import load_fair
from mlinvert.errors import ConfigError, ModelError
from mlinvert.evaluation.trees import attack_tree
from mlinvert.service.store import Store
from mlinvert.targets import io
from mlinvert.targets.tree import train_tree

POLICIES = ["full", "round:2", "labels"]


def _get(records: list[dict[str, Any]], **where: Any) -> dict[str, Any]:
    hits = [r for r in records if all(r[k] == v for k, v in where.items())]
    assert len(hits) == 1, (where, len(hits))
    return hits[0]


@pytest.fixture(scope="module")
def http_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("tree-audit")
    index = run_audit(AuditConfig(data="fair", out=out, seed=0, tree_depths=(1,)))
    return {"out": out, "index": index, "doc": json.loads((out / "results.json").read_text())}


def test_black_box_estimators_went_through_the_service(http_run: dict[str, Any]) -> None:
    doc, out = http_run["doc"], http_run["out"]
    assert doc["status"] == "complete"
    tree = doc["tree_audit"]
    assert tree["route"] == "http" and tree["policies"] == POLICIES
    service = tree["service"]
    assert service["models"] == {
        "tree-full": "full",
        "tree-round_2": "round:2",
        "tree-labels": "labels",
    }
    records = tree["records"]
    for policy in POLICIES:
        mine = [r for r in records if r["defense"] == policy]
        assert mine and {r["channel"] for r in mine} == {"HTTP API"}
    # the sweep's trees are attacked in process, the white-box reads the document
    assert {r["channel"] for r in records if r["defense"] == "depth:1"} == {
        "model document",
        "in-process API",
    }
    # one fresh account per estimator and population; the service counted every input
    per_model = service["per_model"]
    for policy, name in (("full", "tree-full"), ("round:2", "tree-round_2")):
        sent = sum(r["n_queries"] for r in records if r["defense"] == policy)
        assert per_model[name] == {
            "requests": per_model[name]["requests"],
            "inputs": sent,
            "refused": 0,
        }
    # under labels the confidence estimator is refused before it sends a single query
    labels = [r for r in records if r["defense"] == "labels"]
    assert {r["estimator"] for r in labels} == {"black-box-2014", "label-only"}
    assert per_model["tree-labels"]["inputs"] == sum(r["n_queries"] for r in labels)
    # (estimator, population, policy) accounts that sent something: not confidence x labels
    assert len(service["inputs_per_account"]) == 2 * 3 * len(POLICIES) - 2
    assert service["inputs"] == sum(service["inputs_per_account"].values())
    # the query log was copied out of the RAM disk and holds every request
    log = Store(out / service["query_log"])
    try:
        assert len(log.queries()) == service["requests"] > 0
    finally:
        log.close()


def test_results_have_the_paper_shape(http_run: dict[str, Any]) -> None:
    records = http_run["doc"]["tree_audit"]["records"]
    wb = _get(records, estimator="white-box", population="members", defense="none")
    wb_out = _get(records, estimator="white-box", population="non-members", defense="none")
    no = _get(records, estimator="always-no", population="members")
    rand = _get(records, estimator="random", population="members")
    assert wb["accuracy"] > no["accuracy"] + 0.1 and wb["accuracy"] > rand["accuracy"] + 0.2
    assert wb["precision"] > wb_out["precision"] + 0.2  # members leak more
    bb = _get(records, estimator="black-box-2014", population="members", defense="full")
    assert no["accuracy"] < bb["accuracy"] <= wb["accuracy"]
    assert bb["n_queries"] == 2 * bb["n"]  # every candidate of the binary sensitive answer
    conf = _get(records, estimator="black-box-confidence", population="members", defense="full")
    assert conf["status"] == "succeeded" and conf["n_queries"] == bb["n_queries"]
    assert _get(records, estimator="black-box-confidence", population="members", defense="round:2")
    # labels only keeps the served labels, so the label-based estimators learn the same
    for est in ("black-box-2014", "label-only"):
        full = _get(records, estimator=est, population="members", defense="full")
        lab = _get(records, estimator=est, population="members", defense="labels")
        assert lab["accuracy"] == full["accuracy"] and lab["precision"] == full["precision"]


def test_http_answers_match_the_saved_model_in_process(http_run: dict[str, Any]) -> None:
    out, doc = http_run["out"], http_run["doc"]
    model = io.load(out / "models" / "tree")
    assert io.read_card(out / "models" / "tree")["dataset"] == "fair"
    local = attack_tree(load_fair(seed=0), model, seed=0, policies=POLICIES, white_box=False)
    remote = [r for r in doc["tree_audit"]["records"] if r["channel"] == "HTTP API"]
    assert len(local) == len(remote) == 2 * 8  # (3 + 3 + 2 estimators) x 2 populations
    for r in local:
        twin = _get(
            remote, estimator=r["estimator"], population=r["population"], defense=r["defense"]
        )
        for k in ("accuracy", "precision", "recall", "n_queries", "n_guessed_yes"):
            assert twin[k] == pytest.approx(r[k]), (r["estimator"], r["defense"], k)


def test_report_renders_the_tree_section(http_run: dict[str, Any]) -> None:
    html = Path(http_run["index"]).read_text()
    assert "Decision-tree attribute inversion" in html
    assert "the real HTTP service" in html and "black-box-2014" in html
    assert "data:image/png;base64," in html  # the depth-sweep plot is embedded


def test_in_process_route_on_an_existing_tree_folder(tmp_path: Path) -> None:
    # a tree trained on another split (seed 3): the audit must use the card's members
    model, card = train_tree(load_fair(seed=3), seed=3)
    folder = io.save(model, tmp_path / "mytree", card=card)
    out = tmp_path / "audit"
    run_audit(
        AuditConfig(
            model_dir=folder,
            out=out,
            seed=0,
            defenses=("labels",),
            in_process=True,
            tree_depths=(),
        )
    )
    doc = json.loads((out / "results.json").read_text())
    tree = doc["tree_audit"]
    assert tree["route"] == "in-process" and tree["service"] is None and tree["plot"] is None
    assert not (out / "service").exists() and not (out / "models").exists()
    assert doc["targets"]["tree"]["model_dir"] == str(folder)
    wb = _get(tree["records"], estimator="white-box", population="members", defense="none")
    assert wb["n"] == len(card["split"]["train"])
    assert wb["model_train_accuracy"] == pytest.approx(card["train_accuracy"])
    bb = _get(tree["records"], estimator="black-box-2014", population="members")
    assert bb["channel"] == "in-process API" and bb["defense"] == "labels"


def test_a_rate_limit_on_survey_data_is_a_clear_error(tmp_path: Path) -> None:
    config = AuditConfig(
        data="fair", out=tmp_path, defenses=("none", "rate:500/hour", "labels+detect")
    )
    with pytest.raises(ConfigError, match=r"output policies only.*rate:500/hour, labels\+detect"):
        run_audit(config)
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"


def test_cli_summary_table_for_a_survey_audit(
    http_run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """The closing summary of `mlinvert audit` on survey data lists each estimator's
    member and non-member accuracy per defence (not the empty face verdict table)."""
    from mlinvert.cli.audit import _summary

    _summary(http_run["index"])
    shown = capsys.readouterr().out
    assert "members vs non-members" in shown
    records = http_run["doc"]["tree_audit"]["records"]
    wb = _get(records, defense="none", estimator="white-box", population="members")
    assert f"{100 * wb['accuracy']:.1f} %" in shown
    for policy in POLICIES:
        assert policy in shown


def test_a_scikit_learn_tree_file_is_inverted(tmp_path: Path) -> None:
    """``--model tree.joblib --data fair``: a DecisionTreeClassifier fitted on the
    members runs the tree inversion; its white-box document leaks the members' answers."""
    import joblib
    from sklearn.dummy import DummyClassifier
    from sklearn.tree import DecisionTreeClassifier

    data = load_fair(seed=0)
    estimator = DecisionTreeClassifier(min_samples_leaf=2, random_state=0).fit(*data.members())
    joblib.dump(estimator, tmp_path / "tree.joblib")
    out = tmp_path / "audit"
    settings: dict[str, Any] = dict(data="fair", seed=0, in_process=True, tree_depths=())
    run_audit(AuditConfig(model_dir=tmp_path / "tree.joblib", out=out, **settings))
    doc = json.loads((out / "results.json").read_text())
    assert doc["targets"]["tree"]["test_accuracy"] == estimator.score(*data.nonmembers())
    card = io.read_card(out / "models" / "tree")
    assert card["file"]["estimator"] == "DecisionTreeClassifier" and card["dataset"] == "fair"
    records = doc["tree_audit"]["records"]
    white = _get(records, estimator="white-box", population="members", defense="none")
    ideal = _get(records, estimator="ideal", population="members", defense="none")
    held_out = _get(records, estimator="white-box", population="non-members", defense="none")
    assert white["accuracy"] > ideal["accuracy"] and white["accuracy"] > held_out["accuracy"]
    black = _get(records, estimator="black-box-2014", population="members", defense="full")
    assert black["n_queries"] > 0
    joblib.dump(DummyClassifier().fit(*data.members()), tmp_path / "dummy.joblib")
    with pytest.raises(ModelError, match="holds a DummyClassifier, not a fitted Decision"):
        run_audit(AuditConfig(model_dir=tmp_path / "dummy.joblib", out=tmp_path / "x", **settings))
