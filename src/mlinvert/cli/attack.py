"""``mlinvert attack miface``: reconstruct faces through a model or its prediction API.

The command builds an :class:`~mlinvert.attacks.runner.AttackJob` from its flags and
calls :func:`~mlinvert.attacks.runner.run_attack_job`; here are only the flags, the
progress bars and the summary printed at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from mlinvert.cli.common import (
    CLASSES,
    HEADER,
    INPUT_SHAPE,
    OUTPUT,
    PROTOCOL,
    REQUEST,
    SCORES,
    check_seed,
    console,
    on_interrupt,
    out,
    wire_config,
)

if TYPE_CHECKING:
    from mlinvert.attacks.runner import AttackJob

_OutDir = Annotated[Path, typer.Option("--out", help="Folder for PNGs and result.json.")]
_Model = Annotated[
    Path | None,
    typer.Option(
        "--model",
        help="Local model: a folder (`mlinvert train`) or a file: .onnx, .pt "
        "(TorchScript), .joblib or .skops (scikit-learn).",
    ),
]
_Target = Annotated[
    str | None,
    typer.Option(
        "--target",
        help="API URL: http://HOST:PORT/v1/models/NAME (mlinvert), /v2/models/NAME "
        "(--protocol v2) or any JSON endpoint (--protocol rest).",
    ),
]
_ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="MLINVERT_API_KEY",
        help=(
            "API key; several, comma-separated, are used in turn: when the service refuses one "
            "(429 rate limited, 403 blocked) the attack continues with the next."
        ),
    ),
]
_Label = Annotated[str | None, typer.Option("--label", help="Class name (or index).")]
_AllLabels = Annotated[bool, typer.Option("--all-labels", help="Attack every class.")]
_Mode = Annotated[str, typer.Option("--mode", help="whitebox|blackbox|label-only")]
_Gradient = Annotated[
    str,
    typer.Option(
        "--gradient",
        help="auto|fd|fd-central|nes|spsa|broyden (auto: broyden for full scores, else nes).",
    ),
]
_Samples = Annotated[int, typer.Option("--samples", help="NES/SPSA pairs per step.")]
_Sigma = Annotated[float, typer.Option("--sigma", help="Probe size (RMS pixel change).")]
_Space = Annotated[
    str,
    typer.Option(
        "--space", help="pixel|lowres:WxH|dct:K|pca:AUX (auto: pca with --aux, else pixel/dct)."
    ),
]
_Aux = Annotated[
    str | None,
    typer.Option(
        "--aux",
        help=(
            "Auxiliary public faces of OTHER people: lfw (scikit-image's 100 small LFW crops, "
            "shipped offline), a data spec such as lfw:PATH (a full LFW folder) or folder:PATH, "
            "or heldout (--model only: per person, the card's held-out photos of everyone "
            "else)."
        ),
    ),
]
_Learned = Annotated[
    Path | None,
    typer.Option(
        "--prior",
        help=(
            "A prior learned from public faces (`mlinvert prior train --out DIR`): search its "
            "latent space instead of --space/--aux."
        ),
    ),
]
_PcaK = Annotated[int, typer.Option("--pca-k", help="Eigenfaces kept by the PCA prior.")]
_Detail = Annotated[
    int, typer.Option("--detail", help="PCA prior: add the KxK lowest DCT frequencies (0: none).")
]
_Radius = Annotated[
    float,
    typer.Option(
        "--radius",
        help=(
            "PCA or learned prior: search inside ||z|| <= R*sqrt(dim), typical faces (0: no ball)."
        ),
    ),
]
_Augment = Annotated[
    bool,
    typer.Option(
        "--augment",
        help="PCA prior of FACES: add mirrored and 2-px shifted copies of each aux face.",
    ),
]
_Paper = Annotated[bool, typer.Option("--paper", help="Paper settings (GD on 1-p, x0=0).")]
_Objective = Annotated[
    str | None,
    typer.Option(
        "--objective",
        help=(
            "What MI-Face climbs: prob (the paper's 1-p), log, or margin (default: prob with "
            "--paper, else margin; against rounded scores prob can do better)."
        ),
    ),
]
_MaxIter = Annotated[int | None, typer.Option("--max-iter", help="alpha (iterations).")]
_Budget = Annotated[int | None, typer.Option("--budget", help="Queries per label.")]
_Policy = Annotated[
    str, typer.Option("--policy", help="Output policy for a local --model (e.g. round:2).")
]
_Checkpoint = Annotated[
    Path | None,
    typer.Option("--checkpoint", help="Checkpoint file; an interrupted run resumes from it."),
]
_Lanes = Annotated[
    int,
    typer.Option(
        "--lanes",
        help=(
            "With --all-labels through an API (blackbox, label-only): attack N people at once, "
            "their probes sent together in one request per step (1: one by one)."
        ),
    ),
]
_Blind = Annotated[
    float | None,
    typer.Option(
        "--blind",
        help=(
            "Query blinding against a query detector: add fresh uniform noise of +-A to every "
            "probe sent (e.g. 0.05; Blacklight, Section 7)."
        ),
    ),
]
_Escalate = Annotated[
    bool,
    typer.Option(
        "--escalate",
        help=(
            "With --blind and several --api-key keys: double the noise each time the service "
            "blocks one of the keys (403)."
        ),
    ),
]
_Seed = Annotated[int, typer.Option("--seed")]


def register(app: typer.Typer) -> None:
    """Add the ``attack`` command group."""
    attack_app = typer.Typer(help="Model-inversion attacks.", no_args_is_help=True)
    app.add_typer(attack_app, name="attack")

    @attack_app.command("miface")
    def miface(
        out_dir: _OutDir,
        model: _Model = None,
        target: _Target = None,
        api_key: _ApiKey = None,
        label: _Label = None,
        all_labels: _AllLabels = False,
        mode: _Mode = "whitebox",
        gradient: _Gradient = "auto",
        samples: _Samples = 20,
        sigma: _Sigma = 0.02,
        space: _Space = "auto",
        aux: _Aux = None,
        learned: _Learned = None,
        pca_k: _PcaK = 40,
        detail: _Detail = 0,
        radius: _Radius = 1.0,
        augment: _Augment = False,
        paper: _Paper = False,
        objective: _Objective = None,
        max_iter: _MaxIter = None,
        budget: _Budget = None,
        policy: _Policy = "full",
        checkpoint: _Checkpoint = None,
        lanes: _Lanes = 1,
        blind: _Blind = None,
        escalate: _Escalate = False,
        seed: _Seed = 0,
        protocol: str = PROTOCOL,
        output: str | None = OUTPUT,
        request: str | None = REQUEST,
        scores: str | None = SCORES,
        header: list[str] | None = HEADER,
        input_shape: str | None = INPUT_SHAPE,
        classes: str | None = CLASSES,
    ) -> None:
        """Reconstruct a person's face (MI-Face, Fredrikson et al. CCS 2015; BREP-MI)."""
        from mlinvert.attacks.runner import AttackJob

        check_seed(seed)
        job = AttackJob(
            out=out_dir,
            model=model,
            target=target,
            api_keys=tuple((api_key or "").split(",")),
            label=label,
            all_labels=all_labels,
            mode=mode,
            gradient=gradient,
            samples=samples,
            sigma=sigma,
            space=space,
            aux=aux,
            prior=learned,
            pca_k=pca_k,
            detail=detail,
            radius=radius,
            augment=augment,
            paper=paper,
            objective=objective,
            max_iter=max_iter,
            budget=budget,
            policy=policy,
            checkpoint=checkpoint,
            lanes=lanes,
            blind=blind,
            escalate=escalate,
            seed=seed,
            wire=wire_config(protocol, output, request, scores, header, input_shape, classes),
        )
        _run(job)


