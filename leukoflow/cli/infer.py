"""CLI: ``leukoflow infer`` - run one inference worker.

Its options are generated from :class:`leukoflow.inference.worker.InferConfig` (section
``[infer]``, ``LEUKOFLOW_INFER_*``). Heavy imports (torch, the backends) happen inside the
command body.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from leukoflow.cli.options import ConfigOptions

INFER = ConfigOptions("leukoflow.inference.worker:InferConfig", "infer")


def infer(
    ctx: typer.Context,
    print_config: Annotated[bool, typer.Option(
        "--print-config", help="Print the resolved configuration as JSON and exit.")] = False,
) -> None:
    """Run an inference worker: batch crops, classify, count, route flagged cells.

    Stops gracefully (pending cells finished, totals sent) on SIGTERM, SIGINT or a
    control ``stop`` message.
    """
    from leukoflow.core.config import as_dict
    from leukoflow.inference.worker import InferWorker

    cfg = INFER.resolve(ctx)
    if print_config:
        typer.echo(json.dumps(as_dict(cfg), indent=2))
        return
    worker = InferWorker(cfg)  # run() routes SIGTERM/SIGINT to a graceful stop
    try:
        worker.run()
    except Exception as exc:  # clear message, non-zero exit
        typer.echo(f"leukoflow infer: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from exc


def register(app: typer.Typer) -> None:
    """Add ``infer`` to ``app``."""
    app.command("infer", cls=INFER.command_class())(infer)
