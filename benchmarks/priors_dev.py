"""Public-face priors: development set, choice of prior, then one AT&T measurement.

The development set is people of LFW (not AT&T): 40 people with exactly 10 photos,
drawn with seed 0, 7 private / 3 held-out each at 112 x 92, a softmax and an MLP target
trained on them. The priors are trained on LFW *without* these 40 people:

    python benchmarks/priors_dev.py people > priors/dev-people.txt
    nice -n 10 mlinvert prior train --data lfw:../shared/data/lfw/faces --kind pca \\
        --size 112x92 --exclude-people priors/dev-people.txt --out priors/lfw-pca
    nice -n 10 mlinvert prior train --data lfw:../shared/data/lfw/faces --kind vae \\
        --epochs 8 --exclude-people priors/dev-people.txt --out priors/lfw-vae
    nice -n 10 mlinvert prior train --data lfw:../shared/data/lfw/faces --kind gan \\
        --epochs 25 --exclude-people priors/dev-people.txt --out priors/lfw-gan
    nice -n 10 python benchmarks/priors_dev.py dev \\
        --priors today,priors/lfw-pca,priors/lfw-vae,priors/lfw-gan
    nice -n 10 python benchmarks/priors_dev.py dev --kinds softmax \\
        --priors priors/lfw-pca+mean5-stop
    nice -n 10 python benchmarks/priors_dev.py att --priors today,priors/lfw-pca,priors/lfw-gan
    python benchmarks/priors_dev.py grid-att   (docs/images/priors_att_KIND.png)

Each row: the white-box improved MI-Face (MIFaceConfig.improved(), exact gradients) in
the given space, every person of the set, scored by the independent judge (dlib face
recogniser enrolled with the people's private photos): face found, top-1 of all
people, 5-way lineup; seconds per person.
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
LFW = ROOT.parent / "shared" / "data" / "lfw" / "faces"
OUT = ROOT / "benchmarks" / "out" / "priors"
N_DEV = 40
log = logging.getLogger("priors_dev")


def dev_people(seed: int = 0) -> list[str]:
    """40 LFW people with exactly 10 photos (seed 0 draws them; sorted names)."""
    tens = sorted(d.name for d in LFW.iterdir() if d.is_dir() and sum(1 for _ in d.iterdir()) == 10)
    pick = np.random.default_rng(seed).choice(len(tens), size=N_DEV, replace=False)
    return sorted(tens[i] for i in pick)


def dev_dataset() -> Any:
    """The development set: the 40 dev people at 112 x 92, 7 private / 3 held-out each."""
    import dataclasses

    from mlinvert.data.base import per_class_split
    from mlinvert.data.lfw import load_lfw

    people = set(dev_people())
    others = [d.name for d in LFW.iterdir() if d.is_dir() and d.name not in people]
    ds = load_lfw(LFW, exclude=others)
    return dataclasses.replace(ds, spec=f"lfw-dev:{LFW}", split=per_class_split(ds.labels, 7, 0))


def att_dataset() -> Any:
    """AT&T with every table's 7/3 split (the reported people)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from miface_att import dataset

    return dataset(0)


def target(ds: Any, kind: str, name: str) -> Any:
    """The project's ``kind`` target on ``ds`` (cached under benchmarks/out/priors)."""
    from mlinvert.targets import load as load_model
    from mlinvert.targets.io import save
    from mlinvert.targets.training import train_target

    folder = OUT / "models" / f"{name}-{kind}"
    if (folder / "model.json").exists():
        return load_model(folder)
    t0 = time.perf_counter()
    trained = train_target(ds, kind, seed=0)
    save(trained.model, folder, card=trained.card)
    log.info(
        "trained %s on %s in %.0f s (test accuracy %.3f)",
        kind,
        name,
        time.perf_counter() - t0,
        trained.card.get("test_accuracy") or float("nan"),
    )
    return trained.model


def spaces(ds: Any, priors: list[str]) -> dict[str, Any]:
    """Row name -> (label -> search space): ``today``, the eigenfaces of the other people's
    held-out photos (augmented, 200 components), or a learned prior's folder (its private
    photo check against the target's training photos)."""
    from mlinvert.attacks.presets import search_space
    from mlinvert.attacks.priors import load_prior

    rows: dict[str, Any] = {}
    private, _ = ds.train()
    for path in priors:
        if path == "today":
            rows["eigenfaces of the others' held-out photos (today)"] = lambda lab: search_space(
                ds, lab, "pca:200", augment=True
            )
            continue
        folder, _, setting = path.partition("+")
        prior = load_prior(folder)
        name = f"{prior.kind} prior {Path(folder).name}"
        if setting:
            folds, spaces_ = adapted(ds, prior, setting)
            rows[f"{name}, adapted ({setting}: {ADAPT[setting][1]})"] = (
                lambda lab, f=folds, s=spaces_: s[int(f[lab])]
            )
            continue
        bound = prior.space(private=private, shape=ds.image_shape)
        rows[name] = lambda lab, s=bound: s
    return rows


def _adapt_settings() -> dict[str, tuple[int, str, Any]]:
    """Named domain adaptations: (folds of people, description, FinetuneConfig)."""
    from mlinvert.attacks.priors import FinetuneConfig

    return {
        "adapt": (2, "all weights, 300 steps, the other half's held-out photos", FinetuneConfig()),
        "all5": (5, "all weights, 300 steps, the other 4/5's held-out photos", FinetuneConfig()),
        "all5-stop": (
            5,
            "all weights, stopped by 1/5 of the other people held out",
            FinetuneConfig(holdout=0.2),
        ),
        "mean5-stop": (
            5,
            "the mean face only, stopped by 1/5 of the other people held out",
            FinetuneConfig(train=("mean",), holdout=0.2),
        ),
        "mean5": (
            5,
            "the mean face only, 300 steps, the other 4/5's held-out photos",
            FinetuneConfig(train=("mean",)),
        ),
    }


