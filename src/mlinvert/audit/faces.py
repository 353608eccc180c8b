"""The image audit: targets trained or loaded, the judges fitted, the matrix attacked."""

from __future__ import annotations

import logging
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from mlinvert.attacks.presets import Preset, preset_for
from mlinvert.attacks.priors import load_prior
from mlinvert.audit.config import (
    LIKENESS_THRESHOLD,
    AuditConfig,
    parse_target_spec,
    resolve_defenses,
)
from mlinvert.audit.context import AuditContext, AuditTarget, Event
from mlinvert.audit.matrix import attack_matrix
from mlinvert.audit.records import is_recovered
from mlinvert.audit.results import ResultsFile, json_safe
from mlinvert.data.base import ImageDataset
from mlinvert.data.images import save_png
from mlinvert.defenses.spec import Defense
from mlinvert.errors import ConfigError, DataError, ModelError
from mlinvert.evaluation.faces import NOT_FACES, FaceJudge, JudgeConfig
from mlinvert.evaluation.recogniser import JUDGE_NAME, lineup_chance_bar
from mlinvert.evaluation.utility import served_utilities
from mlinvert.targets import io
from mlinvert.targets.files import is_model_file, load_file
from mlinvert.targets.training import dp_config, public_pretrain, train_target

log = logging.getLogger(__name__)


def run_faces(
    config: AuditConfig, results: ResultsFile, dataset: ImageDataset, emit: Event
) -> None:
    out = config.out
    preset = preset_for(dataset.image_shape, config.quick)
    budget = config.budget or preset.budget
    defenses = resolve_defenses(config, budget)
    labels = describe_dataset(config, results, dataset, preset, budget, defenses)
    doc = results.doc

    targets: list[AuditTarget] = []
    if config.model_dir is not None and is_model_file(config.model_dir):
        targets.append(_model_file(config, dataset, emit))
    elif config.model_dir is not None:
        emit("stage", {"name": f"loading {config.model_dir}"})
        model = io.load(config.model_dir)
        card = io.read_card(config.model_dir)
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(config.model_dir).name) or model.kind
        targets.append(
            AuditTarget(name=name, model=model, card=card, folder=Path(config.model_dir))
        )
    else:
        quick = config.quick or preset.quick_targets
        targets.extend(
            _load_or_train(out, k, dataset, config, emit, quick=quick) for k in config.targets
        )
    for t in targets:
        if tuple(t.model.input_shape_) != dataset.image_shape:
            raise DataError(
                f"model {t.name} takes images {tuple(t.model.input_shape_)}, the data "
                f"{dataset.spec} has {dataset.image_shape}; pass the --data it was trained on"
            )
        doc["targets"][t.name] = {
            "kind": t.model.kind,
            "test_accuracy": _test_accuracy(t.model, dataset),
            "model_dir": str(t.folder),
            "privacy": t.card.get("privacy"),
        }
    judge = fit_judge(config, results, dataset, labels, emit)
    doc["utility"].update(served_utilities({t.name: t.model for t in targets}, defenses, dataset))
    results.save()

    ctx = AuditContext(
        config=config,
        results=results,
        dataset=dataset,
        preset=preset,
        targets=targets,
        judge=judge,
        labels=labels,
        defenses=defenses,
        events=emit,
        prior=attacker_prior(config, results, dataset),
    )
    attack_matrix(ctx)


def _model_file(config: AuditConfig, dataset: ImageDataset, emit: Event) -> AuditTarget:
    """The user's model file read at the shape and classes of ``--data``, saved as the
    folder ``models/NAME`` that points at it (its card: what the file declares, the data
    set and its split), which the audit's service serves."""
    path = Path(str(config.model_dir))
    emit("stage", {"name": f"loading the model file {path}"})
    model = load_file(path, input_shape=dataset.image_shape, class_names=dataset.class_names)
    if "whitebox" in config.attacks and not hasattr(model, "class_gradient"):
        raise ConfigError(
            f"{path} gives no gradients (it answers scores only): audit it "
            "with --attacks blackbox,label-only, or give a TorchScript .pt for the white-box "
            "attack"
        )
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem) or model.kind
    folder = config.out / "models" / name
    card = {"dataset": dataset.spec, "split": dataset.split.to_dict(), "file": model.card()}
    io.save(model, folder, card=card)
    return AuditTarget(name=name, model=model, card=io.read_card(folder), folder=folder)


