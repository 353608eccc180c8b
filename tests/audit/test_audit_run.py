"""The audit end to end on digits: in process with an interruption and a resume, over
the real HTTP service, and the CLI's error on a bad flag."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from mlinvert.audit.config import AuditConfig
from mlinvert.audit.results import ResultsFile, record_key
from mlinvert.audit.runner import run_audit
from mlinvert.cli.main import main
from mlinvert.errors import ConfigError
from mlinvert.service import Store

REQUIRED = (
    "attack",
    "defense",
    "target_model",
    "label",
    "n_queries",
    "seconds",
    "status",
    "eval_top1",
    "eval_top5",
    "likeness",
    "lineup_correct",
    "pixel_nn_correct",
    "ssim",
    "feature_distance",
    "utility",
    "recovered",
)
# rate:60/day: one input back every 24 minutes, so no test run lasts long enough for
# a refill to change a count (60/hour gives one back a minute: a slow run could get more)
DEFENSES = ("none", "round:1", "labels", "rate:60/day", "detect:block:20")


class _Stop:
    """Event sink that presses Ctrl-C after ``after`` records."""

    def __init__(self, after: int | None) -> None:
        self.after = after
        self.records: list[Mapping[str, Any]] = []

    def __call__(self, kind: str, data: Mapping[str, Any]) -> None:
        if kind == "record":
            self.records.append(data)
            if self.after is not None and len(self.records) >= self.after:
                raise KeyboardInterrupt


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("audit")
    cfg: dict[str, Any] = dict(
        out=out,
        targets=("softmax",),
        labels=2,
        budget=240,
        quick=True,
        in_process=True,
        defenses=DEFENSES,
        seed=1,
        blind=0.0,  # a naive attacker: the detector row shows what the detector catches
    )
    # the first run attacks two people at a time (lanes) and is interrupted while a lane
    # is still running; the resume attacks one person after another
    first = _Stop(after=5)
    with pytest.raises(KeyboardInterrupt):
        run_audit(AuditConfig(**cfg, lanes=2), events=first)
    partial = json.loads((out / "results.json").read_text())
    second = _Stop(after=None)
    index = run_audit(AuditConfig(**cfg, resume=True, lanes=1), events=second)
    final = json.loads((out / "results.json").read_text())
    return {
        "out": out,
        "partial": partial,
        "first": first,
        "second": second,
        "index": index,
        "final": final,
    }


def test_interrupted_run_leaves_a_valid_partial_file(resumed: dict[str, Any]) -> None:
    partial = resumed["partial"]
    assert partial["status"] == "interrupted"
    assert len(partial["records"]) == 5
    assert (resumed["out"] / "index.html").exists()


def test_resume_finishes_without_redoing_records(resumed: dict[str, Any]) -> None:
    final = resumed["final"]
    assert final["status"] == "complete"
    keys = [record_key(r) for r in final["records"]]
    assert len(keys) == len(set(keys)) == 3 * len(DEFENSES) * 2
    redone = {record_key(r) for r in resumed["second"].records}
    assert not redone & {record_key(r) for r in resumed["partial"]["records"]}
    before = {record_key(r): r for r in resumed["partial"]["records"]}
    for r in final["records"]:
        if record_key(r) in before:
            assert r == before[record_key(r)]
    assert final["config"]["lanes"] == 1
    assert all(r["lanes"] == 1 for r in resumed["second"].records if not r.get("shared_from"))
    # the first run's API attacks attacked both people at once
    api = [r for r in resumed["partial"]["records"] if r["attack"] != "whitebox"]
    assert api and all(r["lanes"] == 2 for r in api)


def test_records_carry_the_schema_and_the_expected_shape(resumed: dict[str, Any]) -> None:
    final = resumed["final"]
    recs = final["records"]
    for r in recs:
        assert set(REQUIRED) <= set(r), set(REQUIRED) - set(r)
    by = {(r["attack"], r["defense"], r["label"]): r for r in recs}
    # the white-box attacker holds the model: identical under every output defence
    for lab in (0, 1):
        wb = [by[("whitebox", d, lab)] for d in DEFENSES]
        assert len({(r["image"], r["likeness"], r["eval_top1"]) for r in wb}) == 1
    # MI-Face cannot run on a labels-only API; label-only inversion still can
    assert all(by[("blackbox", "labels", lab)]["status"] == "not_applicable" for lab in (0, 1))
    assert all(by[("blackbox", "labels", lab)]["measured"] for lab in (0, 1))
    assert all(by[("label-only", "labels", lab)]["n_queries"] > 0 for lab in (0, 1))
    # the rate limit stops the black-box attack before its budget
    rl = [by[("blackbox", "rate:60/day", lab)] for lab in (0, 1)]
    assert all(r["status"] == "rate_limited" and r["n_queries"] <= 60 for r in rl)
    # the detector blocks the account of each API attack after its first near duplicates
    for attack in ("blackbox", "label-only"):
        blocked = [by[(attack, "detect:block:20", lab)] for lab in (0, 1)]
        assert all(r["status"] == "blocked" and r["n_queries"] < 100 for r in blocked), blocked
    # white-box reconstructions of digits point to the right class
    assert sum(by[("whitebox", "none", lab)]["eval_top1"] for lab in (0, 1)) >= 1
    util = final["utility"]["softmax"]
    assert util["labels"]["carries"] == "label"
    assert util["labels"]["brier"] > util["none"]["brier"]
    # an honest client sending the held-out digits is not refused by the detector
    assert util["detect:block:20"]["honest_refused"] == 0
    assert util["detect:block:20"]["accuracy"] == util["none"]["accuracy"]
    html = resumed["index"].read_text()
    assert "AML.T0024" in html and "rate:60/day" in html
    assert "Query detector (detect:block:20), how the attacks ended:" in html
    assert "(labels through the API): blocked 2" in html
    assert "attacker did not adapt (--blind 0)" in html
    # the detector flagged both attacking accounts, and the report says when
    flags = final["detector_flags"]["detect:block:20"]["softmax"]
    for attack in ("blackbox", "label-only"):
        assert 20 <= flags[attack]["near_duplicates"] <= flags[attack]["inputs"] < 200, flags
    assert f"flagged at input {flags['blackbox']['inputs']} (" in html
    assert all(r["blinded"] is None for r in final["records"])


def _copy_models(src: Path, out: Path) -> None:
    """Reuse the in-process run's trained models (same data, seed and quick flag)."""
    (out / "models").mkdir(parents=True)
    for kind in ("softmax", "evaluation"):
        (out / "models" / kind).mkdir()
        for f in (src / "models" / kind).iterdir():
            (out / "models" / kind / f.name).write_bytes(f.read_bytes())


