"""``mlinvert audit --api``: audit a prediction API that is already running.

A real ``mlinvert serve`` (round:2 scores, the query detector) serves a small digits
softmax and, under a second name, a toy model of other classes; the audit attacks it
with the attacker's two keys, and the service's own query log is the witness.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlinvert.audit.channels import ONE_THREAD_ENV
from mlinvert.audit.config import AuditConfig
from mlinvert.audit.results import ResultsFile
from mlinvert.audit.runner import run_audit
from mlinvert.cli.main import main
from mlinvert.data import load
from mlinvert.defenses import Predictor, parse_policy
from mlinvert.errors import ConfigError
from mlinvert.evaluation.utility import served_utility
from mlinvert.service import Store
from mlinvert.service.runner import ServiceProcess, free_port

from .test_audit_run import _answered_by, _small

POLICY = "round:2"
DETECTOR = "detect:block"


def _toy(folder: Path) -> None:
    """A model on 8x8 inputs whose classes are not the digits' (s0..s4)."""
    from mlinvert.targets.io import save
    from mlinvert.targets.torch_models import SoftmaxConfig, SoftmaxRegression

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 6)
    x = rng.random((30, 8, 8), dtype=np.float32)
    model = SoftmaxRegression(SoftmaxConfig(seed=0, max_iter=5)).fit(
        x, y, class_names=tuple(f"s{i}" for i in range(5))
    )
    save(model, folder)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from mlinvert.targets import io
    from mlinvert.targets.training import train_target

    root = tmp_path_factory.mktemp("deployed")
    dataset = load("digits", seed=1)
    trained = train_target(dataset, "softmax", seed=1, quick=True)
    folder = root / "owner" / "softmax"
    io.save(trained.model, folder, card=trained.card)
    _toy(root / "owner" / "toy")
    db = root / "service.sqlite3"
    store = Store(db)
    keys = (store.create_key("alice")[0], store.create_key("bob")[0])
    store.close()
    with ServiceProcess(
        [f"digits={folder}", f"toy={root / 'owner' / 'toy'}"],
        db=db,
        policy=POLICY,
        detector=DETECTOR,
        env=ONE_THREAD_ENV,
    ) as served:
        yield {
            "service": served,
            "url": served.model_url("digits"),
            "keys": keys,
            "folder": folder,
            "model": io.load(folder),
            "db": db,
            "root": root,
        }


@pytest.fixture(scope="module")
def audited(service: dict[str, Any]) -> dict[str, Any]:
    out = service["root"] / "audit"
    index = run_audit(
        _small(
            out,
            api=service["url"],
            api_keys=service["keys"],
            data="digits",
            model_dir=service["folder"],  # its card's split; never its weights
            attacks=("blackbox", "label-only"),
        )
    )
    return {
        "out": out,
        "index": index,
        "text": (out / "results.json").read_text(),
        "final": json.loads((out / "results.json").read_text()),
    }


def test_deployed_api_is_attacked_under_what_it_advertises(
    service: dict[str, Any], audited: dict[str, Any]
) -> None:
    final = audited["final"]
    assert final["status"] == "complete"
    recs = final["records"]
    assert sorted((r["attack"], r["defense"], r["label"]) for r in recs) == [
        (a, "deployed", lab) for a in ("blackbox", "label-only") for lab in (0, 1)
    ]
    assert all(r["channel"] == "deployed HTTP API" and r["target_model"] == "digits" for r in recs)
    # the attacker read the advertised detector and blinded every probe
    assert all(r["blinded"] == 0.05 for r in recs)
    # every attack ran through the API (an MI-Face that ends below its confidence goal
    # reports "failed", with its queries and image; an error would have 0 queries)
    assert all(r["n_queries"] > 0 and r["image"] and r["error"] is None for r in recs), recs
    (row,) = final["defenses"]
    assert row["name"] == "deployed" and row["policy"] == POLICY
    assert row["detector"] == "detect:block:100" and row["rate"] is None
    assert "output policy round:2" in row["description"]
    assert final["deployment"]["url"] == service["url"] and final["deployment"]["keys"] == 2
    assert final["config"]["accounts"] == 2 and final["config"]["targets"] == []
    # no target trained or copied: only the judge's evaluation model
    assert sorted(p.name for p in (audited["out"] / "models").iterdir()) == ["evaluation"]
    # the keys are secrets: only fingerprints reach the results
    for key in service["keys"]:
        assert key not in audited["text"]
    assert all(f.startswith("sha256:") for f in final["config"]["api_keys"])


