"""Calibrate the face measures on a full data set: the reference-point table.

For every identity, ``--per-identity`` copies of each reference point (grey, uniform
noise, noise template, the target's own held-out photo, the identity's mean private
photo) plus a few interpretive probes (a held-out photo under heavy pixel noise, the
average face of everybody, another person's mean photo) are scored by ``FaceJudge``.
Prints a Markdown table (likeness mean and 10/50/90 % quantiles, its two terms,
evaluation-model top-1/top-5, pixel and eigenface nearest neighbour, 5-way lineup,
SSIM, MSE, feature distance), the lineup rate of uniform noise over many draws
(chance 20 %), and the judge's fit/score times; saves a PNG grid of the points.

    nice .venv/bin/python benchmarks/evaluation_calibration.py \
        --data att:../shared/data/att_faces --grid docs/images/evaluation_references.png

The evaluation model comes from ``mlinvert.targets.training.train_target(ds,
"evaluation", seed=...)`` when that module exists (``--no-eval-model`` skips it).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from typing import Any

import numpy as np

from mlinvert.data import ImageDataset, load
from mlinvert.data.images import save_png
from mlinvert.evaluation import FaceJudge, image_grid

COLUMNS = (
    ("identity_likeness", "a_id"),
    ("face_likeness", "a_face"),
    ("eval_top1", "eval top-1"),
    ("eval_top5", "eval top-5"),
    ("pixel_nn_correct", "pixel NN"),
    ("eigen_nn_correct", "eigen NN"),
    ("lineup_correct", "lineup"),
    ("ssim", "SSIM"),
    ("mse", "MSE"),
    ("feature_distance", "feat. dist."),
)


def train_eval_model(ds: ImageDataset, seed: int) -> Any:
    """The project's evaluation model, or None if the targets module is not there yet."""
    if importlib.util.find_spec("mlinvert.targets.training") is None:
        print("(mlinvert.targets.training not available: running without an eval model)")
        return None
    from mlinvert.targets.training import train_target

    t0 = time.perf_counter()
    trained = train_target(ds, "evaluation", seed=seed)
    X_te, y_te = ds.test()
    acc = float(np.mean(trained.model.predict(X_te) == y_te))
    print(f"evaluation model: test accuracy {acc:.3f}, trained in {time.perf_counter() - t0:.1f} s")
    return trained.model


def probes(
    judge: FaceJudge, ds: ImageDataset, labels: np.ndarray, seed: int
) -> dict[str, np.ndarray]:
    """Reference points plus interpretive probes, each one image per label."""
    rng = np.random.default_rng(seed)
    refs = judge.reference_points(labels, seed=seed)
    X, y = ds.train()
    means = np.stack([X[y == c].mean(axis=0) for c in range(ds.n_classes)]).astype(np.float32)
    photo = refs["held_out_photo"]
    noisy = photo + rng.uniform(-0.25, 0.25, size=photo.shape)
    return {
        **refs,
        "held-out photo + U(±0.25)": np.clip(noisy, 0, 1).astype(np.float32),
        "everybody's mean face": np.repeat(X.mean(axis=0)[None], labels.size, axis=0),
        "another person's mean": means[(labels + 1) % ds.n_classes],
    }


def fmt(v: Any) -> str:
    """A table cell."""
    return "—" if v is None else f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.4f}"


def main() -> None:
    """Run the calibration and print the Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="att:../shared/data/att_faces")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-identity", type=int, default=3)
    ap.add_argument("--no-eval-model", action="store_true")
    ap.add_argument("--grid", default="")
    args = ap.parse_args()

    ds = load(args.data, seed=args.seed)
    assert isinstance(ds, ImageDataset)
    model = None if args.no_eval_model else train_eval_model(ds, args.seed)
    t0 = time.perf_counter()
    judge = FaceJudge.fit(ds, model, seed=args.seed)
    fit_s = time.perf_counter() - t0
    labels = np.repeat(np.arange(ds.n_classes), args.per_identity)
    points = probes(judge, ds, labels, args.seed + 1)

    print(
        f"\n{args.data}: {ds.n_classes} identities x {args.per_identity} per point, "
        f"seed {args.seed}, eval model: {'yes' if model is not None else 'none'}\n"
    )
    head = ["point", "likeness mean", "q10 / q50 / q90"] + [c[1] for c in COLUMNS]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    score_s = 0.0
    records_of: dict[str, list[dict[str, Any]]] = {}
    for name, imgs in points.items():
        t1 = time.perf_counter()
        recs = judge.score(imgs, labels)
        score_s += time.perf_counter() - t1
        records_of[name] = recs
        s = judge.summary(recs)
        lk = np.array([r["likeness"] for r in recs])
        q = " / ".join(f"{v:.2f}" for v in np.quantile(lk, [0.1, 0.5, 0.9]))
        cells = [name, fmt(s["likeness"]), q] + [fmt(s[key]) for key, _ in COLUMNS]
        print("| " + " | ".join(cells) + " |")

    draws = np.repeat(np.arange(ds.n_classes), max(1, 2000 // ds.n_classes))
    noise = np.random.default_rng(args.seed + 2).random((draws.size, *ds.image_shape))
    lineup_noise = float(np.mean(judge.lineup_.run(noise.astype(np.float32), draws, seed=3)))
    n_scored = labels.size * len(points)
    print(f"\nlineup on uniform noise over {draws.size} draws: {lineup_noise:.3f} (chance 0.200)")
    print(
        f"judge fit {fit_s:.2f} s; scoring {1000 * score_s / n_scored:.2f} ms per image "
        f"({n_scored} images)"
    )

    if args.grid:
        show = np.arange(0, labels.size, args.per_identity)[:6]
        names = list(points)
        rows = [
            [points[n][i] for n in names] + [judge.private_photo(records_of["held_out_photo"][i])]
            for i in show
        ]
        titles = [f"{n[:14]}" for n in names] + ["private"]
        path = save_png(
            args.grid, image_grid(rows, scale=max(1, 96 // ds.image_shape[0]), col_titles=titles)
        )
        print(f"grid: {path}")
        for i in show:
            print(
                "  "
                + ds.class_names[labels[i]]
                + ": "
                + ", ".join(f"{n[:14]} {records_of[n][i]['likeness']:.2f}" for n in names)
            )


if __name__ == "__main__":
    main()
