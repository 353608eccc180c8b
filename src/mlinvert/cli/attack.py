"""``mlinvert attack miface``: reconstruct faces through a model or its prediction API."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

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
    output_dir,
    wire_config,
    write_json,
)
from mlinvert.errors import ConfigError, OracleError, Unauthorized

MODES = ("whitebox", "blackbox", "label-only")
#: ``--aux heldout``: per person, the local model's held-out photos of everyone else.
HELDOUT = "heldout"
#: Statuses that mean the API refuses this account: the labels after it are not attacked.
STOPPED = ("rate_limited", "blocked")


def _keys(api_key: str | None) -> list[str]:
    """The API keys of ``--api-key K1,K2,...`` (blanks dropped)."""
    return [k.strip() for k in (api_key or "").split(",") if k.strip()]


def _key_ledger(checkpoint: Path | None, api_key: str | None) -> Path | None:
    """Where a multi-key API attack with ``--checkpoint`` keeps what each key answered
    (``CHECKPOINT.keys.json``, by key fingerprint), so a resumed run moves past a key the
    service refused meanwhile; None without a checkpoint or with one key."""
    if checkpoint is None or len(_keys(api_key)) < 2:
        return None
    return checkpoint.with_name(checkpoint.name + ".keys.json")


def _read_ledger(ledger: Path | None, keys: list[str]) -> list[int]:
    """Inputs each of ``keys`` answered in earlier runs (zeros without a ledger)."""
    import json

    from mlinvert.oracle.http import key_fingerprint

    if ledger is None or not ledger.exists():
        return [0] * len(keys)
    try:
        counts = json.loads(ledger.read_text())
        return [int(counts.get(key_fingerprint(k), 0)) for k in keys]
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"{ledger} is not a key ledger written by mlinvert ({exc}); delete it to start "
            "the keys' counts afresh"
        ) from None


def _write_ledger(ledger: Path, keys: list[str], before: list[int], rotating: Any) -> None:
    """Add what each key answered in this run to the ledger (atomic replace)."""
    import json

    from mlinvert.oracle.http import key_fingerprint

    counts = {
        key_fingerprint(k): n + int(o.n_queries)
        for k, n, o in zip(keys, before, rotating.oracles, strict=True)
    }
    tmp = ledger.with_name(ledger.name + ".tmp")
    tmp.write_text(json.dumps(counts, indent=1) + "\n")
    tmp.replace(ledger)


def _oracle(
    model: Path | None,
    target: str | None,
    api_key: str | None,
    mode: str,
    policy: str,
    *,
    escalate: tuple[float, int] | None = None,
    answered_before: Sequence[int] = (),
    wire: Any = None,
) -> Any:
    """The attacker's oracle: a local model, or the API through one key or several
    (``escalate`` = (amplitude, seed): each key blinds its probes, the noise doubled
    each time the service blocks one; ``answered_before``: what each key answered in an
    earlier, interrupted run, see :class:`~mlinvert.oracle.wrappers.Rotating`; ``wire``:
    the API's protocol, a :class:`~mlinvert.oracle.wire.WireConfig`)."""
    if (model is None) == (target is None):
        raise ConfigError(
            "pass exactly one of --model DIR (a local model folder) or "
            "--target URL (http://HOST:PORT/v1/models/NAME, or another API with --protocol)"
        )
    if target is not None:
        if mode == "whitebox":
            raise ConfigError(
                "--mode whitebox needs the model itself (--model DIR); an API "
                "--target allows --mode blackbox or label-only"
            )
        from mlinvert.oracle.http import HttpOracle
        from mlinvert.oracle.wire import WireConfig
        from mlinvert.oracle.wrappers import Rotating, escalating

        wire = wire or WireConfig()
        keys: list[str | None] = list(_keys(api_key))
        if not keys and wire.protocol == "mlinvert":
            raise ConfigError("--target needs --api-key KEY (create one with `mlinvert keys`)")
        keys = keys or [None]  # another protocol: a key (or --header) only if it asks one
        # several keys: a refused key hands over at once; the last one waits out a 429
        accounts = [HttpOracle(target, k, wire=wire, max_wait=0.0) for k in keys[:-1]]
        accounts.append(HttpOracle(target, keys[-1], wire=wire))
        for account in accounts if wire.protocol == "mlinvert" else ():
            _show_account(account)
        if len(accounts) == 1:
            return accounts[0]
        if escalate is not None:
            return escalating(
                accounts, escalate[0], seed=escalate[1], answered_before=answered_before
            )
        return Rotating(accounts, answered_before=answered_before)
    from mlinvert.defenses import Predictor, parse_policy
    from mlinvert.oracle import LocalOracle, WhiteBoxOracle
    from mlinvert.targets import load
    from mlinvert.targets.files import is_model_file, load_file

    assert model is not None
    if is_model_file(model):  # what the file does not declare: --input-shape, --classes
        loaded = load_file(
            model,
            input_shape=None if wire is None else wire.input_shape,
            class_names=None if wire is None else wire.class_names,
        )
    else:
        loaded = load(model)
    name = model.name
    if mode == "whitebox":
        return WhiteBoxOracle(Predictor(loaded, name=name))
    return LocalOracle(Predictor(loaded, name=name, policy=parse_policy(policy)))


def _api_counts(base: Any) -> dict[str, int]:
    """What the API answered this run, over all keys: inputs (the attack's queries and
    any probe that read what the answers carry) and requests."""
    oracles = [getattr(o, "inner", o) for o in getattr(base, "oracles", [base])]  # unblinded
    return {
        "inputs": sum(int(o.n_queries) for o in oracles),
        "requests": sum(int(o.n_requests) for o in oracles),
    }


def _show_account(oracle: Any) -> None:
    """Print what the key may still send (a refused key stops here: Unauthorized)."""
    try:
        a = oracle.account()
    except Unauthorized:
        raise
    except OracleError as exc:
        console.print(f"[yellow]note[/]: cannot read the key's account ({exc})")
        return
    left = f"{a.remaining} of {a.rate_limit} inputs left" if a.rate_limit else "no limit"
    console.print(f"account {a.name}: {left}{' [red](blocked)[/]' if a.blocked else ''}")


def _space(
    spec: str,
    mode: str,
    aux: str | None,
    pca_k: int,
    detail: int,
    radius: float,
    augment: bool,
) -> Any:
    from mlinvert.attacks.spaces import parse_space

    if spec == "auto":
        if aux is not None:
            spec = "pca"
        else:
            spec = {"whitebox": "pixel", "blackbox": "dct:10", "label-only": "dct:8"}[mode]
    if spec == "pca" and aux is not None:
        spec = f"pca:{aux}"
    return parse_space(spec, k=pca_k, detail=detail, radius=radius or None, augment=augment)


def _training_data(model: Path) -> Any:
    """The local model's image data set with its card's split (DataError if not here)."""
    import dataclasses

    from mlinvert.data import load
    from mlinvert.data.base import ImageDataset, Split
    from mlinvert.errors import DataError
    from mlinvert.targets.io import read_card

    card = read_card(model)
    spec, split = card.get("dataset"), card.get("split")
    if not spec or not isinstance(split, dict):
        raise DataError(f"the model card in {model} names no data set and split")
    try:
        data = load(spec)
    except DataError as exc:
        raise DataError(
            f"the model card in {model} names the data set {spec!r}, which is not readable "
            f"here: {exc}"
        ) from None
    if not isinstance(data, ImageDataset):
        raise DataError(f"the model in {model} was trained on {spec!r}, not on images")
    return dataclasses.replace(data, split=Split.from_dict(split))


def _check_prior_is_public(model: Path, aux: str) -> None:
    """Refuse ``--aux`` images that include the local model's private training photos.

    The model card names its data set and split; when that data is on this machine, an
    auxiliary image (nearly) equal to a training photo is a ConfigError — a prior built
    from the target's own photos would measure nothing. Without the data nothing can be
    checked, and the attack goes on (the card's data set may live elsewhere).
    """
    from mlinvert.attacks.spaces import check_disjoint, load_aux
    from mlinvert.errors import MlinvertError

    try:
        private, _ = _training_data(model).train()
    except MlinvertError as exc:
        console.print(f"[yellow]note[/]: cannot check --aux against the model's data ({exc})")
        return
    check_disjoint(load_aux(aux), private)


def _learned_prior(model: Path | None, folder: Path, radius: float) -> Any:
    """The search space of the prior in ``folder`` (``--prior``); with a local model whose
    data is here, refused if the prior was trained on one of its private photos."""
    from mlinvert.attacks.priors import load_prior
    from mlinvert.errors import MlinvertError

    private = None
    if model is not None:
        try:
            private, _ = _training_data(model).train()
        except MlinvertError as exc:
            console.print(f"[yellow]note[/]: cannot check --prior against the model's data ({exc})")
    return load_prior(folder).space(radius=radius or None, private=private)


def _priors(
    model: Path | None,
    spec: str,
    mode: str,
    aux: str | None,
    shape: tuple[int, ...],
    *,
    pca_k: int,
    detail: int,
    radius: float,
    augment: bool,
    learned: Path | None = None,
) -> Callable[[int], Any]:
    """The search space of each label: one shared space, or with ``--aux heldout`` an
    eigenface prior per person from the held-out photos of everyone else, or with
    ``--prior DIR`` the latent space of a learned prior."""
    if learned is not None:
        if aux is not None or spec != "auto":
            raise ConfigError(
                "--prior DIR is the search space (a prior learned from public faces): drop "
                "--aux and --space, or drop --prior to search an eigenface or pixel space"
            )
        shared = _learned_prior(model, learned, radius).bind(shape)
        return lambda lab: shared
    if aux == HELDOUT:
        assert model is not None  # checked before the oracle is built
        if spec not in ("auto", "pca"):
            raise ConfigError(
                f"--aux heldout builds an eigenface prior: use --space pca, not {spec!r}"
            )
        from mlinvert.evaluation.audit import search_space

        data = _training_data(model)
        return lambda lab: search_space(
            data, lab, f"pca:{pca_k}", augment=augment, detail=detail, radius=radius or None
        )
    if model is not None and aux is not None:
        _check_prior_is_public(model, aux)
    # bound once here, so every label shares one prior instead of fitting its own
    shared = _space(spec, mode, aux, pca_k, detail, radius, augment).bind(shape)
    return lambda lab: shared


def register(app: typer.Typer) -> None:
    """Add the ``attack`` command group."""
    attack_app = typer.Typer(help="Model-inversion attacks.", no_args_is_help=True)
    app.add_typer(attack_app, name="attack")

    @attack_app.command("miface")
    def miface(
        out_dir: Path = typer.Option(..., "--out", help="Folder for PNGs and result.json."),
        model: Path | None = typer.Option(
            None,
            "--model",
            help="Local model: a folder (`mlinvert train`) or a file: .onnx, .pt "
            "(TorchScript), .joblib or .skops (scikit-learn).",
        ),
        target: str | None = typer.Option(
            None,
            "--target",
            help="API URL: http://HOST:PORT/v1/models/NAME (mlinvert), /v2/models/NAME "
            "(--protocol v2) or any JSON endpoint (--protocol rest).",
        ),
        api_key: str | None = typer.Option(
            None,
            "--api-key",
            envvar="MLINVERT_API_KEY",
            help="API key; several, comma-separated, are used in turn: when the service "
            "refuses one (429 rate limited, 403 blocked) the attack continues with the next.",
        ),
        label: str | None = typer.Option(None, "--label", help="Class name (or index)."),
        all_labels: bool = typer.Option(False, "--all-labels", help="Attack every class."),
        mode: str = typer.Option("whitebox", "--mode", help="whitebox|blackbox|label-only"),
        gradient: str = typer.Option(
            "auto",
            "--gradient",
            help="auto|fd|fd-central|nes|spsa|broyden (auto: broyden for full scores, else nes).",
        ),
        samples: int = typer.Option(20, "--samples", help="NES/SPSA pairs per step."),
        sigma: float = typer.Option(0.02, "--sigma", help="Probe size (RMS pixel change)."),
        space: str = typer.Option(
            "auto",
            "--space",
            help="pixel|lowres:WxH|dct:K|pca:AUX (auto: pca with --aux, else pixel/dct).",
        ),
        aux: str | None = typer.Option(
            None,
            "--aux",
            help="Auxiliary public faces of OTHER people: lfw, a data spec, or heldout "
            "(--model only: per person, the card's held-out photos of everyone else).",
        ),
        learned: Path | None = typer.Option(
            None,
            "--prior",
            help="A prior learned from public faces (`mlinvert prior train --out DIR`): "
            "search its latent space instead of --space/--aux.",
        ),
        pca_k: int = typer.Option(40, "--pca-k", help="Eigenfaces kept by the PCA prior."),
        detail: int = typer.Option(
            0, "--detail", help="PCA prior: add the KxK lowest DCT frequencies (0: none)."
        ),
        radius: float = typer.Option(
            1.0,
            "--radius",
            help="PCA or learned prior: search inside ||z|| <= R*sqrt(dim), typical faces "
            "(0: no ball).",
        ),
        augment: bool = typer.Option(
            False,
            "--augment",
            help="PCA prior of FACES: add mirrored and 2-px shifted copies of each aux face.",
        ),
        paper: bool = typer.Option(False, "--paper", help="Paper settings (GD on 1-p, x0=0)."),
        objective: str | None = typer.Option(
            None,
            "--objective",
            help="What MI-Face climbs: prob (the paper's 1-p), log, or margin (default: "
            "prob with --paper, else margin; against rounded scores prob can do better).",
        ),
        max_iter: int | None = typer.Option(None, "--max-iter", help="alpha (iterations)."),
        budget: int | None = typer.Option(None, "--budget", help="Queries per label."),
        policy: str = typer.Option(
            "full", "--policy", help="Output policy for a local --model (e.g. round:2)."
        ),
        checkpoint: Path | None = typer.Option(
            None, "--checkpoint", help="Checkpoint file; an interrupted run resumes from it."
        ),
        lanes: int = typer.Option(
            1,
            "--lanes",
            help="With --all-labels through an API (blackbox, label-only): attack N people "
            "at once, their probes sent together in one request per step (1: one by one).",
        ),
        blind: float | None = typer.Option(
            None,
            "--blind",
            help="Query blinding against a query detector: add fresh uniform noise of "
            "+-A to every probe sent (e.g. 0.05; Blacklight, Section 7).",
        ),
        escalate: bool = typer.Option(
            False,
            "--escalate",
            help="With --blind and several --api-key keys: double the noise each time the "
            "service blocks one of the keys (403).",
        ),
        protocol: str = PROTOCOL,
        output: str | None = OUTPUT,
        request: str | None = REQUEST,
        scores: str | None = SCORES,
        header: list[str] | None = HEADER,
        input_shape: str | None = INPUT_SHAPE,
        classes: str | None = CLASSES,
        seed: int = typer.Option(0, "--seed"),
    ) -> None:
        """Reconstruct a person's face (MI-Face, Fredrikson et al. CCS 2015; BREP-MI)."""
        from mlinvert.attacks import (
            AttackResult,
            Checkpoint,
            Exact,
            LabelOnly,
            LabelOnlyConfig,
            MIFace,
            MIFaceConfig,
            parse_gradient,
            run_lockstep,
        )
        from mlinvert.attacks.base import ProgressEvent
        from mlinvert.attacks.miface import resolve_label
        from mlinvert.oracle.lockstep import check_lanes
        from mlinvert.oracle.wrappers import largest_blinding

        if mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
        check_seed(seed)
        if (label is None) == (not all_labels):
            raise ConfigError("pass --label NAME or --all-labels (exactly one)")
        check_lanes(lanes)
        if lanes > 1 and mode == "whitebox":
            raise ConfigError(
                "--lanes batches the API queries of --mode blackbox or label-only; a "
                "white-box attack runs in process on the model's gradients: drop --lanes"
            )
        if aux == HELDOUT and model is None:
            raise ConfigError(
                "--aux heldout reads the held-out photos a local model's card names: it "
                "needs --model DIR (an API attacker brings public photos: --aux lfw or "
                "--aux folder:PATH)"
            )
        if escalate and (blind is None or target is None or len(_keys(api_key)) < 2):
            raise ConfigError(
                "--escalate raises the --blind noise each time the service blocks a key: it "
                "needs --target URL, --blind A and several keys (--api-key K1,K2,...)"
            )
        wire = wire_config(protocol, output, request, scores, header, input_shape, classes)
        if model is not None and wire.to_dict() != type(wire)().to_dict():
            raise ConfigError(
                "--protocol, --output, --request, --scores and --header describe an API "
                "--target; a local --model needs none of them"
            )
        ledger = _key_ledger(checkpoint, api_key) if target is not None else None
        before = _read_ledger(ledger, _keys(api_key))
        base = _oracle(
            model,
            target,
            api_key,
            mode,
            policy,
            escalate=(blind, seed) if escalate and blind is not None else None,
            answered_before=before if ledger is not None else (),
            wire=wire,
        )
        oracle = base
        if blind is not None and not escalate:
            if mode == "whitebox":
                raise ConfigError(
                    "--blind adds noise to the probes sent to an API; a white-box attack "
                    "sends none: drop --blind or use --mode blackbox/label-only"
                )
            from mlinvert.oracle.wrappers import Blinded

            oracle = Blinded(oracle, blind, seed=seed)
        info = oracle.info
        if len(info.input_shape) != 2:
            raise ConfigError(
                f"MI-Face reconstructs images; {target or model} takes inputs of shape "
                f"{tuple(info.input_shape)} (survey answers): audit a decision tree with "
                "`mlinvert audit --model DIR --data steak:PATH` (or gss:PATH, fair)"
            )
        labels = (
            list(range(info.n_classes))
            if all_labels
            else [resolve_label(label or "", info.class_names)]
        )
        prior = _priors(
            model,
            space,
            mode,
            aux,
            info.input_shape,
            pca_k=pca_k,
            detail=detail,
            radius=radius,
            augment=augment,
            learned=learned,
        )
        overrides: dict[str, Any] = {} if max_iter is None else {"max_iter": max_iter}
        if objective is not None:
            if mode == "label-only":
                raise ConfigError(
                    "--objective sets what MI-Face climbs; the label-only attack has no "
                    "scores to climb: drop --objective or use --mode whitebox/blackbox"
                )
            overrides["objective"] = objective
        cfg = MIFaceConfig.paper(**overrides) if paper else MIFaceConfig.improved(**overrides)

        def make(lab: int) -> Any:
            if mode == "label-only":
                return LabelOnly(LabelOnlyConfig(), space=prior(lab))
            source = (
                Exact()
                if mode == "whitebox"
                else parse_gradient(gradient, samples=samples, sigma=sigma, policy=info.policy)
            )
            return MIFace(cfg, gradient=source, space=prior(lab))

        # the label-only attack keeps no state worth resuming
        ckpt = None if checkpoint is None or mode == "label-only" else Checkpoint(checkpoint)
        if ckpt is None and (out_dir / "result.json").exists():
            raise ConfigError(
                f"--out {out_dir} already holds an attack's result.json (and its PNGs), which "
                "this run would replace: choose another --out or delete that folder first "
                "(a run resumed with the same --checkpoint may write over its own results)"
            )
        output_dir(out_dir)  # before the attack, whose results would be lost after it
        if ckpt is not None:
            output_dir(ckpt.path.parent, "--checkpoint")
            states = ckpt.path.parent / (ckpt.path.stem + ".label*.npz")
            stopped_note = f"each label's state is in {states}; run the same command to resume"
        elif checkpoint is not None:
            stopped_note = "nothing was saved (the label-only attack keeps no state to resume)"
        else:
            stopped_note = "nothing was saved; pass --checkpoint FILE to make an attack resumable"
        t0 = time.perf_counter()
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:>7.0f} q"),
            TextColumn("{task.fields[metric]}"),
            TextColumn("{task.fields[rate]:>7.0f} q/s"),
            TimeElapsedColumn(),
        )
        with on_interrupt(stopped_note), Progress(*columns, console=console) as bar:
            tasks = {
                lab: bar.add_task(info.class_names[lab], total=budget, metric="", rate=0.0)
                for lab in labels
            }

            def show(ev: ProgressEvent) -> None:
                metric = (
                    f"in-class {ev.confidence:.2f} r={ev.best_confidence:.2f}"
                    if mode == "label-only"
                    else f"conf {ev.confidence:.3f} best {ev.best_confidence:.3f}"
                )
                bar.update(
                    tasks[ev.label],
                    completed=ev.n_queries,
                    metric=metric,
                    rate=ev.n_queries / max(ev.elapsed_s, 1e-9),
                )

            try:
                results = run_lockstep(
                    make,
                    oracle,
                    labels,
                    lanes=min(lanes, len(labels)),
                    seed=seed,
                    budget=budget,
                    progress=show,
                    checkpoint=ckpt,
                    stop_on=STOPPED,
                )
            finally:  # interrupted too: the keys' answers were spent
                if ledger is not None:
                    _write_ledger(ledger, _keys(api_key), before, base)
            for result in results:
                bar.update(
                    tasks.pop(int(result.labels[0])),
                    completed=result.n_queries,
                    total=result.n_queries or 1,
                )
            for task in tasks.values():  # skipped after the API refused the account
                bar.update(task, metric="not attacked")
        stopped = {r.status: r.per_label[0]["message"] for r in results}
        for status in STOPPED:
            if status in stopped:
                console.print(f"[yellow]{status}[/]: {stopped[status]}")
        merged = AttackResult.merge(results)
        merged.extra["target"] = target or str(model)
        merged.extra["mode"] = mode
        merged.extra["blind"] = blind
        merged.extra["escalate"] = escalate
        merged.extra["blinded_up_to"] = largest_blinding(oracle)
        merged.extra["wire"] = wire.to_dict() if target else None
        merged.extra["api_answered"] = _api_counts(base) if target else None
        merged.extra["api_keys_used"] = getattr(base, "accounts_used", 1 if target else 0)
        paths = merged.save_pngs(out_dir, scale=3)
        write_json(out_dir / "result.json", merged.to_dict())
        for per in merged.per_label:
            conf = per.get("confidence")
            shown = "-" if conf is None or conf != conf else f"{conf:.3f}"
            out.print(
                f"{per['name']}: {per['status']} ({per['stop']}), {per['n_queries']} "
                f"queries, {per['elapsed_s']:.1f} s, confidence {shown}"
            )
            if per["n_queries"] == 0 and per.get("message") and per["status"] not in STOPPED:
                console.print(f"[yellow]{per['status']}[/]: {per['message']}")  # e.g. budget
        out.print(
            f"{len(paths)} PNGs and result.json in {out_dir} "
            f"({time.perf_counter() - t0:.1f} s, status {merged.status})"
        )
