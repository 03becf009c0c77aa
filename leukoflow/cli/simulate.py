"""CLI: simulate (placeholder until built)."""

from __future__ import annotations

import typer

from leukoflow.cli import not_built


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""

    @app.command("simulate", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def simulate() -> None:
        """simulate: not built yet."""
        not_built("simulate")
