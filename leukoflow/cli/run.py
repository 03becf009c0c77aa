"""CLI: ``run``, ``record`` (the collector service), ``replay``, ``validate``.

Heavy imports happen inside the command bodies so ``leukoflow --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def _echo_json(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=1, default=str))


def _print_summary(s: dict) -> None:
    """Human-readable end-of-run summary."""
    acc = s.get("accounting", {})
    typer.echo(f"run {s.get('run')}: emitted {acc.get('emitted', 0)}, counted "
               f"{acc.get('counted', 0)}, uncertain {acc.get('uncertain', 0)}, OOD "
               f"{acc.get('ood', 0)}, rejected {acc.get('rejected_total', 0)}, dropped "
               f"{acc.get('dropped_total', 0)} "
               f"({'balanced' if acc.get('balanced') else 'NOT balanced'})")
    for name, c in s.get("differential", {}).items():
        if c.get("fraction") is not None:
            typer.echo(f"  {name:11s} {100 * c['fraction']:5.1f} %  "
                       f"[{100 * c['lower']:5.1f}, {100 * c['upper']:5.1f}]")
    thr = s.get("throughput", {})
    lat = s.get("latency", {})
    if lat.get("run_p50_s") is not None:
        typer.echo(f"  {thr.get('mean_cells_per_s', 0):.0f} cells/s, latency p50 "
                   f"{1e3 * lat['run_p50_s']:.1f} ms, p99 {1e3 * lat['run_p99_s']:.1f} ms")
    if s.get("report"):
        typer.echo(f"  report: {s['report']}")


def _recorded_frame_rate(path: Path) -> float:
    """The ``imaging:frame rate`` of a recording [frames/s] (500 when absent)."""
    import h5py

    with h5py.File(path, "r") as h5:
        return float(h5.attrs.get("imaging:frame rate", 500.0))


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""

    @app.command("run")
    def run(
        source: Annotated[str, typer.Option(
            "--source", help="sim | file:PATH (raw holograms) | camera:... | replay:PATH "
            "(crop recording).")] = "sim",
        duration: Annotated[float | None, typer.Option(
            "--duration", help="Stop the source after this many seconds.")] = None,
        cells: Annotated[int | None, typer.Option(
            "--cells", help="Stop the source after this many emitted cells.")] = None,
        workers: Annotated[int, typer.Option("--workers", min=1, max=64,
                                             help="Inference workers.")] = 1,
        record: Annotated[Path | None, typer.Option(
            "--record", help="Record crops and predictions to this .rtdc file.")] = None,
        out: Annotated[Path | None, typer.Option(
            "--out", help="Run folder (default runs/<run id>).")] = None,
        json_out: Annotated[bool, typer.Option(
            "--json", help="Print the final summary as JSON (no live view).")] = False,
        no_explain: Annotated[bool, typer.Option(
            "--no-explain", help="Do not start the explainer.")] = False,
        backend: Annotated[str | None, typer.Option(
            "--backend", help="Inference backend (worker default: auto).")] = None,
        model: Annotated[str | None, typer.Option(
            "--model", help="Model artifact (default lenet5-sim).")] = None,
        seed: Annotated[int | None, typer.Option("--seed", help="Simulator seed.")] = None,
        zmq_base_port: Annotated[int, typer.Option(
            "--zmq-base-port", envvar="LEUKOFLOW_RUN_ZMQ_BASE_PORT",
            help="ZeroMQ ports: +0 crops, +1 collector, +2 explainer, +3 live, +4 tap.")
        ] = 5555,
        metrics_base_port: Annotated[int, typer.Option(
            "--metrics-base-port", envvar="LEUKOFLOW_RUN_METRICS_BASE_PORT",
            help="Metrics ports: +0 acquire, +1 infer, +2 explain, +3 collector "
            "(worker i>0: +10+i).")] = 9101,
        drain_timeout: Annotated[float, typer.Option(
            "--drain-timeout", help="Collector drain timeout after the source stops [s].")
        ] = 5.0,
        no_live: Annotated[bool, typer.Option("--no-live", help="No live view.")] = False,
    ) -> None:
        """Run everything on this machine: acquisition, inference, explainer, collector.

        Shows a live view on a terminal; Ctrl-C stops gracefully (source stops, queues
        drain, files flush, report written). Writes the run folder with summary.json, the
        cell log, logs/ and report/index.html.
        """
        import logging

        from leukoflow.run.liveview import LiveView, want_live_view
        from leukoflow.run.orchestrate import RunOptions, compact_summary, run_pipeline

        opts = RunOptions(
            source=source, duration_s=duration, cells=cells, workers=workers,
            record=str(record) if record else "", out=str(out) if out else "",
            explain=not no_explain, backend=backend or "", model=model or "", seed=seed,
            zmq_base_port=zmq_base_port, metrics_base_port=metrics_base_port,
            drain_timeout_s=drain_timeout)
        if source.startswith("replay:"):
            opts.source = source
        show = want_live_view(json_out) and not no_live
        view = LiveView() if show else None
        if view is not None:
            logging.getLogger().setLevel(logging.ERROR)
        try:
            summary = run_pipeline(opts, view=view)
        except (RuntimeError, OSError, ValueError) as exc:
            typer.echo(f"leukoflow run: {exc}", err=True)
            raise typer.Exit(1) from exc
        compact = compact_summary(summary)
        if json_out:
            _echo_json(compact)
        else:
            _print_summary(compact)
        if not summary.get("final"):
            typer.echo("leukoflow run: the collector wrote no final summary", err=True)
            raise typer.Exit(1)

    @app.command("record")
    def record_cmd(
        out: Annotated[Path | None, typer.Option(
            "--out", help="Record crops + predictions to this .rtdc file (needs --tap-in).")
        ] = None,
        results: Annotated[str | None, typer.Option(
            "--results", help="PULL endpoint to bind for results/control "
            "[default tcp://127.0.0.1:5556].")] = None,
        live: Annotated[str | None, typer.Option(
            "--live", help="PUB endpoint of the live state [default tcp://127.0.0.1:5558].")
        ] = None,
        tap_in: Annotated[str | None, typer.Option(
            "--tap-in", help="Acquisition crops endpoint to PULL from (recording tap).")
        ] = None,
        tap_out: Annotated[str | None, typer.Option(
            "--tap-out", help="Endpoint to bind where workers PULL the tapped crops.")
        ] = None,
        metrics_port: Annotated[int | None, typer.Option(
            "--metrics-port", help="/metrics port [default 9104].")] = None,
        run_dir: Annotated[str | None, typer.Option(
            "--run-dir", help="Folder for the cell log and summary.")] = None,
        run_id: Annotated[str | None, typer.Option("--run-id", help="Run id.")] = None,
        drain_timeout: Annotated[float | None, typer.Option(
            "--drain-timeout", help="Finish this long after the last message once the "
            "stream ended [s].")] = None,
        params_json: Annotated[str | None, typer.Option(
            "--params-json", help="JSON file with the run parameters to record.")] = None,
        keep_running: Annotated[bool, typer.Option(
            "--keep-running", help="Do not exit at end of stream.")] = False,
        json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")
                            ] = False,
    ) -> None:
        """Run the collector (counts, accounting, metrics, live state) and optional recorder.

        With --out and --tap-in/--tap-out it sits between acquisition and the workers and
        writes every cell's crop, features and predictions to .rtdc (crash-safe).
        """
        from leukoflow.core.config import ConfigError, resolve
        from leukoflow.run.collector import Collector, CollectorConfig

        if out is not None and not (tap_in or tap_out):
            typer.echo("leukoflow record: --out needs --tap-in and --tap-out (the crops come "
                       "from the tap)", err=True)
            raise typer.Exit(2)
        try:
            cfg = resolve("collector", CollectorConfig, {
                "results": results, "live": live, "metrics_port": metrics_port,
                "run_dir": run_dir, "run_id": run_id, "record": str(out) if out else None,
                "tap_in": tap_in, "tap_out": tap_out, "drain_timeout_s": drain_timeout,
                "params_json": params_json, "exit_on_eos": False if keep_running else None,
            })
        except ConfigError as exc:
            typer.echo(f"leukoflow record: {exc}", err=True)
            raise typer.Exit(2) from exc
        try:
            summary = Collector(cfg).run()
        except Exception as exc:
            typer.echo(f"leukoflow record: {type(exc).__name__}: {exc}", err=True)
            raise typer.Exit(1) from exc
        if json_out:
            _echo_json({k: summary[k] for k in ("accounting", "differential", "recording")})

    @app.command("replay")
    def replay_cmd(
        file: Annotated[Path, typer.Argument(help="Recording (.rtdc) to replay.",
                                             exists=True, dir_okay=False)],
        realtime: Annotated[bool, typer.Option(
            "--realtime", help="Replay at the recorded pace.")] = False,
        rate: Annotated[float | None, typer.Option(
            "--rate", help="Replay at this many cells/s (crops) or frames/s (raw).")] = None,
        workers: Annotated[int, typer.Option("--workers", min=1, max=64)] = 1,
        out: Annotated[Path | None, typer.Option("--out", help="Run folder.")] = None,
        record: Annotated[Path | None, typer.Option(
            "--record", help="Record the replayed run to this .rtdc.")] = None,
        explain: Annotated[bool, typer.Option(
            "--explain/--no-explain", help="Start the explainer.")] = False,
        backend: Annotated[str | None, typer.Option("--backend")] = None,
        model: Annotated[str | None, typer.Option("--model")] = None,
        zmq_base_port: Annotated[int, typer.Option(
            "--zmq-base-port", envvar="LEUKOFLOW_RUN_ZMQ_BASE_PORT")] = 5555,
        metrics_base_port: Annotated[int, typer.Option(
            "--metrics-base-port", envvar="LEUKOFLOW_RUN_METRICS_BASE_PORT")] = 9101,
        json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")
                            ] = False,
    ) -> None:
        """Replay a recording through the pipeline and compare with the recorded decisions.

        Crop recordings go straight into inference; raw-hologram recordings (qpi_oah)
        through acquisition. Default pace: as fast as possible.
        """
        from leukoflow.run.liveview import LiveView, want_live_view
        from leukoflow.run.orchestrate import RunOptions, compact_summary, run_pipeline
        from leukoflow.run.replay import compare_decisions, recording_kind

        if realtime and rate:
            typer.echo("leukoflow replay: use --realtime or --rate, not both", err=True)
            raise typer.Exit(2)
        try:
            kind = recording_kind(file)
        except (ValueError, OSError) as exc:
            typer.echo(f"leukoflow replay: {exc}", err=True)
            raise typer.Exit(2) from exc
        opts = RunOptions(
            source=f"replay:{file.resolve()}" if kind == "crops" else f"file:{file.resolve()}",
            workers=workers, out=str(out) if out else "", record=str(record) if record else "",
            explain=explain, backend=backend or "", model=model or "",
            zmq_base_port=zmq_base_port, metrics_base_port=metrics_base_port,
            replay_rate=rate, replay_realtime=realtime)
        if kind == "raw" and (rate or realtime):
            opts.rate_hz = rate if rate else _recorded_frame_rate(file)
        view = LiveView() if want_live_view(json_out) else None
        try:
            summary = run_pipeline(opts, view=view)
        except (RuntimeError, OSError, ValueError) as exc:
            typer.echo(f"leukoflow replay: {exc}", err=True)
            raise typer.Exit(1) from exc
        compact = compact_summary(summary)
        if kind == "crops":
            compact["comparison"] = compare_decisions(file, summary["run_dir"])
            Path(summary["run_dir"], "replay_comparison.json").write_text(
                json.dumps(compact["comparison"], indent=1))
        if json_out:
            _echo_json(compact)
        else:
            _print_summary(compact)
            if "comparison" in compact:
                c = compact["comparison"]
                typer.echo(f"  replay vs recording: {c['identical']}/{c['recorded']} "
                           f"identical decisions, {c['missing']} missing")
        if not summary.get("final"):
            raise typer.Exit(1)

    @app.command("replay-publish", hidden=True)
    def replay_publish(
        file: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
        crops: Annotated[str, typer.Option("--crops")] = "tcp://127.0.0.1:5555",
        collector: Annotated[str, typer.Option("--collector")] = "tcp://127.0.0.1:5556",
        run_id: Annotated[str, typer.Option("--run-id")] = "replay",
        rate: Annotated[float | None, typer.Option("--rate")] = None,
        realtime: Annotated[bool, typer.Option("--realtime")] = False,
    ) -> None:
        """Publish a crop recording into inference (the replay source of ``run``)."""
        import signal

        from leukoflow.run.replay import ReplayPublisher

        pub = ReplayPublisher(file, crops, collector, run_id, rate=rate, realtime=realtime)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: pub.stop())
        stats = pub.run()
        typer.echo(json.dumps(stats), err=True)

    @app.command("validate")
    def validate_cmd(
        file: Annotated[Path, typer.Argument(help="Labelled recording (.rtdc).",
                                             exists=True, dir_okay=False)],
        json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
        html: Annotated[Path | None, typer.Option(
            "--html", help="Write an HTML report (folder, or a .html file).")] = None,
    ) -> None:
        """Compare a recording's predictions with its labels.

        Confusion matrix, per-class precision/recall/F1, differential error per class [pp],
        calibration (ECE, 15 bins; reliability diagram), OOD rejection rates.
        """
        from leukoflow.reports.report import write_validation_report as write_html
        from leukoflow.reports.validate import validate_recording

        try:
            res = validate_recording(file)
        except (ValueError, OSError, KeyError) as exc:
            typer.echo(f"leukoflow validate: {exc}", err=True)
            raise typer.Exit(2) from exc
        if html is not None:
            res["html"] = str(write_html(res, html))
        if json_out:
            _echo_json(res)
            return
        cls = res["classification"]
        typer.echo(f"{file}: {res['labelled_in_distribution']} labelled cells, "
                   f"{res['ood_objects']} OOD objects")
        typer.echo(f"  accuracy {cls['accuracy']:.4f}; counted-cell accuracy "
                   f"{cls['counted']['accuracy']}; ECE {res.get('calibration', {}).get('ece')}")
        for name, v in res["differential"]["classes"].items():
            if v["error_pp"] is not None:
                typer.echo(f"  {name:11s} live {100 * v['live']:5.1f} %  true "
                           f"{100 * v['true']:5.1f} %  error {v['error_pp']:+.2f} pp")
        ood = res["ood"]
        typer.echo(f"  OOD rejection {ood['rejection_rate']}, false rejection "
                   f"{ood['false_rejection_rate']}")
        if html is not None:
            typer.echo(f"  report: {res['html']}")


__all__ = ["register"]
