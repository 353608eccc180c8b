"""DP-SGD against MI-Face on AT&T: accuracy cost and what the audit's attacks recover.

For each target kind (softmax, MLP, CNN, DAE) and privacy target epsilon (inf = the project's
cached non-DP model; otherwise DP-SGD with ``mlinvert.targets.training.dp_config``,
delta 1e-5, models cached under benchmarks/out/models/KIND-dp-epsE), trained on all 40
people's private photos: test accuracy, then the audit's white-box and black-box
MI-Face (``mlinvert.attacks.presets`` builders and preset, eigenface prior from the
other people's held-out photos) on the first ``--labels`` people, judged by FaceJudge
with the cached evaluation model exactly as benchmarks/miface_att.py does: evaluation
top-1, mean likeness, and the audit's "recovered" share (top-1 right and likeness >=
the audit's threshold). A control row trains the same way with clipping but no noise
(not private). Prints a Markdown table; writes benchmarks/out/dp_faces.json (--json).

``--public none,head,finetune`` (DAE only) repeats the DAE rows with public pre-training:
both autoencoder layers and the decoder learned from scikit-image's LFW face crops at no
privacy cost (``mlinvert.targets.training.public_pretrain``), then only the head or the
fine-tuning reads the private photos (DP-SGD for finite epsilon, the clip-only SGD for the
control, AdamW for inf).

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/dp_faces.py --labels 10
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/dp_faces.py --labels 40 \
        --kinds softmax --json benchmarks/out/dp_faces_softmax40.json
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/dp_faces.py --labels 10 --kinds dae \
        --epsilons inf,nan,32,8,1 --public none,head,finetune \
        --json benchmarks/out/dp_faces_dae_public.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from miface_att import DATA, OUT, judge_for, target
from mlinvert.attacks import AttackResult
from mlinvert.attacks.presets import build_attack, preset_for, search_space
from mlinvert.audit.config import LIKENESS_THRESHOLD
from mlinvert.audit.records import is_recovered
from mlinvert.data import load
from mlinvert.data.base import ImageDataset
from mlinvert.defenses import Predictor
from mlinvert.evaluation.faces import FaceJudge
from mlinvert.oracle import LocalOracle, WhiteBoxOracle

log = logging.getLogger("dp_faces")


def dp_target(
    ds: ImageDataset, kind: str, epsilon: float, private: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """The DP-SGD model of ``kind`` at ``epsilon`` (seed 0), cached as a model folder;
    ``private`` (the DAE): pre-trained on the public LFW faces, then only that stage
    (``head`` or ``finetune``) DP-SGD on the private photos. Epsilon inf with ``private``:
    the same public pre-training, then that stage without DP (AdamW)."""
    from mlinvert.targets import load as load_model
    from mlinvert.targets.io import read_card, save
    from mlinvert.targets.training import dp_config, public_pretrain, train_target

    public = None if private is None else public_pretrain("lfw", private)
    tag = "" if private is None else f"-public-lfw-{private}"
    private_dp = math.isfinite(epsilon)
    folder = OUT / "models" / (f"{kind}-dp-eps{epsilon:g}{tag}" if private_dp else f"{kind}{tag}")
    if not (folder / "model.json").exists():
        dp = dp_config(kind, epsilon, private=private) if private_dp else None
        trained = train_target(ds, kind, seed=0, dp=dp, public=public)
        save(trained.model, folder, card=trained.card)
        log.info(
            "trained %s at epsilon %g in %.0f s",
            folder.name,
            epsilon,
            trained.card["train_seconds"],
        )
    return load_model(folder), read_card(folder)


def clip_only_target(ds: ImageDataset, kind: str, private: str | None = None) -> Any:
    """Control: ``kind`` trained by the DP-SGD procedure at epsilon 8's schedule (public
    normalisation, Poisson batches, per-example clipping) but with no noise — not
    private; separates what the noise does from what the training procedure does."""
    import torch

    from mlinvert.targets._torch import seeded, torch_threads
    from mlinvert.targets.dp import PUBLIC_PIXEL_STATS
    from mlinvert.targets.dp_sgd import dp_sgd
    from mlinvert.targets.training import DP_CNN, dp_config, face_config, make_face_model

    if kind == "dae":  # the DP DAE's own staged training, noise set to 0
        return _clip_only_dae(ds, private)
    dp = dp_config(kind, 8.0)
    config = face_config(kind, seed=0, quick=False)
    if kind == "cnn":  # the network train_target gives a DP CNN
        config = replace(config, **DP_CNN)
    model = make_face_model(kind, config)
    x, y = ds.train()
    with seeded(0), torch_threads(1):
        net = model._build(ds.image_shape, ds.n_classes, *PUBLIC_PIXEL_STATS)
        if kind == "softmax":  # as SoftmaxRegression's DP path: from zero weights
            for param in net.parameters():
                torch.nn.init.zeros_(param)
        q = dp.batch_size / x.shape[0]
        dp_sgd(
            net,
            torch.from_numpy(x),
            torch.from_numpy(y),
            noise_multiplier=0.0,
            clip=dp.clip,
            sample_rate=q,
            steps=round(dp.epochs / q),
            lr=dp.lr,
            momentum=dp.momentum,
        )
    net.eval()
    model.net_ = net
    model.class_names_ = ds.class_names
    model.classes_ = np.arange(ds.n_classes)
    model.input_shape_ = ds.image_shape
    return model


def _clip_only_dae(ds: ImageDataset, private: str | None) -> Any:
    """The DP DAE (``DP_DAE``, the four stages of ``dp_config("dae", 8)``; with ``private``
    the public pre-training and that one stage) trained with every DP stage's clipping and
    batches but a noise multiplier of 0: not private."""
    from unittest import mock

    from mlinvert.targets import dp_sgd
    from mlinvert.targets.training import dp_config, public_pretrain, train_target

    public = None if private is None else public_pretrain("lfw", private)
    with mock.patch.object(dp_sgd, "noise_for_schedule", return_value=0.0):
        trained = train_target(
            ds, "dae", seed=0, dp=dp_config("dae", 8.0, private=private), public=public
        )
    model = trained.model
    model.privacy_ = None  # no guarantee at all
    return model


def attack_all(
    model: Any, name: str, attack: str, labels: list[int], spaces: dict[int, Any], preset: Any
) -> AttackResult:
    """The audit's ``attack`` on every label against ``model`` (full-precision scores)."""
    parts = []
    for label in labels:
        predictor = Predictor(model, name=name)
        oracle: Any
        if attack == "whitebox":
            oracle, budget = WhiteBoxOracle(predictor), None
        else:
            oracle, budget = LocalOracle(predictor, account=f"dp-{name}"), preset.budget
        built = build_attack(attack, preset, preset.budget, spaces[label], policy="full")
        parts.append(built.run(oracle, label, seed=0, budget=budget))
    return AttackResult.merge(parts)


