"""The inference worker service.

PULL crop messages (connects to acquisition's PUSH, so several workers share one
acquisition), batch them dynamically (:mod:`~leukoflow.inference.batcher`), run the
backend, apply the decision rule (:mod:`~leukoflow.inference.decision`), PUSH one
``results`` message per message segment to the collector, route flagged cells to the
explainer without ever blocking (:mod:`~leukoflow.inference.routing`), and account for
every cell (:mod:`~leukoflow.inference.accounting`).

Control messages from acquisition: ``eos``/``accounting`` flush the pending cells first and
are then forwarded verbatim to the collector (results precede them on the same socket);
``stop`` stops the worker gracefully (pending cells are finished). The worker adds its own
cumulative totals as ``control``/``accounting`` messages (``stats.event = "totals"``) after
each eos and at stop, and as ``heartbeat`` stats every ``heartbeat_s``. Cells rejected by the
worker (undecodable message with a readable cell list, wrong crop size, non-finite crop,
non-finite model output, backend failure, a failure of the worker's own handling) are
reported individually as ``control``/``accounting`` messages with ``stats = {"event":
"rejected", "reason": ..., "cells": n, "ids": [...], "run": ...}`` plus the crop message they
came from (``src_sender``, ``src_seq``, ``src_n``, ``src_cum``).

Nothing that decodes can end the worker: each message is handled inside its own error
boundary (a failure rejects that message's cells with reason ``handler_error``), and so is
the decision step of each batch (an exception there rejects the batch's cells). A cell whose
model output is not finite (e.g. a finite but extreme crop that overflows the network) is
rejected on its own (``non_finite_output``); the other cells of its message are delivered.
Results are validated before they are sent. At a graceful stop the worker delivers every
result it counted: the results socket closes with a linger (``results_linger_ms``).

Timestamps added to each results message's ``t`` (monotonic ns): ``infer_recv`` (message
received), ``infer_batch`` (its batch formed), ``infer_done`` (batch outputs on the host),
``infer_send``. Results also carry ``src_sender``/``src_seq``/``src_n``/``src_cum`` (the
crop message they came from, its number of cells and the cells its source published before
it): with several workers behind one PUSH each worker sees only part of acquisition's
sequence numbers, so its own gap count is meaningful for a single worker only, and the
collector checks completeness per source across workers from these fields
(:mod:`leukoflow.run.ledger`).

Metrics/health on ``metrics_host:metrics_port`` (``/metrics``, ``/healthz``, ``/readyz``
(200 once the model is loaded and warmed up), ``/status`` (differential and accounting)).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from leukoflow.core import transport, wire
from leukoflow.core.config import as_dict, bounded
from leukoflow.core.metrics import FailureGate
from leukoflow.core.physics import CropSizeError, check_crop_size
from leukoflow.core.service import (
    ServiceScaffold,
    StopSignals,
    control_message,
    heartbeat_message,
    hello_message,
)
from leukoflow.inference.accounting import Accounting
from leukoflow.inference.backends import create_backend
from leukoflow.inference.batcher import Batch, DynamicBatcher
from leukoflow.inference.decision import (
    COUNTED,
    OOD,
    UNCERTAIN,
    DecisionRule,
    Decisions,
    rule_from_artifact,
)
from leukoflow.inference.differential import Differential
from leukoflow.inference.drift import FEATURES as _DRIFT_FEATURES
from leukoflow.inference.drift import PenultimateProjection
from leukoflow.inference.routing import ROUTE_REASONS, ExplainRouter, _finite
from leukoflow.inference.telemetry import InferMetrics, observe_many
from leukoflow.models.artifact import load_artifact

log = logging.getLogger(__name__)

#: Acquisition features a worker forwards with each result (drift detection).
DRIFT_FEATURE_NAMES: tuple[str, ...] = tuple(f for f, _ in _DRIFT_FEATURES)

SECTION = "infer"
#: Consecutive backend failures after which ``/readyz`` says not ready (with the error); the
#: next good batch makes the worker ready again.
BACKEND_FAILURES_NOT_READY = 3


@dataclass(frozen=True)
class InferConfig:
    """Parameters of one inference worker (recorded with its results).

    Attributes
    ----------
    model : str
        Artifact name (``models/artifacts/<name>``) or folder.
    backend : str
        ``auto``, ``tensorrt``, ``torch-cuda``, ``onnxruntime`` or ``torch-cpu``.
    max_batch : int
        Largest batch [cells]; a full batch runs at once.
    max_delay_ms : float
        Longest wait of the oldest pending cell before a partial batch runs [ms].
    threads : int
        CPU threads of the CPU backends.
    precision : str
        GPU precision (``fp16`` or ``fp32``).
    cpu_pipeline : bool
        CPU backends compute batch *k* in a second thread while the worker finishes batch
        *k - 1* (decisions, OOD scoring, sending); the network itself keeps ``threads``.
    crops_endpoint, results_endpoint, explain_endpoint : str
        ZeroMQ endpoints (all connected); an empty explain endpoint disables routing.
    crops_hwm, results_hwm, explain_hwm : int
        High-water marks [messages]; the explainer's is small on purpose.
    explain_sndbuf_bytes : int
        Kernel send buffer of the explainer socket [bytes] (bounds what hides below the
        high-water mark, so a stalled explainer shows up as drops quickly).
    results_timeout_ms : int
        A results message that cannot be queued within this time is dropped and its cells
        are counted as rejected (reason ``results_backpressure``) [ms].
    results_linger_ms : int
        At stop, results already queued (and counted) get this long to reach the collector
        before the socket closes [ms].
    explain_sample_rate : float
        Fraction of confident cells also sent to the explainer.
    explain_seed : int
        Seed of that random sample.
    metrics_host, metrics_port : str, int
        HTTP endpoint of /metrics, /healthz, /readyz; port -1 disables, 0 picks a free one.
    allow_remote : bool
        Serve the metrics on a non-loopback ``metrics_host`` (opt-in, like ZeroMQ binds).
    heartbeat_s : float
        Interval of heartbeat messages with the cumulative totals [s].
    cache_dir : str
        Export cache root (ONNX/TensorRT); empty = ``$LEUKOFLOW_CACHE_DIR`` or ~/.cache.
    warmup : bool
        Run every batch bucket once before declaring ready.
    """

    model: str = "lenet5-sim"
    backend: str = "auto"
    max_batch: int = bounded(256, 1, 65536)
    max_delay_ms: float = bounded(2.0, 0.0, 60_000.0)
    threads: int = 1
    precision: str = "fp16"
    cpu_pipeline: bool = True
    crops_endpoint: str = transport.DEFAULT_ENDPOINTS["crops"]
    results_endpoint: str = transport.DEFAULT_ENDPOINTS["collector"]
    explain_endpoint: str = transport.DEFAULT_ENDPOINTS["explain"]
    crops_hwm: int = 100
    results_hwm: int = 1000
    explain_hwm: int = 8
    explain_sndbuf_bytes: int = 262144
    results_timeout_ms: int = 1000
    results_linger_ms: int = bounded(5000, 0, 600_000)
    explain_sample_rate: float = 0.01
    explain_seed: int = 0
    metrics_host: str = transport.LOOPBACK
    metrics_port: int = transport.DEFAULT_METRICS_PORTS["infer"]
    allow_remote: bool = False
    heartbeat_s: float = bounded(1.0, 0.01, 3600.0)
    cache_dir: str = ""
    warmup: bool = True


@dataclass
class _MsgCtx:
    """Per crop message state while its cells are in flight."""

    msg: wire.Message
    t_recv: int
    ids: np.ndarray
    t0: int  # earliest upstream timestamp [ns] (e2e latency origin)
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def run(self) -> str:
        return self.msg.header["run"]

    @property
    def src(self) -> dict[str, Any]:
        """The crop message's identity for the collector's completeness check."""
        return _src_fields(self.msg.header)


@dataclass
class _InFlight:
    batch: Batch
    handle: Any
    t_batch: int


class InferWorker:
    """The inference service (see module docstring).

    Parameters
    ----------
    config : InferConfig
        Parameters.
    artifact : models.artifact.Artifact, optional
        Already loaded artifact (default: ``load_artifact(config.model)``).
    backend : Backend, optional
        Already built backend (tests, benchmarks).
    clock : callable, optional
        Monotonic clock in seconds for the batcher (tests); default :func:`time.monotonic`.
    context : zmq.Context, optional
        ZeroMQ context (default: a private one, terminated on exit).
    """

    def __init__(self, config: InferConfig, artifact: Any = None, backend: Any = None,
                 context: Any = None) -> None:
        self.config = config
        self._artifact = artifact
        self._backend = backend
        self._ctx_given = context
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self.accounting = Accounting()
        self.differential: Differential | None = None
        self.sender: wire.Sender | None = None
        self.health: Any = None
        self.metrics: Any = None
        self._thread: threading.Thread | None = None
        self._inflight: list[_InFlight] = []
        self._last_run = ""
        self._size_warned: set[int] = set()
        self._msg_cells = "new"
        #: per-cell rejections not yet reported (collector unreachable), sent with the
        #: next heartbeat that gets through (bounded; the totals carry the counts anyway)
        self._deferred: deque[tuple[str, str, list[int], dict | None]] = deque(maxlen=4096)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> InferWorker:
        """Run :meth:`run` in a background thread; returns ``self``."""
        self._thread = threading.Thread(target=self._run_guarded, name="infer-worker",
                                        daemon=True)
        self._thread.start()
        return self

    def _run_guarded(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # surfaced to the caller through .error
            self.error = exc
            log.exception("inference worker failed")

    def stop(self) -> None:
        """Ask the worker to stop gracefully (thread- and signal-safe)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the background thread."""
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def metrics_port(self) -> int | None:
        """Bound HTTP port (when serving)."""
        return self.health.port if self.health is not None else None

    # -- setup ---------------------------------------------------------------------------
    def _setup(self) -> None:
        import zmq


        cfg = self.config
        if cfg.max_batch < 1 or cfg.max_delay_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_delay_ms >= 0")
        if self._artifact is None:

            self._artifact = load_artifact(cfg.model)
        art = self._artifact
        self.class_names = tuple(art.class_names)
        self.metrics = InferMetrics(class_names=self.class_names)
        # health server (none when metrics_port < 0); signals are routed in run()
        self.health = ServiceScaffold(self.metrics.m, host=cfg.metrics_host,
                                      port=cfg.metrics_port, status=self.status).open()
        self.backend_gate = FailureGate(self.health.set_ready, "backend",
                                        BACKEND_FAILURES_NOT_READY)
        if self._backend is None:
            self._backend = create_backend(
                cfg.backend, art, max_batch=cfg.max_batch, threads=cfg.threads,
                precision=cfg.precision, cache_dir=cfg.cache_dir or None,
                pipeline=cfg.cpu_pipeline)
        be = self._backend
        if be.device_kind == "cpu":
            _limit_blas_threads(cfg.threads)
        self.rule: DecisionRule = rule_from_artifact(art)
        # penultimate-layer projections for the collector's drift test (card["drift"])
        self.pen_proj = PenultimateProjection.from_card(getattr(art, "card", None) or {})
        self.differential = Differential(self.class_names)
        self.model_name = str(getattr(art, "name", cfg.model))
        self.batcher = DynamicBatcher(cfg.max_batch, cfg.max_delay_ms / 1e3,
                                      buckets=be.buckets)
        self.sender = wire.Sender(run="", role="infer")
        self._ctx = self._ctx_given or zmq.Context()
        # largest crop message: a batch of the model's crops (ZeroMQ drops bigger frames)
        limit = transport.message_limit(be.input_size, cfg.max_batch)
        self.crops = transport.make_socket(self._ctx, "PULL", cfg.crops_endpoint, bind=False,
                                           hwm=cfg.crops_hwm, identity="infer",
                                           max_msg_bytes=limit)
        self.results = transport.make_socket(self._ctx, "PUSH", cfg.results_endpoint,
                                             bind=False, hwm=cfg.results_hwm, immediate=False,
                                             identity="infer")
        self.results.setsockopt(zmq.SNDTIMEO, int(cfg.results_timeout_ms))
        explain = None
        if cfg.explain_endpoint:
            # SNDBUF must be set before connecting
            explain = transport.make_socket(
                self._ctx, "PUSH", cfg.explain_endpoint, bind=False,
                hwm=int(cfg.explain_hwm), identity="infer",
                options={zmq.SNDBUF: int(cfg.explain_sndbuf_bytes)})
        self.explain = explain
        # explain messages get their own sender (own sequence numbers): the explainer sees
        # dropped messages as gaps, the collector sees a gap-free stream from this worker
        self.router = ExplainRouter(explain, wire.Sender(run="", role="infer"),
                                    cfg.explain_sample_rate,
                                    cfg.explain_seed, self.class_names, self.model_name)
        self.poller = zmq.Poller()
        self.poller.register(self.crops, zmq.POLLIN)
        self.metrics["leukoflow_model_info"].labels(self.model_name, be.name,
                                                     be.precision).set(1)
        if cfg.warmup:
            be.warmup()
        self._hello()
        if self.health is not None:
            self.health.set_ready(True)
        self.ready.set()
        log.info("inference worker ready: model=%s backend=%s", self.model_name, be.name)

    def describe(self) -> dict[str, Any]:
        """Every parameter of this worker (config, backend, decision rule)."""

        return {"config": as_dict(self.config), "backend": self._backend.describe(),
                "decision": self.rule.describe(), "model": self.model_name,
                "input_size": int(self._backend.input_size)}

    def _hello(self) -> None:
        """Tell the collector who this worker is and with which parameters it runs."""
        frames = wire.encode(hello_message(self.sender, self.describe()))
        if not self._send_results_frames(frames):
            log.warning("collector not reachable: hello not sent")

    def status(self) -> dict[str, Any]:
        """Live state for ``/status``: accounting and differential."""
        pending = self.batcher.pending if hasattr(self, "batcher") else 0
        return {"accounting": self.accounting.stats(pending),
                "differential": self.differential.snapshot() if self.differential else None,
                "explain": {"routed": dict(self.router.routed), "dropped": self.router.dropped}
                if hasattr(self, "router") else None}

    # -- main loop -----------------------------------------------------------------------
    def run(self) -> None:
        """Serve until :meth:`stop` or a control ``stop`` message; then drain and close.

        SIGTERM/SIGINT (main thread only) ask for the same graceful stop, from the start:
        a signal while the model loads stops the worker once it is set up.
        """
        with StopSignals(lambda _sig: self.stop()):
            try:
                self._setup()
                self._loop()
                self._drain_socket()
                self._drain()
                self._send_totals(final=True)
            finally:
                self._close()
                self.finished.set()

    def _loop(self) -> None:
        import zmq

        be_pipelined = self._backend.max_in_flight > 1
        next_hb = time.monotonic() + self.config.heartbeat_s
        while not self._stop.is_set():
            if self.health is not None:
                self.health.tick()
            self._receive()
            now = time.monotonic()
            if now >= next_hb:  # also under full load
                try:
                    self._heartbeat()
                except Exception as exc:  # noqa: BLE001 - a report never ends the worker
                    log.exception("heartbeat failed: %s", exc)
                next_hb = now + self.config.heartbeat_s
            if self.batcher.ready(now):
                self._launch(self.batcher.pop(now), be_pipelined)
                continue
            if self._inflight:
                self._finish(self._inflight.pop(0))
                continue
            ttd = self.batcher.time_to_deadline(now)
            wait = min(0.1, next_hb - now) if ttd is None else min(ttd, 0.1)
            timeout_ms = max(0, math.ceil(wait * 1e3))
            self._gauges()
            try:
                self.poller.poll(timeout_ms)
            except zmq.ZMQError:  # interrupted by a signal
                continue

    def _receive(self, max_messages: int = 256, stopping: bool = False) -> int:
        """Take messages while the batcher has room (back-pressure stays in ZeroMQ)."""
        import zmq

        got = 0
        for _ in range(max_messages):
            if self.batcher.pending >= self.config.max_batch or (
                    self._stop.is_set() and not stopping):
                break
            try:
                frames = self.crops.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self._handle(frames, time.monotonic_ns())
            got += 1
        return got

    def _drain_socket(self) -> None:
        """On stop: process the messages already queued for this worker (bounded), so that
        cells handed to it by the PUSH/PULL fan-out are not lost with the socket."""
        pipelined = self._backend.max_in_flight > 1
        budget = 4 * max(1, self.config.crops_hwm)
        while budget > 0:
            got = self._receive(min(budget, 256), stopping=True)
            budget -= got
            if self.batcher.pending >= self.config.max_batch:
                self._launch(self.batcher.pop(force=True), pipelined)
            elif got == 0:
                break

    def _handle(self, frames: list[Any], t_recv: int) -> None:
        try:
            msg = wire.decode(frames, check_finite=False)
        except wire.WireError as exc:
            self._reject_undecodable(frames, exc.reason)
            return
        self._msg_cells = "new"  # -> "received" (counted in) -> "owned" (in the batcher)
        try:
            self._dispatch(msg, frames, t_recv)
        except Exception as exc:  # noqa: BLE001 - one message never ends the worker
            self._handler_failed(msg, exc)

    def _new_run(self) -> None:
        """Crops of a new run: finish the old run's cells, send its totals, and count the new
        run from zero (the collector keeps one accounting per run; a worker may serve run after
        run)."""
        log.info("run %s ends here: totals sent, counting afresh", self._last_run)
        self._drain()
        self._send_totals()
        self.accounting = Accounting(gaps=self.accounting.gaps)
        self.differential = Differential(self.class_names)

    def _handler_failed(self, msg: wire.Message, exc: BaseException) -> None:
        """Error boundary of one message: its cells (unless the batcher already owns them)
        are rejected with reason ``handler_error``; the worker goes on."""
        log.exception("handling %s %s/%s failed: %s", msg.kind, msg.header.get("sender"),
                      msg.header.get("seq"), exc)
        try:
            if self._msg_cells == "owned":  # the batcher delivers them; count the message
                self.accounting.rejected_messages["handler_error"] += 1
                self.metrics.reject("handler_error", 0, message=True)
                return
            ids = np.asarray(msg.ids, dtype=np.int64) if msg.kind == "crops" else \
                np.zeros(0, np.int64)
            if ids.size and self._msg_cells == "new":
                self.accounting.receive(int(ids.size))
            self._reject_cells("handler_error", msg.header.get("run", ""), ids, message=True,
                               src=_src_fields(msg.header) if ids.size else None)
        except Exception:  # noqa: BLE001
            log.exception("could not count the failed message")

    def _dispatch(self, msg: wire.Message, frames: list[Any], t_recv: int) -> None:
        h = msg.header
        if h["run"]:
            if self._last_run and h["run"] != self._last_run and msg.kind == "crops":
                self._new_run()
            self._last_run = h["run"]
        missing = self.accounting.gaps.observe(h["sender"], h["seq"])
        if missing:
            self.metrics["leukoflow_sequence_gaps_total"].inc(missing)
        kind = h["kind"]
        if kind == "crops":
            self._accept_crops(msg, t_recv)
        elif kind == "control":
            self._control(msg, frames)
        elif kind == "heartbeat":
            self.accounting.control_messages["heartbeat"] += 1
        else:  # results/explain have no business here
            self.accounting.reject_message("kind", 0)
            self.metrics.reject("kind", 0, message=True)

    def _accept_crops(self, msg: wire.Message, t_recv: int) -> None:
        h = msg.header
        x = msg.array
        n = x.shape[0]
        ids = np.asarray(h["ids"], dtype=np.int64)
        s = self._backend.input_size
        if x.shape[1:] != (s, s):
            if x.ndim == 3 and x.shape[1] == x.shape[2] and x.shape[1] not in self._size_warned:
                self._size_warned.add(x.shape[1])  # once per size: say why, then count
                try:
                    check_crop_size(x.shape[1], s, f"model {self.model_name!r}")
                except CropSizeError as exc:
                    log.error("%s (from %s)", exc, h["sender"])
            self.accounting.receive(n)
            self._msg_cells = "received"
            self._reject_cells("shape", h["run"], ids, message=True, src=_src_fields(h))
            return
        self.metrics["leukoflow_inference_request_success_total"].inc()
        t = h["t"]
        t0 = min(t.values()) if t else t_recv
        extra = {k: np.asarray(h[k]) for k in ("labels", "kinds", "frames", "t_acq") if k in h}
        feat = h.get("feat") or {}
        for k in DRIFT_FEATURE_NAMES:  # acquisition features forwarded for drift detection
            if k in feat:
                extra[f"feat:{k}"] = np.asarray(feat[k], dtype=np.float64)
        ctx = _MsgCtx(msg, t_recv, ids, t0, extra)
        self.accounting.receive(n)
        self._msg_cells = "received"
        self.batcher.put(x, ctx, now=t_recv * 1e-9)
        self._msg_cells = "owned"  # from here on the batcher delivers these cells

    def _control(self, msg: wire.Message, frames: list[Any]) -> None:
        cmd = msg.header["cmd"]
        self.accounting.control_messages[cmd] += 1
        if cmd in ("eos", "accounting"):
            self._drain()
            self._send_results_frames(frames)
            if cmd == "eos":
                self._send_totals()
        elif cmd == "stop":
            log.info("control stop received")
            self._stop.set()

    # -- batches -------------------------------------------------------------------------
    def _gauges(self) -> None:
        pending = self.batcher.pending
        self.metrics["leukoflow_inference_pending_requests"].set(pending)
        self.metrics["leukoflow_queue_depth"].labels("batcher").set(pending)

    def _launch(self, batch: Batch, pipelined: bool) -> None:
        self._gauges()
        if self._inflight and not pipelined:
            self._finish(self._inflight.pop(0))
        t_batch = time.monotonic_ns()
        be = self._backend
        try:
            buf = be.host_buffer(batch.bucket)
            batch.gather(buf)
            handle = be.submit(buf, batch.n)
        except Exception as exc:  # a backend fault rejects the batch, never kills the loop
            log.exception("backend submit failed: %s", exc)
            self.backend_gate.failure(exc)
            self._reject_batch(batch, "backend")
            return
        self._inflight.append(_InFlight(batch, handle, t_batch))
        if pipelined and len(self._inflight) >= be.max_in_flight:
            self._finish(self._inflight.pop(0))  # GPU runs batch k while k-1 is finished

    def _drain(self) -> None:
        """Run every pending cell and deliver all in-flight batches."""
        pipelined = self._backend.max_in_flight > 1
        for batch in self.batcher.flush():
            self._launch(batch, pipelined)
        while self._inflight:
            self._finish(self._inflight.pop(0))

    def _finish(self, job: _InFlight) -> None:
        batch = job.batch
        try:
            out = self._backend.collect(job.handle)
        except Exception as exc:
            log.exception("backend collect failed: %s", exc)
            self.backend_gate.failure(exc)
            self._reject_batch(batch, "backend")
            return
        self.backend_gate.success()
        t_done = time.monotonic_ns()
        try:  # the decision step: an exception rejects this batch, never ends the worker
            with np.errstate(all="ignore"):
                dec = self.rule(out.logits, out.features, out.ood_score)
                pen = self.pen_proj(out.features) if self.pen_proj is not None else None
            ok, _ = _usable(out.finite, dec, out.features, batch.n)
        except Exception as exc:  # noqa: BLE001
            log.exception("decision step failed: %s", exc)
            self._reject_batch(batch, "handler_error")
            return
        m = self.metrics
        m.batch(batch.n, (t_done - job.t_batch) * 1e-9)
        good = np.flatnonzero(ok)
        route_idx, route_reason = self.router.select(dec.code[good])
        self._send_explain(batch, dec, good[route_idx], route_reason, job.t_batch)
        delivered = ok.copy()
        row = 0
        t_first = min(seg.ctx.t_recv for seg in batch.segments)
        for seg in batch.segments:
            try:
                sent = self._send_segment(seg, dec, ok, row, job.t_batch, t_done, pen,
                                          out.finite)
            except Exception as exc:  # noqa: BLE001 - this segment's cells are rejected
                log.exception("results of %s/%s failed: %s", seg.ctx.msg.sender,
                              seg.ctx.msg.seq, exc)
                sel = np.flatnonzero(ok[row:row + seg.n])
                self._reject_cells("handler_error", seg.ctx.run,
                                   seg.ctx.ids[seg.start + sel], src=seg.ctx.src)
                sent = False
            if not sent:
                delivered[row:row + seg.n] = False
            row += seg.n
        # outcomes of the cells whose results reached the collector's socket
        dg = dec.take(np.flatnonzero(delivered))
        m.decisions(dg.pred, dg.code, dg.conf, dg.ood_score - self.rule.ood_threshold
                    if math.isfinite(self.rule.ood_threshold) else dg.ood_score)
        counts = np.bincount(dg.code, minlength=3)
        self.accounting.decided(int(counts[COUNTED]), int(counts[UNCERTAIN]), int(counts[OOD]))
        self.differential.add(dg.pred, dg.code, dg.probs)
        m["leukoflow_inference_request_duration_seconds"].observe(
            (time.monotonic_ns() - t_first) * 1e-9)

    def _send_segment(self, seg: Any, dec: Decisions, ok: np.ndarray, row: int, t_batch: int,
                      t_done: int, pen: np.ndarray | None = None,
                      finite_in: np.ndarray | None = None) -> bool:
        """Results of one message segment; False if they could not be queued (the usable
        cells are then rejected as ``results_backpressure``). ``ok``: usable cells (finite
        crop and finite outputs); ``finite_in``: finite crops (unusable cells with a
        non-finite crop are rejected as ``non_finite``, the others as
        ``non_finite_output``). ``pen``: the batch's penultimate-layer projections (drift
        detection), sent in the ``feat`` map."""

        ctx: _MsgCtx = seg.ctx
        sl = slice(row, row + seg.n)
        okl = ok[sl]
        local = np.arange(seg.start, seg.stop)
        if not okl.all():
            fin = np.zeros_like(okl) if finite_in is None else np.asarray(finite_in)[sl]
            bad_in = ~okl & ~fin
            bad_out = ~okl & fin
            for reason, mask in (("non_finite", bad_in), ("non_finite_output", bad_out)):
                if mask.any():
                    self._reject_cells(reason, ctx.run, ctx.ids[local[mask]], src=ctx.src)
        keep = np.flatnonzero(okl)
        if keep.size == 0:
            return True
        d = dec.take(slice(row, row + seg.n)).take(keep)
        cells = local[keep]
        h = ctx.msg.header
        t = dict(h["t"])
        t.update(infer_recv=ctx.t_recv, infer_batch=t_batch, infer_done=t_done)
        fields: dict[str, Any] = {
            "frame": h["frame"], **ctx.src,
            "ids": ctx.ids[cells].tolist(),
            "pred": d.pred.tolist(), "decision": d.names(),
            "conf": d.conf.astype(float).tolist(),
            "ood_score": _finite(d.ood_score).tolist(),
            "classes": list(self.class_names), "model": self.model_name,
        }
        feat: dict[str, list[float]] = {}
        for key, arr in ctx.extra.items():
            if key.startswith("feat:"):
                feat[key[5:]] = arr[cells].tolist()
            else:
                fields[key] = arr[cells].tolist()
        if pen is not None:
            feat.update(self.pen_proj.fields(pen[row + keep]))
        if feat:
            fields["feat"] = feat
        t_send = time.monotonic_ns()
        t["infer_send"] = t_send
        msg = self.sender.message("results", np.ascontiguousarray(d.probs), t=t, run=ctx.run,
                                  **fields)
        m = self.metrics
        w = np.full(1, keep.size)
        observe_many(m["leukoflow_inference_queue_duration_seconds"],
                     np.array([(t_batch - ctx.t_recv) * 1e-9]), w)
        if "t_acq" in ctx.extra:
            observe_many(m["leukoflow_e2e_latency_seconds"],
                         (t_send - ctx.extra["t_acq"][cells].astype(np.int64)) * 1e-9)
        else:
            observe_many(m["leukoflow_e2e_latency_seconds"],
                         np.array([(t_send - ctx.t0) * 1e-9]), w)
        frames = wire.encode(msg)  # validated: never send what the collector would reject
        if not self._send_results_frames(frames):
            # not delivered: these cells end as rejected, never silently lost
            self._reject_cells("results_backpressure", ctx.run, ctx.ids[cells], report=False,
                               src=ctx.src)
            return False
        return True

    def _send_explain(self, batch: Batch, dec: Decisions, rows: np.ndarray,
                      reasons: np.ndarray, t_batch: int) -> None:
        if rows.size == 0 or self.explain is None:
            return
        crops, ids, labels, runs = [], [], [], []
        has_labels = all("labels" in s.ctx.extra for s in batch.segments)
        row = 0
        for seg in batch.segments:
            sel = rows[(rows >= row) & (rows < row + seg.n)] - row
            if sel.size:
                crops.append(seg.crops[sel])
                ids.append(seg.ctx.ids[seg.start + sel])
                runs.append(seg.ctx.run)
                if has_labels:
                    labels.append(seg.ctx.extra["labels"][seg.start + sel])
            row += seg.n
        x = np.concatenate(crops) if len(crops) > 1 else crops[0]
        sent = self.router.send(runs[0], x, np.concatenate(ids).tolist(), dec.take(rows),
                                reasons, {"infer_batch": t_batch},
                                np.concatenate(labels).tolist() if has_labels else None)
        m = self.metrics
        if sent:
            for r, c in zip(*np.unique(reasons, return_counts=True), strict=True):

                m["leukoflow_explainer_routed_total"].labels(ROUTE_REASONS[r]).inc(int(c))
        else:
            m["leukoflow_dropped_total"].labels("explain", "explainer_full").inc(rows.size)

    # -- rejections ----------------------------------------------------------------------
    def _reject_batch(self, batch: Batch, reason: str) -> None:
        for seg in batch.segments:
            ids = seg.ctx.ids[seg.start:seg.stop]
            self._reject_cells(reason, seg.ctx.run, ids, src=seg.ctx.src)

    def _reject_cells(self, reason: str, run: str, ids: np.ndarray,
                      message: bool = False, report: bool = True,
                      src: dict[str, Any] | None = None) -> None:
        n = int(ids.size)
        self.accounting.reject(reason, n)
        if message:
            self.accounting.rejected_messages[reason] += 1
        self.metrics.reject(reason, n, message=message)
        self.differential.reject(reason, n)
        if report:
            self._report_rejected(reason, run, ids.tolist(), src)
        elif len(self._deferred) < self._deferred.maxlen:  # the collector is unreachable
            self._deferred.append((reason, run, ids.tolist(), src))  # now: report it later

    def _reject_undecodable(self, frames: list[Any], reason: str) -> None:
        """Count an undecodable message; report its cells if the header lists them."""
        run, ids, src = _peek_cells(frames)
        self.accounting.reject_message(reason, len(ids))
        self.metrics.reject(reason, len(ids), message=True)
        if ids:
            self.differential.reject(reason, len(ids))
            self._report_rejected(reason, run, ids, src)

    def _report_rejected(self, reason: str, run: str, ids: list[int],
                         src: dict[str, Any] | None = None) -> bool:
        """Send one per-cell rejection event; False when it could not be queued."""
        if not ids:
            return True
        stats = {"event": "rejected", "reason": reason, "cells": len(ids), "ids": ids[:4000],
                 "run": run, **(src or {})}
        msg = self.sender.message("control", run=run or self._last_run, cmd="accounting",
                                  stats=stats)
        return self._send_results_frames(wire.encode(msg))

    # -- sending ---------------------------------------------------------------------------
    def _send_results_frames(self, frames: list[Any]) -> bool:
        import zmq

        try:  # results are small (N x K float32): copying beats zero-copy frame tracking
            self.results.send_multipart(frames, copy=True)
        except zmq.Again:
            return False
        return True

    def _totals_msg(self, kind: str, final: bool = False) -> wire.Message:
        stats = {"event": "totals", "final": final,
                 **self.accounting.stats(self.batcher.pending),
                 "explain_routed": dict(self.router.routed),
                 "explain_dropped": self.router.dropped}
        if kind == "control":
            return control_message(self.sender, "accounting", stats, run=self._last_run)
        return heartbeat_message(self.sender, stats, run=self._last_run)

    def _send_totals(self, final: bool = False) -> None:
        """Cumulative totals; ``final`` at a graceful stop (the collector then knows this
        worker left on purpose, not by dying)."""
        if self.sender is not None and hasattr(self, "results"):
            self._send_results_frames(wire.encode(self._totals_msg("control", final)))

    def _heartbeat(self) -> None:
        # same (bounded) blocking send as results: a heartbeat is never dropped on its own,
        # so the collector sees this sender's sequence numbers without holes
        if self._send_results_frames(wire.encode(self._totals_msg("heartbeat"))):
            while self._deferred:  # rejections the collector could not be told of earlier
                if not self._report_rejected(*self._deferred[0]):
                    break
                self._deferred.popleft()

    def _close(self) -> None:
        if self.health is not None:
            self.health.set_ready(False)
            self.health.close()
        for name in ("crops", "results", "explain"):
            sock = getattr(self, name, None)
            if sock is not None:
                # results already counted as delivered get their linger to leave
                sock.close(self.config.results_linger_ms if name == "results" else 0)
        if self._ctx_given is None and getattr(self, "_ctx", None) is not None:
            self._ctx.term()
        if self._backend is not None:
            self._backend.close()


def _limit_blas_threads(n: int) -> None:
    """Limit BLAS/OpenMP pools (OOD detector matrix products) to ``n`` threads.

    On a small shared machine two OpenBLAS threads made a 256 x 84 x 2000 product 8x slower
    than one (measured); CPU workers keep to their thread budget, like the network itself.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        return
    threadpool_limits(limits=max(1, int(n)))



