"""CLI: explain, audit (placeholder until built)."""

from __future__ import annotations

import typer

from leukoflow.cli import not_built


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""

    @app.command("explain", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def explain() -> None:
        """explain: not built yet."""
        not_built("explain")

    @app.command("audit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def audit() -> None:
        """audit: not built yet."""
        not_built("audit")
