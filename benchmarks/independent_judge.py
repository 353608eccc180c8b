"""The independent face judge on a face data set: its references and its cost.

Enrols every person with the mean descriptor of their private (training) photos, then
scores, for every person, each reference point of the audit (grey, uniform noise, noise
template, a held-out photo, the mean private photo) and the recognisability scale (the
held-out photo blurred by 2, 3, 4, 6 px; with pixel noise of sigma 0.1; at half
contrast). Prints a Markdown table (face found, right person top-1 / top-5 of all, exact
5-way lineup, distance, same person) and the judge's seconds per image.

    nice .venv/bin/python benchmarks/independent_judge.py --data att:../shared/data/att_faces
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mlinvert.data import ImageDataset, load
from mlinvert.evaluation.faces import FaceJudge, JudgeConfig

COLUMNS = (
    ("face_found", "face found"),
    ("judge_top1", "top-1"),
    ("judge_top5", "top-5"),
    ("judge_lineup5", "5-way lineup"),
    ("judge_distance", "distance"),
    ("judge_same_person", "same person (< 0.6)"),
)


def _probes(judge: FaceJudge, labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    points = judge.reference_points(labels, seed=seed)
    held = points["held_out_photo"]
    rng = np.random.default_rng(seed)
    points["held_out_photo + noise sigma 0.1"] = np.clip(
        held + rng.normal(0.0, 0.1, held.shape), 0, 1
    ).astype(np.float32)
    points["held_out_photo at half contrast"] = (0.5 + 0.5 * (held - 0.5)).astype(np.float32)
    return points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="att:../shared/data/att_faces")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ds = load(args.data, seed=args.seed)
    assert isinstance(ds, ImageDataset)
    t0 = time.perf_counter()
    judge = FaceJudge.fit(ds, None, seed=args.seed, config=JudgeConfig(independent=True))
    fit_s = time.perf_counter() - t0
    labels = np.arange(ds.n_classes)
    n_private = ds.split.train.size
    print(f"{ds.spec}: {ds.n_classes} people, {n_private} private photos enrolled\n")
    print("| image judged | " + " | ".join(title for _, title in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    scored, seconds = 0, 0.0
    for name, images in _probes(judge, labels, args.seed).items():
        t = time.perf_counter()
        summary = FaceJudge.summary(judge.score(images, labels))
        seconds += time.perf_counter() - t
        scored += len(labels)
        cells = [f"{summary[key]:.2f}" for key, _ in COLUMNS]
        print(f"| {name.replace('_', ' ')} | " + " | ".join(cells) + " |")
    print(
        f"\nfit (FaceJudge with the independent recogniser, {n_private} photos enrolled): "
        f"{fit_s:.1f} s; scoring {scored} images: {seconds:.1f} s, "
        f"{seconds / scored:.3f} s per image (every FaceJudge measure, the recogniser's "
        "included)"
    )


if __name__ == "__main__":
    main()
