"""CLI: ``run``, ``record`` (the collector service), ``replay``, ``validate``.

``run`` and ``replay`` take their options from :class:`leukoflow.run.orchestrate.RunOptions`
(section ``[run]``, ``LEUKOFLOW_RUN_*``), ``record`` from
:class:`leukoflow.run.collector.CollectorConfig` (section ``[collector]``,
``LEUKOFLOW_COLLECTOR_*``). Heavy imports happen inside the command bodies so
``leukoflow --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer

from leukoflow.cli.options import ConfigOptions

_RUN_FLAGS = {"duration_s": "--duration", "drain_timeout_s": "--drain-timeout",
              "rate_hz": "--rate", "ready_timeout_s": "--ready-timeout"}
_RUN_EXTRA = {"workers": {"min": 1, "max": 64}}

#: every RunOptions field is a ``run`` option except the ones ``replay`` sets
RUN = ConfigOptions("leukoflow.run.orchestrate:RunOptions", "run",
                    exclude=("replay_rate", "replay_realtime", "extra_acquire_args"),
                    flags=_RUN_FLAGS, extra=_RUN_EXTRA)
#: replay sets the source, pace, explainer and stop condition itself
REPLAY = ConfigOptions("leukoflow.run.orchestrate:RunOptions", "run",
                       exclude=("source", "duration_s", "cells", "explain", "seed", "rate_hz",
                                "as_fast_as_possible", "replay_rate", "replay_realtime",
                                "extra_acquire_args"),
                       flags=_RUN_FLAGS, extra=_RUN_EXTRA)
COLLECTOR = ConfigOptions("leukoflow.run.collector:CollectorConfig", "collector",
                          exclude=("record",),
                          flags={"drain_timeout_s": "--drain-timeout",
                                 "exit_on_eos": "--keep-running"},
                          extra={"exit_on_eos": {"help": "Do not exit at end of stream."}})


def _echo_json(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=1, default=str))


def _print_summary(s: dict) -> None:
    """Human-readable end-of-run summary."""
    acc = s.get("accounting", {})
    typer.echo(f"run {s.get('run')}: emitted {acc.get('emitted', 0)}, counted "
               f"{acc.get('counted', 0)}, uncertain {acc.get('uncertain', 0)}, OOD "
               f"{acc.get('ood', 0)}, rejected {acc.get('rejected_total', 0)}, dropped "
               f"{acc.get('dropped_total', 0)}, lost {acc.get('lost_total', 0)} "
               f"({'balanced' if acc.get('balanced') else 'NOT balanced'})")
    for line in _loss_lines(s):
        typer.echo(f"  WARNING: {line}")
    validity = s.get("validity") or {}
    for reason in validity.get("reasons", []):
        typer.echo(f"  DIFFERENTIAL NOT VALID: {reason}")
    for warning in validity.get("warnings", []):
        typer.echo(f"  WARNING: {warning}")
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


def _loss_lines(s: dict) -> list[str]:
    """What the run lost or fell behind on, one line each (empty when nothing)."""
    acc = s.get("accounting", {})
    out = []
    if acc.get("lost_total"):
        why = ", ".join(f"{k} {v}" for k, v in sorted((acc.get("lost") or {}).items()) if v)
        out.append(f"{acc['lost_total']} cells lost ({why})")
    if acc.get("duplicates"):
        out.append(f"{acc['duplicates']} duplicate cells received (counted once)")
    cam = s.get("camera")  # compact_summary: acquisition processes added up
    if isinstance(cam, dict) and cam.get("frames_dropped_total"):
        reasons = ", ".join(f"{k} {v}" for k, v in sorted((cam.get("frames_dropped")
                                                            or {}).items()))
        rate = (f"{cam['steady_hz']:.0f} of {cam['nominal_hz']:.0f} frames/s, "
                if cam.get("steady_hz") and cam.get("nominal_hz") else "")
        out.append(f"camera: {rate}{cam['frames_dropped_total']} frames dropped "
                   f"({100 * cam.get('frames_dropped_fraction', 0.0):.1f} %; {reasons}), "
                   f"~{cam.get('cells_in_dropped_frames_estimate', 0.0):.0f} cells in them "
                   "not counted")
    return out


def _recorded_frame_rate(path: Path) -> float:
    """The ``imaging:frame rate`` of a recording [frames/s] (500 when absent)."""
    import h5py

    with h5py.File(path, "r") as h5:
        return float(h5.attrs.get("imaging:frame rate", 500.0))


def run(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print the final summary as JSON (no live view).")] = False,
) -> None:
    """Run everything on this machine: acquisition, inference, explainer, collector.

    Shows a live view on a terminal; Ctrl-C stops gracefully (source stops, queues
    drain, files flush, report written). Writes the run folder with summary.json, the
    cell log, logs/ and report/index.html.
    """
    import logging

    from leukoflow.run.liveview import LiveView, want_live_view
    from leukoflow.run.orchestrate import compact_summary, run_pipeline

    opts = RUN.resolve(ctx)
    view = LiveView() if want_live_view(json_out) and opts.live else None
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


def record(
    ctx: typer.Context,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Record crops + predictions to this .rtdc file (needs --tap-in and "
        "--tap-out).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")
                        ] = False,
) -> None:
    """Run the collector (counts, accounting, metrics, live state) and optional recorder.

    With --out and --tap-in/--tap-out it sits between acquisition and the workers and
    writes every cell's crop, features and predictions to .rtdc (crash-safe).
    """
    from leukoflow.run.collector import Collector

    given = COLLECTOR.given(ctx)
    if out is not None and not (given.get("tap_in") or given.get("tap_out")):
        typer.echo("leukoflow record: --out needs --tap-in and --tap-out (the crops come "
                   "from the tap)", err=True)
        raise typer.Exit(2)
    cfg = COLLECTOR.resolve(ctx, record=str(out) if out else None)
    try:
        summary = Collector(cfg).run()
    except Exception as exc:
        typer.echo(f"leukoflow record: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from exc
    if json_out:
        _echo_json({k: summary[k] for k in ("accounting", "differential", "recording")})


def replay(
    ctx: typer.Context,
    files: Annotated[list[str], typer.Argument(
        help="Recording (.rtdc) to replay; with --fast: several, or glob patterns.")],
    realtime: Annotated[bool, typer.Option(
        "--realtime", help="Replay at the recorded pace.")] = False,
    rate: Annotated[float | None, typer.Option(
        "--rate", help="Replay at this many cells/s (crops) or frames/s (raw).")] = None,
    explain: Annotated[bool, typer.Option(
        "--explain/--no-explain", help="Start the explainer.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")
                        ] = False,
    fast: Annotated[bool, typer.Option(
        "--fast", help="No pipeline: run the model on the recorded crops (one Dask task "
        "per recording), compare with the recorded decisions, validate against labels.")
    ] = False,
    scheduler: Annotated[str | None, typer.Option(
        "--scheduler", help="With --fast: Dask scheduler ('local' or tcp://host:8786).")
    ] = None,
    html: Annotated[Path | None, typer.Option(
        "--html", help="With --fast: write the validation report here.")] = None,
) -> None:
    """Replay a recording through the pipeline and compare with the recorded decisions.

    Crop recordings go straight into inference; raw-hologram recordings (qpi_oah)
    through acquisition. Default pace: as fast as possible. --fast: many crop recordings
    on Dask, model only (see ``validate``).
    """
    from leukoflow.run.liveview import LiveView, want_live_view
    from leukoflow.run.orchestrate import compact_summary, run_pipeline
    from leukoflow.run.replay import compare_decisions, recording_kind

    if fast:
        o = REPLAY.resolve(ctx)
        backend = o.backend if o.backend not in ("", "auto") else "onnxruntime"
        _archive("fast-replay", files, scheduler, None, html, json_out,
                 model=o.model or None, backend=backend)
        return
    if len(files) != 1 or scheduler:
        typer.echo("leukoflow replay: one recording through the pipeline; several (or "
                   "--scheduler) need --fast", err=True)
        raise typer.Exit(2)
    file = Path(files[0])
    if not file.is_file():
        typer.echo(f"leukoflow replay: recording not found: {file}", err=True)
        raise typer.Exit(2)
    if realtime and rate:
        typer.echo("leukoflow replay: use --realtime or --rate, not both", err=True)
        raise typer.Exit(2)
    try:
        kind = recording_kind(file)
    except (ValueError, OSError) as exc:
        typer.echo(f"leukoflow replay: {exc}", err=True)
        raise typer.Exit(2) from exc
    opts = dataclasses.replace(
        REPLAY.resolve(ctx),
        source=f"replay:{file.resolve()}" if kind == "crops" else f"file:{file.resolve()}",
        explain=explain, replay_rate=rate, replay_realtime=realtime, duration_s=None,
        cells=None, rate_hz=None)
    if kind == "raw" and (rate or realtime):
        opts.rate_hz = rate if rate else _recorded_frame_rate(file)
    view = LiveView() if want_live_view(json_out) and opts.live else None
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


def replay_publish(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    crops: Annotated[str | None, typer.Option(
        "--crops", help="Crop endpoint to bind (default: the transport's crops endpoint).")
    ] = None,
    collector: Annotated[str | None, typer.Option(
        "--collector", help="Collector endpoint (default: the transport's).")] = None,
    run_id: Annotated[str, typer.Option("--run-id")] = "replay",
    rate: Annotated[float | None, typer.Option("--rate")] = None,
    realtime: Annotated[bool, typer.Option("--realtime")] = False,
) -> None:
    """Publish a crop recording into inference (the replay source of ``run``)."""
    from leukoflow.core.service import StopSignals
    from leukoflow.core.transport import DEFAULT_ENDPOINTS
    from leukoflow.run.replay import ReplayPublisher

    pub = ReplayPublisher(file, crops or DEFAULT_ENDPOINTS["crops"],
                          collector or DEFAULT_ENDPOINTS["collector"], run_id, rate=rate,
                          realtime=realtime)
    with StopSignals(lambda _sig: pub.stop()):
        stats = pub.run()
    typer.echo(json.dumps(stats), err=True)


def validate(
    files: Annotated[list[str], typer.Argument(
        help="Labelled recordings (.rtdc): paths or glob patterns ('runs/*/run.rtdc').")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    html: Annotated[Path | None, typer.Option(
        "--html", help="Write an HTML report (folder, or a .html file).")] = None,
    scheduler: Annotated[str | None, typer.Option(
        "--scheduler", help="Dask scheduler for many recordings: 'local' (a local cluster "
        "sized to this machine; the default with several recordings) or tcp://host:8786.")
    ] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", help="Workers of a local Dask cluster (default: the cores).")] = None,
) -> None:
    """Compare recordings' predictions with their labels.

    Confusion matrix, per-class precision/recall/F1, differential error per class [pp],
    calibration (ECE, 15 bins; reliability diagram), OOD rejection rates. Several recordings
    (or --scheduler): one Dask task each, per-recording rows and pooled numbers with
    intervals.
    """
    from leukoflow.reports.report import write_validation_report as write_html
    from leukoflow.reports.validate import validate_recording

    if len(files) > 1 or scheduler or any(c in files[0] for c in "*?["):
        _archive("validate", files, scheduler, workers, html, json_out)
        return
    file = Path(files[0])
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


def _archive(mode: str, files: list[str], scheduler: str | None, workers: int | None,
             html: Path | None, json_out: bool, model: str | None = None,
             backend: str = "onnxruntime") -> None:
    """Many recordings on Dask (:mod:`leukoflow.reports.archive`): print and report."""
    from leukoflow.reports.archive import validate_archive, write_archive_report

    cmd = "validate" if mode == "validate" else "replay --fast"
    try:
        res = validate_archive(files, scheduler=scheduler, mode=mode, model=model,
                               backend=backend, n_workers=workers)
    except (FileNotFoundError, ValueError, OSError) as exc:
        typer.echo(f"leukoflow {cmd}: {exc}", err=True)
        raise typer.Exit(2) from exc
    if html is not None:
        res["html"] = str(write_archive_report(res, html))
    if json_out:
        _echo_json({k: v for k, v in res.items() if k != "results"})
    else:
        cl = res["cluster"]
        typer.echo(f"{len(res['recordings'])} recordings on Dask ({cl['scheduler']}, "
                   f"{cl['workers']} workers, {cl['seconds']:.1f} s); {res['failed']} failed")
        for r in res["recordings"]:
            if r["status"] != "ok":
                typer.echo(f"  {Path(r['file']).name}: ERROR {r['error']}")
                continue
            extra = (f", {r['identical_decisions']}/{r['compared']} identical decisions"
                     if "compared" in r else "")
            typer.echo(f"  {Path(r['file']).name}: accuracy {r['accuracy']}, max |error| "
                       f"{r['max_abs_error_pp']} pp{extra}")
        p = res["pooled"]
        if p.get("recordings"):
            typer.echo(f"pooled over {p['recordings']} recordings: accuracy "
                       f"{p['classification']['accuracy']:.4f}")
            for name, v in p["differential"]["classes"].items():
                lo, hi = v["error_pp_ci95"]
                if v["error_pp"] is not None:
                    typer.echo(f"  {name:11s} error {v['error_pp']:+.2f} pp (95 % "
                               f"{lo if lo is None else round(lo, 2)}, "
                               f"{hi if hi is None else round(hi, 2)})")
        if html is not None:
            typer.echo(f"  report: {res['html']}")
    if res["failed"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``run``, ``record``, ``replay``, ``validate`` (and the hidden replay source)."""
    app.command("run", cls=RUN.command_class())(run)
    app.command("record", cls=COLLECTOR.command_class())(record)
    app.command("replay", cls=REPLAY.command_class())(replay)
    app.command("replay-publish", hidden=True)(replay_publish)
    app.command("validate")(validate)