def _small(out: Path, **settings: Any) -> AuditConfig:
    """The small audit of these tests (softmax, 2 digits, 240 queries, quick, seed 1)."""
    base: dict[str, Any] = dict(targets=("softmax",), labels=2, budget=240, quick=True, seed=1)
    return AuditConfig(out=out, **(base | settings))


def test_the_attacker_blinds_its_probes_against_an_advertised_detector(
    tmp_path: Path, resumed: dict[str, Any]
) -> None:
    out = tmp_path / "adaptive"
    _copy_models(resumed["out"], out)
    index = run_audit(
        _small(
            out,
            in_process=True,
            defenses=("detect:block:20",),
            attacks=("whitebox", "label-only"),
        )
    )
    final = json.loads((out / "results.json").read_text())
    assert final["config"]["blind"] == 0.05
    by = {(r["attack"], r["label"]): r for r in final["records"]}
    naive = {
        r["label"]: r
        for r in resumed["final"]["records"]
        if (r["attack"], r["defense"]) == ("label-only", "detect:block:20")
    }
    for lab in (0, 1):
        adaptive = by[("label-only", lab)]
        # the naive attacker was blocked; the same attack with noise on every probe is not
        assert naive[lab]["status"] == "blocked"
        assert adaptive["blinded"] == 0.05 and adaptive["status"] != "blocked", adaptive
        assert adaptive["n_queries"] > naive[lab]["n_queries"]
        assert by[("whitebox", lab)]["blinded"] is None  # no API, nothing to blind
    assert final["detector_flags"]["detect:block:20"]["softmax"] == {"label-only": None}
    html = index.read_text()
    assert "so the attacker adapted and added fresh noise of ±0.05 to every probe" in html
    assert "an API attacker whose probes carried ±0.05 noise" in html
    assert "Label-only inversion (labels through the API): never flagged" in html
    # resuming with another blinding would mix two attackers in one row
    with pytest.raises(ConfigError, match=r"blind: 0\.05 -> 0\.0"):
        ResultsFile(out, _small(out, resume=True, blind=0.0))