def judged(
    judge: FaceJudge, images: np.ndarray, labels: np.ndarray, per_label: list[dict[str, Any]]
) -> dict[str, Any]:
    """Evaluation top-1, likeness and the audit's recovered share (its own ``is_recovered``
    rule) of reconstructions ``images`` of ``labels``; mean queries per person."""
    records = judge.score(images, labels)
    s = judge.summary(records)
    return {
        "eval_top1": s["eval_top1"],
        "likeness": s["likeness"],
        "recovered": float(np.mean([is_recovered(r) for r in records])),
        "queries_mean": float(np.mean([p.get("n_queries", 0) for p in per_label] or [0])),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--labels", type=int, default=10, help="attack the first N people")
    p.add_argument("--kinds", default="softmax,mlp")
    p.add_argument(
        "--epsilons",
        default="inf,nan,8,2,1",
        help="inf = the project's non-DP model; nan = the clip-only control (no noise)",
    )
    p.add_argument(
        "--public",
        default="none",
        help="DAE: none (no public pre-training) and/or head, finetune (public LFW "
        "pre-training, then that stage on the private photos), comma-separated",
    )
    p.add_argument("--json", type=Path, default=OUT / "dp_faces.json", help="results file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not (DATA / "s1" / "1.pgm").is_file():
        print(f"AT&T faces not found at {DATA}; this benchmark needs them", file=sys.stderr)
        return 2
    ds = load(f"att:{DATA}", seed=0)
    assert isinstance(ds, ImageDataset)
    judge = judge_for(ds)
    preset = preset_for(ds.image_shape, quick=False)
    labels = list(range(min(args.labels, ds.n_classes)))
    spaces = {lab: search_space(ds, lab, preset.space, augment=preset.augment) for lab in labels}
    x_test, y_test = ds.test()
    lab = np.asarray(labels)
    refs = {
        name: judged(judge, x, lab, [])
        for name, x in judge.reference_points(lab, seed=0).items()
        if name in ("noise_template", "held_out_photo")
    }
    rows: list[dict[str, Any]] = []
    publics = [None if m.strip() == "none" else m.strip() for m in args.public.split(",")]
    runs = [
        (kind, private, eps)
        for kind in [k.strip() for k in args.kinds.split(",")]
        for private in (publics if kind == "dae" else [None])
        for eps in [float(e) for e in args.epsilons.split(",")]
    ]
    for kind, private, eps in runs:
        t0 = time.perf_counter()
        if math.isnan(eps):
            model, card, training = clip_only_target(ds, kind, private), {}, "sgd-clip-no-noise"
        elif math.isinf(eps) and private is None:
            model, folder = target(ds, kind)
            card = json.loads((Path(folder) / "model.json").read_text())
            training = "lbfgs" if kind in ("softmax", "mlp") else "adamw"
        elif math.isinf(eps):
            model, card = dp_target(ds, kind, eps, private)
            training = "adamw"
        else:
            model, card = dp_target(ds, kind, eps, private)
            training = "dp-sgd"
        row: dict[str, Any] = {
            "kind": kind,
            "public": None if private is None else f"lfw, then private {private}",
            "training": training,
            "epsilon_target": eps if math.isfinite(eps) else None,
            "privacy": card.get("privacy"),
            "test_accuracy": float(np.mean(model.predict(x_test) == y_test)),
            "train_seconds": card.get("train_seconds"),
        }
        if kind == "dae":  # the decoder the code-space attack would decode through
            recon = model.decode(model.encode(x_test))
            row["test_reconstruction_mse"] = float(((recon - x_test) ** 2).mean())
        name = f"{kind}-{training}-eps{eps:g}" + ("" if private is None else f"-pub-{private}")
        for attack in ("whitebox", "blackbox"):
            res = attack_all(model, name, attack, labels, spaces, preset)
            row[attack] = judged(judge, res.reconstructions, res.labels, res.per_label)
            row[attack]["seconds"] = float(res.elapsed_s)
        rows.append(row)
        log.info("%s done in %.0f s: %s", name, time.perf_counter() - t0, row)
    doc = {
        "command": "OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/dp_faces.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "labels": labels,
        "preset": {"budget": preset.budget, "space": preset.space},
        "likeness_threshold": LIKENESS_THRESHOLD,
        "references": refs,
        "rows": rows,
    }
    out: Path = args.json
    out.write_text(json.dumps(doc, indent=2) + "\n")

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.0f} %"

    print(
        "| model | epsilon (achieved) | noise mult. | test acc. | white-box top-1 | likeness "
        "| recovered | black-box top-1 | likeness | recovered | black-box queries/id |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pr = r["privacy"]
        if pr is not None:
            eps_text = f"{r['epsilon_target']:g} ({pr['epsilon']:.2f})"
        elif r["training"] == "sgd-clip-no-noise":
            eps_text = "inf: clip-only SGD control"
        else:
            eps_text = f"inf (no DP, {'L-BFGS' if r['training'] == 'lbfgs' else 'AdamW'})"
        model_text = r["kind"] + ("" if not r.get("public") else f" (public {r['public']})")
        sigma = "-" if pr is None else f"{pr['noise_multiplier']:.2f}"
        w, b = r["whitebox"], r["blackbox"]
        print(
            f"| {model_text} | {eps_text} | {sigma} | {pct(r['test_accuracy'])} | "
            f"{pct(w['eval_top1'])} | {w['likeness']:.2f} | {pct(w['recovered'])} | "
            f"{pct(b['eval_top1'])} | {b['likeness']:.2f} | {pct(b['recovered'])} | "
            f"{b['queries_mean']:.0f} |"
        )
    for name, s in refs.items():
        print(
            f"| reference: {name} | | | | {pct(s['eval_top1'])} | {s['likeness']:.2f} "
            f"| {pct(s['recovered'])} | | | | |"
        )
    recon_rows = [r for r in rows if "test_reconstruction_mse" in r]
    if recon_rows:
        mean_mse = float(((x_test - ds.train()[0].mean(axis=0)) ** 2).mean())
        print(f"\nDAE test reconstruction MSE (the mean training image: {mean_mse:.4f}):")
        for r in recon_rows:
            print(
                f"- {r['training']} epsilon {r['epsilon_target']}"
                + ("" if not r.get("public") else f" (public {r['public']})")
                + ": "
                f"{r['test_reconstruction_mse']:.4f}"
            )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
