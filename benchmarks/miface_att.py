"""MI-Face on full AT&T (all 40 identities): white-box, black-box (HTTP), FD, rounding.

Prints Markdown tables (identity + likeness from FaceJudge, queries, seconds) and saves
image grids (reconstruction beside the nearest private photo) under docs/images/.

The attacker's prior (PCAPrior) for identity c is learned from the *held-out* photos
of the other 39 people: none of the target's private training photos, and nobody's
photo of c (checked by PCAPrior(private=...)).

    nice .venv/bin/python benchmarks/miface_att.py whitebox --kinds softmax,mlp,dae
    nice .venv/bin/python benchmarks/miface_att.py whitebox --kinds softmax --data-seeds 0,1,2,3
    (the improved white-box row on other 7/3 train/test splits of AT&T: per split its own
    target, evaluation CNN and priors; one table, with mean, sd and splits >= 0.95)
    nice .venv/bin/python benchmarks/miface_att.py blackbox --http --budget 20000 --grid
    (the black-box run also records the best image after 1k/2.5k/5k/10k/20k queries:
    the curve of identity and likeness against queries, plotted to
    docs/images/miface_curve_KIND_GRADIENT.png)
    nice .venv/bin/python benchmarks/miface_att.py fd --labels 3 --paper-labels 1
    nice .venv/bin/python benchmarks/miface_att.py rounding --labels 10 --objective margin
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from mlinvert.attacks import (
    AttackResult,
    Exact,
    FiniteDifferences,
    MIFace,
    MIFaceConfig,
    PCAPrior,
    Pixel,
)
from mlinvert.attacks.gradients import GradientSource, parse_gradient
from mlinvert.attacks.spaces import DAECode
from mlinvert.data import load
from mlinvert.data.base import ImageDataset
from mlinvert.defenses import Predictor, parse_policy
from mlinvert.errors import DataError
from mlinvert.evaluation.faces import FaceJudge
from mlinvert.oracle import LocalOracle, WhiteBoxOracle

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "att_faces"
OUT = ROOT / "benchmarks" / "out"
IMAGES = ROOT / "docs" / "images"
log = logging.getLogger("miface_att")
SNAPS = (250, 500, 1000, 2500, 5000, 10_000, 20_000)  # query counts of the quality curve


def dataset(data_seed: int = 0) -> ImageDataset:
    """AT&T with the 7/3 train/test split drawn by ``data_seed`` (0: every table's split)."""
    ds = load(f"att:{DATA}", seed=data_seed)
    if not isinstance(ds, ImageDataset):
        raise DataError(f"expected the AT&T face images at {DATA}, got {type(ds).__name__}")
    return ds


def target(ds: ImageDataset, kind: str, seed: int = 0) -> Any:
    """The project's trained target of ``kind`` (cached as a model folder; a training
    ``seed`` other than 0 gets its own folder, ``KIND-seedS``, and a data set split with a
    seed other than 0 its own, ``KIND-dataD``; a cached model trained on another split
    than ``ds``'s is an error)."""
    from mlinvert.targets import load as load_model
    from mlinvert.targets.io import save
    from mlinvert.targets.training import train_target

    name = kind + (f"-data{ds.split.seed}" if ds.split.seed else "")
    folder = OUT / "models" / (name if seed == 0 else f"{name}-seed{seed}")
    if (folder / "model.json").exists():
        card = json.loads((folder / "model.json").read_text())
        if card.get("split", {}).get("train") != ds.split.train.tolist():
            raise DataError(f"{folder} was trained on another train/test split; remove it")
        return load_model(folder), folder
    t0 = time.perf_counter()
    trained = train_target(ds, kind, seed=seed)
    save(trained.model, folder, card=trained.card)
    log.info("trained %s in %.0f s", kind, time.perf_counter() - t0)
    return trained.model, folder


def aux_prior(ds: ImageDataset, label: int, k: int = 200) -> PCAPrior:
    """Eigenfaces from the held-out photos of everyone except ``label`` (117 photos, each
    also mirrored and shifted by 2 px: 702 images, ``k`` = 200 components kept) — the
    audit's prior, built by the same function."""
    from mlinvert.attacks.presets import search_space

    space: PCAPrior = search_space(ds, label, f"pca:{k}", augment=True)
    return space


def judge_for(ds: ImageDataset, seed: int = 0) -> FaceJudge:
    """FaceJudge with the project's evaluation model (training ``seed``; 0 is the judge
    of every table, other seeds measure how much the numbers owe to that one model)."""
    eval_model, _ = target(ds, "evaluation", seed)
    return FaceJudge.fit(ds, eval_model, seed=0)


def improved_whitebox(ds: ImageDataset, model: Any, kind: str, labels: list[int]) -> AttackResult:
    """The improved white-box attack (``MIFaceConfig.improved()``, exact gradients, the
    ``aux_prior`` of each identity) on every label."""
    return run_labels(
        lambda lab: MIFace(MIFaceConfig.improved(), gradient=Exact(), space=aux_prior(ds, lab)),
        WhiteBoxOracle(Predictor(model, name=kind)),
        labels,
        None,
    )


def summarise(judge: FaceJudge, result: AttackResult) -> dict[str, Any]:
    """FaceJudge summary plus cost figures of a merged result."""
    records = judge.score(result.reconstructions, result.labels)
    s = judge.summary(records)
    per = result.per_label
    s.update(
        n=len(per),
        queries_mean=float(np.mean([p["n_queries"] for p in per])),
        seconds_per_identity=float(np.mean([p["elapsed_s"] for p in per])),
        confidence_mean=(
            float(np.nanmean(result.confidence)) if np.isfinite(result.confidence).any() else None
        ),
        queries_max=max((int(p["n_queries"]) for p in per), default=0),
        succeeded=sum(p["status"] == "succeeded" for p in per),
    )
    return s


def references(judge: FaceJudge, labels: np.ndarray) -> dict[str, dict[str, Any]]:
    """The judge's reference points scored like reconstructions."""
    refs = judge.reference_points(labels, seed=0)
    return {name: judge.summary(judge.score(x, labels)) for name, x in refs.items()}


def save_grid(judge: FaceJudge, result: AttackResult, name: str, n: int = 10) -> Path:
    """Grid of the first ``n`` reconstructions beside their nearest private photo."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    sel = slice(0, n)
    grid = judge.pair_grid(result.reconstructions[sel], result.labels[sel], scale=1)
    path = IMAGES / f"{name}.png"
    grid.save(path, optimize=True)
    return path


def run_labels(
    attack_for: Callable[[int], MIFace], oracle: Any, labels: list[int], budget: int | None
) -> AttackResult:
    """Run ``attack_for(label)`` on every label; one merged result."""
    parts = []
    for lab in labels:
        r = attack_for(lab).run(oracle, lab, seed=0, budget=budget)
        log.info(
            "label %d: %s %d q (%d q/iter) %.1f s conf %.3f",
            lab,
            r.status,
            r.n_queries,
            r.per_label[0]["queries_per_iteration"],
            r.elapsed_s,
            r.confidence[0],
        )
        parts.append(r)
    return AttackResult.merge(parts)


def row(name: str, s: dict[str, Any]) -> str:
    """One Markdown table row."""

    def f(key: str, fmt: str = "{:.2f}") -> str:
        v = s.get(key)
        return "-" if v is None else fmt.format(v)

    return (
        f"| {name} | {f('eval_top1')} | {f('eval_top5')} | {f('likeness')} | "
        f"{f('lineup_correct')} | {f('pixel_nn_correct')} | {f('ssim')} | "
        f"{f('queries_mean', '{:.0f}')} | {f('seconds_per_identity')} |"
    )


def source(args: argparse.Namespace) -> GradientSource:
    """The black-box gradient source the command line asks for (the attack CLI's parser)."""
    return parse_gradient(args.gradient, samples=args.samples, sigma=args.sigma)


def curve(res: AttackResult, class_names: tuple[str, ...]) -> dict[str, AttackResult]:
    """Rows of the quality-vs-queries curve: the best image after each of SNAPS queries
    (a run that stopped earlier keeps its final image for the later points)."""
    from mlinvert.attacks.base import decode_array

    parts = res.extra.get("parts") or [res.extra]
    rows: dict[str, AttackResult] = {}
    for q in SNAPS:
        imgs, labs = [], []
        for part, final, lab in zip(parts, res.reconstructions, res.labels, strict=True):
            snaps = [s for s in part.get("snapshots", []) if s["queries"] == q]
            imgs.append(decode_array(snaps[0]["image"]) if snaps else final)
            labs.append(int(lab))
        rows[f"best image after {q} queries"] = AttackResult(
            attack="miface",
            reconstructions=np.stack(imgs),
            labels=np.asarray(labs),
            class_names=class_names,
            confidence=np.full(len(labs), np.nan),
            per_label=[{"n_queries": q, "elapsed_s": 0.0, "status": "succeeded"} for _ in labs],
            n_queries=q,
            elapsed_s=0.0,
            seed=0,
            config={},
            status="succeeded",
        )
    return rows


def plot_curve(
    rows: dict[str, dict[str, Any]],
    final: dict[str, Any],
    template: dict[str, Any],
    title: str,
    name: str,
) -> Path:
    """Evaluation top-1 and likeness of the best image after each of SNAPS queries, up to
    the most queries any identity spent, then the final images (``final``, at that
    count), beside the likeness of the noise-template reference (``template``): the level
    a reconstruction must clearly beat to be more than a discriminative template."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spent = int(final["queries_max"])
    qs = [q for q in SNAPS if f"best image after {q} queries" in rows and 1.25 * q < spent]
    pts = [rows[f"best image after {q} queries"] for q in qs] + [final]
    qs.append(spent)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(qs, [p["eval_top1"] for p in pts], "o-", label="evaluation top-1")
    ax.plot(qs, [p["likeness"] for p in pts], "s-", label="likeness")
    ax.axhline(template["likeness"], color="grey", ls=":", label="noise template likeness")
    ax.set_xscale("log")
    ax.set_xticks(qs, [f"{q:,}" for q in qs], fontsize=8)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(0, 1)
    ax.set_xlabel("queries per identity")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    IMAGES.mkdir(parents=True, exist_ok=True)
    path = IMAGES / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def split_table(data_seeds: list[int], kinds: list[str], n_labels: int) -> dict[str, Any]:
    """The improved white-box row on the 7/3 splits drawn by ``data_seeds``: per split its
    own targets, evaluation CNN (training seed 0) and priors (that split's held-out photos
    of the other people). Prints one Markdown table, then mean, sd (n - 1) and how many
    splits reach 0.95."""
    cols = ["held_out_photo"] + [f"{k}: {m}" for k in kinds for m in ("top1", "top5", "likeness")]
    print(
        "| split seed | held-out photo top-1 |"
        + "".join(f" {k} top-1 | {k} top-5 | {k} likeness |" for k in kinds)
    )
    print("|---" * len(cols) + "|---|")
    table: dict[str, dict[str, float]] = {}
    for data_seed in data_seeds:
        ds = dataset(data_seed)
        judge = judge_for(ds)
        labels = list(range(min(n_labels, ds.n_classes)))
        ref = references(judge, np.asarray(labels))["held_out_photo"]
        cells = {"held_out_photo": float(ref["eval_top1"])}
        for kind in kinds:
            model, _ = target(ds, kind)
            s = summarise(judge, improved_whitebox(ds, model, kind, labels))
            cells[f"{kind}: top1"] = s["eval_top1"]
            cells[f"{kind}: top5"] = s["eval_top5"]
            cells[f"{kind}: likeness"] = s["likeness"]
        table[str(data_seed)] = cells
        print(f"| {data_seed} | " + " | ".join(f"{cells[c]:.3f}" for c in cols) + " |", flush=True)
    values = {c: np.asarray([cells[c] for cells in table.values()]) for c in cols}
    sd = {c: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan") for c, v in values.items()}
    at_bar = {c: int(np.sum(v >= 0.95 - 1e-9)) for c, v in values.items()}
    n = len(table)
    print("| mean | " + " | ".join(f"{values[c].mean():.3f}" for c in cols) + " |")
    print("| sd | " + " | ".join(f"{sd[c]:.3f}" for c in cols) + " |")
    print(
        "| splits >= 0.95 | "
        + " | ".join(f"{at_bar[c]}/{n}" if "likeness" not in c else "-" for c in cols)
        + " |"
    )
    return {
        "splits": table,
        "mean": {c: float(v.mean()) for c, v in values.items()},
        "sd": sd,
        "splits_at_0.95": at_bar,
    }


HEADER = (
    "| attack | eval top-1 | top-5 | likeness | lineup | pixel-NN | SSIM | queries/id "
    "| s/id |\n|---|---|---|---|---|---|---|---|---|"
)


@contextmanager
def http_oracle(folder: Path, name: str, policy: str = "full") -> Iterator[Any]:
    """The real service on a loopback port and an HttpOracle with a fresh key."""
    from mlinvert.oracle.http import HttpOracle
    from mlinvert.service.runner import ServiceProcess
    from mlinvert.service.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "svc.sqlite3"
        store = Store(db)
        key = store.create_key("miface-bench")[0]
        store.close()
        with ServiceProcess([f"{name}={folder}"], db=db, policy=policy, startup_timeout=240) as svc:
            oracle = HttpOracle(svc.model_url(name), key)
            try:
                yield oracle
            finally:
                oracle.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["whitebox", "blackbox", "fd", "rounding"])
    p.add_argument("--kinds", default="softmax")
    p.add_argument("--labels", type=int, default=40, help="first N identities")
    p.add_argument("--budget", type=int, default=20_000)
    p.add_argument("--paper-labels", type=int, default=40, help="identities for paper rows")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument(
        "--iters", type=int, default=450, help="black-box iterations (450 x 41 = 18 450 queries)"
    )
    p.add_argument("--sigma", type=float, default=0.02)
    p.add_argument(
        "--gradient",
        choices=["nes", "broyden"],
        default="nes",
        help="black-box and rounding rows: NES (--samples pairs) or Broyden (step --sigma)",
    )
    p.add_argument(
        "--objective",
        choices=["prob", "log", "margin"],
        default="margin",
        help="objective of the rounding sweep (prob = the paper's 1 - p cost)",
    )
    p.add_argument(
        "--no-confidence-stop",
        action="store_true",
        help="rounding sweep: no gamma stop (run until patience, max_iter or the budget)",
    )
    p.add_argument("--http", action="store_true", help="black-box over the real HTTP service")
    p.add_argument("--grid", action="store_true", help="save image grids under docs/images")
    p.add_argument(
        "--judge-seeds",
        default="",
        help="also score every row with evaluation models trained with these seeds (1,2,3)",
    )
    p.add_argument(
        "--data-seeds",
        default="",
        help="whitebox: only the improved row (no paper rows), on the train/test splits drawn "
        "by these seeds (0,1,...,7), each with its own targets, judge and priors; one table",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.data_seeds:
        if args.what != "whitebox" or args.judge_seeds or args.grid:
            p.error("--data-seeds is for whitebox, without --judge-seeds and --grid")
        data_seeds = [int(v) for v in args.data_seeds.split(",") if v.strip()]
        kinds = args.kinds.split(",")
        splits = split_table(data_seeds, kinds, args.labels)
        OUT.mkdir(parents=True, exist_ok=True)
        out = OUT / "miface_whitebox_splits.json"
        out.write_text(json.dumps({"kinds": kinds, "labels": args.labels} | splits, indent=1))
        return 0
    ds = dataset(0)
    judge = judge_for(ds)
    others = {int(v): judge_for(ds, int(v)) for v in args.judge_seeds.split(",") if v.strip()}
    labels = list(range(min(args.labels, ds.n_classes)))
    lab_arr = np.asarray(labels)
    summary: dict[str, Any] = {"what": args.what, "labels": len(labels), "rows": {}}
    print(HEADER)
    refs = references(judge, lab_arr)
    for name, s in refs.items():
        print(row(f"reference: {name}", s))
    for seed, other in others.items():
        for name, s in references(other, lab_arr).items():
            summary["rows"][f"reference: {name}, judge seed {seed}"] = s
            print(row(f"reference: {name}, judge seed {seed}", s))
    for kind in args.kinds.split(","):
        model, folder = target(ds, kind)
        results: dict[str, AttackResult] = {}
        if args.what == "whitebox":
            wb = WhiteBoxOracle(Predictor(model, name=kind))
            for start in ("zero", "grey") if args.paper_labels else ():

                def paper_pixel(lab: int, start: str = start) -> MIFace:
                    return MIFace(MIFaceConfig.paper(start=start), gradient=Exact(), space=Pixel())

                results[f"paper (pixel, GD on 1-p, x0={start})"] = run_labels(
                    paper_pixel, wb, labels[: args.paper_labels], None
                )
            if kind == "dae" and args.paper_labels:
                code_space = DAECode(model)

                def paper_code(lab: int, sp: DAECode = code_space) -> MIFace:
                    return MIFace(MIFaceConfig.paper(), gradient=Exact(), space=sp)

                results["paper (DAE code space + Process)"] = run_labels(
                    paper_code, wb, labels[: args.paper_labels], None
                )
            results["improved (PCA prior ball, Adam)"] = improved_whitebox(ds, model, kind, labels)
        elif args.what == "blackbox":

            def bb_attack(lab: int) -> MIFace:
                return MIFace(
                    MIFaceConfig.improved(max_iter=args.iters, snapshot_queries=SNAPS),
                    gradient=source(args),
                    space=aux_prior(ds, lab),
                )

            shown = args.gradient.upper() if args.gradient == "nes" else "Broyden"
            if args.http:
                with http_oracle(folder, kind) as oracle:
                    res = run_labels(bb_attack, oracle, labels, args.budget)
                results[f"{shown} in PCA prior ball, HTTP"] = res
            else:
                res = run_labels(
                    bb_attack, LocalOracle(Predictor(model, name=kind)), labels, args.budget
                )
                results[f"{shown} in PCA prior ball, in-process"] = res
            results.update(curve(res, ds.class_names))
        elif args.what == "fd":
            oracle = LocalOracle(Predictor(model, name=kind))
            results["paper FD (pixel, forward, d+1 q/iter)"] = run_labels(
                lambda lab: MIFace(
                    MIFaceConfig.paper(max_iter=20),
                    gradient=FiniteDifferences(step=0.01),
                    space=Pixel(),
                ),
                oracle,
                labels[: args.paper_labels],
                None,
            )
            for central, per_iter in ((False, "forward, d+1"), (True, "central, 2d")):

                def fd_prior(lab: int, central: bool = central) -> MIFace:
                    return MIFace(
                        MIFaceConfig.improved(max_iter=500),
                        gradient=FiniteDifferences(step=0.5, central=central),
                        space=aux_prior(ds, lab),
                    )

                results[f"FD in PCA prior ({per_iter} q/iter)"] = run_labels(
                    fd_prior, oracle, labels, args.budget
                )
        elif args.what == "rounding":
            for policy, shown in [
                ("full", "none"),
                ("round:3", "0.001"),
                ("round:2", "0.01"),
                ("round-to:0.05", "0.05"),
                ("round-to:0.1", "0.1"),
            ]:
                oracle = LocalOracle(Predictor(model, name=kind, policy=parse_policy(policy)))
                gamma = None if args.no_confidence_stop else 1.0
                row_name = f"{args.gradient}/PCA ({args.objective}, gamma {gamma}), r={shown}"

                def rounded(lab: int, gamma: float | None = gamma) -> MIFace:
                    return MIFace(
                        MIFaceConfig.improved(
                            max_iter=args.iters, objective=args.objective, target_confidence=gamma
                        ),
                        gradient=source(args),
                        space=aux_prior(ds, lab),
                    )

                results[row_name] = run_labels(rounded, oracle, labels, args.budget)
        kind_rows: dict[str, dict[str, Any]] = {}
        for name, res in results.items():
            s = summarise(judge, res)
            summary["rows"][f"{kind}: {name}"] = kind_rows[name] = s
            print(row(f"{kind}: {name}", s), flush=True)
            for seed, other in others.items():
                summary["rows"][f"{kind}: {name}, judge seed {seed}"] = o = summarise(other, res)
                print(row(f"{kind}: {name}, judge seed {seed}", o), flush=True)
            if args.grid:
                slug = "".join(ch if ch.isalnum() else "_" for ch in f"{kind}_{name}")[:60]
                print(f"  grid: {save_grid(judge, res, 'miface_' + slug)}", file=sys.stderr)
        if args.what == "blackbox":
            title = f"{kind}, {args.gradient}, {'HTTP' if args.http else 'in-process'}"
            slug = f"miface_curve_{kind}_{args.gradient}"
            final = kind_rows[next(iter(results))]  # the attack's own row comes first
            plot = plot_curve(kind_rows, final, refs["noise_template"], title, slug)
            print(f"  curve: {plot}", file=sys.stderr)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"miface_{args.what}.json").write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