def test_audit_over_the_real_http_service(tmp_path: Path, resumed: dict[str, Any]) -> None:
    # reuse the trained models of the in-process run (same data, seed and quick flag)
    out = tmp_path / "http"
    _copy_models(resumed["out"], out)
    index = run_audit(
        _small(
            out,
            defenses=("rate:60/day", "detect:block:20"),
            attacks=("blackbox",),
            lanes=2,
            accounts=2,  # a fresh API key when the first is refused
            escalate=True,  # and twice the blinding noise after a block
        )
    )
    final = json.loads((out / "results.json").read_text())
    assert final["status"] == "complete"
    records = [r for r in final["records"] if r["defense"] == "rate:60/day"]
    assert [r["label"] for r in sorted(records, key=lambda r: r["label"])] == [0, 1]
    assert all(r["channel"] == "HTTP API" and r["lanes"] == 2 for r in records)
    # two people share the attacker's two accounts' rate limits: once the first key is
    # refused the second is used; both people end rate limited, none failed
    assert all(r["status"] == "rate_limited" for r in records), [r["error"] for r in records]
    assert all(r["accounts"] == 2 for r in records)
    assert 60 < sum(r["n_queries"] for r in records) <= 120
    assert (out / "service" / "rate_60_day.sqlite3").exists()  # the service's query log
    # the service's detector blocks the attacking account (403) and records the flag
    # (even blinded: noise of +-0.05 moves too few of these 8x8 probes' pixels across the
    # detector's 0.2 quantisation steps to break up their 20-pixel windows); the attacker
    # learns from the 403, doubles its noise and goes on through its second key unseen
    adapted = [r for r in final["records"] if r["defense"] == "detect:block:20"]
    assert len(adapted) == 2 and all(r["status"] != "blocked" for r in adapted), adapted
    assert all(r["blinded"] == 0.05 and r["blinded_up_to"] == 0.1 for r in adapted), [
        (r["blinded"], r["blinded_up_to"], r["accounts"], r["n_queries"], r["status"])
        for r in adapted
    ]
    assert all(r["accounts"] == 2 and r["n_queries"] > 0 for r in adapted)
    store = Store(out / "service" / "detect_block_20.sqlite3")
    (flag,) = store.flags()  # the first key only
    assert flag.flag.account == "audit-detect_block_20-softmax-blackbox"
    assert flag.flag.near_duplicates >= 20
    # the audit read the flag back from the service's account database
    noted = final["detector_flags"]["detect:block:20"]["softmax"]["blackbox"]
    assert noted == {
        "inputs": flag.flag.inputs,
        "near_duplicates": flag.flag.near_duplicates,
        "accounts_flagged": 1,
    }
    html = index.read_text()
    assert "the attacker had 2 API keys and opened 2, a fresh one whenever one was refused" in html
    assert "doubling it each time the service blocked one of its accounts (up to ±0.1)" in html
    assert "whose probes carried ±0.05 to ±0.1 noise" in html  # the recommendation
    assert "1 of the 2 accounts it opened flagged" in html


