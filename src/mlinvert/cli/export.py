"""``mlinvert export``: write a tree's white-box "downloadable model" document (JSON).

The document holds the features, every split and the training count of each class at
every node, the way an MLaaS such as BigML lets its customers download a model; it is
what the white-box estimator of Fredrikson, Jha, Ristenpart (CCS 2015) reads.
"""

from __future__ import annotations

from pathlib import Path

import typer

from mlinvert.cli.common import console
from mlinvert.core import write_json
from mlinvert.errors import ConfigError, ModelError


def export_document(model_dir: Path, out_file: Path) -> int:
    """Load the model folder, write its document to ``out_file``; return the node count."""
    from mlinvert.targets import io

    if out_file.resolve().parent == model_dir.resolve() and out_file.name in (io.CARD, io.WEIGHTS):
        raise ConfigError(
            f"--out {out_file} would overwrite the model folder's own {out_file.name}; write "
            "the document elsewhere, e.g. --out tree.json"
        )
    model = io.load(model_dir)
    to_document = getattr(model, "to_document", None)
    if to_document is None:
        raise ModelError(
            f"model in {str(model_dir)!r} is a {getattr(model, 'kind', '?')!r} model; only "
            "decision trees (kind 'tree') have a downloadable white-box document"
        )
    doc = to_document()
    write_json(out_file, doc)
    return len(doc["nodes"])


def register(app: typer.Typer) -> None:
    """Add the ``export`` command."""

    @app.command("export")
    def export(
        model: Path = typer.Option(..., "--model", help="Model folder (from mlinvert train)."),
        out: Path = typer.Option(..., "--out", help="JSON file to write."),
    ) -> None:
        """Write a decision tree's white-box document with the counts at every node."""
        nodes = export_document(model, out)
        console.print(f"wrote {out} ({nodes} nodes)")
