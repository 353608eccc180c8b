"""The issue-19 rows beside the priors on AT&T: ART's MIFace and the black-box curve.

Same targets as ``priors_dev.py att`` (cached under benchmarks/out/priors/models), same
independent judge (dlib, enrolled with each person's private photos), all 40 people:

    nice -n 10 python benchmarks/priors_rows.py art --kinds softmax --max-iter 10000
    nice -n 10 python benchmarks/priors_rows.py blackbox --kinds softmax,mlp \\
        --gradient broyden --space today --budget 20000

``art``: IBM ART's ``MIFace`` at the best setting found earlier (grey start, threshold 1.0
so only ``max_iter`` stops it, learning rate 0.1) on a frozen copy of the same network.
``ceiling`` / ``ceiling-dev``: what each ``--space`` (comma-separated) can draw of each
person at best, their own photo projected into it (a bound, not an attack).
``blackbox``: improved MI-Face over real HTTP (``mlinvert serve`` on loopback, raw binary
requests, full scores), every query counted; the best image after each of SNAPS queries
is judged, giving top-1 and the 5-way lineup against queries per person (table and plot).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from priors_dev import OUT, att_dataset, spaces, table, target  # noqa: E402

IMAGES = ROOT / "docs" / "images"
SNAPS = (500, 1000, 2000, 5000, 10_000, 20_000)
log = logging.getLogger("priors_rows")


def judge_for(ds: Any) -> Any:
    """The independent judge enrolled with every person's private photos."""
    from mlinvert.evaluation.recogniser import IndependentJudge

    x_train, y_train = ds.train()
    return IndependentJudge.enrol(x_train, y_train, ds.n_classes)


def art_rows(ds: Any, kinds: list[str], max_iter: int) -> list[dict[str, Any]]:
    """ART's MIFace (best setting, ``max_iter`` iterations) on every person."""
    from miface_vs_art import art_run

    judge = judge_for(ds)
    labels = list(range(ds.n_classes))
    rows = []
    for kind in kinds:
        res = art_run(target(ds, kind, "att"), labels, start=0.5, threshold=1.0, max_iter=max_iter)
        s = judge.summary(judge.score(res.reconstructions, res.labels))
        space = f"ART MIFace (pixels, grey start, lr 0.1, {max_iter} iterations)"
        rows.append(
            {"set": "att", "target": kind, "space": space, "s_per_person": res.elapsed_s / 40, **s}
        )
        log.info("%s", json.dumps(rows[-1], default=float))
        np.save(OUT / f"att-{kind}-zz-ART-MIFace.npy", res.reconstructions)
    return rows


