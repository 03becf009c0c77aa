"""CLI: ``leukoflow acquire`` (the acquisition service).

Its options are generated from :class:`leukoflow.acquisition.service.AcquireConfig`
(section ``[acquire]``, ``LEUKOFLOW_ACQUIRE_*``); the segmentation/crop pipeline is
configured by ``[acquire_pipeline]`` and its stage tables ``[acquire_pipeline.crop]``, ...
(:class:`leukoflow.acquisition.pipeline.PipelineConfig`).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from leukoflow.cli.options import ConfigOptions

#: value ranges are checked where they are declared (leukoflow.core.config.validate)
ACQUIRE = ConfigOptions("leukoflow.acquisition.service:AcquireConfig", "acquire",
                        flags={"duration_s": "--duration", "rate_hz": "--rate"})


def acquire(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print the final accounting as JSON.")] = False,
) -> None:
    """Run the acquisition service: camera -> phase -> one crop per cell -> ZeroMQ.

    Publishes crop messages (PUSH, non-blocking; drops counted by reason) and sends
    accounting/EOS control messages to the collector. Stops on SIGTERM/SIGINT, at
    --frames/--duration, or at the end of a file source.
    """
    from leukoflow.acquisition.pipeline import SECTION as PIPELINE_SECTION
    from leukoflow.acquisition.pipeline import PipelineConfig
    from leukoflow.acquisition.service import AcquireService
    from leukoflow.acquisition.sources import SourceError
    from leukoflow.core.config import ConfigError, resolve

    cfg = ACQUIRE.resolve(ctx)
    try:
        pcfg = resolve(PIPELINE_SECTION, PipelineConfig, {})
    except ConfigError as exc:
        typer.echo(f"acquire: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    svc = AcquireService(cfg, pcfg)
    try:
        final = svc.run()
    except (SourceError, ValueError, OSError) as exc:
        typer.echo(f"acquire: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    if json_out:
        typer.echo(json.dumps(final, default=str))
    else:
        typer.echo(
            f"acquire: run {final.get('run')} stopped ({final.get('stop_reason')}): "
            f"{final.get('frames')} frames, {final.get('cells_emitted')} cells emitted, "
            f"dropped {final.get('cells_dropped')}, rejected {final.get('cells_rejected')}",
            err=True)


def register(app: typer.Typer) -> None:
    """Add ``acquire`` to ``app``."""
    app.command("acquire", cls=ACQUIRE.command_class())(acquire)
