"""``mlinvert train``: train a target model and write its self-describing folder."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import typer

from mlinvert.cli.common import check_seed, console, on_interrupt, out
from mlinvert.core import output_dir

KIND_HELP = (
    "softmax (softmax regression), mlp (3000 sigmoid hidden units), dae (stacked "
    "denoising autoencoder 1000->300 + softmax), cnn (small CNN), evaluation (the judge "
    "model, augmented), tree (BigML-style decision tree, surveys only)"
)


def _spinner(verb: str, what: str) -> AbstractContextManager[Any]:
    return console.status(f"[bold]{verb}[/] {what} ...")


def train(
    data: str = typer.Option(
        "digits",
        "--data",
        "-d",
        help="Data spec: att:PATH, folder:PATH, olivetti, digits (embedded default), "
        "steak:PATH, gss:PATH or fair.",
    ),
    model: str = typer.Option("softmax", "--model", "-m", help=f"Model kind: {KIND_HELP}."),
    out_dir: Path = typer.Option(
        ..., "--out", "-o", help="Folder to write (weights.safetensors + model.json)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the split and the training."),
    quick: bool = typer.Option(
        False, "--quick", help="Tiny training settings (smoke tests, not for audits)."
    ),
    dp_epsilon: float | None = typer.Option(
        None,
        "--dp-epsilon",
        help="Train by DP-SGD (softmax, mlp, cnn, dae) to this privacy target epsilon: "
        "Poisson batches, per-example clipping, Gaussian noise sized by an RDP accountant "
        "(the dae: four stages, epsilon composed over them).",
    ),
    dp_delta: float | None = typer.Option(
        None,
        "--dp-delta",
        help="DP delta (default min(1e-5, n^-1.1) for n training images).",
    ),
    public_data: str | None = typer.Option(
        None,
        "--public-pretrain",
        help="dae only: pre-train both autoencoder layers and the decoder on this public "
        "face set (lfw: scikit-image's 100 LFW face crops, resized), at no privacy cost; "
        "only --private-stages then read the private images (with --dp-epsilon, the "
        "only DP-SGD stages).",
    ),
    private_stages: str | None = typer.Option(
        None,
        "--private-stages",
        help="With --public-pretrain: head (the softmax head alone, on the public codes; "
        "default) or finetune (encoder, head and the decoder's upper layer).",
    ),
) -> None:
    """Train a target model on the private split of a data set and save it.

    Writes a self-describing folder that `mlinvert serve`, `mlinvert attack` and
    `mlinvert audit` load: safetensors weights (loading runs no code) and a model
    card with the data spec, the train/test split, the seed, the config, the
    accuracies and the training time. Example:

        mlinvert train --data att:../shared/data/att_faces --model softmax \\
            --out models/att-softmax

    With --dp-epsilon the card also records the privacy spent (epsilon achieved,
    delta, noise multiplier, clip, sampling rate, steps, accountant).
    """
    from mlinvert.targets.job import TrainJob, train_job

    check_seed(seed)
    job = TrainJob(
        data=data,
        kind=model,
        out_dir=out_dir,
        seed=seed,
        quick=quick,
        dp_epsilon=dp_epsilon,
        dp_delta=dp_delta,
        public_data=public_data,
        private_stages=private_stages,
    )
    output_dir(out_dir)  # before the training, which the model would be lost after
    with on_interrupt(f"training stopped; no model was written to {out_dir}"):
        card = train_job(job, stage=_spinner)
    _print_card(card)
    out.print(f"wrote {out_dir}/model.json and weights.safetensors")


def _print_card(card: dict[str, Any]) -> None:
    """The card's accuracies, privacy spent and public pre-training, a line each."""
    test = card.get("test_accuracy")
    chance = card.get("chance_accuracy")
    out.print(
        f"[bold green]trained[/] {card['kind']} on {card['dataset']}: "
        f"train accuracy {card['train_accuracy']:.3f}, test accuracy "
        + ("n/a" if test is None else f"{test:.3f}")
        + (f" (chance {chance:.3f})" if chance else "")
        + f", {card['train_seconds']:.1f} s"
    )
    privacy = card.get("privacy")
    if isinstance(privacy, dict):
        out.print(
            f"DP-SGD: epsilon {privacy['epsilon']:.3f} at delta {privacy['delta']:.2g} "
            f"(noise multiplier {privacy['noise_multiplier']:.3f}, clip {privacy['clip']}, "
            f"sampling rate {privacy['sample_rate']:.3f}, {privacy['steps']} steps)"
            + (" composed over the stages:" if privacy.get("stages") else "")
        )
        for stage in privacy.get("stages", ()):
            out.print(
                f"  {stage['name']}: clip {stage['clip']}, sampling rate "
                f"{stage['sample_rate']:.3f}, {stage['steps']} steps, lr {stage['lr']} "
                f"(alone: epsilon {stage['epsilon_alone']:.3f})"
            )
    stages = card.get("training_stages")
    if isinstance(stages, dict):
        out.print(
            f"public pre-training on {stages['public_data']['name']}: public stages "
            f"{', '.join(stages['public'])}; private stages {', '.join(stages['private'])} "
            f"({stages['private_training']})"
        )


def register(app: typer.Typer) -> None:
    """Add the ``train`` command."""
    app.command("train")(train)
