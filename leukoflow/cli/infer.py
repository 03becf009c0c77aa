"""CLI: ``leukoflow infer`` — run one inference worker.

Heavy imports (torch, the backends) happen inside the command body.
"""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""

    @app.command("infer")
    def infer(
        model: Annotated[str | None, typer.Option(
            "--model", help="Model artifact name or folder (default lenet5-sim).")] = None,
        backend: Annotated[str | None, typer.Option(
            "--backend",
            help="auto | tensorrt | torch-cuda | onnxruntime | torch-cpu (default auto).")
        ] = None,
        max_batch: Annotated[int | None, typer.Option(
            "--max-batch", help="Largest batch (cells) (default 256).")] = None,
        max_delay_ms: Annotated[float | None, typer.Option(
            "--max-delay-ms", help="Longest wait of the oldest cell (ms) (default 2).")] = None,
        threads: Annotated[int | None, typer.Option(
            "--threads", help="CPU threads of CPU backends (default 1).")] = None,
        precision: Annotated[str | None, typer.Option(
            "--precision", help="GPU precision fp16 | fp32 (default fp16).")] = None,
        crops_endpoint: Annotated[str | None, typer.Option(
            "--crops-endpoint", help="Acquisition PUSH to connect to "
            "[default: tcp://127.0.0.1:5555].")] = None,
        results_endpoint: Annotated[str | None, typer.Option(
            "--results-endpoint", help="Collector PULL to connect to "
            "[default: tcp://127.0.0.1:5556].")] = None,
        explain_endpoint: Annotated[str | None, typer.Option(
            "--explain-endpoint", help="Explainer PULL to connect to ('' disables) "
            "[default: tcp://127.0.0.1:5557].")] = None,
        explain_sample_rate: Annotated[float | None, typer.Option(
            "--explain-sample-rate",
            help="Fraction of confident cells also explained (default 0.01).")] = None,
        metrics_port: Annotated[int | None, typer.Option(
            "--metrics-port", help="/metrics /healthz /readyz port on 127.0.0.1 (-1 off) "
            "[default: 9102].")] = None,
        cache_dir: Annotated[str | None, typer.Option(
            "--cache-dir", help="ONNX/TensorRT export cache root.")] = None,
        print_config: Annotated[bool, typer.Option(
            "--print-config", help="Print the resolved configuration as JSON and exit.")
        ] = False,
    ) -> None:
        """Run an inference worker: batch crops, classify, count, route flagged cells.

        Stops gracefully (pending cells finished, totals sent) on SIGTERM, SIGINT or a
        control ``stop`` message.
        """
        import json

        from leukoflow.core.config import ConfigError, as_dict, resolve
        from leukoflow.inference.worker import SECTION, InferConfig, InferWorker

        try:
            cfg = resolve(SECTION, InferConfig, {
                "model": model, "backend": backend, "max_batch": max_batch,
                "max_delay_ms": max_delay_ms, "threads": threads, "precision": precision,
                "crops_endpoint": crops_endpoint, "results_endpoint": results_endpoint,
                "explain_endpoint": explain_endpoint,
                "explain_sample_rate": explain_sample_rate, "metrics_port": metrics_port,
                "cache_dir": cache_dir,
            })
        except ConfigError as exc:
            typer.echo(f"leukoflow infer: {exc}", err=True)
            raise typer.Exit(2) from exc
        if print_config:
            typer.echo(json.dumps(as_dict(cfg), indent=2))
            return
        worker = InferWorker(cfg)  # run() routes SIGTERM/SIGINT to a graceful stop
        try:
            worker.run()
        except Exception as exc:  # clear message, non-zero exit
            typer.echo(f"leukoflow infer: {type(exc).__name__}: {exc}", err=True)
            raise typer.Exit(1) from exc