def _src_fields(h: dict[str, Any]) -> dict[str, Any]:
    """``src_*`` fields naming a (validated) crop message: sender, sequence number, number
    of cells and, when the source sends it, the cells it published before (``cum``)."""
    out = {"src_sender": h["sender"], "src_seq": h["seq"], "src_n": len(h["ids"])}
    if "cum" in h:
        out["src_cum"] = h["cum"]
    return out


def _usable(finite_in: np.ndarray, dec: Decisions, features: np.ndarray,
            n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ok, out_ok)`` per cell: ``out_ok`` where probabilities, confidence and features are
    finite (a finite but extreme crop can still overflow the network), ``ok`` where in
    addition the crop was finite. Raises when the decision step returned the wrong number of
    cells."""
    probs = np.asarray(dec.probs)
    if probs.shape[0] != n or np.shape(dec.conf) != (n,) or np.shape(finite_in) != (n,):
        raise ValueError(f"decision step returned {probs.shape[0]} rows for {n} cells")
    out_ok = np.isfinite(probs).all(axis=1) & np.isfinite(dec.conf)
    feats = np.asarray(features)
    if feats.ndim == 2 and feats.shape[0] == n:
        out_ok &= np.isfinite(feats).all(axis=1)
    return np.asarray(finite_in, dtype=bool) & out_ok, out_ok


def _peek_cells(frames: list[Any]) -> tuple[str, list[int], dict[str, Any] | None]:
    """Best effort: run id, cell ids and source fields from a header that failed
    validation."""
    try:
        if len(frames) < 1:
            return "", [], None
        buf = frames[0].buffer if hasattr(frames[0], "buffer") else frames[0]
        if len(buf) > wire.MAX_HEADER_BYTES:
            return "", [], None
        h = msgpack.unpackb(buf, raw=False, strict_map_key=True, use_list=True,
                            ext_hook=wire._ext_hook)
        if not isinstance(h, dict) or h.get("kind") != "crops":
            return "", [], None
        ids = h.get("ids")
        if not isinstance(ids, list) or len(ids) > wire.MAX_CELLS:
            return "", [], None
        ids = [i for i in ids if type(i) is int and 0 <= i < 2**63]
        run = h.get("run") if isinstance(h.get("run"), str) else ""
        src = None
        sender, seq, cum = h.get("sender"), h.get("seq"), h.get("cum")
        if (isinstance(sender, str) and len(sender) <= wire.MAX_STR and type(seq) is int
                and 0 <= seq < 2**63 and ids and len(ids) == len(h["ids"])):
            src = {"src_sender": sender, "src_seq": seq, "src_n": len(ids)}
            if type(cum) is int and 0 <= cum < 2**63:
                src["src_cum"] = cum
        return run[: wire.MAX_STR], ids, src
    except Exception:  # noqa: BLE001 - anything unreadable has no countable cells
        return "", [], None
