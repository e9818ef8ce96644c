"""CLI commands of the `service` package (registered on the single `pdl1` app)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach this package's commands to `app`; keep imports of heavy modules inside the commands."""
