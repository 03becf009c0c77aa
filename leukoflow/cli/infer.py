"""CLI: infer (placeholder until built)."""

from __future__ import annotations

import typer

from leukoflow.cli import not_built


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""

    @app.command("infer", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def infer() -> None:
        """infer: not built yet."""
        not_built("infer")
