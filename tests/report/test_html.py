"""The report renders from records alone and opens cleanly in a real headless Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure

from mlinvert.errors import DataError
from mlinvert.report import plots
from mlinvert.report.html import render_report
from mlinvert.report.summary import answer, attack_title, cells, recommendations, verdicts

from .conftest import DEFENSES, check_page, make_results


def test_verdicts_follow_the_records(tmp_path: Path) -> None:
    doc = make_results(tmp_path)
    vs = {(v.target_model, v.defense): v for v in verdicts(doc)}
    assert vs[("softmax", "none")].level == "exposed"
    assert vs[("softmax", "labels")].level == "mitigated"
    assert vs[("softmax", "none")].api_recovered == pytest.approx(0.75)
    recs = recommendations(doc, list(vs.values()))
    assert any("serve with 'round:1'" in r or "serve with 'labels'" in r for r in recs)
    # the fixture's rate limit leaves the black-box attack recovering faces: said, not
    # the generic advice to add one
    assert vs[("softmax", "rate:300/hour")].level == "exposed"
    assert any("'rate:300/hour' did not stop" in r for r in recs)
    assert not any("Add a per-account rate limit" in r for r in recs)
    assert any("Keep the weights private" in r for r in recs)
    cell = next(c for c in cells(doc["records"]) if (c.attack, c.defense) == ("blackbox", "labels"))
    assert cell.eval_top1 == 0 and cell.n == 4


def test_a_rate_limit_beaten_with_many_keys_is_called_a_price_in_accounts(
    tmp_path: Path,
) -> None:
    doc = make_results(tmp_path)
    said = "softmax: the rate limit 'rate:300/hour' did not"
    (cut,) = [r for r in recommendations(doc, verdicts(doc)) if r.startswith(said)]
    # the fixture's limit refused every API attack: what it answered before was enough
    assert "before the limit cut each attack off were already enough" in cut
    assert "fit in one account's allowance" not in cut
    for r in doc["records"]:  # the same results, the attacks ending within the allowance
        if r["defense"] == "rate:300/hour":
            r["status"] = "succeeded"
    (one,) = [r for r in recommendations(doc, verdicts(doc)) if r.startswith(said)]
    assert "fit in one account's allowance" in one
    for r in doc["records"]:  # the same results, reached by a Sybil with many keys
        if r["defense"] == "rate:300/hour":
            r["accounts"] = 7
    (many,) = [r for r in recommendations(doc, verdicts(doc)) if r.startswith(said)]
    assert "spread them over 7 API keys" in many and "prices the attack in accounts" in many
    assert "fit in one account's allowance" not in many


def test_a_per_account_guard_is_never_the_policy_to_serve_with(tmp_path: Path) -> None:
    doc = make_results(tmp_path)
    for r in doc["records"]:  # the rate limit now stops every attack
        if r["defense"] == "rate:300/hour":
            r.update(recovered=False, eval_top1=False, lineup_correct=False)
    vs = verdicts(doc)
    assert next(v for v in vs if v.defense == "rate:300/hour").api_recovered == 0
    recs = recommendations(doc, vs)
    assert not any("serve with 'rate:300/hour'" in r for r in recs)
    assert any("serve with 'round:1'" in r or "serve with 'labels'" in r for r in recs)
    # only a guard audited: no output policy to recommend
    doc["defenses"] = [{"name": "rate:300/hour"}]
    doc["records"] = [r for r in doc["records"] if r["defense"] == "rate:300/hour"]
    assert not any("serve with" in r for r in recommendations(doc, verdicts(doc)))


def test_report_is_self_contained(tmp_path: Path) -> None:
    make_results(tmp_path, status="interrupted")
    html = render_report(tmp_path).read_text()
    srcs = re.findall(r'<img[^>]+src="([^"]+)"', html)
    assert len(srcs) >= 2 + 6 + 1  # two plots, a grid per target x attack, references
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "ML03" in html and "AML.T0024" in html
    assert "mlinvert audit --out runs/x" in html
    # a noise-only cell is never called recovered: labels defence verdict says mitigated
    assert "mitigated" in html
    # a partial run says so and how to continue
    assert "--resume" in html


def test_missing_results_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no results\.json"):
        render_report(tmp_path)
    (tmp_path / "results.json").write_text("{broken")
    with pytest.raises(DataError, match="not valid JSON"):
        render_report(tmp_path)


@pytest.mark.browser
def test_report_opens_in_headless_chromium(tmp_path: Path) -> None:
    make_results(tmp_path / "run")
    page = render_report(tmp_path / "run")
    shot = tmp_path / "run" / "screenshot.png"
    seen = check_page(page, tmp_path, screenshot=shot)
    assert seen.ready, seen.stderr[-2000:]
    assert seen.images_total >= 9
    assert seen.images_broken == 0
    assert seen.errors == 0
    assert "Uncaught" not in seen.stderr
    assert shot.exists() and shot.stat().st_size > 10_000


@pytest.mark.browser
def test_browser_check_detects_a_broken_image(tmp_path: Path) -> None:
    make_results(tmp_path / "run")
    page = render_report(tmp_path / "run")
    html = page.read_text().replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1)
    page.write_text(html)
    seen = check_page(page, tmp_path)
    assert seen.ready
    assert seen.images_broken == 1
    assert seen.errors >= 1


def test_results_document_round_trips_as_json(tmp_path: Path) -> None:
    doc = make_results(tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == doc


def test_a_policy_that_still_leaks_is_not_recommended_as_the_fix(tmp_path: Path) -> None:
    doc = make_results(tmp_path)
    for r in doc["records"]:  # every reconstruction now points to the right person
        r.update(eval_top1=True, lineup_correct=True)
    vs = verdicts(doc)
    assert {v.level for v in vs if v.defense in ("round:1", "labels")} == {"identity leaks"}
    (line,) = [r for r in recommendations(doc, vs) if r.startswith("softmax: no output policy")]
    assert "it still leaks identity" in line and "lineup 100 %" in line
    assert not any("serve with" in r for r in recommendations(doc, vs))
    # only 'none' measured: it is not recommended either
    doc["defenses"] = [{"name": "none"}]
    doc["records"] = [r for r in doc["records"] if r["defense"] == "none"]
    recs = recommendations(doc, verdicts(doc))
    assert any(
        r.startswith("softmax: no output policy protects it, since only 'none'") for r in recs
    )
    assert not any("serve with" in r for r in recs)


def test_each_verdict_measure_is_the_highest_any_api_attack_reached(tmp_path: Path) -> None:
    doc = make_results(tmp_path)
    for r in doc["records"]:
        if (r["target_model"], r["defense"]) != ("softmax", "labels"):
            continue
        if r["attack"] == "label-only":  # recovers one person, identifies only that one
            r.update(recovered=r["label"] == 1, eval_top1=r["label"] == 1, lineup_correct=False)
        elif r["attack"] == "blackbox":  # recovers nobody, but identifies three of four
            r.update(recovered=False, eval_top1=r["label"] > 0, lineup_correct=r["label"] > 1)
    v = next(v for v in verdicts(doc) if (v.target_model, v.defense) == ("softmax", "labels"))
    assert v.api_recovered == pytest.approx(0.25)
    assert v.api_identity == pytest.approx(0.75) and v.api_lineup == pytest.approx(0.5)


def test_a_guard_that_refused_every_attack_is_cut_off_not_mitigated(tmp_path: Path) -> None:
    doc = make_results(tmp_path)
    for r in doc["records"]:  # the rate limit refuses every API attack and leaves nothing
        if r["defense"] == "rate:300/hour" and r["attack"] != "whitebox":
            r.update(recovered=False, eval_top1=False, lineup_correct=False)
    (doc_path := tmp_path / "results.json").write_text(json.dumps(doc))
    v = next(
        v for v in verdicts(doc) if (v.target_model, v.defense) == ("softmax", "rate:300/hour")
    )
    assert v.level == "cut off" and v.stopped
    assert "not an attacker with more keys or more time" in v.headline
    html = render_report(doc_path.parent).read_text()
    assert re.search(r"rate:300/hour</td>\s*<td[^>]*><span class=\"lvl lvl-cut-off\">cut off", html)
    # the same refusals under an output policy are not a guard's: judged as measured
    for r in doc["records"]:
        if r["defense"] == "labels":
            r["status"] = "blocked"
    assert next(v for v in verdicts(doc) if v.defense == "labels").level == "mitigated"


def test_the_first_section_answers_which_defences_work(tmp_path: Path) -> None:
    make_results(tmp_path)
    html = render_report(tmp_path).read_text().replace("&#39;", "'")
    short = html[html.index("<h2>In short</h2>") : html.index("<h2>Verdict per defence</h2>")]
    assert "softmax: the API attacks are mitigated by 'round:1' (served accuracy 95 %" in short
    assert "Exposed (faces recovered): 'none', 'rate:300/hour'" in short
    assert "An attacker holding the weights recovers 75 %" in short
    assert html.index("<h2>In short</h2>") < html.index("<h2>Verdict per defence</h2>")


def test_plots_tell_targets_and_attacks_apart(tmp_path: Path) -> None:
    doc = make_results(tmp_path)
    seen: dict[str, list[str]] = {}

    def keep(fig: Figure) -> bytes:
        seen[fig.get_suptitle() or "queries"] = [
            *(ax.get_title() for ax in fig.axes),
            *(t.get_text() for leg in fig.legends for t in leg.get_texts()),
            *(ax.get_xlabel() for ax in fig.axes),
        ]
        return b""

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "_png", keep)
        plots.accuracy_vs_queries(doc)
        plots.privacy_utility(doc)
    queries, utility = seen.pop("queries"), next(iter(seen.values()))
    # one row of panels per target, each titled with it
    assert sum("target softmax" in t for t in queries) == 2
    assert sum("target mlp" in t for t in queries) == 2
    assert "defence none" in queries and "attack blackbox" in queries
    assert any("0 drawn at 1" in t for t in queries)
    # legend names say which is a defence and which a target (no shared grey swatch)
    assert "defence none" in utility and "target mlp" in utility
    grey = plt.get_cmap("tab10")(7)
    assert grey not in plots._colours([f"d{i}" for i in range(12)]).values()


def test_an_accuracy_cost_reads_as_a_loss(tmp_path: Path) -> None:
    doc = make_results(tmp_path)
    doc["utility"]["softmax"]["round:1"]["accuracy"] = 0.93  # 'none' serves 95 %
    vs = {(v.target_model, v.defense): v for v in verdicts(doc)}
    (util,) = [d for d in vs[("softmax", "round:1")].details if d.startswith("Utility")]
    assert "served accuracy 93 %, 2.0 points below 'none'" in util
    (base,) = [d for d in vs[("softmax", "none")].details if d.startswith("Utility")]
    assert "'none'" not in base  # no comparison of 'none' with itself


def test_index_embeds_the_sample_and_faces_html_holds_every_reconstruction(
    tmp_path: Path,
) -> None:
    doc = make_results(tmp_path, n_labels=12)
    html = render_report(tmp_path).read_text()
    srcs = re.findall(r'<img[^>]+src="([^"]+)"', html)
    # two plots, the references, and per target 4 sampled people: private, held-out and
    # white-box photos plus each API attack (2) under each defence; no per-attack grids
    assert len(srcs) == 3 + 2 * 4 * (3 + 2 * len(DEFENSES))
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    faces = (tmp_path / "faces.html").read_text()
    shown = set(re.findall(r'<img[^>]+src="([^"]+)"', faces))
    # every API attack's reconstruction, and the white-box one once (defences do not reach it)
    drawn = [r for r in doc["records"] if r["attack"] != "whitebox" or r["defense"] == "none"]
    assert {r["image"] for r in drawn if r.get("image")} <= shown


def test_keys_an_attacker_never_used_are_not_said_to_have_been_rotated(tmp_path: Path) -> None:
    doc = make_results(tmp_path)
    doc["config"]["accounts"] = 100
    for r in doc["records"]:  # refused on its first account, which had answered nothing
        if r["defense"] == "rate:300/hour":
            r["accounts"] = 1
    v = next(
        v for v in verdicts(doc) if (v.target_model, v.defense) == ("softmax", "rate:300/hour")
    )
    (black,) = [d for d in v.details if d.startswith(attack_title("blackbox"))]
    assert "had 100 API keys but opened 1" in black
    assert "a fresh one whenever one was refused" not in black


def test_every_table_measure_is_defined(tmp_path: Path) -> None:
    make_results(tmp_path)
    html = render_report(tmp_path).read_text()
    defined = set(re.findall(r"<dt>([^<]+)</dt>", html))
    table = html[html.index('<h2 id="measures">') :]
    table = table[: table.index("</table>")]
    headers = {re.sub(r" \(.*\)", "", h) for h in re.findall(r"<th[^>]*>([^<]+)</th>", table)}
    words = {w.strip() for d in defined for w in re.split(r",|/", d)}
    words |= {f"eval {w}" for w in words if w.startswith("top-")}
    undefined = headers - words - {"defence", "people", "served acc.", "ECE", "top-k"}
    assert not undefined, undefined
    assert 'href="#measures"' in html


def test_the_header_counts_runs_not_reused_results(tmp_path: Path) -> None:
    doc = make_results(tmp_path)  # 2 targets x 3 attacks x 4 defences x 4 people = 96
    for r in doc["records"]:
        if r["attack"] == "whitebox" and r["defense"] != "none":
            r["shared_from"] = "none"  # 2 x 3 x 4 = 24 reuse a run
    (tmp_path / "results.json").write_text(json.dumps(doc))
    html = render_report(tmp_path).read_text()
    assert "72 attack runs (96 results: 24 reuse the run of a defence" in " ".join(html.split())


def test_a_verdict_below_exposed_still_counts_the_faces_recovered(tmp_path: Path) -> None:
    doc = make_results(tmp_path)
    for r in doc["records"]:  # the label-only attack recovers one of the four under labels
        if r["defense"] == "labels" and r["attack"] == "label-only" and r["label"] == 1:
            r.update(recovered=True, eval_top1=True)
    doc["thresholds"]["exposed_rate"] = 0.3
    v = next(v for v in verdicts(doc) if (v.target_model, v.defense) == ("softmax", "labels"))
    assert v.level == "mitigated"
    assert "Still, 1 of 4 was recovered (Label-only inversion" in v.headline
    assert "below the 30 % that counts as exposed" in v.headline


def test_reference_points_are_described_as_measured(tmp_path: Path) -> None:
    doc = make_results(tmp_path)
    doc["references"].append({**doc["references"][-1], "name": "private mean"})
    (tmp_path / "results.json").write_text(json.dumps(doc))
    html = render_report(tmp_path).read_text().replace("&#39;", "'")
    text = html[html.index("<h2>Reference points</h2>") :]
    text = " ".join(text[: text.index("</p>")].split())
    assert "the average of the person's private training photos" in text
    assert "the best any reconstruction can do" not in text  # the private mean scores higher


def test_digit_data_says_what_person_and_face_stand_for(tmp_path: Path) -> None:
    doc = make_results(tmp_path)
    assert "not faces" not in render_report(tmp_path).read_text()
    doc["dataset"]["spec"] = "digits"
    (tmp_path / "results.json").write_text(json.dumps(doc))
    html = " ".join(render_report(tmp_path).read_text().split())
    assert "This data set is handwritten digits, not faces" in html
    assert "a <i>person</i> is a class (4 of them)" in html


def test_the_short_answer_gives_a_dp_target_its_accuracy_price(tmp_path: Path) -> None:
    doc = make_results(tmp_path)
    doc["targets"]["mlp"].update(privacy={"epsilon": 8.0, "delta": 1e-5}, test_accuracy=0.68)
    doc["targets"]["mlp"]["kind"] = "softmax"  # a DP-SGD twin of 'softmax'
    line = next(a for a in answer(doc, verdicts(doc)) if a.startswith("mlp"))
    assert line.startswith("mlp (DP-SGD, epsilon 8: test accuracy 68 % against 95 % for softmax)")
    assert next(a for a in answer(doc, verdicts(doc)) if a.startswith("softmax")).startswith(
        "softmax: "
    )


def test_the_level_legend_gives_the_identity_thresholds(tmp_path: Path) -> None:
    doc = make_results(tmp_path)
    doc["thresholds"]["identity_rate"] = 0.5
    (tmp_path / "results.json").write_text(json.dumps(doc))
    html = " ".join(render_report(tmp_path).read_text().split())
    assert (
        "eval top-1 at least 50 % and twice chance, or the lineup right for at least 50 %" in html
    )


def test_defences_on_one_point_of_the_utility_plot_share_one_label(tmp_path: Path) -> None:
    doc = make_results(tmp_path)  # 'none' and 'rate:300/hour' have equal utility and top-1
    labels: list[str] = []

    def keep(fig: Figure) -> bytes:
        labels.extend(t.get_text() for t in fig.axes[0].texts)
        return b""

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "_png", keep)
        plots.privacy_utility(doc)
    assert "none, rate:300/hour" in labels
    assert "none" not in labels and "rate:300/hour" not in labels


def test_on_faces_the_independent_recogniser_gives_the_verdict(tmp_path: Path) -> None:
    doc = make_results(tmp_path, faces=True)
    # the evaluation model (trained on the same photos) names everybody under round:1,
    # the independent recogniser nobody: not exposed, whatever "attack accuracy" says
    for r in doc["records"]:
        if r["defense"] == "round:1":
            r["eval_top1"] = True
    vs = {(v.target_model, v.defense): v for v in verdicts(doc)}
    assert vs[("softmax", "none")].level == "exposed"
    assert vs[("softmax", "round:1")].level == "mitigated"
    assert vs[("softmax", "round:1")].api_identity == 1.0  # shown, never the verdict
    assert vs[("softmax", "none")].judge == "independent face recogniser"
    # a lineup clearly above the bar without the person named: identity leaks
    for r in doc["records"]:
        if r["defense"] == "round:1" and r["attack"] == "blackbox":
            r["judge_lineup5"] = 0.9
    assert {v.defense: v.level for v in verdicts(doc)}["round:1"] == "identity leaks"


def test_an_unmeasured_attack_is_never_a_defence_that_works(tmp_path: Path) -> None:
    doc = make_results(tmp_path, faces=True)
    for r in doc["records"]:
        if r["defense"] == "round:1" and r["attack"] == "label-only" and r["label"] == 2:
            r.update(status="error", measured=False, error="the prior holds a private photo")
            r.update(dict.fromkeys(("judge_top1", "judge_lineup5", "image"), None))
    (tmp_path / "results.json").write_text(json.dumps(doc))
    vs = verdicts(doc)
    round1 = next(v for v in vs if (v.target_model, v.defense) == ("softmax", "round:1"))
    assert round1.level == "not measured"
    assert "the prior holds a private photo" in round1.headline
    # an exposed cell stays exposed: the failure can only have hidden more
    none = next(v for v in vs if (v.target_model, v.defense) == ("softmax", "none"))
    assert none.level == "exposed"
    short = " ".join(answer(doc, vs))
    assert "Not measured, so not shown to protect anything: 'round:1'" in short
    recs = recommendations(doc, vs)
    assert any("do not choose a defence" in r and "'round:1'" in r for r in recs)
    assert not any("serve with 'round:1'" in r for r in recs)
    html = " ".join(render_report(tmp_path).read_text().split())
    assert 'lvl lvl-not-measured">not measured' in html and 'class="m-unmeasured"' in html


@pytest.mark.browser
def test_the_first_screen_shows_the_faces(tmp_path: Path) -> None:
    make_results(tmp_path / "run", faces=True, n_labels=12)
    page = render_report(tmp_path / "run")
    seen = check_page(page, tmp_path, window="1280,900")
    assert seen.ready, seen.stderr[-2000:]
    assert seen.images_broken == 0
    # a 1280x900 window shows about 760 px of page
    assert seen.viewport_height > 700
    assert 0 < seen.faces_bottom <= seen.viewport_height
    assert seen.first_table_top > seen.faces_bottom  # no table before the faces
    faces = check_page(tmp_path / "run" / "faces.html", tmp_path / "all")
    assert faces.ready and faces.images_broken == 0
    # every person on faces.html, 4 spread over them on the first screen
    assert faces.images_total == 2 * 12 * (2 + 1 + len(DEFENSES) * 2)
    html = page.read_text()
    assert 'href="faces.html"' in html and "4 of 12 people" in html
