"""The ``leukoflow explain`` service: explains flagged cells off the counting path.

Inference PUSHes ``explain`` messages (crops plus the results keys of those cells) without
blocking; this service binds a PULL socket (default: the ``explain`` endpoint of
:data:`leukoflow.core.transport.DEFAULT_ENDPOINTS`), and a receiver thread drains it
continuously into a bounded in-memory backlog. When the backlog is full the **oldest** cell
is dropped and counted as
``leukoflow_dropped_total{stage="explain",reason="backlog_full"}``, so the newest flagged
cells are explained and the sender never sees backpressure from slow explanations. A worker
thread takes cells from the backlog, runs the configured methods on its own model copy and
writes one artifact per cell into ``<run_dir>/explanations/``.

Every received cell is accounted for: explained, dropped (``backlog_full``, ``error``,
``shutdown``) or part of a rejected message (``leukoflow_messages_rejected_total{reason}``).
Each message is handled inside its own error boundary: one that fails is rejected with reason
``handler_error`` (its cell ids logged), the service goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leukoflow.core import transport, wire
from leukoflow.core.metrics import ServiceMetrics
from leukoflow.core.physics import CROP_SIZE_PX
from leukoflow.core.service import ServiceScaffold, StopSignals

log = logging.getLogger("leukoflow.explain")

STAGE = "explain"


@dataclass(frozen=True)
class ExplainConfig:
    """Parameters of the explain service (section ``[explain]``, ``LEUKOFLOW_EXPLAIN_*``).

    Attributes
    ----------
    endpoint : str
        PULL endpoint to bind (loopback by default).
    allow_remote : bool
        Allow binding a non-loopback address.
    metrics_host, metrics_port : str, int
        HTTP address of /metrics, /healthz, /readyz (port 0 = any free port).
    run_dir : str
        Run folder; artifacts go to ``<run_dir>/explanations/``.
    model : str
        Model artifact name or path.
    methods : tuple of str
        Explanation methods (``leukoflow.explain.methods.EXPLAINERS`` names), run in this order.
    backlog : int
        Maximum number of cells waiting; the oldest is dropped beyond it.
    batch_cells : int
        Cells explained together (one batched LIME forward stream; > 1 helps on a GPU).
    lime_samples : int
        LIME perturbations per segmentation.
    lime_segments : tuple of int
        SLIC ``n_segments`` per segmentation.
    seed : int
        LIME sampler seed (combined with the cell id).
    png : bool
        Also render the PNG overlay.
    device : str
        Torch device of the explainer's model copy.
    threads : int
        Torch CPU threads of the worker.
    hwm : int
        ZeroMQ receive high-water mark [messages].
    nice : int
        Niceness increment of the service's own process (:meth:`ExplainService.run_forever`),
        so that where cores are shared the counting path (niceness 0) gets the CPU first;
        0 leaves the priority unchanged.
    """

    endpoint: str = transport.DEFAULT_ENDPOINTS["explain"]
    allow_remote: bool = False
    metrics_host: str = transport.LOOPBACK
    metrics_port: int = transport.DEFAULT_METRICS_PORTS["explain"]
    run_dir: str = "runs/current"
    model: str = "lenet5-sim"
    methods: tuple[str, ...] = ("lime", "guided_backprop")
    backlog: int = 64
    batch_cells: int = 1
    lime_samples: int = 500
    lime_segments: tuple[int, ...] = (25, 50, 100)
    seed: int = 0
    png: bool = True
    device: str = "cpu"
    threads: int = 1
    hwm: int = 1000
    nice: int = 10


@dataclass
class FlaggedCell:
    """One cell waiting in the backlog."""

    cell_id: int
    crop: np.ndarray
    record: dict[str, Any]
    t_flag_ns: int
    t_recv_ns: int
    target: int = 0


class Backlog:
    """Bounded FIFO that drops the **oldest** item when full (thread-safe).

    Parameters
    ----------
    maxlen : int
        Capacity (>= 1).
    """

    def __init__(self, maxlen: int) -> None:
        if maxlen < 1:
            raise ValueError("backlog must hold at least one cell")
        self._q: deque[FlaggedCell] = deque()
        self.maxlen = int(maxlen)
        self._cond = threading.Condition()
        self.dropped = 0

    def put(self, item: FlaggedCell) -> int:
        """Append; return how many old items were dropped to make room (0 or 1)."""
        with self._cond:
            dropped = 0
            while len(self._q) >= self.maxlen:
                self._q.popleft()
                dropped += 1
            self._q.append(item)
            self.dropped += dropped
            self._cond.notify()
            return dropped

    def count_dropped(self, n: int) -> None:
        """Count ``n`` items dropped without being queued (older than a full backlog)."""
        with self._cond:
            self.dropped += int(n)

    def take(self, max_items: int, timeout_s: float) -> list[FlaggedCell]:
        """Pop up to ``max_items`` oldest items, waiting at most ``timeout_s`` for one."""
        with self._cond:
            if not self._q:
                self._cond.wait(timeout_s)
            out = []
            while self._q and len(out) < max_items:
                out.append(self._q.popleft())
            return out

    def clear(self) -> int:
        """Remove everything; return the number removed."""
        with self._cond:
            n = len(self._q)
            self._q.clear()
            return n

    def __len__(self) -> int:
        with self._cond:
            return len(self._q)


def _flag_time(t: dict, now: int) -> int:
    """Earliest plausible monotonic stamp of the message (same host), else ``now``."""
    vals = [v for v in t.values() if isinstance(v, int) and 0 < v <= now
            and now - v < 3_600_000_000_000]
    return max(vals) if vals else now


def cells_from_message(msg: Any, now_ns: int, first: int = 0) -> list[FlaggedCell]:
    """Split a decoded ``explain`` message into per-cell backlog items (crops copied).

    ``first`` skips the message's first cells (those a full backlog would drop at once)."""
    h = msg.header
    crops = np.asarray(msg.array, dtype=np.float32)
    t_flag = _flag_time(h.get("t", {}), now_ns)
    classes = list(h["classes"])
    if len(crops) != len(h["ids"]):
        raise ValueError("explain message: one crop per id required")
    out = []
    for i, cid in enumerate(h["ids"]):
        if i < first:
            continue
        pred = int(h["pred"][i])
        probs = [float(p) for p in h["probs"][i]]
        rec = {"run": h.get("run", ""), "sender": h.get("sender", ""),
               "decision": h["decision"][i], "pred": pred, "pred_class": classes[pred],
               "conf": float(h["conf"][i]), "ood_score": float(h["ood_score"][i]),
               "probabilities": dict(zip(classes, probs, strict=True)),
               "classes": classes, "sender_model": h.get("model", ""),
               "label": (h.get("labels") or [None] * len(h["ids"]))[i],
               "kind": (h.get("kinds") or [None] * len(h["ids"]))[i]}
        out.append(FlaggedCell(int(cid), crops[i].copy(), rec, t_flag, now_ns, pred))
    return out


