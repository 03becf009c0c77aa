"""Prometheus metrics and health endpoints shared by every leukoflow service.

Each service process owns one :class:`prometheus_client.CollectorRegistry` (no global state,
so several services can run in one test process) and one :class:`HealthServer` that serves
``/metrics``, ``/healthz`` (live: the main loop ticked recently) and ``/readyz`` (ready: the
service says so, e.g. model loaded and warmed up) on loopback.

Metric names follow Prometheus conventions (``leukoflow_`` prefix, base units, ``_total``
counters). :data:`METRIC_NAMES` is the single list of families; ``deploy/`` dashboards and
rules are tested against it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from leukoflow import __version__
from leukoflow.core import curve

#: Latency buckets [s]: sub-millisecond resolution up to 5 s.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
#: Batch-size buckets [cells]: powers of two up to 4096.
BATCH_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(13))
#: Confidence (max calibrated probability) buckets.
CONFIDENCE_BUCKETS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
#: OOD-score buckets (detector units; scores are shifted so the threshold is 0).
OOD_BUCKETS: tuple[float, ...] = (-4, -2, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 2, 4, 8)

#: Every metric family leukoflow exports: name -> (type, help, labels, service).
METRIC_NAMES: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    # common
    "leukoflow_service_info": ("gauge", "Service identity (value 1)", ("service", "version", "run_id"), "all"),
    "leukoflow_ready": ("gauge", "1 when the service is ready", (), "all"),
    "leukoflow_dropped_total": ("counter", "Cells dropped, by stage and reason", ("stage", "reason"), "all"),
    "leukoflow_stage_duration_seconds": ("histogram", "Processing time per stage", ("stage",), "all"),
    "leukoflow_queue_depth": ("gauge", "Items waiting in a queue", ("queue",), "all"),
    "leukoflow_messages_rejected_total": ("counter", "Wire messages rejected, by reason", ("reason",), "all"),
    "leukoflow_sequence_gaps_total": ("counter", "Messages missing by sequence number", (), "all"),
    # acquisition
    "leukoflow_frames_total": ("counter", "Camera frames received", (), "acquire"),
    "leukoflow_frames_rejected_total": ("counter", "Camera frames rejected, by reason", ("reason",), "acquire"),
    "leukoflow_cells_detected_total": ("counter", "Objects segmented (all frames)", (), "acquire"),
    "leukoflow_cells_rejected_total": ("counter", "Cells rejected by quality gates, by reason", ("reason",), "acquire"),
    "leukoflow_cells_emitted_total": ("counter", "Cells published to inference", (), "acquire"),
    "leukoflow_tracks_active": ("gauge", "Open tracks", (), "acquire"),
    "leukoflow_camera_stalls_total": ("counter", "Camera stalls/dropouts detected", (), "acquire"),
    "leukoflow_camera_frame_age_seconds": ("gauge", "Age of the newest camera frame", (), "acquire"),
    "leukoflow_frames_dropped_total": ("counter", "Camera frames lost before processing, by reason (overrun: not taken in time; camera: frame-counter gap)", ("reason",), "acquire"),
    "leukoflow_frame_rate_nominal_hertz": ("gauge", "Camera frame rate to keep up with [frames/s] (0: unpaced run)", (), "acquire"),
    "leukoflow_frame_rate_achieved_hertz": ("gauge", "Frames taken per second over the last 5 s", (), "acquire"),
    "leukoflow_frame_backlog": ("gauge", "Frames captured and not yet taken", (), "acquire"),
    "leukoflow_warming_up": ("gauge", "1 during the warm-up after the first frame (rate and latency alerts wait)", (), "acquire"),
    "leukoflow_cells_in_dropped_frames": ("gauge", "Estimated cells that passed in dropped frames", (), "acquire"),
    "leukoflow_frames_skipped_total": ("counter", "Frames not reconstructed, by reason (empty: prescreen found no object)", ("reason",), "acquire"),
    "leukoflow_prescreen_audits_total": ("counter", "Skipped frames processed in full anyway, by outcome (missed: an object was there)", ("outcome",), "acquire"),
    # inference (Triton-like families)
    "leukoflow_inference_request_success_total": ("counter", "Crop messages processed", (), "infer"),
    "leukoflow_inference_request_failure_total": ("counter", "Crop messages failed", ("reason",), "infer"),
    "leukoflow_inference_count_total": ("counter", "Cells inferred", (), "infer"),
    "leukoflow_inference_exec_count_total": ("counter", "Batches executed", (), "infer"),
    "leukoflow_inference_pending_requests": ("gauge", "Cells waiting for a batch", (), "infer"),
    "leukoflow_inference_queue_duration_seconds": ("histogram", "Time a cell waited for its batch", (), "infer"),
    "leukoflow_inference_compute_infer_duration_seconds": ("histogram", "Model execution time per batch", (), "infer"),
    "leukoflow_inference_request_duration_seconds": ("histogram", "Receive-to-send time per batch", (), "infer"),
    "leukoflow_batch_size": ("histogram", "Cells per executed batch", (), "infer"),
    "leukoflow_e2e_latency_seconds": ("histogram", "Acquisition timestamp to result", (), "infer"),
    "leukoflow_cells_classified_total": ("counter", "Counted cells by predicted class", ("class",), "infer"),
    "leukoflow_decisions_total": ("counter", "Cells by decision", ("decision",), "infer"),
    "leukoflow_confidence": ("histogram", "Max calibrated probability per cell", (), "infer"),
    "leukoflow_ood_score": ("histogram", "OOD score minus threshold per cell", (), "infer"),
    "leukoflow_explainer_routed_total": ("counter", "Cells sent to the explainer", ("reason",), "infer"),
    "leukoflow_model_info": ("gauge", "Loaded model (value 1)", ("model", "backend", "precision"), "infer"),
    # explainer
    "leukoflow_explainer_backlog": ("gauge", "Flagged cells waiting to be explained", (), "explain"),
    "leukoflow_explainer_latency_seconds": ("histogram", "Flag-to-artifact latency", (), "explain"),
    "leukoflow_explainer_duration_seconds": ("histogram", "Compute time per method", ("method",), "explain"),
    "leukoflow_explanations_total": ("counter", "Explanations written", ("method",), "explain"),
    # collector
    "leukoflow_run_cells_total": ("counter", "Run accounting: cells by outcome", ("outcome",), "collector"),
    "leukoflow_differential_cells": ("gauge", "Counted cells per class in this run", ("class",), "collector"),
    "leukoflow_differential_ratio": ("gauge", "Differential fraction per class", ("class",), "collector"),
    "leukoflow_differential_ratio_lower": ("gauge", "Lower 95 % bound of the fraction", ("class",), "collector"),
    "leukoflow_differential_ratio_upper": ("gauge", "Upper 95 % bound of the fraction", ("class",), "collector"),
    "leukoflow_differential_probabilistic_cells": ("gauge", "Sum of calibrated probabilities per class", ("class",), "collector"),
    "leukoflow_recorder_events_total": ("counter", "Events written to the recording", (), "collector"),
    "leukoflow_child_restarts_total": ("counter", "Supervised child restarts", ("child",), "collector"),
    "leukoflow_run_cells_in_flight": ("gauge", "Cells published and not yet classified, rejected, dropped or lost", (), "collector"),
    "leukoflow_run_cells_lost": ("gauge", "Cells of crop messages that never came back, by stage and reason (per-source completeness; a late arrival takes its cells back)", ("stage", "reason"), "collector"),
    # drift and QC (collector; leukoflow.run.drift_watch)
    "leukoflow_drift_alarm": ("gauge", "1 once instrument/sample drift was detected in this run", (), "collector"),
    "leukoflow_drift_enabled": ("gauge", "1 when the run is monitored for drift", (), "collector"),
    "leukoflow_drift_max_score": ("gauge", "Largest drift test statistic over its alarm threshold at the last checkpoint", (), "collector"),
    "leukoflow_drift_score": ("gauge", "Drift test statistic over its alarm threshold (>= 1: drift)", ("feature", "group"), "collector"),
    "leukoflow_differential_valid": ("gauge", "1 while the differential is valid (no drift detected)", (), "collector"),
    "leukoflow_qc_status": ("gauge", "QC state of the run: 1 pass, 0 off, -1 none, -2 expired, -3 failed", (), "collector"),
    "leukoflow_qc_magnification": ("gauge", "Magnification relative to nominal measured by the QC in use", (), "collector"),
}


def make_metric(registry: Any, name: str, **kwargs: Any) -> Any:
    """Create the metric family ``name`` of :data:`METRIC_NAMES` in ``registry``.

    The ``_total`` suffix is handled as prometheus_client expects (it appends it itself).
    Histograms get the matching bucket constants unless ``buckets`` is given.
    """
    import prometheus_client as pc

    kind, help_, labels, _service = METRIC_NAMES[name]
    cls = {"counter": pc.Counter, "gauge": pc.Gauge, "histogram": pc.Histogram}[kind]
    base = name[: -len("_total")] if kind == "counter" and name.endswith("_total") else name
    if kind == "histogram" and "buckets" not in kwargs:
        if "batch" in name:
            kwargs["buckets"] = BATCH_BUCKETS
        elif "confidence" in name:
            kwargs["buckets"] = CONFIDENCE_BUCKETS
        elif "ood_score" in name:
            kwargs["buckets"] = OOD_BUCKETS
        else:
            kwargs["buckets"] = LATENCY_BUCKETS
    return cls(base, help_, labelnames=labels, registry=registry, **kwargs)


class ServiceMetrics:
    """Lazily created metric families of one service, in its own registry.

    ``m = ServiceMetrics("infer"); m["leukoflow_batch_size"].observe(64)``
    """

    def __init__(self, service: str, run_id: str = "", version: str | None = None) -> None:
        import prometheus_client as pc


        self.service = service
        self.registry = pc.CollectorRegistry()
        self._metrics: dict[str, Any] = {}
        self._refused = sum(curve.refusals().values())
        self["leukoflow_service_info"].labels(service, version or __version__, run_id).set(1)
        self["leukoflow_ready"].set(0)

    def __getitem__(self, name: str) -> Any:
        m = self._metrics.get(name)
        if m is None:
            m = self._metrics[name] = make_metric(self.registry, name)
        return m

    def exposition(self) -> bytes:
        """Text exposition of all families.

        Handshakes the process's CurveZMQ endpoints refused (:func:`curve.refusals`) are
        added as ``leukoflow_messages_rejected_total{reason="unauthenticated"}``.
        """
        import prometheus_client as pc

        refused = sum(curve.refusals().values())
        if refused > self._refused:
            self["leukoflow_messages_rejected_total"].labels("unauthenticated").inc(
                refused - self._refused)
            self._refused = refused
        return pc.generate_latest(self.registry)


class FailureGate:
    """Readiness that follows a component's health (like Triton's model readiness).

    ``fail_after`` consecutive failures clear readiness with a reason (``/readyz`` answers
    503 ``not ready: backend failed 3 times in a row: <error>``); the next success restores
    it. Only readiness this gate cleared is restored.

    Parameters
    ----------
    set_ready : callable
        ``set_ready(ready, reason)`` of the service (:meth:`HealthServer.set_ready`).
    component : str
        Name used in the reason (``backend``).
    fail_after : int
        Consecutive failures that make the service not ready (>= 1).
    """

    def __init__(self, set_ready: Callable[[bool, str], None], component: str = "backend",
                 fail_after: int = 3) -> None:
        if fail_after < 1:
            raise ValueError("fail_after must be >= 1")
        self._set_ready = set_ready
        self.component = component
        self.fail_after = int(fail_after)
        self.consecutive = 0
        self.tripped = False
        self._lock = threading.Lock()

    def failure(self, error: BaseException | str) -> None:
        """Record one failure (clears readiness at the ``fail_after``-th in a row)."""
        with self._lock:
            self.consecutive += 1
            if self.consecutive >= self.fail_after:
                self.tripped = True
                self._set_ready(False, f"{self.component} failed {self.consecutive} times "
                                       f"in a row: {str(error)[:200]}")

    def success(self) -> None:
        """Record a success (restores readiness this gate cleared)."""
        with self._lock:
            self.consecutive = 0
            if self.tripped:
                self.tripped = False
                self._set_ready(True, "")


class HealthServer:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` from a background thread.

    ``/readyz`` answers 200 ``ready`` or 503 ``not ready: <reason>`` (the reason given to
    :meth:`set_ready`, e.g. by a :class:`FailureGate`; ``stalled`` when the loop stopped).

    Parameters
    ----------
    metrics : ServiceMetrics
        The service's metrics.
    host : str
        Bind address; loopback by default (remote scraping is opt-in).
    port : int
        TCP port; 0 picks a free one (see :attr:`port`).
    live_timeout_s : float
        ``/healthz`` answers 503 when :meth:`tick` was not called for this long [s].
    """

    def __init__(
        self,
        metrics: ServiceMetrics,
        host: str = "127.0.0.1",
        port: int = 0,
        live_timeout_s: float = 5.0,
        status: Callable[[], dict] | None = None,
    ) -> None:
        self.metrics = metrics
        self.live_timeout_s = live_timeout_s
        self.status = status
        self._ready = False
        self._reason = ""
        self._last_tick = time.monotonic()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body = server.metrics.exposition()
                    self._send(200, body, "text/plain; version=0.0.4; charset=utf-8")
                elif path == "/healthz":
                    ok = server.live
                    self._send(200 if ok else 503, b"ok\n" if ok else b"stalled\n")
                elif path == "/readyz":
                    ok = server.ready and server.live
                    why = "" if ok else server.not_ready_reason
                    self._send(200 if ok else 503, b"ready\n" if ok else (
                        f"not ready: {why}\n".encode() if why else b"not ready\n"))
                elif path == "/status" and server.status is not None:
                    body = json.dumps(server.status(), default=str).encode()
                    self._send(200, body, "application/json")
                else:
                    self._send(404, b"not found\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away (a scrape timed out): nothing to answer

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.host = host
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        name=f"health-{metrics.service}")
        self._thread.start()

    @property
    def live(self) -> bool:
        """True when the main loop ticked within ``live_timeout_s``."""
        return time.monotonic() - self._last_tick < self.live_timeout_s

    @property
    def ready(self) -> bool:
        """Readiness flag set by the service."""
        return self._ready

    def tick(self) -> None:
        """Mark the main loop alive (call once per loop iteration)."""
        self._last_tick = time.monotonic()

    @property
    def not_ready_reason(self) -> str:
        """Why the service is not ready (``/readyz`` body): the reason given to
        :meth:`set_ready`, or ``stalled`` when the main loop stopped ticking."""
        if not self.live:
            return "stalled (main loop not ticking)"
        return "" if self._ready else self._reason

    def set_ready(self, ready: bool = True, reason: str = "") -> None:
        """Set readiness (and the ``leukoflow_ready`` gauge); ``reason`` says why not."""
        self._ready = ready
        self._reason = "" if ready else reason
        self.metrics["leukoflow_ready"].set(1 if ready else 0)

    def close(self) -> None:
        """Stop serving."""
        self._httpd.shutdown()
        self._httpd.server_close()
