"""The acquisition service: source -> pipeline -> crop publisher, with metrics and health.

Configuration comes from two dataclasses resolved with :func:`leukoflow.core.config.resolve`:
:class:`AcquireConfig` (section ``acquire``: source, limits, endpoints, ports) and
:class:`leukoflow.acquisition.pipeline.PipelineConfig` (section ``acquire_pipeline``: every
segmentation, gating, tracking and crop parameter). Both are recorded in every accounting
message and in :meth:`AcquireService.params`.

Real time is the default: a simulated or replayed camera delivers its frames at the
camera's frame rate into a ring buffer (:class:`leukoflow.acquisition.sources.FrameClock`),
as a real camera does, and frames the acquisition did not take in time are dropped at the
source and counted (``overrun``); gaps in a real camera's frame counter are counted as
``camera`` drops. The service exports the nominal and the achieved frame rate, the frame
backlog and the frames dropped, and estimates the cells that passed in dropped frames.
``as_fast_as_possible`` (benchmarks) takes frames as fast as the pipeline processes them
instead: nothing is dropped, simulated time then runs slower than real time. The first
``warmup_s`` seconds of frames are the warm-up (``leukoflow_warming_up`` = 1): alerts on
rates and latency wait for the steady state.

The loop never blocks on downstream: crops are sent non-blocking and counted as dropped
(``backpressure``) when the inference workers are full. Bad frames are rejected and
counted; camera stalls (no frame for ``stall_intervals`` frame intervals) and dropouts
(frame-index jumps) are counted; the service keeps running. SIGTERM/SIGINT stop it
gracefully: open tracks are flushed and published, then an ``eos`` control message with the
final accounting goes to the collector.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from leukoflow.acquisition.pipeline import (
    AcquisitionPipeline,
    FrameResult,
    PipelineConfig,
    TruthScorer,
)
from leukoflow.acquisition.publisher import AccountingPublisher, CropPublisher
from leukoflow.acquisition.realtime import RealtimeMonitor
from leukoflow.acquisition.sources import (
    EndOfStream,
    Source,
    SourceError,
    StallMonitor,
    create_source,
)
from leukoflow.acquisition.sources.file import median_background
from leukoflow.acquisition.sources.sim import LIVE_CONCENTRATION
from leukoflow.core import transport
from leukoflow.core.identity import claim, release
from leukoflow.core.metrics import ServiceMetrics
from leukoflow.core.service import ServiceScaffold

log = logging.getLogger("leukoflow.acquire")


@dataclass(frozen=True)
class AcquireConfig:
    """Service parameters (section ``acquire``; env ``LEUKOFLOW_ACQUIRE_<KEY>``).

    Attributes
    ----------
    source : str
        Source spec: ``sim``, ``file:PATH``, ``camera:opencv:INDEX``, ``camera:genicam``.
    seed : int
        Simulator seed (``sim`` source).
    concentration : float
        Sample density of the simulated instrument [objects per field of view] when the
        source spec names none (``sim``, ``sim:SEED``); the default is the live default
        :data:`leukoflow.acquisition.sources.sim.LIVE_CONCENTRATION` (docs/realtime.md).
    frames : int
        Stop after this many frames (0 = no limit).
    duration_s : float
        Stop after this many seconds [s] (0 = no limit).
    rate_hz : float
        Frame rate of a simulated/replayed camera [frames/s] (0 = the camera's nominal rate:
        the simulator's, or the one recorded in the file).
    as_fast_as_possible : bool
        Take simulated/replayed frames as fast as the pipeline processes them (benchmarks)
        instead of in real time: no frame is dropped, simulated time runs slower.
    buffer_frames : int
        Ring buffer of the simulated/replayed camera [frames]: frames still unread when it
        wraps around are dropped (``overrun``).
    warmup_s : float
        Warm-up after the first frame [s]: ``leukoflow_warming_up`` is 1 and the achieved
        frame rate of the steady state is measured from its end.
    device : str
        Where the per-pixel work runs: ``cpu`` (NumPy, frame by frame), ``cuda``/``cuda:N``
        (batches of frames on the GPU, :mod:`leukoflow.acquisition.batched`), ``auto``
        (CUDA when available) or ``torch-cpu`` (the batched path on the CPU: tests).
    batch_frames : int
        Frames per device batch (GPU path).
    batch_max_delay_ms : float
        A device batch is processed at the latest this long after its first frame [ms].
    score_truth : bool
        Sources with ground truth (the simulator): score the acquisition against it while
        it runs (one crop per fully crossing cell, duplicates, phase RMSE; the truth of
        frames dropped at the source counts too) in the accounting's ``truth`` entry.
    crops_endpoint : str
        PUSH bind address for crops.
    collector_endpoint : str
        Collector PULL address for accounting/EOS messages.
    metrics_host : str
        Bind address of /metrics, /healthz, /readyz (loopback by default).
    metrics_port : int
        Port of the health server (0 = pick a free one).
    run_id : str
        Run id ("" = generated).
    sndhwm : int
        Crop socket send high-water mark [messages].
    dtype : str
        Crop payload dtype (``<f4`` or ``<f2``).
    accounting_interval_s : float
        Interval of the periodic accounting message [s].
    stall_intervals : float
        Frame intervals without a frame that count as a camera stall.
    bg_frames : int
        Frames used for a median background when the source has none.
    allow_remote : bool
        Permit non-loopback binds (add CurveZMQ in such deployments).
    state_dir : str
        Folder of the acquisition's identity file ('' = none; :mod:`leukoflow.core.identity`):
        each start claims the next epoch, so cell ids stay unique across restarts, and a
        start without a fixed ``run_id`` resumes the run a crashed start was serving
        (``leukoflow run``: the run folder; systemd/compose: the state directory).
    journal : str
        Publish journal path ('' = none): one JSON line per crop message (sender, seq, ids,
        truth ids) written before it is sent; an audit trail of what left acquisition.
    """

    source: str = "sim"
    seed: int = 0
    concentration: float = LIVE_CONCENTRATION
    frames: int = 0
    duration_s: float = 0.0
    rate_hz: float = 0.0
    as_fast_as_possible: bool = False
    buffer_frames: int = 256
    warmup_s: float = 5.0
    device: str = "cpu"
    batch_frames: int = 64
    batch_max_delay_ms: float = 20.0
    score_truth: bool = True
    crops_endpoint: str = transport.DEFAULT_ENDPOINTS["crops"]
    collector_endpoint: str = transport.DEFAULT_ENDPOINTS["collector"]
    metrics_host: str = transport.LOOPBACK
    metrics_port: int = transport.DEFAULT_METRICS_PORTS["acquire"]
    run_id: str = ""
    sndhwm: int = 16
    dtype: str = "<f4"
    accounting_interval_s: float = 1.0
    stall_intervals: float = 50.0
    bg_frames: int = 32
    allow_remote: bool = False
    state_dir: str = ""
    journal: str = ""


def truth_summary(scorer: TruthScorer) -> dict[str, Any]:
    """The accounting's ``truth`` entry: yield figures against the simulator's truth."""
    s = scorer.summary()

    def short(d: dict) -> dict:
        return {k: d[k] for k in ("n", "exactly_one", "missed", "multiple",
                                  "yield_exactly_one")}

    # coincidence and other losses per kind: fully crossing objects without a crop
    loss: dict[str, dict[str, int]] = {}
    for cid in scorer.full:
        d = loss.setdefault(scorer.kind.get(cid, "?"), {"n": 0, "missed": 0, "multiple": 0})
        d["n"] += 1
        e = scorer.emitted[cid]
        d["missed"] += e == 0
        d["multiple"] += e > 1
    return {"loss_by_kind": loss,
            "full_crossing_cells": short(s["full_crossing_cells"]),
            "resolvable_cells": short(s["resolvable_cells"]),
            "full_crossing_leukocytes": short(s["full_crossing_leukocytes"]),
            "duplicates": s["duplicates"], "unmatched_emitted": s["unmatched_emitted"],
            "phase_rmse_rad": s["phase_rmse_rad"],
            "missed_resolvable_kinds": s["missed_resolvable_kinds"]}


def new_run_id() -> str:
    """Run id: UTC time plus a short random suffix."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


class AcquireService:
    """One acquisition process.

    Parameters
    ----------
    config : AcquireConfig
        Service parameters.
    pipeline_config : PipelineConfig
        Pipeline parameters.
    source : Source, optional
        A ready source (default: built from ``config.source``).
    """

    def __init__(self, config: AcquireConfig | None = None,
                 pipeline_config: PipelineConfig | None = None,
                 source: Source | None = None) -> None:
        self.config = config or AcquireConfig()
        self.pipeline_config = pipeline_config or PipelineConfig()
        # run id and epoch of this start (cell ids unique across restarts)
        self.identity = claim(self.config.state_dir, self.config.run_id, new_run_id)
        self.run_id = self.identity.run
        self._source = source
        self._stop = threading.Event()
        self.stop_reason = ""
        self.stats: Counter = Counter()
        self.health: Any = None
        self.metrics: Any = None
        self.pipeline: AcquisitionPipeline | None = None
        self._identity_cache: dict[str, Any] | None = None
        self.final: dict[str, Any] = {}
        self._last_index = 0
        self.realtime: RealtimeMonitor | None = None
        self._gauges_at = 0.0
        self._audits_seen: dict[str, int] = {}
        self._batch: list = []
        self.scorer: TruthScorer | None = None
        self._batch_t0 = time.monotonic()

    # ------------------------------------------------------------------ control
    def stop(self, reason: str = "requested") -> None:
        """Ask the loop to stop after the current frame (thread/signal safe)."""
        if not self.stop_reason:
            self.stop_reason = reason
        self._stop.set()

    @property
    def params(self) -> dict[str, Any]:
        """Every parameter of this run (service, pipeline, source)."""
        d: dict[str, Any] = {"run": self.run_id, "acquire": asdict(self.config)}
        if self.pipeline is not None:
            d.update(self.pipeline.params)
        if self._source is not None:
            d["source"] = self._source.info
        return d

    def _pipeline_identity(self) -> dict[str, Any]:
        """Identifier (``id_parts``: joined, the :func:`identity` ``id``), hash and generation
        of the running pipeline ({} before it exists)."""
        if self.pipeline is None:
            return {}
        if self._identity_cache is None:  # fixed once the pipeline runs
            ident = self.pipeline.params.get("identity") or {}
            text = str(ident.get("id", ""))
            # the wire caps strings in stats: the identifier travels in 512-character parts
            self._identity_cache = {"id_parts": [text[i:i + 512]
                                                 for i in range(0, len(text), 512)],
                                    "hash": ident.get("hash"),
                                    "generation": ident.get("generation")}
        return self._identity_cache

    # ------------------------------------------------------------------ accounting
    def accounting(self) -> dict[str, Any]:
        """Complete accounting so far (sent in ``accounting``/``eos`` control messages).

        ``cells_total = cells_emitted + sum(cells_dropped) + sum(cells_rejected)``.
        """
        p = self.pipeline.accounting() if self.pipeline is not None else {}
        pub = getattr(self, "publisher", None)
        emitted = pub.sent_cells if pub is not None else 0
        dropped = dict(pub.dropped) if pub is not None else {}
        rejected = p.get("cells_rejected", {})
        stall = getattr(self, "stall", None)
        rt = self.realtime
        # cells found in the frames taken (finished tracks: emitted or rejected)
        found = int(p.get("cells_emitted", 0)) + int(sum(rejected.values()))
        return {
            "run": self.run_id,
            "crops_sender": pub.sender.sender if pub is not None else "",
            "epoch": self.identity.epoch,
            # the pipeline these crops were cut with (recordings of a standalone collector
            # carry it; ``leukoflow run`` also resolves it with the model beforehand)
            "pipeline": self._pipeline_identity(),
            "crops_seq": pub.sender.seq if pub is not None else 0,
            "crops_messages": pub.sent_messages if pub is not None else 0,
            "frames": int(self.stats["frames"]),
            "frames_processed": p.get("frames", 0),
            "frames_skipped_empty": p.get("frames_skipped_empty", 0),
            "prescreen": p.get("prescreen", {}),
            "frames_rejected": p.get("frames_rejected", {}),
            "frames_background": int(self.stats["frames_background"]),
            "detections": p.get("detections", 0),
            "cells_emitted": int(emitted),
            "cells_dropped": dropped,
            "cells_rejected": rejected,
            "cells_total": int(emitted + sum(dropped.values()) + sum(rejected.values())),
            "tracks_open": p.get("tracks_open", 0),
            "camera": {
                "stalls": stall.stalls if stall else 0,
                "dropouts": stall.dropouts if stall else 0,
                "frames_missing": stall.frames_missing if stall else 0,
                "source_errors": int(self.stats["source_errors"]),
                **(rt.summary(found) if rt is not None else {}),
            },
            "stop_reason": self.stop_reason,
            **({"truth": truth_summary(self.scorer)} if self.scorer is not None else {}),
        }

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict[str, Any]:
        """Run until a limit, the end of the source, or a stop request; return the accounting."""
        import zmq


        cfg = self.config
        self.metrics = ServiceMetrics("acquire", run_id=self.run_id)
        # signals (SIGTERM/SIGINT -> stop) and the health server, both undone in _shutdown
        self.health = ServiceScaffold(self.metrics, host=cfg.metrics_host,
                                      port=cfg.metrics_port, status=self.accounting,
                                      on_stop=self.stop).open()
        ctx = zmq.Context()
        self.publisher = None
        self.control = None
        t_start = time.monotonic()
        try:
            self.publisher = CropPublisher(ctx, self.run_id, cfg.crops_endpoint,
                                           sndhwm=cfg.sndhwm, dtype=cfg.dtype,
                                           allow_remote=cfg.allow_remote,
                                           epoch=self.identity.epoch, journal=cfg.journal)
            self.control = AccountingPublisher(ctx, self.run_id, cfg.collector_endpoint)
            own_source = self._source is None
            if own_source:
                self._source = create_source(cfg.source, seed=cfg.seed,
                                             concentration=cfg.concentration)
            src = self._source
            src.open()
            self.stall = StallMonitor(frame_interval_s=src.frame_interval_s or 0.002,
                                      stall_intervals=cfg.stall_intervals)
            self.pipeline = self._make_pipeline()
            bg = src.background
            if bg is not None:
                self.pipeline.set_background(bg)
            else:
                self._collect_background(src)
            if own_source and not cfg.as_fast_as_possible:
                # real time from the first frame of the run on (set-up is not a backlog)
                src.pace(cfg.rate_hz, cfg.buffer_frames)
            if cfg.score_truth and src.has_truth:
                self.scorer = TruthScorer(pixel_um=self.pipeline.pixel_um,
                                          true_phase=getattr(src, "true_phase", None))
                if hasattr(src, "on_drop"):  # dropped frames held cells too
                    prev = src.on_drop

                    def on_drop(fr: Any, prev: Any = prev) -> None:
                        self.scorer.observe_truth(list(fr.truth))
                        if prev is not None:
                            prev(fr)

                    src.on_drop = on_drop
            self.realtime = RealtimeMonitor(src.nominal_rate_hz if src.paced else 0.0,
                                            warmup_s=cfg.warmup_s)
            self._set_rate_gauges(force=True)
            self.control.send("hello", {"run": self.run_id, "source": cfg.source,
                                        "crops_sender": self.publisher.sender.sender,
                                        "epoch": self.identity.epoch,
                                        "resumed": self.identity.resumed,
                                        "crops_endpoint": cfg.crops_endpoint,
                                        "paced": src.paced,
                                        "nominal_frame_rate_hz": src.nominal_rate_hz})
            self.health.set_ready(True)
            log.info("acquire ready: run %s, source %s", self.run_id, cfg.source)
            self._loop(src, t_start)
        finally:
            self._shutdown()
            ctx.term()
        return self.final

    def _make_pipeline(self) -> AcquisitionPipeline:
        """The NumPy pipeline, or the batched device pipeline for ``device`` cuda/auto."""
        dev = self.config.device
        if dev == "cpu":
            return AcquisitionPipeline(self.pipeline_config)
        import torch

        from leukoflow.acquisition.batched import BatchedPipeline

        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            if dev == "cpu":
                return AcquisitionPipeline(self.pipeline_config)
        if dev == "torch-cpu":
            dev = "cpu"
        elif not torch.cuda.is_available():
            raise SourceError(f"acquire device {dev!r}: CUDA is not available here "
                              "(use device cpu or auto)")
        return BatchedPipeline(self.pipeline_config, device=dev)

    def _collect_background(self, src: Source) -> None:
        frames = []
        deadline = time.monotonic() + 30.0
        while len(frames) < self.config.bg_frames and not self._stop.is_set():
            self.health.tick()
            if time.monotonic() > deadline:
                raise SourceError("no frames for the background estimate within 30 s")
            raw = src.read(timeout_s=0.5)
            if raw is None or self.pipeline.validator.check(raw.image) is not None:
                continue
            frames.append(raw.image)
            self.stats["frames_background"] += 1
        if frames:
            self.pipeline.set_background(median_background(frames))

    def _loop(self, src: Source, t_start: float) -> None:
        cfg = self.config
        m = self.metrics
        next_acct = time.monotonic() + cfg.accounting_interval_s
        while not self._stop.is_set():
            self.health.tick()
            now = time.monotonic()
            if cfg.frames and self.stats["frames"] >= cfg.frames:
                self.stop("frames")
                break
            if cfg.duration_s and now - t_start >= cfg.duration_s:
                self.stop("duration")
                break
            if now >= next_acct:
                self.control.send("accounting", self.accounting())
                next_acct = now + cfg.accounting_interval_s
            try:
                c0 = time.thread_time()
                raw = src.read(timeout_s=0.1)
                self.realtime.source_cpu_s += time.thread_time() - c0
            except EndOfStream:
                self.stop("end_of_stream")
                break
            except SourceError as exc:
                self.stats["source_errors"] += 1
                log.warning("source error: %s", exc)
                time.sleep(0.1)
                continue
            if raw is None:
                if self.stall.idle():
                    m["leukoflow_camera_stalls_total"].inc()
                    log.warning("camera stall: no frame for %.2f s", self.stall.timeout_s)
                m["leukoflow_camera_frame_age_seconds"].set(self.stall.age_s())
                self._flush_batch(src)  # no frame now: do not hold a partial batch back
                self._set_rate_gauges()
                continue
            self._last_index = max(self._last_index, int(raw.index))
            overrun = int(raw.dropped_before)
            missing = self.stall.frame(raw.index, explained=overrun)
            if missing:
                m["leukoflow_camera_stalls_total"].inc()
                log.warning("camera dropout: %d frames missing before %d", missing, raw.index)
            if overrun:
                m["leukoflow_frames_dropped_total"].labels("overrun").inc(overrun)
            if missing:
                m["leukoflow_frames_dropped_total"].labels("camera").inc(missing)
            self.realtime.frame({"overrun": overrun, "camera": missing}, backlog=raw.backlog)
            self.stats["frames"] += 1
            m["leukoflow_frames_total"].inc()
            if hasattr(self.pipeline, "process_batch"):
                if not self._batch:
                    self._batch_t0 = time.monotonic()
                self._batch.append(raw)
                if (len(self._batch) >= max(cfg.batch_frames, 1)
                        or time.monotonic() - self._batch_t0 >= cfg.batch_max_delay_ms / 1e3):
                    self._flush_batch(src)
            else:
                res = self.pipeline.process(raw)
                self._score(raw, res)
                self._account_frame(res, src)
            self._set_rate_gauges()

    def _flush_batch(self, src: Source) -> None:
        """Process the frames collected for the device in one batch."""
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        for raw, res in zip(batch, self.pipeline.process_batch(batch), strict=True):
            self._score(raw, res)
            self._account_frame(res, src)

    def _score(self, raw: Any, res: FrameResult | None) -> None:
        if self.scorer is not None:
            if raw is not None and raw.truth is not None:
                self.scorer.observe_truth(raw.truth)
            if res is not None:
                self.scorer.observe_cells(res.cells)

    def _set_rate_gauges(self, force: bool = False) -> None:
        """Frame-rate gauges (at most 4 times a second: cheap per frame)."""
        now = time.monotonic()
        if not force and now - self._gauges_at < 0.25:
            return
        self._gauges_at = now
        rt, m = self.realtime, self.metrics
        m["leukoflow_frame_rate_nominal_hertz"].set(rt.nominal_hz)
        m["leukoflow_frame_rate_achieved_hertz"].set(rt.achieved_hz(now))
        m["leukoflow_frame_backlog"].set(rt.backlog)
        m["leukoflow_warming_up"].set(1 if rt.warming_up(now) else 0)
        p = self.pipeline.accounting() if self.pipeline is not None else {}
        found = int(p.get("cells_emitted", 0)) + int(sum(p.get("cells_rejected", {}).values()))
        m["leukoflow_cells_in_dropped_frames"].set(rt.cells_in_dropped_frames(found))
        ps = p.get("prescreen", {})
        audits = m["leukoflow_prescreen_audits_total"]
        for outcome, n in (("missed", ps.get("audit_missed", 0)),
                           ("empty", ps.get("audited", 0) - ps.get("audit_missed", 0))):
            seen = self._audits_seen.get(outcome, 0)
            if n > seen:
                audits.labels(outcome).inc(n - seen)
                self._audits_seen[outcome] = n

    def _account_frame(self, res: FrameResult, src: Source) -> None:
        m = self.metrics
        if res.frame_reject is not None:
            m["leukoflow_frames_rejected_total"].labels(res.frame_reject).inc()
            return
        if res.skipped is not None:  # no object in view and none tracked: nothing to do
            m["leukoflow_frames_skipped_total"].labels(res.skipped).inc()
            m["leukoflow_camera_frame_age_seconds"].set(self.stall.age_s())
            return
        t = res.t
        hist = m["leukoflow_stage_duration_seconds"]
        for stage, a, b in (("reconstruct", "t_acq", "t_recon"),
                            ("segment", "t_recon", "t_segment"),
                            ("track", "t_segment", "t_track"), ("crop", "t_track", "t_crop")):
            if a in t and b in t:
                hist.labels(stage).observe(max(t[b] - t[a], 0) / 1e9)
        m["leukoflow_cells_detected_total"].inc(res.n_detections)
        for rc in res.rejected:
            m["leukoflow_cells_rejected_total"].labels(rc.reason).inc()
        self._publish(res, src)
        m["leukoflow_tracks_active"].set(self.pipeline.tracker.n_open)
        m["leukoflow_camera_frame_age_seconds"].set(self.stall.age_s())

    def _publish(self, res: FrameResult, src: Source) -> None:
        if not res.cells:
            return
        m = self.metrics
        t0 = time.monotonic_ns()
        ok = self.publisher.publish(res.index, res.cells, res.t, with_truth=src.has_truth)
        m["leukoflow_stage_duration_seconds"].labels("publish").observe(
            (time.monotonic_ns() - t0) / 1e9)
        if ok:
            m["leukoflow_cells_emitted_total"].inc(len(res.cells))
        else:
            m["leukoflow_dropped_total"].labels("acquire", "backpressure").inc(len(res.cells))

    def _shutdown(self) -> None:
        try:
            if self.health is not None:
                self.health.set_ready(False)
            if self.pipeline is not None and self.publisher is not None:
                if self._source is not None:
                    self._flush_batch(self._source)
                res = self.pipeline.flush(self._last_index)
                self._score(None, res)
                if self._source is not None:
                    self._account_frame(res, self._source)
            self.final = self.accounting()
            if self.control is not None:
                ok = self.control.send("eos", self.final, timeout_ms=2000)
                self.final["eos_sent"] = ok
                if ok:  # a clean end: the next start begins a new run
                    release(self.identity)
                log.info("acquire stopped (%s); eos sent: %s", self.stop_reason, ok)
        finally:
            for closer in (getattr(self._source, "close", None),
                           getattr(self.publisher, "close", None)):
                if closer is not None:
                    try:
                        closer()
                    except Exception as exc:  # noqa: BLE001
                        log.warning("close failed: %s", exc)
            if self.control is not None:
                self.control.close(linger_ms=1000)
            if self.health is not None:
                self.health.close()