def blackbox_rows(ds: Any, kind: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """MI-Face through the real service in ``args.space``; one row per snapshot and the
    final images."""
    from miface_att import http_oracle
    from mlinvert.attacks import AttackResult, MIFace, MIFaceConfig
    from mlinvert.attacks.gradients import parse_gradient

    (row_name, space_for), *_ = spaces(ds, [args.space]).items()
    judge = judge_for(ds)
    labels = list(range(ds.n_classes))
    folder = OUT / "models" / f"att-{kind}"
    target(ds, kind, "att")
    config = MIFaceConfig.improved(max_iter=args.iters, snapshot_queries=SNAPS)
    parts = []
    with http_oracle(folder, kind) as oracle:
        for lab in labels:
            attack = MIFace(config, gradient=parse_gradient(args.gradient), space=space_for(lab))
            parts.append(attack.run(oracle, lab, seed=0, budget=args.budget))
            log.info(
                "%s label %d: %d queries %.1f s",
                kind,
                lab,
                parts[-1].n_queries,
                parts[-1].elapsed_s,
            )
    res = AttackResult.merge(parts)
    base = {"set": "att", "target": kind, "gradient": args.gradient, "space": row_name}
    rows = []
    for q in SNAPS:
        imgs = [_snapshot(p, q) for p in parts]
        s = judge.summary(judge.score(np.stack(imgs), np.asarray(labels)))
        rows.append({**base, "queries": q, **s})
    spent = [p.n_queries for p in parts]
    s = judge.summary(judge.score(res.reconstructions, res.labels))
    secs = float(np.mean([p.elapsed_s for p in parts]))
    rows.append(
        {
            **base,
            "queries": "final",
            "queries_mean": float(np.mean(spent)),
            "queries_max": int(max(spent)),
            "s_per_person": secs,
            **s,
        }
    )
    np.save(OUT / f"blackbox-{kind}-{args.gradient}.npy", res.reconstructions)
    return rows


def ceiling_rows(ds: Any, name: str, priors: list[str]) -> list[dict[str, Any]]:
    """What each space can draw of each person at best (a bound, not an attack: it
    looks at the person's photos): the person's first held-out photo and the mean of
    their private photos, each projected into the space (its ``encode`` then ``decode``,
    inside the ball), scored by the judge."""
    judge = judge_for(ds)
    x_train, y_train = ds.train()
    x_test, y_test = ds.test()
    labels = np.arange(ds.n_classes)
    photos = {
        "a held-out photo": np.stack([x_test[y_test == c][0] for c in labels]),
        "the mean of the private photos": np.stack([x_train[y_train == c].mean(0) for c in labels]),
    }
    rows = []
    for row_name, space_for in spaces(ds, priors).items():
        for what, x in photos.items():
            drawn = np.stack([_drawn(space_for(c), x[c]) for c in labels])
            s = judge.summary(judge.score(drawn, labels))
            rows.append({"set": name, "target": "-", "space": f"{what} in {row_name}", **s})
            log.info("%s", json.dumps(rows[-1], default=float))
    return rows


def _drawn(space: Any, photo: np.ndarray) -> np.ndarray:
    """``photo`` as the space draws it: its nearest latent point inside the ball, decoded."""
    z = space.project(space.encode(photo[None])[0])
    return np.asarray(space.decode(z[None]))[0]


def _snapshot(part: Any, q: int) -> np.ndarray:
    """The best image after ``q`` queries (the final one if the run stopped before)."""
    from mlinvert.attacks.base import decode_array

    snaps = [s for s in part.extra.get("snapshots", []) if s["queries"] == q]
    return decode_array(snaps[0]["image"]) if snaps else part.reconstructions[0]


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Top-1 and lineup against queries per person, one pair of lines per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for kind in dict.fromkeys(r["target"] for r in rows):
        pts = [r for r in rows if r["target"] == kind and r["queries"] != "final"]
        qs = [r["queries"] for r in pts]
        ax.plot(qs, [r["judge_top1"] for r in pts], "o-", label=f"{kind}: top-1 of 40")
        ax.plot(qs, [r["judge_lineup5"] for r in pts], "s--", label=f"{kind}: 5-way lineup")
    ax.axhline(0.60, color="C3", ls=":", lw=1, label="bars: top-1 0.60 / lineup 0.90")
    ax.axhline(0.90, color="C3", ls=":", lw=1)
    ax.axhline(0.20, color="grey", ls=":", lw=1, label="chance lineup 0.20")
    ax.set_xscale("log")
    ax.set_xticks(list(SNAPS), [f"{q:,}" for q in SNAPS], fontsize=8)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(0, 1)
    ax.set_xlabel("queries per person (HTTP, full scores)")
    ax.set_title("Black-box MI-Face, AT&T 40 people, independent judge", fontsize=10)
    ax.legend(fontsize=7, loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curve_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: target, queries, faces found, top-1, top-5, lineup."""
    lines = [
        "| target | queries per person | faces found | top-1 | top-5 | lineup (5-way) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        q = r["queries"]
        shown = (
            f"final ({r['queries_mean']:,.0f} mean, {r['queries_max']:,} max)"
            if q == "final"
            else f"{q:,}"
        )
        lines.append(
            f"| {r['target']} | {shown} | {r['face_found']:.2f} | {r['judge_top1']:.2f} | "
            f"{r['judge_top5']:.2f} | {r['judge_lineup5']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """``art`` or ``blackbox`` (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("art", "blackbox", "ceiling", "ceiling-dev"))
    parser.add_argument("--kinds", default="softmax,mlp")
    parser.add_argument("--max-iter", type=int, default=10_000, help="ART's iterations")
    parser.add_argument("--space", default="today", help="today, a prior folder, FOLDER+SETTING")
    parser.add_argument("--gradient", default="broyden", help="broyden, nes, ...")
    parser.add_argument("--iters", type=int, default=200, help="MI-Face iterations")
    parser.add_argument("--budget", type=int, default=20_000, help="queries per person")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    OUT.mkdir(parents=True, exist_ok=True)
    if args.what.startswith("ceiling"):
        from priors_dev import dev_dataset

        name = "dev" if args.what.endswith("dev") else "att"
        ds = dev_dataset() if name == "dev" else att_dataset()
        rows = ceiling_rows(ds, name, args.space.split(","))
        tag = "-".join(Path(p).name for p in args.space.split(","))
        (OUT / f"ceiling-{name}-{tag}.json").write_text(json.dumps(rows, indent=2, default=float))
        print(table(rows))
        return
    ds = att_dataset()
    kinds = args.kinds.split(",")
    t0 = time.perf_counter()
    if args.what == "art":
        rows = art_rows(ds, kinds, args.max_iter)
        (OUT / f"art-{'-'.join(kinds)}-{args.max_iter}.json").write_text(
            json.dumps(rows, indent=2, default=float) + "\n"
        )
        print(table(rows))
        return
    rows = [r for kind in kinds for r in blackbox_rows(ds, kind, args)]
    tag = f"{'-'.join(kinds)}-{args.gradient}-{Path(args.space).name}"
    (OUT / f"blackbox-{tag}.json").write_text(json.dumps(rows, indent=2, default=float) + "\n")
    print(curve_table(rows))
    print(plot(rows, IMAGES / f"priors_blackbox_{args.gradient}.png"))
    log.info("wall %.0f s", time.perf_counter() - t0)


if __name__ == "__main__":
    main()
