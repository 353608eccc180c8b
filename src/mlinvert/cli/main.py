"""The ``mlinvert`` command: a thin Typer front; each command calls one library function.

Each command module exposes ``register(app)``; user mistakes (any MlinvertError)
print one clear line and exit 2, never a traceback.
"""

from __future__ import annotations

import sys

import typer

from mlinvert.cli.common import console, setup_logging
from mlinvert.errors import MlinvertError


def build_app() -> typer.Typer:
    """Assemble the Typer application from the command modules."""
    from mlinvert.cli import attack, audit, export, keys, prior, serve, train

    app = typer.Typer(
        name="mlinvert",
        help="Audit and harden ML prediction APIs against model inversion (OWASP ML03).",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )

    @app.callback()
    def _root(
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
    ) -> None:
        setup_logging(verbose)

    for module in (train, prior, keys, serve, audit, attack, export):
        module.register(app)
    return app


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    try:
        # a command's own Ctrl-C is Typer's exit 130 (after the command's on_interrupt
        # message); this catches one while the command modules are still importing
        build_app()(args=argv, prog_name="mlinvert")
    except MlinvertError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