def test_served_accuracy_is_what_the_model_serves_under_the_policy(
    service: dict[str, Any], audited: dict[str, Any]
) -> None:
    from mlinvert.data.base import Split
    from mlinvert.targets.io import read_card

    final = audited["final"]
    util = final["utility"]["digits"]["deployed"]
    split = Split.from_dict(read_card(service["folder"])["split"])
    x, y = dataclasses.replace(load("digits", seed=1), split=split).test()
    owner = Predictor(
        service["model"], name="digits", policy=parse_policy(POLICY), max_batch=len(x)
    )
    served = owner.predict(x, account="owner")
    expected = served_utility(served, y, 10)
    assert util["accuracy"] == expected["accuracy"] > 0.8
    assert util["brier"] == pytest.approx(expected["brier"])
    assert util["n_test"] == len(y) and util["queries_spent"] == len(y)
    assert util["honest_refused"] == 0
    assert "--api-key #1" in util["measured_through"]


def test_attack_queries_are_in_the_services_log(
    service: dict[str, Any], audited: dict[str, Any]
) -> None:
    final = audited["final"]
    store = Store(service["db"])
    try:
        answered: dict[str, int] = {}
        for q in store.queries():
            if q.status == 200:
                assert q.model == "digits"
                answered[str(q.account)] = answered.get(str(q.account), 0) + q.n_inputs
    finally:
        store.close()
    attack_queries = sum(r["n_queries"] for r in final["records"])
    n_test = final["utility"]["digits"]["deployed"]["n_test"]
    assert attack_queries > 0
    # every input the service answered was the utility measurement or an attack's probe,
    # through the attacker's two keys and nobody else's
    assert set(answered) <= {"alice", "bob"}
    assert sum(answered.values()) == n_test + attack_queries, answered
    assert answered["alice"] >= n_test


def test_report_names_the_deployment(service: dict[str, Any], audited: dict[str, Any]) -> None:
    html = audited["index"].read_text()
    assert "Deployed prediction API audited" in html and service["url"] in html
    assert "output policy round:2" in html and "query detector detect:block:100" in html
    assert "served accuracy measured through the deployed API with --api-key #1" in html


def test_resume_refuses_another_api(service: dict[str, Any], audited: dict[str, Any]) -> None:
    other = service["url"].replace("/digits", "/toy")
    cfg: dict[str, Any] = dict(
        api_keys=service["keys"],
        data="digits",
        model_dir=service["folder"],
        attacks=("blackbox", "label-only"),
    )
    with pytest.raises(ConfigError, match=r"\(api: '[^']*/digits' -> '[^']*/toy'\)"):
        ResultsFile(audited["out"], _small(audited["out"], api=other, resume=True, **cfg))
    # the same URL resumes: nothing left to do, no input answered (the key check reads
    # GET /v1/account, which is not a query)
    before = _answered(service["db"])
    run_audit(_small(audited["out"], api=service["url"], resume=True, **cfg))
    assert _answered(service["db"]) == before
    assert json.loads((audited["out"] / "results.json").read_text())["status"] == "complete"


def test_rate_limited_api_skips_the_served_accuracy_and_says_so(
    service: dict[str, Any], tmp_path: Path
) -> None:
    db = tmp_path / "limited.sqlite3"
    store = Store(db)
    key = store.create_key("mallory")[0]
    store.close()
    with ServiceProcess(
        [f"digits={service['folder']}"], db=db, rate_limit="100/hour", env=ONE_THREAD_ENV
    ) as limited:
        out = tmp_path / "audit"
        index = run_audit(
            _small(
                out,
                api=limited.model_url("digits"),
                api_keys=(key,),
                data="digits",
                labels=1,
                attacks=("blackbox",),
            )
        )
        answered = _answered(db)
    final = json.loads((out / "results.json").read_text())
    util = final["utility"]["digits"]["deployed"]
    # 100 inputs an hour cannot carry the 539 held-out digits: not measured, not spent
    assert util["accuracy"] is None and util["queries_spent"] == 0
    assert "smaller than the" in util["skipped"] and "100/hour" in util["skipped"]
    (record,) = final["records"]
    assert record["status"] == "rate_limited" and 0 < record["n_queries"] <= 100
    assert answered == record["n_queries"]
    assert final["defenses"][0]["rate"] == "100/hour"
    html = index.read_text()
    assert "not measured: the advertised rate limit (100/hour per account)" in html


def test_utility_key_measures_the_served_accuracy_through_its_own_account(
    service: dict[str, Any], tmp_path: Path
) -> None:
    db = tmp_path / "honest.sqlite3"
    store = Store(db)
    alice, bob, honest = (store.create_key(name)[0] for name in ("alice", "bob", "carol"))
    store.close()
    out = tmp_path / "audit"
    with ServiceProcess(
        [f"digits={service['folder']}"], db=db, policy=POLICY, env=ONE_THREAD_ENV
    ) as served:
        index = run_audit(
            _small(
                out,
                api=served.model_url("digits"),
                api_keys=(alice, bob),
                utility_key=honest,
                data="digits",
                model_dir=service["folder"],
                labels=1,
                attacks=("label-only",),
            )
        )
        spent = _answered_by(db)
    text = (out / "results.json").read_text()
    final = json.loads(text)
    util = final["utility"]["digits"]["deployed"]
    (record,) = final["records"]
    # the honest client's inputs went through carol's account, the attack's through alice's
    assert spent.pop("carol") == util["n_test"] == util["queries_spent"] > 0
    assert spent == {"alice": record["n_queries"]} and record["n_queries"] > 0
    assert util["accuracy"] > 0.8 and "with --utility-key:" in util["measured_through"]
    assert final["deployment"]["keys"] == 2
    assert final["deployment"]["utility_key"] == "--utility-key"
    assert honest not in text and final["config"]["utility_key"].startswith("sha256:")
    assert "served accuracy measured through the deployed API with --utility-key" in (
        index.read_text()
    )


