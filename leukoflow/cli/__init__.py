"""The ``leukoflow`` command line (one Typer app).

One style for every command module ``leukoflow/cli/<group>.py``: commands are module-level
functions with ``Annotated`` options, and the module ends with ``register(app)`` that
attaches them (``app.command("name")(func)``) or adds a module-level ``typer.Typer()``
sub-app (``app.add_typer``). A service's options are generated from its config dataclass
(:mod:`leukoflow.cli.options`), so defaults are written once and every parameter can be set
by TOML, ``LEUKOFLOW_<SECTION>_<KEY>`` or flag. Stage imports happen inside command bodies
only, so that ``leukoflow --help`` answers quickly. A new command: a new module and one
line in :func:`_register_all`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from leukoflow import __version__

app = typer.Typer(
    name="leukoflow",
    help="Live four-part white-blood-cell differential for flow QPI instruments.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"leukoflow {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option("--config", envvar="LEUKOFLOW_CONFIG", help="TOML configuration file.",
                     exists=True, dir_okay=False),
    ] = None,
    log_level: Annotated[
        str, typer.Option("--log-level", envvar="LEUKOFLOW_LOG_LEVEL", help="Logging level.")
    ] = "WARNING",
) -> None:
    """Global options; configuration precedence: defaults < TOML < LEUKOFLOW_* env < flags."""
    import logging

    if config is not None:
        os.environ["LEUKOFLOW_CONFIG"] = str(config)
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _register_all() -> None:
    from leukoflow.cli import (
        acquire,
        bench,
        explain,
        infer,
        info,
        keys,
        models,
        qc,
        reconstruct,
        run,
        simulate,
    )

    for mod in (simulate, reconstruct, acquire, infer, explain, run, models, bench, qc, keys,
                info):
        mod.register(app)


_register_all()


def main() -> None:
    """Console-script entry point."""
    app()