ADAPT = _adapt_settings()


def adapted(ds: Any, prior: Any, setting: str) -> tuple[np.ndarray, list[Any]]:
    """Copies of ``prior`` fine-tuned (GLO) on the attacker's in-domain photos of other
    people: the people are cut into K folds (contiguous labels); the copy that attacks
    a fold's people is adapted to the held-out photos of every other fold. Never a photo
    of the attacked person and never a private photo (checked). Returns each label's
    fold and the folds' spaces."""
    from mlinvert.attacks.priors import finetune_prior

    k, _, config = ADAPT[setting]
    x_test, y_test = ds.test()
    private, _ = ds.train()
    fold_of = np.arange(ds.n_classes) * k // ds.n_classes
    out = []
    for f in range(k):
        others = fold_of[y_test] != f
        tuned = finetune_prior(
            prior,
            x_test[others],
            config,
            source="held-out photos of other people",
            private=private,
            groups=y_test[others],
        )
        log.info("adapted %s (%s, fold %d): %s", prior.kind, setting, f, tuned.card["finetuned"])
        out.append(tuned.space(private=private, shape=ds.image_shape))
    return fold_of, out


def attack_rows(ds: Any, name: str, kinds: list[str], priors: list[str]) -> list[dict[str, Any]]:
    """White-box improved MI-Face on every person of ``ds``, per target kind and space."""
    from mlinvert.attacks import Exact, MIFace, MIFaceConfig
    from mlinvert.defenses import Predictor
    from mlinvert.evaluation.recogniser import IndependentJudge
    from mlinvert.oracle import WhiteBoxOracle

    x_train, y_train = ds.train()
    judge = IndependentJudge.enrol(x_train, y_train, ds.n_classes)
    rows = []
    x_test, y_test = ds.test()
    ref = judge.summary(judge.score(x_test, y_test))
    rows.append({"set": name, "target": "-", "space": "a held-out photo (reference)", **ref})
    labels = list(range(ds.n_classes))
    rows_spaces = spaces(ds, priors)
    for kind in kinds:
        oracle = WhiteBoxOracle(Predictor(target(ds, kind, name), name=kind))
        for row, space_for in rows_spaces.items():
            t0 = time.perf_counter()
            recons = []
            for lab in labels:
                attack = MIFace(MIFaceConfig.improved(), gradient=Exact(), space=space_for(lab))
                recons.append(attack.run(oracle, lab, seed=0).reconstructions[0])
            seconds = (time.perf_counter() - t0) / len(labels)
            s = judge.summary(judge.score(np.stack(recons), np.asarray(labels)))
            rows.append({"set": name, "target": kind, "space": row, "s_per_person": seconds, **s})
            log.info("%s %s %s: %s", name, kind, row, json.dumps(rows[-1], default=float))
            slug = "".join(c if c.isalnum() else "-" for c in row)
            np.save(OUT / f"{name}-{kind}-{slug}.npy", np.stack(recons))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown rows: faces found, top-1, top-5, 5-way lineup, seconds per person."""

    def f(r: dict[str, Any], key: str) -> str:
        v = r.get(key)
        return "-" if v is None else f"{v:.2f}"

    lines = [
        "| set | target | space | faces found | top-1 | top-5 | lineup (5-way) | s/person |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['set']} | {r['target']} | {r['space']} | {f(r, 'face_found')} | "
            f"{f(r, 'judge_top1')} | {f(r, 'judge_top5')} | {f(r, 'judge_lineup5')} | "
            f"{f(r, 's_per_person')} |"
        )
    return "\n".join(lines)


def grid(ds: Any, name: str, kind: str, n: int = 10) -> Path:
    """docs/images/priors_NAME_KIND.png: the first ``n`` people's first private photo,
    then one row per space measured (the saved reconstructions, in file order)."""
    from mlinvert.attacks.base import image_grid

    x_train, y_train = ds.train()
    rows = [np.stack([x_train[y_train == c][0] for c in range(n)])]
    for f in sorted(OUT.glob(f"{name}-{kind}-*.npy")):
        rows.append(np.load(f)[:n])
        log.info("grid row %d: %s", len(rows), f.stem)
    return image_grid(rows, ROOT / "docs" / "images" / f"priors_{name}_{kind}.png")


def main() -> None:
    """``people``, ``dev`` or ``att`` (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("people", "dev", "att", "grid-dev", "grid-att"))
    parser.add_argument(
        "--priors",
        default="today",
        help="comma-separated: today, prior folders, FOLDER+SETTING (adapted: "
        + ", ".join(ADAPT)
        + ")",
    )
    parser.add_argument("--kinds", default="softmax,mlp")
    args = parser.parse_args()
    if args.what == "people":
        print("\n".join(dev_people()))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    OUT.mkdir(parents=True, exist_ok=True)
    ds = dev_dataset() if args.what.endswith("dev") else att_dataset()
    if args.what.startswith("grid"):
        for kind in args.kinds.split(","):
            print(grid(ds, args.what.partition("-")[2], kind))
        return
    priors = [p for p in args.priors.split(",") if p]
    rows = attack_rows(ds, args.what, args.kinds.split(","), priors)
    tag = "_".join([args.kinds.replace(",", "-"), *(Path(p).name for p in priors)])
    (OUT / f"{args.what}-{tag}.json").write_text(json.dumps(rows, indent=2, default=float) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
