"""CLI: train, calibrate, evaluate, export (placeholder until built)."""

from __future__ import annotations

import typer

from leukoflow.cli import not_built


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""

    @app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def train() -> None:
        """train: not built yet."""
        not_built("train")

    @app.command("calibrate", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def calibrate() -> None:
        """calibrate: not built yet."""
        not_built("calibrate")

    @app.command("evaluate", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def evaluate() -> None:
        """evaluate: not built yet."""
        not_built("evaluate")

    @app.command("export", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def export() -> None:
        """export: not built yet."""
        not_built("export")
