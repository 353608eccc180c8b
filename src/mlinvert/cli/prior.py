"""``mlinvert prior train``: learn an attacker's face prior from public photos."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from mlinvert.cli.common import check_seed, console, on_interrupt, out
from mlinvert.core import output_dir
from mlinvert.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

    from mlinvert.attacks.priors import FinetuneConfig, PriorConfig


def _shape(text: str) -> tuple[int, int]:
    """``HxW`` (e.g. 64x52) as (h, w)."""
    h, _, w = text.lower().partition("x")
    try:
        return int(h), int(w)
    except ValueError:
        raise ConfigError(f"--size is HxW in pixels, e.g. 64x52 or 112x92; got {text!r}") from None


def _excluded(path: Path | None) -> set[str]:
    """The people named in ``path`` (one per line, # comments), or none."""
    if path is None:
        return set()
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(
            f"cannot read --exclude-people {path} ({exc.strerror or exc}); pass a text file "
            "with one person (folder name) per line"
        ) from None
    return {s for line in lines if (s := line.partition("#")[0].strip())}


def _images(
    data: str, seed: int, shape: tuple[int, int], exclude: set[str]
) -> tuple[np.ndarray, np.ndarray, int]:
    """``data``'s images at ``shape`` without the ``exclude`` people: (images, labels)."""
    import numpy as np

    from mlinvert.data import load
    from mlinvert.data.base import ImageDataset
    from mlinvert.errors import DataError

    with console.status(f"[bold]loading[/] {data} ..."):
        dataset = load(data, seed=seed, size=shape)
    if not isinstance(dataset, ImageDataset):
        raise DataError(f"a face prior learns from images; {data!r} is not an image data set")
    unknown = exclude - set(dataset.class_names)
    if unknown:
        shown = ", ".join(sorted(unknown)[:5])
        raise ConfigError(
            f"--exclude-people names {len(unknown)} people not in {data} (e.g. {shown}); "
            "write each person's folder name exactly"
        )
    keep = ~np.isin(np.asarray(dataset.class_names)[dataset.labels], sorted(exclude))
    return dataset.images[keep], dataset.labels[keep], dataset.n_classes - len(exclude)


def _private_photos(model: Path) -> np.ndarray:
    """The training photos of the local model in ``model`` (its card's data set and
    split); DataError if that data is not readable here."""
    from mlinvert.targets.io import trained_on

    return trained_on(model).train()[0]


def run_prior_train(
    data: str, out_dir: Path, config: PriorConfig, exclude: set[str]
) -> dict[str, Any]:
    """Load ``data`` (minus the ``exclude`` people), train, save to ``out_dir``; the card."""
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from mlinvert.attacks.priors import train_prior

    if (out_dir / "prior.json").exists():
        raise ConfigError(
            f"--out {out_dir} already holds a prior (prior.json); choose another --out, or "
            "delete that folder first to replace it"
        )
    images, _, n_people = _images(data, config.seed, config.shape, exclude)
    output_dir(out_dir)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("{task.fields[metrics]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with (
        on_interrupt(f"training stopped; no prior was written to {out_dir}"),
        Progress(*columns, console=console) as bar,
    ):
        task = bar.add_task(f"{config.kind} prior", total=None, metrics="")

        def show(step: int, total: int, metrics: dict[str, float]) -> None:
            text = " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
            bar.update(task, completed=step, total=total, metrics=text)

        prior = train_prior(
            images,
            config,
            source=data,
            n_people=n_people,
            progress=show,
        )
    prior.card["data"]["excluded_people"] = sorted(exclude)
    prior.save(out_dir)
    return prior.card


def run_prior_finetune(
    prior_dir: Path,
    data: str,
    out_dir: Path,
    config: FinetuneConfig,
    exclude: set[str],
    model: Path | None,
) -> dict[str, Any]:
    """Adapt the prior in ``prior_dir`` to ``data``'s photos (minus ``exclude``), refusing
    ``model``'s private photos; save to ``out_dir``; the card."""
    from mlinvert.attacks.priors import finetune_prior, load_prior

    if (out_dir / "prior.json").exists():
        raise ConfigError(
            f"--out {out_dir} already holds a prior (prior.json); choose another --out, or "
            "delete that folder first to replace it"
        )
    prior = load_prior(prior_dir)
    private = None if model is None else _private_photos(model)
    images, labels, _ = _images(data, config.seed, prior.config.shape, exclude)
    output_dir(out_dir)
    with (
        on_interrupt(f"fine-tuning stopped; no prior was written to {out_dir}"),
        console.status(f"[bold]fine-tuning[/] on {len(images)} photos ..."),
    ):
        tuned = finetune_prior(prior, images, config, source=data, private=private, groups=labels)
    tuned.card["finetuned"]["excluded_people"] = sorted(exclude)
    tuned.card.pop("path", None)
    tuned.save(out_dir)
    return tuned.card


def train_command(
    data: str = typer.Option(
        ...,
        "--data",
        "-d",
        help="Public faces of OTHER people: lfw:PATH (one folder per person) or folder:PATH.",
    ),
    kind: str = typer.Option("pca", "--kind", help="pca (eigenfaces), vae or gan."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write the prior to."),
    size: str = typer.Option("64x52", "--size", help="HxW the prior learns faces at."),
    latent: int | None = typer.Option(
        None, "--latent", help="Latent size (default: pca 300, vae 64, gan 100)."
    ),
    epochs: int = typer.Option(20, "--epochs", help="Passes over the data (vae, gan)."),
    exclude: Path | None = typer.Option(
        None,
        "--exclude-people",
        help="Text file of people (folder names, one a line) to leave out, e.g. the "
        "people of a development target.",
    ),
    threads: int = typer.Option(1, "--threads", help="torch threads."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Train a face prior on public photos and save it as a folder.

    The folder holds prior.json (the card: kind, data, people, seed, size, training
    time), weights.pt and thumbs.npy (a thumbnail of each training photo, so an
    attack can check that the prior never saw a target's private photo). Use it with
    `mlinvert attack miface --prior DIR`. Example:

        mlinvert prior train --data lfw:../shared/data/lfw/faces --kind vae \\
            --out priors/lfw-vae
    """
    from mlinvert.attacks.priors import KINDS, PriorConfig

    if kind not in KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    check_seed(seed)
    config = PriorConfig(
        kind=kind,  # type: ignore[arg-type]
        shape=_shape(size),
        latent=latent,
        epochs=epochs,
        seed=seed,
        threads=threads,
    )
    card = run_prior_train(data, out_dir, config, _excluded(exclude))
    out.print(
        f"[bold green]trained[/] a {kind} prior on {card['data']['n_images']} photos of "
        f"{card['data']['n_people']} people in {card['training_seconds']} s: "
        f"{card['weights_bytes'] / 1e6:.1f} MB in {out_dir}"
    )


def finetune_command(
    prior_dir: Path = typer.Option(..., "--prior", "-p", help="The prior folder to adapt."),
    data: str = typer.Option(
        ...,
        "--data",
        "-d",
        help="In-domain photos of OTHER people (folder:PATH, att:PATH, lfw:PATH ...).",
    ),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write the new prior to."),
    model: Path | None = typer.Option(
        None,
        "--model",
        "-m",
        help="A local target: refuse if the prior or the photos include its private "
        "training photos (checked against its card's data set and split).",
    ),
    exclude: Path | None = typer.Option(
        None, "--exclude-people", help="Text file of people to leave out, one a line."
    ),
    train: str = typer.Option(
        "",
        "--train",
        help="Decoder parameters that adapt, comma-separated name prefixes (e.g. mean "
        "for the eigenface prior's mean face only); empty: all.",
    ),
    holdout: float = typer.Option(
        0.0,
        "--holdout",
        help="Fraction of the people held out; stop where their error is lowest.",
    ),
    steps: int = typer.Option(300, "--steps", help="Adam steps."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam step size."),
    threads: int = typer.Option(1, "--threads", help="torch threads."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Adapt a prior to the target's domain with photos of other people there.

    GLO fine-tuning: the decoder and one latent point per photo descend the
    reconstruction error together. Example (the eigenface prior's mean face only,
    stopped by a fifth of the people held out):

        mlinvert prior finetune --prior priors/lfw-pca --data folder:my-photos \\
            --train mean --holdout 0.2 --model models/target --out priors/lfw-pca-adapted
    """
    from mlinvert.attacks.priors import FinetuneConfig

    check_seed(seed)
    config = FinetuneConfig(
        steps=steps,
        lr=lr,
        train=tuple(t.strip() for t in train.split(",") if t.strip()),
        holdout=holdout,
        seed=seed,
        threads=threads,
    )
    card = run_prior_finetune(prior_dir, data, out_dir, config, _excluded(exclude), model)
    tuned = card["finetuned"]
    stop = f", stopped at step {tuned['stopped_at']}" if "stopped_at" in tuned else ""
    out.print(
        f"[bold green]adapted[/] the {card['kind']} prior to {tuned['n_images']} photos in "
        f"{tuned['seconds']} s (RMSE {tuned['rmse']}{stop}): {out_dir}"
    )


def register(app: typer.Typer) -> None:
    """Add the ``prior`` command group: ``train`` and ``finetune``."""
    prior_app = typer.Typer(help="Attacker priors learned from public faces.", no_args_is_help=True)
    app.add_typer(prior_app, name="prior")
    prior_app.command("train")(train_command)
    prior_app.command("finetune")(finetune_command)