def _load_or_train(
    ctx_out: Path,
    spec: str,
    dataset: ImageDataset,
    config: AuditConfig,
    emit: Event,
    *,
    quick: bool,
) -> AuditTarget:
    """The target of ``spec`` (see :func:`parse_target`): reloaded from the run's
    ``models/NAME`` folder if there, else trained and saved there."""

    name, kind, epsilon, public_spec = parse_target_spec(spec)
    folder = ctx_out / "models" / name
    if (folder / "model.json").exists():
        emit("stage", {"name": f"loading {name} from {folder}"})
        try:
            model = io.load(folder)
        except ModelError as exc:  # retrain (same seed) rather than give up the resume
            log.warning("cannot reload %s (%s); training it again", folder, exc)
        else:
            return AuditTarget(name=name, model=model, card=io.read_card(folder), folder=folder)
    public = None if public_spec is None else public_pretrain(*public_spec, quick=quick)
    private = None if public is None else public.private
    dp = None if epsilon is None else dp_config(kind, epsilon, quick=quick, private=private)
    emit("stage", {"name": f"training {name}" + ("" if dp is None else " (DP-SGD)")})
    trained = train_target(dataset, kind, seed=config.seed, quick=quick, dp=dp, public=public)
    io.save(trained.model, folder, card=trained.card)
    return AuditTarget(name=name, model=trained.model, card=io.read_card(folder), folder=folder)


def _test_accuracy(model: Any, dataset: ImageDataset) -> float:
    x, y = dataset.test()
    return float((np.asarray(model.predict(x)) == y).mean())


def attacker_prior(config: AuditConfig, results: ResultsFile, dataset: ImageDataset) -> Any:
    """The bound search space of the learned prior ``config.prior`` (binding checks that
    it never saw a private photo), or None for the default eigenfaces; which prior it is
    goes into ``results``."""
    preset_space = results.doc["preset"]["space"]
    if config.prior is None:
        results.doc["prior"] = {
            "kind": preset_space,
            "path": None,
            "source": "eigenfaces of the held-out photos of every other attacked person",
        }
        return None

    prior = load_prior(config.prior)
    space = prior.space(private=dataset.train()[0], shape=dataset.image_shape)
    card = prior.card
    results.doc["prior"] = {
        "kind": prior.kind,
        "path": str(config.prior),
        "source": (card.get("data") or {}).get("spec"),
        "latent": prior.latent,
        "card": {k: v for k, v in card.items() if k not in ("path",)},
    }
    return space


def describe_dataset(
    config: AuditConfig,
    results: ResultsFile,
    dataset: ImageDataset,
    preset: Preset,
    budget: int,
    defenses: list[Defense],
) -> list[int]:
    """Write the data set, defences, budget and preset into ``results``; return the
    attacked labels."""
    labels = list(range(min(config.labels or dataset.n_classes, dataset.n_classes)))
    doc = results.doc
    doc["dataset"] = {
        "spec": dataset.spec,
        "kind": "image",
        "n_classes": dataset.n_classes,
        "class_names": list(dataset.class_names),
        "image_shape": list(dataset.image_shape),
        "n_train": int(dataset.split.train.size),
        "n_test": int(dataset.split.test.size),
        "split_rule": dataset.split.rule,
        "attacked_labels": labels,
    }
    doc["defenses"] = [asdict(d) for d in defenses]
    doc["budget"] = budget
    doc["preset"] = asdict(preset)
    return labels