@dataclass
class ExplainService:
    """Receiver thread + bounded backlog + explanation worker + health server.

    Parameters
    ----------
    config : ExplainConfig
    bundle : ModelBundle, optional
        The model; loaded from ``config.model`` on :meth:`start` if not given.
    """

    config: ExplainConfig = field(default_factory=ExplainConfig)
    bundle: Any = None

    def __post_init__(self) -> None:

        self.metrics = ServiceMetrics("explain")
        self.backlog = Backlog(self.config.backlog)
        self.stop_event = threading.Event()
        self.health: Any = None
        self._threads: list[threading.Thread] = []
        self._ctx: Any = None
        self._sock: Any = None
        self.explainers: list[Any] = []
        self.stats = {"received_cells": 0, "explained": 0, "dropped_backlog": 0,
                      "dropped_error": 0, "dropped_shutdown": 0, "dropped_shape": 0,
                      "rejected_messages": 0}
        self.crop_side: int | None = None  # the model's input size, known once loaded
        self.class_names: tuple[str, ...] | None = None  # the model's classes, likewise
        self._lock = threading.Lock()
        self.out_dir = Path(self.config.run_dir) / "explanations"
        self.endpoint = self.config.endpoint

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> ExplainService:
        """Bind the socket, start health, receiver and worker threads; returns self."""
        import zmq


        cfg = self.config
        self.health = ServiceScaffold(self.metrics, host=cfg.metrics_host,
                                      port=cfg.metrics_port, status=self.status).open()
        self._ctx = zmq.Context()
        self._sock = transport.make_socket(self._ctx, "PULL", cfg.endpoint, bind=True,
                                           hwm=cfg.hwm, allow_remote=cfg.allow_remote,
                                           serves="explain")
        self.endpoint = self._sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.metrics["leukoflow_explainer_backlog"].set(0)
        for r in ("backlog_full", "error", "shutdown", "shape"):
            self.metrics["leukoflow_dropped_total"].labels(STAGE, r)
        for m in cfg.methods:
            self.metrics["leukoflow_explanations_total"].labels(m)
        self._threads = [threading.Thread(target=self._receive_loop, name="explain-recv",
                                          daemon=True),
                         threading.Thread(target=self._work_loop, name="explain-work",
                                          daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def _load(self) -> None:
        import torch

        from leukoflow.explain.methods import EXPLAINERS
        from leukoflow.explain.model import ModelBundle

        torch.set_num_threads(max(1, self.config.threads))
        if self.bundle is None:
            self.bundle = ModelBundle.from_artifact(self.config.model)
        if self.config.device != "cpu":
            self.bundle.module.to(self.config.device)
        self.explainers = []
        for name in self.config.methods:
            kw: dict[str, Any] = {}
            if name == "lime":
                kw = {"n_samples": self.config.lime_samples,
                      "n_segments": tuple(self.config.lime_segments), "seed": self.config.seed,
                      "batch_size": 32 if self.config.device == "cpu" else 8192}
            self.explainers.append(EXPLAINERS.create(name, bundle=self.bundle, **kw))
        # warm-up on a blank crop so the first real cell is not slowed by lazy init
        s = self.bundle.module.input_size or CROP_SIZE_PX
        for e in self.explainers:
            e.explain(np.zeros((1, s, s), np.float32), [0])
        self.crop_side = int(s)
        self.class_names = tuple(self.bundle.class_names)

    def stop(self, timeout_s: float = 10.0) -> dict[str, int]:
        """Stop both threads (the current cell is finished), count leftovers, close.

        Returns the final :attr:`stats`.
        """
        self.stop_event.set()
        for t in self._threads:
            t.join(timeout_s)
        left = self.backlog.clear()
        if left:
            self._drop("shutdown", left)
        self.metrics["leukoflow_explainer_backlog"].set(0)
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self.health is not None:
            self.health.close()
            self.health = None
        return dict(self.stats)

    def lower_priority(self) -> int:
        """Raise this process's niceness by ``config.nice`` (call only in the service's own
        process); returns the new niceness."""
        import os

        if self.config.nice < 0:
            raise ValueError("nice must be >= 0 (the explainer never outranks counting)")
        new = os.nice(int(self.config.nice)) if self.config.nice else os.nice(0)
        log.info("explainer process niceness %d", new)
        return new

    def run_forever(self) -> dict[str, int]:
        """Start, wait for SIGINT/SIGTERM or a ``stop`` control message, stop gracefully.

        Runs in the service's own process, whose CPU priority is lowered first
        (:meth:`lower_priority`)."""
        self.lower_priority()
        with StopSignals(lambda _sig: self.stop_event.set()):
            self.start()
            while not self.stop_event.wait(0.2):
                pass
            return self.stop()

    def status(self) -> dict[str, Any]:
        """Counters for ``/status``."""
        with self._lock:
            d = dict(self.stats)
        d["backlog"] = len(self.backlog)
        d["endpoint"] = self.endpoint
        d["out_dir"] = str(self.out_dir)
        return d

    # ---------------------------------------------------------------- internals
    def _drop(self, reason: str, n: int = 1) -> None:
        self.metrics["leukoflow_dropped_total"].labels(STAGE, reason).inc(n)
        key = {"backlog_full": "dropped_backlog", "error": "dropped_error",
               "shutdown": "dropped_shutdown", "shape": "dropped_shape"}[reason]
        with self._lock:
            self.stats[key] += n

    def _reject(self, reason: str) -> None:
        self.metrics["leukoflow_messages_rejected_total"].labels(reason).inc()
        with self._lock:
            self.stats["rejected_messages"] += 1

    def _receive_loop(self) -> None:
        import zmq


        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self.stop_event.is_set():
            if self.health is not None:
                self.health.tick()
            if not poller.poll(100):
                continue
            # drain everything available before going back to poll
            while not self.stop_event.is_set():
                try:
                    frames = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                except zmq.ZMQError:
                    return
                try:
                    msg = wire.decode(frames)
                except wire.WireError as exc:
                    self._reject(exc.reason)
                    continue
                if not transport.authorize(frames, msg.header):  # CurveZMQ role check
                    self._reject("unauthorized")
                    continue
                try:
                    self._handle(msg)
                except Exception as exc:  # noqa: BLE001 - one message never ends the service
                    ids = msg.header.get("ids") if msg.kind == "explain" else None
                    log.exception("handling %s from %s failed (cells %s): %s", msg.kind,
                                  msg.sender, ids, exc)
                    self._reject("handler_error")

    def _handle(self, msg: Any) -> None:

        if msg.kind == "control":
            if msg.header.get("cmd") == "stop":
                log.info("stop requested by %s", msg.sender)
                self.stop_event.set()
            return
        if msg.kind == "heartbeat":
            return
        if msg.kind != "explain":
            self._reject("kind")
            return
        side = self.crop_side
        if side is not None and tuple(msg.array.shape[1:]) != (side, side):
            self._reject("shape")  # only crops of the model's size are explained
            return
        if self.class_names is not None and tuple(msg.header["classes"]) != self.class_names:
            self._reject("class_mismatch")  # decided by another model: not explainable here
            return
        # a message larger than the backlog: its first cells would be dropped (oldest
        # first) as soon as they were queued; count them without building them
        n = len(msg.header.get("ids") or ())
        skip = max(0, n - self.backlog.maxlen)
        try:
            cells = cells_from_message(msg, wire.now_ns(), first=skip)
        except (KeyError, IndexError, TypeError, ValueError) as exc:  # decode validated already
            log.warning("bad explain message: %s", exc)
            self._reject("field_value")
            return
        with self._lock:
            self.stats["received_cells"] += skip + len(cells)
        if skip:
            self.backlog.count_dropped(skip)
            self._drop("backlog_full", skip)
        for c in cells:
            dropped = self.backlog.put(c)
            if dropped:
                self._drop("backlog_full", dropped)
        self.metrics["leukoflow_explainer_backlog"].set(len(self.backlog))

    def _work_loop(self) -> None:
        try:
            self._load()
        except Exception as exc:  # noqa: BLE001  (report and stay alive, not ready)
            log.error("explainer could not load the model: %s", exc)
            while not self.stop_event.wait(0.5):
                n = self.backlog.clear()
                if n:
                    self._drop("error", n)
            return
        self.health.set_ready(True)
        while not self.stop_event.is_set():
            cells = self.backlog.take(max(1, self.config.batch_cells), 0.1)
            self.metrics["leukoflow_explainer_backlog"].set(len(self.backlog))
            # cells queued before the model was loaded: only crops of its size are explained
            side = (self.crop_side, self.crop_side)
            keep = [c for c in cells if c.crop.shape == side]
            if len(keep) < len(cells):
                self._drop("shape", len(cells) - len(keep))
                cells = keep
            if not cells:
                continue
            try:
                self._explain(cells)
            except Exception as exc:  # noqa: BLE001  (one bad cell must not stop the service)
                log.exception("explanation failed for cells %s: %s",
                              [c.cell_id for c in cells], exc)
                self._drop("error", len(cells))

    def _explain(self, cells: Sequence[FlaggedCell]) -> None:
        from leukoflow.explain.artifacts import write_cell_artifact

        crops = np.stack([c.crop for c in cells])
        targets = [c.target for c in cells]
        keys = [c.cell_id for c in cells]
        per_method = []
        for e in self.explainers:
            t0 = time.perf_counter()
            res = e.explain(crops, targets, keys)
            self.metrics["leukoflow_explainer_duration_seconds"].labels(e.name).observe(
                (time.perf_counter() - t0) / len(cells))
            per_method.append(res)
        model = self.bundle.describe()
        for i, c in enumerate(cells):
            exps = [res[i] for res in per_method]
            rec = dict(c.record)
            rec["model"] = model
            rec["explained_class"] = self.bundle.class_names[c.target]
            now = wire.now_ns()
            rec["latency_s"] = (now - c.t_flag_ns) / 1e9
            rec["queue_s"] = (now - c.t_recv_ns) / 1e9
            write_cell_artifact(self.out_dir, c.cell_id, c.crop, exps, rec, self.config.png)
            self.metrics["leukoflow_explainer_latency_seconds"].observe(
                (wire.now_ns() - c.t_flag_ns) / 1e9)
            for e in exps:
                self.metrics["leukoflow_explanations_total"].labels(e.method).inc()
            with self._lock:
                self.stats["explained"] += 1
