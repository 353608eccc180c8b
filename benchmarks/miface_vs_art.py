"""MI-Face (mlinvert) beside IBM ART's MIFace on the same trained softmax and MLP.

Same process, same models, same identities, same judge (FaceJudge). ART runs with its
defaults (black start, threshold 0.99) and with the best setting we found (grey
start, threshold 1.0 so that only its window rule stops it, learning rate 0.1).
Needs the optional ``bench`` extra: ``pip install adversarial-robustness-toolbox``.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/miface_vs_art.py --labels 40
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from typing import Any

import numpy as np
import torch

from miface_att import HEADER, OUT, aux_prior, judge_for, row, save_grid, summarise, target
from mlinvert.attacks import AttackResult, Exact, MIFace, MIFaceConfig
from mlinvert.data import load
from mlinvert.data.base import ImageDataset
from mlinvert.defenses import Predictor
from mlinvert.errors import DataError
from mlinvert.oracle import WhiteBoxOracle

log = logging.getLogger("miface_vs_art")


def art_run(
    model: Any, labels: list[int], *, start: float, threshold: float, max_iter: int
) -> AttackResult:
    """ART's MIFace on ``model`` (softmax outputs, so it climbs probabilities as we do)."""
    from art.attacks.inference.model_inversion import MIFace as ArtMIFace
    from art.estimators.classification import PyTorchClassifier

    # A frozen copy: ART needs only input gradients, and without this its
    # PyTorchClassifier also back-propagates into every weight on each of its up to
    # 10 000 iterations (3.5x slower on the MLP, same images).
    net = torch.nn.Sequential(copy.deepcopy(model.net_), torch.nn.Softmax(dim=1))
    net.requires_grad_(False)
    h, w = model.input_shape_
    clf = PyTorchClassifier(
        model=net,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=(h, w),
        nb_classes=len(model.classes_),
        clip_values=(0.0, 1.0),
    )
    attack = ArtMIFace(
        clf, max_iter=max_iter, threshold=threshold, learning_rate=0.1, verbose=False
    )
    recons: list[np.ndarray] = []
    per: list[dict[str, Any]] = []
    for lab in labels:
        t0 = time.perf_counter()
        x0 = np.full((1, h, w), start, dtype=np.float32)
        x = attack.infer(x0, np.asarray([lab]))
        dt = time.perf_counter() - t0
        conf = float(model.predict_proba(x)[0, lab])
        recons.append(x[0])
        per.append(
            {
                "label": lab,
                "n_queries": 0,
                "elapsed_s": dt,
                "status": "succeeded",
                "confidence": conf,
            }
        )
        log.info("ART label %d: %.1f s conf %.3f", lab, dt, conf)
    return AttackResult(
        attack="art-miface",
        reconstructions=np.stack(recons),
        labels=np.asarray(labels),
        class_names=tuple(model.class_names_),
        confidence=np.asarray([p["confidence"] for p in per]),
        per_label=per,
        n_queries=0,
        elapsed_s=sum(p["elapsed_s"] for p in per),
        seed=None,
        config={"start": start, "threshold": threshold, "max_iter": max_iter},
        status="succeeded",
    )


def ours(model: Any, ds: Any, labels: list[int]) -> AttackResult:
    """mlinvert MI-Face, improved mode, PCA prior from other people's held-out photos."""
    oracle = WhiteBoxOracle(Predictor(model, name=model.kind))
    parts = []
    for lab in labels:
        attack = MIFace(
            MIFaceConfig.improved(),
            gradient=Exact(),
            space=aux_prior(ds, lab),
        )
        parts.append(attack.run(oracle, lab, seed=0))
    return AttackResult.merge(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kinds", default="softmax,mlp")
    p.add_argument("--labels", type=int, default=40)
    p.add_argument("--grid", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from miface_att import DATA

    ds = load(f"att:{DATA}", seed=0)
    if not isinstance(ds, ImageDataset):
        raise DataError(f"expected the AT&T face images at {DATA}, got {type(ds).__name__}")
    judge = judge_for(ds)
    labels = list(range(min(args.labels, ds.n_classes)))
    print(HEADER)
    summary: dict[str, Any] = {}
    for kind in args.kinds.split(","):
        model, _ = target(ds, kind)
        runs = [
            ("mlinvert MI-Face (PCA prior ball, Adam)", ours(model, ds, labels)),
            (
                "ART MIFace defaults",
                art_run(model, labels, start=0.0, threshold=0.99, max_iter=10000),
            ),
            (
                "ART MIFace best (grey, thr 1.0)",
                art_run(model, labels, start=0.5, threshold=1.0, max_iter=10000),
            ),
        ]
        for name, res in runs:
            s = summarise(judge, res)
            summary[f"{kind}: {name}"] = s
            print(row(f"{kind}: {name}", s), flush=True)
            if args.grid:
                slug = "".join(ch if ch.isalnum() else "_" for ch in f"{kind}_{name}")[:50]
                save_grid(judge, res, "vs_art_" + slug)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "miface_vs_art.json").write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
