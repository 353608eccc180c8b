"""Shared pieces of the CLI: the console, logging set-up, JSON output."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

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