def _run(job: AttackJob) -> None:
    """Run ``job`` with a progress bar per label, then print what each label got."""
    from mlinvert.attacks.base import ProgressEvent
    from mlinvert.attacks.runner import STOPPED, run_attack_job
    from mlinvert.core import OracleInfo

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:>7.0f} q"),
        TextColumn("{task.fields[metric]}"),
        TextColumn("{task.fields[rate]:>7.0f} q/s"),
        TimeElapsedColumn(),
    )
    tasks: dict[int, TaskID] = {}
    with on_interrupt(job.stopped_note), Progress(*columns, console=console) as bar:

        def started(info: OracleInfo, labels: list[int]) -> None:
            for lab in labels:
                tasks[lab] = bar.add_task(
                    info.class_names[lab], total=job.budget, metric="", rate=0.0
                )

        def show(ev: ProgressEvent) -> None:
            metric = (
                f"in-class {ev.confidence:.2f} r={ev.best_confidence:.2f}"
                if job.mode == "label-only"
                else f"conf {ev.confidence:.3f} best {ev.best_confidence:.3f}"
            )
            rate = ev.n_queries / max(ev.elapsed_s, 1e-9)
            bar.update(tasks[ev.label], completed=ev.n_queries, metric=metric, rate=rate)

        def note(text: str) -> None:
            console.print(text if text.startswith("account ") else f"[yellow]note[/]: {text}")

        done = run_attack_job(job, started=started, progress=show, note=note)
        for lab, per in zip(done.result.labels, done.result.per_label, strict=True):
            task = tasks.pop(int(lab))
            bar.update(task, completed=per["n_queries"], total=per["n_queries"] or 1)
        for task in tasks.values():  # skipped after the API refused the account
            bar.update(task, metric="not attacked")
    for status, message in done.stopped.items():
        console.print(f"[yellow]{status}[/]: {message}")
    for per in done.result.per_label:
        conf = per.get("confidence")
        shown = "-" if conf is None or conf != conf else f"{conf:.3f}"
        out.print(
            f"{per['name']}: {per['status']} ({per['stop']}), {per['n_queries']} "
            f"queries, {per['elapsed_s']:.1f} s, confidence {shown}"
        )
        if per["n_queries"] == 0 and per.get("message") and per["status"] not in STOPPED:
            console.print(f"[yellow]{per['status']}[/]: {per['message']}")  # e.g. budget
    out.print(
        f"{len(done.paths)} PNGs and result.json in {job.out} "
        f"({done.elapsed_s:.1f} s, status {done.result.status})"
    )
