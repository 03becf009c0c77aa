"""CLI: ``leukoflow acquire`` (the acquisition service)."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""

    @app.command("acquire")
    def acquire(
        source: Annotated[str | None, typer.Option(
            "--source", help="sim[:SEED[:CONCENTRATION]] | file:PATH | camera:opencv:INDEX | "
            "camera:genicam")
        ] = None,
        frames: Annotated[int | None, typer.Option(
            "--frames", min=0, help="Stop after N frames (0 = no limit).")] = None,
        duration: Annotated[float | None, typer.Option(
            "--duration", min=0.0, help="Stop after S seconds (0 = no limit).")] = None,
        rate: Annotated[float | None, typer.Option(
            "--rate", min=0.0, help="Pace sim/file frames at R frames/s (0 = max speed).")
        ] = None,
        crops_endpoint: Annotated[str | None, typer.Option(
            "--crops-endpoint", help="PUSH bind address for crops.")] = None,
        collector_endpoint: Annotated[str | None, typer.Option(
            "--collector-endpoint", help="Collector PULL address (accounting, EOS).")] = None,
        metrics_port: Annotated[int | None, typer.Option(
            "--metrics-port", min=0, max=65535, help="Port of /metrics /healthz /readyz.")
        ] = None,
        seed: Annotated[int | None, typer.Option("--seed", help="Simulator seed.")] = None,
        run_id: Annotated[str | None, typer.Option("--run-id", help="Run id.")] = None,
        json_out: Annotated[bool, typer.Option(
            "--json", help="Print the final accounting as JSON.")] = False,
    ) -> None:
        """Run the acquisition service: camera -> phase -> one crop per cell -> ZeroMQ.

        Publishes crop messages (PUSH, non-blocking; drops counted by reason) and sends
        accounting/EOS control messages to the collector. Stops on SIGTERM/SIGINT, at
        --frames/--duration, or at the end of a file source.
        """
        import json

        from leukoflow.acquisition.pipeline import PipelineConfig
        from leukoflow.acquisition.service import AcquireConfig, AcquireService
        from leukoflow.acquisition.sources import SourceError
        from leukoflow.core.config import ConfigError, resolve

        cli = {"source": source, "frames": frames, "duration_s": duration, "rate_hz": rate,
               "crops_endpoint": crops_endpoint, "collector_endpoint": collector_endpoint,
               "metrics_port": metrics_port, "seed": seed, "run_id": run_id}
        try:
            cfg = resolve("acquire", AcquireConfig, cli)
            pcfg = resolve("acquire_pipeline", PipelineConfig, {})
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
