"""Decision-tree inversion benchmark: the paper's table, the depth sweep, DP trees, timings.

Usage (from the repository root)::

    nice .venv/bin/python benchmarks/trees.py [--out DIR] [--seed 0]

Prints Markdown for BENCHMARKS.md and writes ``records.json`` and the sweep plots to
``--out``. ``--art`` runs only the comparison with ART's attribute-inference attacks on
one scikit-learn ``DecisionTreeClassifier`` per survey, saved as ``tree.joblib`` and
read back as ``mlinvert audit --model tree.joblib`` reads it::

    nice .venv/bin/python benchmarks/trees.py --art

The black-box estimator is timed over real HTTP (``mlinvert serve`` in a
subprocess) when ``mlinvert.targets.io`` can save model folders, otherwise in process
(the output says which).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mlinvert.attacks.tree_inversion import (
    BlackBox2014,
    Knowledge,
    WhiteBoxCounts,
    training_confusion,
)
from mlinvert.data.surveys import SurveyDataset, load_fair, load_gss, load_steak
from mlinvert.evaluation.trees import (
    plot_depth_sweep,
    render_defense_table,
    render_tree_table,
    run_tree_audit,
    sweep_verdict,
)
from mlinvert.targets.tree import DecisionTreeTarget, TreeConfig, train_tree

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEPTHS = (0, 1, 2, 3, 4, 6, 8, 10, 12, 15, 20)
EPSILONS = (0.1, 1.0, 10.0)
MAX_DEPTHS = (4, 6, 8)


def datasets(seed: int) -> list[SurveyDataset]:
    """Steak and GSS when present, and the embedded fair survey."""
    out = []
    if (DATA / "steak-survey" / "steak-risk-survey.csv").is_file():
        out.append(load_steak(str(DATA / "steak-survey"), seed=seed))
    if (DATA / "gss" / "GSS_15235.csv").is_file():
        out.append(load_gss(str(DATA / "gss"), seed=seed))
    out.append(load_fair(seed=seed))
    return out


def time_white_box(gss: SurveyDataset, model: DecisionTreeTarget) -> dict[str, float]:
    """Best of 5: white-box inversion of every GSS member from the tree document."""
    doc = json.loads(json.dumps(model.to_document()))
    knowledge = Knowledge.of(gss, "members")
    t0 = time.perf_counter()
    attack = WhiteBoxCounts(doc)
    parse = time.perf_counter() - t0
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        attack.run(None, knowledge)
        runs.append(time.perf_counter() - t0)
    return {"rows": knowledge.n, "parse_s": parse, "infer_s": min(runs), "nodes": model.n_nodes_}


def _serve_in_thread(model: DecisionTreeTarget, name: str, db: Path) -> tuple[Any, Any, str]:
    """Real HTTP on a loopback port: the service app under uvicorn in a thread."""
    import threading

    import uvicorn

    from mlinvert.defenses import Predictor
    from mlinvert.service import ServiceSettings, Store, create_app
    from mlinvert.service.runner import free_port

    store = Store(db)
    key, _ = store.create_key("bench")
    settings = ServiceSettings(db=db, max_batch=1024)
    app = create_app(settings, [Predictor(model, name=name, max_batch=1024)], store=store)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, key


def time_black_box(
    data: SurveyDataset, model: DecisionTreeTarget, card: dict[str, Any]
) -> dict[str, Any]:
    """The 2014 estimator on every member over HTTP (binary float32 batches of 1024).

    With ``mlinvert.targets.io`` the model is saved and served by ``mlinvert serve`` in a
    subprocess; without it, the same app runs under uvicorn in a thread of this process.
    """
    from mlinvert.oracle.http import HttpOracle

    knowledge = Knowledge.of(data, "members")
    attack = BlackBox2014(training_confusion(model, *data.members()))
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "keys.sqlite"
        if importlib.util.find_spec("mlinvert.targets.io") is None:
            server, thread, key = _serve_in_thread(model, data.name, db)
            try:
                url = f"http://127.0.0.1:{server.config.port}/v1/models/{data.name}"
                with HttpOracle(url, key) as oracle:
                    t0 = time.perf_counter()
                    result = attack.run(oracle, knowledge)
                    seconds = time.perf_counter() - t0
            finally:
                server.should_exit = True
                thread.join()
            transport = "HTTP loopback, uvicorn in a thread (mlinvert.targets.io missing)"
        else:
            from mlinvert.service.runner import ServiceProcess
            from mlinvert.service.store import Store
            from mlinvert.targets import io

            folder = Path(tmp) / data.name
            io.save(model, folder, card=card)
            key, _ = Store(db).create_key("bench")
            with ServiceProcess([f"{data.name}={folder}"], db=db, max_batch=1024) as service:
                oracle = HttpOracle(service.model_url(data.name), key)
                t0 = time.perf_counter()
                result = attack.run(oracle, knowledge)
                seconds = time.perf_counter() - t0
            transport = "HTTP, mlinvert serve subprocess"
    return {
        "transport": transport,
        "queries": result.n_queries,
        "seconds": seconds,
        "status": result.status,
    }


def partial_knowledge(data: SurveyDataset, unknown: tuple[str, ...], *, seed: int) -> str:
    """White-box and black-box-2014 on members when ``unknown`` answers are unknown too."""
    from mlinvert.defenses import Predictor
    from mlinvert.evaluation.trees import binary_metrics
    from mlinvert.oracle import LocalOracle

    model, _ = train_tree(data, seed=seed)
    knowledge = Knowledge.of(data, "members", unknown=unknown)
    truth = knowledge.truth == data.sensitive_positive
    cells = []
    for attack in (
        WhiteBoxCounts(model.to_document()),
        BlackBox2014(training_confusion(model, *data.members())),
    ):
        oracle = LocalOracle(Predictor(model, name="tree", max_batch=4096))
        result = attack.run(oracle, knowledge)
        m = binary_metrics(truth, result.guesses == data.sensitive_positive)
        cells.append(
            f"{result.estimator} {100 * m['accuracy']:.1f} / {100 * m['precision']:.1f} / "
            f"{100 * m['recall']:.1f} ({result.n_queries} queries, {result.elapsed_s:.2f} s)"
        )
    return f"- {data.name} members, unknown {list(unknown) or 'none'}: " + "; ".join(cells)


def _scored(guesses: np.ndarray, knowledge: Knowledge, data: SurveyDataset) -> str:
    """One row: accuracy / precision / recall of the guessed "yes" answers."""
    from mlinvert.evaluation.trees import binary_metrics

    truth = knowledge.truth == data.sensitive_positive
    m = binary_metrics(truth, np.asarray(guesses) == data.sensitive_positive)
    return f"{100 * m['accuracy']:.1f} / {100 * m['precision']:.1f} / {100 * m['recall']:.1f}"


def _timed(run: Any, *args: Any, **kwargs: Any) -> tuple[np.ndarray, float, int]:
    """Guesses, seconds and queries of one attack call (ours return a result)."""
    t0 = time.perf_counter()
    out = run(*args, **kwargs)
    seconds = time.perf_counter() - t0
    if isinstance(out, np.ndarray):
        return out, seconds, 0
    return out.guesses, seconds, out.n_queries


def sensitive_first(data: SurveyDataset) -> SurveyDataset:
    """``data`` with the sensitive column moved first: ART's white-box attacks refuse to
    attack the last column (their check ``attack_feature >= x.shape[1]`` is off by one),
    where GSS keeps it; every attack of the comparison sees this order."""
    import dataclasses

    j = data.sensitive_index
    order = [j, *(i for i in range(len(data.feature_names)) if i != j)]
    return dataclasses.replace(
        data,
        feature_names=tuple(data.feature_names[i] for i in order),
        domains=tuple(data.domains[i] for i in order),
        ordered=tuple(data.ordered[i] for i in order),
        X=np.ascontiguousarray(data.X[:, order]),
    )


def art_beside_ours(data: SurveyDataset, seed: int, folder: Path) -> list[str]:
    """ART's three attribute-inference attacks beside ours on one scikit-learn tree.

    The tree (``min_samples_leaf=2``, as ours) is fitted on the members, saved as
    ``tree.joblib`` and read back by :func:`load_survey_tree` (what ``audit --model``
    does). Every attacker knows a respondent's other answers and label (ART's
    ``y``: the true label, the knowledge our estimators have) and the sensitive
    feature's prior over the population attacked. ART's black-box attack model (a random
    forest) is trained on the non-members with their sensitive answers known, so it is
    scored on the members only. Returns Markdown rows (``data``: see
    :func:`sensitive_first`).
    """
    import joblib
    from art.attacks.inference.attribute_inference import AttributeInferenceBlackBox
    from art.estimators.classification.scikitlearn import ScikitlearnDecisionTreeClassifier
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.tree import DecisionTreeClassifier

    from mlinvert.targets.files import load_survey_tree

    estimator = DecisionTreeClassifier(min_samples_leaf=2, random_state=seed)
    estimator.fit(*data.members())
    path = folder / f"{data.name}-tree.joblib"
    joblib.dump(estimator, path)
    model, _ = load_survey_tree(path, data)
    art = ScikitlearnDecisionTreeClassifier(estimator)
    black = AttributeInferenceBlackBox(
        art, attack_feature=data.sensitive_index, attack_model_type="rf"
    )
    # ART's "rf" model, seeded (ART tests `if attack_model:`, which an unfitted forest fails)
    black.attack_model = RandomForestClassifier(random_state=seed)
    black.fit(*data.nonmembers())
    rows = []
    for population in ("members", "non-members"):
        knowledge = Knowledge.of(data, population)
        runs = {"baseline: always no": (np.full(knowledge.n, -1), 0.0, 0)}
        runs.update(_population(data, model, art, knowledge))
        if population == "members":
            rest = np.delete(knowledge.X, data.sensitive_index, axis=1)
            pred = estimator.predict(knowledge.X).reshape(-1, 1)
            values = list(range(len(data.domains[data.sensitive_index])))
            runs["ART BlackBox (random forest on the non-members)"] = _timed(
                black.infer, rest, knowledge.y, pred=pred, values=values
            )
        for name, (guesses, seconds, queries) in runs.items():
            rows.append(
                f"| {data.name} | {population} | {name} | "
                f"{_scored(guesses, knowledge, data)} | {queries:,} | {seconds:.2f} s |"
            )
    return rows


def _population(
    data: SurveyDataset, model: DecisionTreeTarget, art: Any, knowledge: Knowledge
) -> dict[str, tuple[np.ndarray, float, int]]:
    """Our two estimators and ART's two white-box attacks on one population."""
    from art.attacks.inference.attribute_inference import (
        AttributeInferenceWhiteBoxDecisionTree,
        AttributeInferenceWhiteBoxLifestyleDecisionTree,
    )

    from mlinvert.defenses import Predictor
    from mlinvert.oracle import LocalOracle

    j = data.sensitive_index
    rest = np.delete(knowledge.X, j, axis=1)
    known = {"values": list(range(len(data.domains[j]))), "priors": list(knowledge.prior)}
    oracle = LocalOracle(Predictor(model, name="tree", max_batch=4096))
    black_2014 = BlackBox2014(training_confusion(model, *data.members()))
    white = AttributeInferenceWhiteBoxDecisionTree(art, attack_feature=j)
    life = AttributeInferenceWhiteBoxLifestyleDecisionTree(art, attack_feature=j)
    return {
        "mlinvert white-box (counts in the document)": _timed(
            WhiteBoxCounts(model.to_document()).run, None, knowledge
        ),
        "mlinvert black-box 2014 (API answers)": _timed(black_2014.run, oracle, knowledge),
        "ART WhiteBoxDecisionTree": _timed(white.infer, rest, knowledge.y, **known),
        "ART WhiteBoxLifestyleDecisionTree": _timed(life.infer, rest, **known),
    }


