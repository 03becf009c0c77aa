"""CLI: run, record, replay, validate (placeholder until built)."""

from __future__ import annotations

import typer

from leukoflow.cli import not_built


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""

    @app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def run() -> None:
        """run: not built yet."""
        not_built("run")

    @app.command("record", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def record() -> None:
        """record: not built yet."""
        not_built("record")

    @app.command("replay", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def replay() -> None:
        """replay: not built yet."""
        not_built("replay")

    @app.command("validate", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def validate() -> None:
        """validate: not built yet."""
        not_built("validate")
