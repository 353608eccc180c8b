"""Shared pieces of the CLI: the console, logging set-up, JSON output."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.logging import RichHandler

from mlinvert.errors import ConfigError

console = Console(stderr=True)
out = Console()

#: Largest ``--seed`` (every random generator used, numpy's and torch's, takes it).
MAX_SEED = 2**32 - 1


def check_seed(seed: int) -> None:
    """ConfigError unless ``--seed`` is an integer in 0 .. MAX_SEED."""
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed must be between 0 and {MAX_SEED}, got {seed}")


def setup_logging(verbose: bool) -> None:
    """Route library logging through rich; INFO with ``--verbose``, WARNING otherwise."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )


@contextmanager
def on_interrupt(message: str) -> Iterator[None]:
    """Ctrl-C inside the block prints ``message`` (what is kept, how to go on) and exits
    with code 130 (Typer turns the re-raised KeyboardInterrupt into that exit code)."""
    try:
        yield
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: {message}")
        raise


# the wire options of a command that talks to a prediction API (attack --target, audit --api)
PROTOCOL = typer.Option(
    "mlinvert",
    "--protocol",
    help="What the API speaks: mlinvert (`mlinvert serve`), v2 (Open Inference Protocol: "
    "MLServer, KServe, Triton, Seldon; URL http://HOST:PORT/v2/models/NAME), rest (any JSON "
    "API: --request and --scores) or auto (the first that answers).",
)
OUTPUT = typer.Option(
    None,
    "--output",
    help="v2: the probability output tensor (default: the single output, or predict_proba "
    "when the server declares none).",
)
REQUEST = typer.Option(
    None,
    "--request",
    help="rest: the JSON request with $INPUTS where the batch goes, e.g. "
    "'{\"instances\": $INPUTS}'.",
)
SCORES = typer.Option(
    None,
    "--scores",
    help="rest: the path to the scores in the answer, e.g. 'predictions[*].probabilities'.",
)
HEADER = typer.Option(
    None, "--header", help="An extra request header 'Name: value' (repeatable), e.g. auth."
)
INPUT_SHAPE = typer.Option(
    None,
    "--input-shape",
    help="v2/rest or a --model file: the model's input shape (e.g. 112x92) when the server "
    "or file does not declare it.",
)
CLASSES = typer.Option(
    None,
    "--classes",
    help="v2/rest or a --model file: the model's classes (N, or comma-separated names) when "
    "the server or file does not declare them "
    "(needed for a labels-only endpoint).",
)


def wire_config(
    protocol: str,
    output: str | None,
    request: str | None,
    scores: str | None,
    headers: list[str] | None,
    input_shape: str | None = None,
    classes: str | None = None,
) -> Any:
    """The one :class:`~mlinvert.oracle.wire.WireConfig` of the wire options."""
    from mlinvert.oracle.wire import WireConfig

    names: tuple[str, ...] | None = None
    if classes is not None:
        names = tuple(c.strip() for c in classes.split(",") if c.strip())
        if len(names) == 1 and names[0].isdigit():
            names = tuple(str(i) for i in range(int(names[0])))
        if len(names) < 2:
            raise ConfigError(f"--classes must be a count >= 2 or names a,b,..., got {classes!r}")
    return WireConfig(
        protocol=protocol,  # type: ignore[arg-type]  # checked by WireConfig
        output=output,
        request=request,
        scores=scores,
        headers=WireConfig.parse_headers(headers or []),
        input_shape=None if input_shape is None else WireConfig.parse_shape(input_shape),
        class_names=names,
    )