def art_table(seed: int, folder: Path) -> None:
    """Print the ART comparison on every survey here."""
    print("| survey | respondents | attack | acc / prec / rec (%) | queries | time |")
    print("|---|---|---|---|---|---|")
    for data in datasets(seed):
        for row in art_beside_ours(sensitive_first(data), seed, folder):
            print(row, flush=True)


def main() -> None:
    """Run everything and print the Markdown."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "mlinvert-trees")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--art", action="store_true", help="only ART's attacks beside ours")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.art:
        art_table(args.seed, args.out)
        return
    records: list[dict[str, Any]] = []
    for data in datasets(args.seed):
        t0 = time.perf_counter()
        recs = run_tree_audit(
            data, seed=args.seed, depths=DEPTHS, dp_epsilons=EPSILONS, max_depths=MAX_DEPTHS
        )
        records += recs
        plot_depth_sweep(recs, args.out / f"sweep_{data.name}.png")
        print(f"<!-- {data.name}: audit {time.perf_counter() - t0:.1f} s -->")
        print(f"- {data.name} sweep verdict: {sweep_verdict(recs)}")
    (args.out / "records.json").write_text(json.dumps(records, indent=1))
    print("\n### Paper table (plain answers)\n")
    print(render_tree_table(records))
    keep = {"white-box", "black-box-2014", "black-box-confidence"}
    print("\n### Defences: output policies, privacy-aware depth, DP trees\n")
    print(render_defense_table([r for r in records if r["estimator"] in keep]))
    by_name = {d.name: d for d in datasets(args.seed)}
    if "steak" in by_name:  # the configuration choice, for honesty
        leaf1 = run_tree_audit(
            by_name["steak"],
            seed=args.seed,
            policies=("full",),
            config=TreeConfig(min_samples_leaf=1),
        )
        print("\n### Steak with 1-row leaves (min_samples_leaf=1)\n")
        print(render_tree_table(leaf1))
    print("\n### Partial knowledge (acc / prec / rec, members)\n")
    for name, unknown in (
        ("steak", ()),
        ("steak", ("age",)),
        ("steak", ("age", "income")),
        ("gss", ()),
        ("gss", ("age",)),
        ("gss", ("age", "educ")),
    ):
        if name in by_name:
            print(partial_knowledge(by_name[name], unknown, seed=args.seed))
    if "gss" in by_name:
        gss = by_name["gss"]
        model, card = train_tree(gss, seed=args.seed)
        print(f"\n- white-box, all GSS members: {time_white_box(gss, model)}")
        print(f"- black-box 2014, all GSS members: {time_black_box(gss, model, card)}")
    print(
        f"\nrecords and plots in {args.out}; mean model accuracy check: "
        f"{np.mean([r['model_accuracy'] for r in records]):.3f}"
    )


if __name__ == "__main__":
    main()