def test_cli_bad_flag_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "website").mkdir()
    (tmp_path / "website" / "index.html").write_text("<p>mine</p>\n")
    bad = subprocess.run(
        [sys.executable, "-m", "mlinvert", "audit", "--no-such-flag"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "No such option" in bad.stderr and "Traceback" not in bad.stderr
    for flags, words in [
        (["--attacks", "whitebox,teleport"], "unknown attack"),
        (["--lanes", "0"], "--lanes must be between 1"),
        (["--blind", "2"], "--blind must be in [0, 1]"),
        (["--targets", "softmax,softmax@dp:abc"], "write KIND or KIND@dp:EPSILON"),
        (["--accounts", "0"], "--accounts must be between 1 and 1000"),
        (["--accounts", "3", "--escalate", "--blind", "0"], "--escalate raises the blinding"),
        (["--escalate"], "it needs --blind > 0 and --accounts >= 2"),
        (["--seed", "-3"], "--seed must be between 0 and"),
        (["--seed", "99999999999999999999"], "--seed must be between 0 and"),
        (["--out", __file__], "is a file; pass a folder path"),
        (["--out", "/proc/no-such-dir/x"], "cannot write into --out"),
        (["--out", str(tmp_path / "website")], "holds other files and no audit"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["audit", "--out", "/nonexistent/x", *flags])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert words in " ".join(err.split()) and "Traceback" not in err  # rich wraps lines
    assert (tmp_path / "website" / "index.html").read_text() == "<p>mine</p>\n"


def test_cli_ctrl_c_says_what_is_kept_and_how_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlinvert.audit.runner as runner

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_audit", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 130
    err = " ".join(capsys.readouterr().err.split())
    assert "interrupted" in err and "results.json keeps the finished attack runs" in err
    assert "run the same command with --resume" in err


def test_resumed_http_audit_keeps_the_service_log_and_moves_past_a_blocked_account(
    tmp_path: Path, resumed: dict[str, Any]
) -> None:
    """A resumed audit over HTTP continues the earlier run's service database (its query
    log, accounts and flags) instead of replacing it; an attacking account flagged in
    the earlier run is refused from the start, and the Sybil moves on to its next
    account rather than reading that refusal as "this batch is refused by anyone"."""
    from mlinvert.defenses.detector import Flag

    out = tmp_path / "http"
    _copy_models(resumed["out"], out)
    detector = "detect:block:5000"  # never flags by itself in this small run
    cfg: dict[str, Any] = dict(defenses=(detector,), attacks=("label-only",), accounts=2)
    run_audit(_small(out, labels=1, **cfg))
    db = out / "service" / "detect_block_5000.sqlite3"
    first = _answered_by(db)
    account = "audit-detect_block_5000-softmax-label-only"
    assert set(first) == {account} and first[account] > 0
    store = Store(db)  # an operator (or the detector) flagged the first account
    try:
        store.flag(Flag(account=account, at=0.0, near_duplicates=1, inputs=1, detail="test"))
    finally:
        store.close()
    run_audit(_small(out, labels=2, resume=True, **cfg))
    final = json.loads((out / "results.json").read_text())
    again = _answered_by(db)
    second = {a: n - first.get(a, 0) for a, n in again.items()}
    # the earlier run's log is still there, and the resumed attack used the second account
    assert again[account] == first[account] and second[account] == 0
    (resumed_record,) = [r for r in final["records"] if r["label"] == 1]
    assert resumed_record["n_queries"] > 0 and resumed_record["status"] != "blocked"
    assert second[f"{account}-2"] == resumed_record["n_queries"]


def _answered_by(db: Path) -> dict[str, int]:
    """Inputs the service answered, per account."""
    store = Store(db)
    try:
        out: dict[str, int] = {}
        for q in store.queries():
            if q.status == 200:
                out[str(q.account)] = out.get(str(q.account), 0) + q.n_inputs
        return out
    finally:
        store.close()


def test_cli_model_without_data_audits_the_data_set_its_card_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``audit --model DIR`` without --data used the digits (and then said the model's
    inputs do not match them), not the data set the model was trained on."""
    import mlinvert.audit.runner as runner
    from mlinvert.data import load
    from mlinvert.targets import save, train_target

    tree = train_target(load("fair", seed=0), "tree", seed=0, quick=True)
    save(tree.model, tmp_path / "tree", card=tree.card)
    seen: list[AuditConfig] = []

    def capture(config: AuditConfig, **kwargs: object) -> None:
        seen.append(config)
        raise ConfigError("captured")

    monkeypatch.setattr(runner, "run_audit", capture)
    for argv, spec in [
        (["--model", str(tmp_path / "tree")], "fair"),
        (["--model", str(tmp_path / "tree"), "--data", "fair"], "fair"),
        ([], "digits"),
    ]:
        with pytest.raises(SystemExit):
            main(["audit", "--out", str(tmp_path / "run"), *argv])
        assert runner.data_spec(seen.pop())[0] == spec