def fit_judge(
    config: AuditConfig, results: ResultsFile, dataset: ImageDataset, labels: list[int], emit: Event
) -> Any:
    """Train (or reload) the evaluation model and fit the FaceJudge; score the reference
    images and store the private photos of the attacked people."""

    evaluator = _load_or_train(config.out, "evaluation", dataset, config, emit, quick=config.quick)
    results.doc["evaluation_model"] = {
        "kind": "evaluation",
        "test_accuracy": _test_accuracy(evaluator.model, dataset),
        "model_dir": str(evaluator.folder),
    }
    results.save()
    faces = is_faces(dataset)
    emit(
        "stage",
        {
            "name": "fitting the judges (independent face recogniser, evaluation model, "
            "lineup, references)"
            if faces
            else "fitting the judge (evaluation model, lineup, references)"
        },
    )
    judge = FaceJudge.fit(
        dataset, evaluator.model, seed=config.seed, config=JudgeConfig(independent=faces)
    )
    results.doc["thresholds"].update(_judge_thresholds(faces, dataset, labels))
    _references(judge, labels, config.seed, results)
    _private_photos(dataset, labels, results)
    return judge


def is_faces(dataset: ImageDataset) -> bool:
    """Whether ``dataset`` holds faces, which the independent face recogniser judges (not
    digits: a face recogniser says nothing about handwriting)."""
    return dataset.spec.partition(":")[0].strip().lower() not in NOT_FACES


def _judge_thresholds(faces: bool, dataset: ImageDataset, labels: list[int]) -> dict[str, Any]:
    """Which judge gives the verdicts, and its bars (written into ``thresholds``)."""
    if not faces:
        return {
            "judge": "evaluation model",
            "judge_doc": "not faces: recovered = evaluation-model top-1 and likeness at least "
            f"{LIKENESS_THRESHOLD}",
        }
    return {
        "judge": "independent",
        "judge_name": JUDGE_NAME,
        "judge_doc": "recovered = the independent face recogniser ranks the right person "
        f"first of {dataset.n_classes}; identity leaks = its mean 5-way lineup probability "
        "at least identity_lineup",
        "identity_lineup": lineup_chance_bar(dataset.n_classes, len(labels)),
        "identity_lineup_doc": "chance (0.2) plus 3 standard errors of the mean lineup "
        f"probability of {len(labels)} people whose images carry no identity (ranks "
        "uniform): about the 99.9th percentile of chance",
    }


def _references(judge: Any, labels: list[int], seed: int, results: ResultsFile) -> None:
    """Score FaceJudge's reference images (grey, noise, noise template, held-out photo)
    for every attacked person; keep the rates and one example image each."""

    y = np.asarray(labels, dtype=np.int64)
    out = []
    for name, images in judge.reference_points(y, seed=seed).items():
        scores = judge.score(images, y)
        for s in scores:
            s["recovered"] = is_recovered(s)
        summary = FaceJudge.summary(scores)
        rel = f"images/references/{re.sub(r'[^A-Za-z0-9]+', '_', name)}.png"
        save_png(results.out / rel, np.asarray(images[0]))
        out.append(
            {
                "name": name.replace("_", " "),
                "n": len(scores),
                **{k: json_safe(v) for k, v in summary.items() if k != "n"},
                "recovered": sum(s["recovered"] for s in scores) / max(len(scores), 1),
                "image": rel,
                "image_label": int(y[0]),
            }
        )
    results.doc["references"] = out


def _private_photos(dataset: ImageDataset, labels: list[int], results: ResultsFile) -> None:
    """Save the first private training photo and the first held-out photo of each
    attacked person (the report shows them beside the reconstructions)."""
    for key, folder, (x, y) in (
        ("private_images", "private", dataset.train()),
        ("held_out_images", "held_out", dataset.test()),
    ):
        saved = results.doc.setdefault(key, {})
        for lab in labels:
            rows = np.flatnonzero(y == lab)
            if rows.size:
                rel = f"images/{folder}/{lab}.png"
                save_png(results.out / rel, x[rows[0]])
                saved[str(lab)] = rel
