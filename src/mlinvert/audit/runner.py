"""``run_audit``: one entry point that loads the data and dispatches to a flow."""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import sys
from pathlib import Path

from mlinvert.audit.config import AuditConfig
from mlinvert.audit.context import Event, no_event, serialised, single_threaded
from mlinvert.audit.deployed import run_deployed
from mlinvert.audit.faces import run_faces
from mlinvert.audit.results import ResultsFile, now_utc
from mlinvert.audit.trees import run_tree
from mlinvert.core import output_dir
from mlinvert.data import load
from mlinvert.data.base import ImageDataset, Split
from mlinvert.errors import ConfigError, MlinvertError
from mlinvert.report.html import render_report
from mlinvert.targets.files import is_model_file
from mlinvert.targets.io import read_card

#: What may stand in a new audit's output folder: trained targets placed there beforehand
#: (``models/NAME``) are loaded instead of trained again.
REUSED = ("models",)


def data_spec(config: AuditConfig) -> tuple[str, Split | None]:
    """The data spec to load and, with ``--model``, the split recorded in its card."""
    if config.model_dir is None:
        return config.data or "digits", None
    if is_model_file(config.model_dir):
        if not config.data:
            raise ConfigError(
                f"{config.model_dir} is a model file, which does not say what data it was "
                "trained on: pass --data SPEC (the images and classes the model reads)"
            )
        return config.data, None

    card = read_card(config.model_dir)
    spec = config.data or card.get("dataset")
    if not spec:
        raise ConfigError(
            f"the card of {config.model_dir} does not say which data set it was trained on; "
            "pass --data SPEC"
        )
    split = Split.from_dict(card["split"]) if isinstance(card.get("split"), dict) else None
    return str(spec), split


def run_audit(config: AuditConfig, *, events: Event | None = None) -> Path:
    """Run the audit described by ``config``; return the path of ``index.html``.

    ``events(kind, data)`` receives progress (``stage``, ``plan``, ``record``,
    ``attack_progress``) for a progress display. Ctrl-C (KeyboardInterrupt) marks the
    run ``interrupted``, renders the partial report and re-raises.
    """

    emit = serialised(events or no_event)
    out = config.out
    if out.is_dir() and not (out / "results.json").exists():
        others = sorted(p.name for p in out.iterdir() if p.name not in REUSED)
        if others:
            raise ConfigError(
                f"--out {out} holds other files and no audit ({', '.join(others[:3])}; no "
                "results.json): the audit writes results.json, index.html, images/, models/ "
                "and service/ there, replacing any of that name: choose a new or empty folder"
            )
    output_dir(out)
    results = ResultsFile(out, config)
    results.save()
    try:
        spec, split = data_spec(config)
        emit("stage", {"name": f"loading data {spec}"})
        dataset = load(spec, seed=config.seed)
        if split is not None and isinstance(dataset, ImageDataset):
            dataset = dataclasses.replace(dataset, split=split)
        with single_threaded():
            if config.api is not None:
                if not isinstance(dataset, ImageDataset):
                    raise ConfigError(
                        f"--api audits image models; {spec} is survey data (audit a "
                        "decision tree from its model folder without --api)"
                    )
                run_deployed(config, results, dataset, emit)
            elif not isinstance(dataset, ImageDataset):
                run_tree(config, results, dataset, emit)
            else:
                run_faces(config, results, dataset, emit)
        results.doc["status"] = "complete"
        results.doc["finished"] = now_utc()
    except KeyboardInterrupt:
        results.doc["status"] = "interrupted"
        results.save()
        with contextlib.suppress(MlinvertError, OSError, ValueError):
            render_report(out)
        raise
    except BaseException:
        results.doc["status"] = "failed"
        results.save()
        raise
    results.save()
    emit("stage", {"name": "rendering the report"})
    return render_report(out)


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed (for the report's reproduce section)."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["mlinvert", *args])
