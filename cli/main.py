"""`pdl1`: one entry point. Sub-commands live next to their code and import heavy libraries lazily."""

from __future__ import annotations

import logging

import typer
from rich.console import Console
from rich.logging import RichHandler

from export.commands import register as register_export
from service.commands import register as register_service
from training.commands import register as register_training

app = typer.Typer(
    name="pdl1",
    help="PD-L1 status from DECT iodine maps: synthesise, preprocess, reproduce the study, export, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    """Configure logging once for every sub-command."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        # logs go to stderr: stdout carries the commands' results (JSON, tags, paths) for pipes
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)],
    )


register_training(app)
register_export(app)
register_service(app)

if __name__ == "__main__":  # pragma: no cover
    app()