def test_resumed_audit_moves_past_a_key_blocked_in_the_earlier_run(
    service: dict[str, Any], tmp_path: Path
) -> None:
    """The results remember what each key had answered (by fingerprint), so a resumed
    audit whose first key was blocked meanwhile moves on to the second key instead of
    taking the refusal for "this batch is refused by any key"."""
    from mlinvert.defenses.detector import Flag
    from mlinvert.oracle.http import key_fingerprint

    db = tmp_path / "resume.sqlite3"
    store = Store(db)
    alice, bob = (store.create_key(name)[0] for name in ("alice", "bob"))
    store.close()
    out = tmp_path / "audit"
    with ServiceProcess(
        [f"digits={service['folder']}"], db=db, detector="detect:block:5000", env=ONE_THREAD_ENV
    ) as served:
        cfg: dict[str, Any] = dict(
            api=served.model_url("digits"),
            api_keys=(alice, bob),
            data="digits",
            model_dir=service["folder"],
            attacks=("label-only",),
        )
        run_audit(_small(out, labels=1, **cfg))
        first = _answered_by(db)
        answered = json.loads((out / "results.json").read_text())["deployment"]["answered"]
        assert answered == {key_fingerprint(alice): first["alice"], key_fingerprint(bob): 0}
        store = Store(db)  # the service's operator blocks alice between the two runs
        try:
            store.flag(Flag(account="alice", at=0.0, near_duplicates=1, inputs=1, detail="t"))
        finally:
            store.close()
        run_audit(_small(out, labels=2, resume=True, **cfg))
        again = _answered_by(db)
    final = json.loads((out / "results.json").read_text())
    (record,) = [r for r in final["records"] if r["label"] == 1]
    assert again["alice"] == first["alice"]
    assert record["status"] != "blocked" and again["bob"] == record["n_queries"] > 0
    assert final["deployment"]["answered"] == {
        key_fingerprint(alice): first["alice"],
        key_fingerprint(bob): record["n_queries"],
    }


def _answered(db: Path) -> int:
    return sum(_answered_by(db).values())


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    return " ".join(err.split())


def test_cli_errors_are_one_clear_line(
    service: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, (alice, _) = service["url"], service["keys"]
    base = ["--api-key", alice, "--data", "digits", "--labels", "1", "--quick"]
    cases = [
        (["--api", url, *base, "--attacks", "whitebox,blackbox"], "needs the model weights"),
        (["--api", url, "--api-key", alice], "--api needs --data SPEC"),
        (["--api", url, *base, "--defenses", "none"], "drop --defenses"),
        (
            ["--api", service["url"].replace("/digits", "/toy"), *base],
            "classes ['s0', 's1', 's2', 's3', 's4']",
        ),
        (
            ["--api", f"http://127.0.0.1:{free_port()}/v1/models/digits", *base],
            "cannot reach the deployed API",
        ),
        (["--api", url, *base[2:], "--api-key", f"{alice},wrong"], "refused --api-key #2 of 2"),
        (["--api", url, *base, "--utility-key", "wrong"], "refused --utility-key"),
        (["--api", url, *base, "--utility-key", alice], "one of the attacker's --api-key keys"),
        ([*base[2:], "--utility-key", alice], "--utility-key is for --api"),
        (["--api", url.replace("/digits", "/nope"), *base], "serves no model 'nope'"),
    ]
    for i, (args, words) in enumerate(cases):
        err = _cli([*args, "--out", str(tmp_path / str(i))], capsys)
        assert words in err, (args, err)
    # a wrong key is a 401 from the service, and the message says which key
    err = _cli(["--api", url, "--api-key", "nope", *base[2:], "--out", str(tmp_path / "k")], capsys)
    assert "refused --api-key #1 of 1" in err
    # the CLI resume check names the changed URL
    audit_out = service["root"] / "audit"
    if (audit_out / "results.json").exists():
        other = url.replace("/digits", "/toy")
        same = ["--model", str(service["folder"]), "--seed", "1", "--budget", "240"]
        keys = ["--api-key", ",".join(service["keys"])]
        args = [*keys, *base[2:], *same, "--resume", "--out", str(audit_out)]
        err = _cli(["--api", other, *args], capsys)
        assert f"(api: '{url}' -> '{other}')" in err
    with pytest.raises(ConfigError, match="--api-key"):
        AuditConfig(api=url, data="digits", attacks=("blackbox",))
