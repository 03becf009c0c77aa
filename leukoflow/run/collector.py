"""The collector: the single authority for a run's counts and accounting.

It PULLs (bound; default: the ``collector`` endpoint of
:data:`leukoflow.core.transport.DEFAULT_ENDPOINTS`) the inference workers' ``results``
messages and every service's ``control`` messages (acquisition accounting and end of stream,
worker accounting, supervisor restarts), and

* counts every cell exactly once (a cell id seen twice is a *duplicate*: reported, never
  counted again), into the official differential
  (:class:`leukoflow.inference.differential.Differential`);
* keeps the run's accounting, which balances exactly at the end of a run::

      emitted = counted + uncertain + ood + rejected + dropped

  where ``emitted`` is every cell acquisition (or replay) produced (published to inference,
  or rejected/dropped by acquisition itself), ``rejected`` and ``dropped`` are by
  ``stage:reason`` (e.g. ``acquire:backpressure``, ``infer:non_finite``), and cells
  published but never heard of again are dropped with reason ``lost``;
* appends every cell to a crash-safe, append-only cell log (``cells.bin``) from which a
  restarted collector rebuilds its state and the run report draws its time series;
* optionally taps the crop stream (PULL from acquisition, PUSH on to the workers) so the
  :class:`leukoflow.run.recorder.Recorder` can write crops with their predictions to ``.rtdc``;
* PUBlishes the live state (a wire ``heartbeat`` whose ``stats`` is :meth:`RunState.snapshot`)
  on the ``live`` endpoint for the live view, and serves Prometheus metrics (default ports:
  :mod:`leukoflow.core.transport`).

Accounting reports (``control`` with ``cmd`` ``accounting`` or ``eos``) carry cumulative
``stats`` per sender, so a lost or repeated report changes nothing. Keys understood:

``cells_emitted`` or ``emitted`` (int)
    cells published into the pipeline (acquisition and replay senders only);
``cells_rejected``, ``cells_dropped`` ({reason: int})
    acquisition's own quality rejections and back-pressure drops (never published);
``rejected``, ``dropped`` ({reason: int})
    cells that left the pipeline after publishing without a result (e.g. a worker
    rejecting a crop with non-finite pixels); workers may also report them incrementally
    as ``{"event": "rejected", "reason": r, "cells": n, "ids": [...]}``;
``restarts`` ({child: int})
    supervisor restarts per child.

Roles are read from the sender id (``role-pid-nonce``, :func:`leukoflow.core.wire.new_sender_id`):
``acquire`` and ``replay`` emit cells; any other role reports downstream losses.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leukoflow.core import jsonutil, transport, wire
from leukoflow.core.config import bounded
from leukoflow.core.jsonutil import atomic_write_json
from leukoflow.core.metrics import ServiceMetrics
from leukoflow.core.service import ServiceScaffold, heartbeat_message
from leukoflow.core.vocabulary import CLASS_NAMES, DECISIONS
from leukoflow.inference.differential import Differential
from leukoflow.run.drift_watch import RunWatch
from leukoflow.run.recorder import Recorder, repair_rtdc

log = logging.getLogger(__name__)

EMITTER_ROLES: frozenset[str] = frozenset({"acquire", "acquisition", "replay"})

#: One record per cell in the append-only cell log (``cells.bin``).
CELL_DTYPE = np.dtype([
    ("id", "<i8"),          # cell id
    ("t_recv_ns", "<i8"),   # collector receive time, monotonic [ns]
    ("t_acq_ns", "<i8"),    # acquisition time, monotonic [ns] (0 when unknown)
    ("latency_s", "<f4"),   # end-to-end latency [s]
    ("pred", "i1"),         # predicted class index
    ("decision", "i1"),     # index into DECISIONS
    ("label", "i1"),        # ground truth: class index, -1 OOD, -2 unknown
    ("pad", "i1"),
    ("conf", "<f4"),        # max calibrated probability
    ("ood", "<f4"),         # OOD score
    ("p", "<f4", (len(CLASS_NAMES),)),  # calibrated probabilities
])


# ----------------------------------------------------------------------------- helpers

class IdSet:
    """Membership of non-negative integer cell ids: a growing bitmap, a set beyond it.

    Parameters
    ----------
    bitmap_limit : int
        Ids below this use one byte each in a numpy array (dense, fast); larger ids a set.
    """

    def __init__(self, bitmap_limit: int = 1 << 27) -> None:
        self._bits = np.zeros(1 << 16, dtype=bool)
        self._limit = int(bitmap_limit)
        self._big: set[int] = set()
        self.size = 0

    def add_new(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Add ``ids``; return a mask that is True where an id was not seen before.

        Repeated ids inside ``ids`` count as new only at their first position.
        """
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        new = np.ones(arr.size, dtype=bool)
        small = (arr >= 0) & (arr < self._limit)
        if small.any():
            top = int(arr[small].max())
            if top >= self._bits.size:
                cap = self._bits.size
                while cap <= top:
                    cap *= 2
                grown = np.zeros(min(cap, self._limit), dtype=bool)
                grown[: self._bits.size] = self._bits
                self._bits = grown
        for i, cid in enumerate(arr.tolist()):
            if 0 <= cid < self._limit:
                if self._bits[cid]:
                    new[i] = False
                else:
                    self._bits[cid] = True
            elif cid in self._big:
                new[i] = False
            else:
                self._big.add(cid)
        self.size += int(new.sum())
        return new

    def __contains__(self, cid: int) -> bool:
        if 0 <= cid < self._limit:
            return cid < self._bits.size and bool(self._bits[cid])
        return cid in self._big

    def __len__(self) -> int:
        return self.size


class CellLog:
    """Append-only binary log of :data:`CELL_DTYPE` records (crash-safe by construction).

    A killed writer leaves whole records plus at most one partial record, which
    :func:`read_cell_log` ignores. :meth:`flush` (the collector calls it every
    ``flush_interval_s``) and :meth:`close` write the buffer and ``fsync`` the file:
    :attr:`flushed` records survive a crash of the process or of the machine.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        size = self.path.stat().st_size if self.path.exists() else 0
        self._fh = open(self.path, "ab")  # noqa: SIM115 (kept open for the run)
        if size % CELL_DTYPE.itemsize:  # drop a torn record left by a kill
            self._fh.truncate(size - size % CELL_DTYPE.itemsize)
        self._last_flush = time.monotonic()
        #: records on disk for sure (appended before the last flush + fsync), this session
        self.flushed = 0
        self._appended = 0

    def append(self, records: np.ndarray) -> None:
        """Append records (buffered; see :meth:`flush`)."""
        if len(records):
            self._fh.write(np.ascontiguousarray(records, dtype=CELL_DTYPE).tobytes())
            self._appended += len(records)

    def flush(self) -> None:
        """Write buffered records and ``fsync`` them (they survive a crash)."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.flushed = self._appended
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush, ``fsync`` and close."""
        if not self._fh.closed:
            self.flush()
            self._fh.close()


def read_cell_log(path: str | Path) -> np.ndarray:
    """Read every whole record of a cell log (empty array when the file is missing)."""
    p = Path(path)
    if not p.exists():
        return np.zeros(0, dtype=CELL_DTYPE)
    raw = p.read_bytes()
    n = len(raw) // CELL_DTYPE.itemsize
    return np.frombuffer(raw[: n * CELL_DTYPE.itemsize], dtype=CELL_DTYPE).copy()


def _percentile(values: Sequence[float] | np.ndarray, q: float) -> float | None:
    arr = np.asarray(values, dtype=float)
    return float(np.percentile(arr, q)) if arr.size else None


def _role(sender: str) -> str:
    return sender.split("-", 1)[0]


def _merge_counts(dst: Counter, src: Any) -> None:
    if isinstance(src, Mapping):
        for reason, n in src.items():
            if isinstance(n, int | float) and not isinstance(n, bool) and n > 0:
                dst[str(reason)] += int(n)


# ----------------------------------------------------------------------------- run state

class RunState:
    """Counts, accounting and live statistics of one run (no I/O; fed by :class:`Collector`).

    Parameters
    ----------
    classes : sequence of str
        Class names in probability-column order (results with other classes are rejected).
    run_id : str
        Run id (results of another run are rejected).
    latency_window : int
        Cells kept for the live latency percentiles.
    """

    def __init__(self, classes: Sequence[str] = CLASS_NAMES, run_id: str = "",
                 latency_window: int = 5000) -> None:

        self.classes = tuple(classes)
        self.run_id = run_id
        self.diff = Differential(self.classes)
        self.ids = IdSet()
        self.duplicates = 0
        self.reports: dict[str, dict[str, Any]] = {}
        self.event_rejected: dict[str, Counter[str]] = {}
        self.event_dropped: dict[str, Counter[str]] = {}
        self._event_seen: set[tuple[str, int]] = set()
        self.eos_senders: set[str] = set()
        self.stop_requested = False
        self.collector_rejected: Counter[str] = Counter()
        self.messages_rejected: Counter[str] = Counter()
        self.truth = np.zeros(len(self.classes), dtype=np.int64)
        self.truth_ood = 0
        self.latencies: deque[float] = deque(maxlen=latency_window)
        self.latency_all: list[float] = []
        self.t_start = time.monotonic()
        self.t_first_ns: int | None = None
        self.t_last_ns: int | None = None
        self.last_progress = time.monotonic()
        self._rate_samples: deque[tuple[float, int]] = deque(maxlen=64)
        self.restarts: dict[str, int] = {}
        self.collector_restarts = 0
        self.recording: dict[str, Any] = {}
        #: drift monitor, QC status and validity verdict (set by the collector)
        self.watch: RunWatch | None = None

    # -- ingest --------------------------------------------------------------------------
    def ingest_results(self, header: Mapping[str, Any], probs: np.ndarray,
                       t_recv_ns: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Count the cells of one validated ``results`` message.

        Returns
        -------
        records : ndarray of CELL_DTYPE
            One record per newly counted cell (for the cell log).
        new : ndarray of bool
            Mask over the message's cells: True where the cell was new (not a duplicate).
        """
        t_recv_ns = time.monotonic_ns() if t_recv_ns is None else t_recv_ns
        ids = np.asarray(header["ids"], dtype=np.int64)
        n = ids.size
        if tuple(header["classes"]) != self.classes:
            self.collector_rejected["class_mismatch"] += n
            self.messages_rejected["class_mismatch"] += 1
            return np.zeros(0, dtype=CELL_DTYPE), np.zeros(n, dtype=bool)
        if self.run_id and header.get("run") and header["run"] != self.run_id:
            self.messages_rejected["run_mismatch"] += 1
            return np.zeros(0, dtype=CELL_DTYPE), np.zeros(n, dtype=bool)
        new = self.ids.add_new(ids)
        self.duplicates += int(n - new.sum())
        if not new.any():
            return np.zeros(0, dtype=CELL_DTYPE), new
        t = header.get("t", {}) or {}
        t_acq_list = header.get("t_acq")
        t_msg = min(t.values()) if t else 0
        rec = np.zeros(n, dtype=CELL_DTYPE)
        rec["id"] = ids
        rec["t_recv_ns"] = t_recv_ns
        rec["t_acq_ns"] = np.asarray(t_acq_list, dtype=np.int64) if t_acq_list else t_msg
        rec["latency_s"] = np.where(rec["t_acq_ns"] > 0,
                                    (t_recv_ns - rec["t_acq_ns"]) / 1e9, np.nan)
        rec["pred"] = header["pred"]
        rec["decision"] = [DECISIONS.index(d) for d in header["decision"]]
        labels = header.get("labels")
        rec["label"] = labels if labels is not None else -2
        rec["conf"] = header["conf"]
        rec["ood"] = header["ood_score"]
        rec["p"] = np.asarray(probs, dtype=np.float32)
        rec = rec[new]
        self._count(rec)
        if self.watch is not None:
            self.watch.add_results(header, new)
        return rec, new

    def _count(self, rec: np.ndarray) -> None:
        if not len(rec):
            return
        self.diff.add(rec["pred"], rec["decision"], rec["p"])
        lab = rec["label"]
        self.truth += np.bincount(lab[lab >= 0], minlength=len(self.classes))[: len(self.classes)]
        self.truth_ood += int((lab == -1).sum())
        lat = rec["latency_s"][np.isfinite(rec["latency_s"])]
        self.latencies.extend(lat.tolist())
        self.latency_all.extend(lat.tolist())
        t0 = int(rec["t_recv_ns"].min())
        t1 = int(rec["t_recv_ns"].max())
        self.t_first_ns = t0 if self.t_first_ns is None else min(self.t_first_ns, t0)
        self.t_last_ns = t1 if self.t_last_ns is None else max(self.t_last_ns, t1)
        self.last_progress = time.monotonic()

    def restore(self, records: np.ndarray) -> None:
        """Rebuild counts from a cell log written by a predecessor (after a restart)."""
        if not len(records):
            return
        new = self.ids.add_new(records["id"])
        self.duplicates += int((~new).sum())
        self._count(records[new])

    def ingest_control(self, header: Mapping[str, Any]) -> None:
        """Take a ``control`` (``accounting``/``eos``/``stop``/``hello``) or ``heartbeat``.

        Cumulative reports replace the sender's previous one only when their sequence
        number is newer (the same report may arrive twice, e.g. directly and forwarded by a
        worker). Incremental ``{"event": "rejected", "reason", "cells", "ids"}`` reports
        (inference workers) add up, once per message.
        """
        cmd = header.get("cmd", "heartbeat" if header.get("kind") == "heartbeat" else None)
        sender = str(header.get("sender", "?"))
        seq = int(header.get("seq", 0))
        stats = header.get("stats", {}) or {}
        if cmd in ("accounting", "eos", "heartbeat"):
            if stats.get("event") in ("rejected", "dropped"):
                key = (sender, seq)
                if key not in self._event_seen:
                    self._event_seen.add(key)
                    n = stats.get("cells", len(stats.get("ids", []) or []))
                    reason = str(stats.get("reason", "unknown"))
                    if isinstance(n, int) and n > 0:
                        book = self.event_rejected if stats["event"] == "rejected" \
                            else self.event_dropped
                        book.setdefault(sender, Counter())[reason] += n
            elif cmd != "heartbeat" or stats:
                prev = self.reports.get(sender)
                if prev is None or seq >= prev.get("seq", -1):
                    self.reports[sender] = {"role": _role(sender), "seq": seq,
                                            "stats": dict(stats)}
            if cmd == "eos":
                self.eos_senders.add(sender)
            restarts = stats.get("restarts")
            if isinstance(restarts, Mapping):
                for child, n in restarts.items():
                    if isinstance(n, int):
                        self.restarts[str(child)] = n
            if cmd != "heartbeat":
                self.last_progress = time.monotonic()
        elif cmd == "stop":
            self.stop_requested = True
            self.last_progress = time.monotonic()

    def reject_message(self, reason: str) -> None:
        """Count a message the collector could not decode (its cells are unknown)."""
        self.messages_rejected[reason] += 1

    # -- read-out ------------------------------------------------------------------------
    @property
    def eos(self) -> bool:
        """True once every emitting sender that reported has sent end of stream."""
        emitters = [s for s, r in self.reports.items() if r["role"] in EMITTER_ROLES]
        return bool(emitters) and all(s in self.eos_senders for s in emitters)

    def accounting(self, final: bool = False) -> dict[str, Any]:
        """The run's accounting; with ``final`` unresolved cells become ``dropped/lost``."""
        emitted = 0
        published = 0
        rejected: Counter[str] = Counter({f"collector:{r}": n
                                          for r, n in self.collector_rejected.items()})
        dropped: Counter[str] = Counter()
        senders = set(self.reports) | set(self.event_rejected) | set(self.event_dropped)
        for sender in sorted(senders):
            rep = self.reports.get(sender, {"role": _role(sender), "stats": {}})
            st = rep["stats"]
            role = rep["role"]
            if role in EMITTER_ROLES:
                val = st.get("cells_emitted", st.get("emitted", 0))
                pub = int(val) if isinstance(val, int | float) else 0
                published += pub
                emitted += pub
                # acquisition's own outcomes before publishing (quality gates, back-pressure)
                for key, dst in (("cells_rejected", rejected), ("cells_dropped", dropped)):
                    own: Counter[str] = Counter()
                    _merge_counts(own, st.get(key))
                    emitted += sum(own.values())
                    for reason, n in own.items():
                        dst[f"{role}:{reason}"] += n
            # downstream losses: cumulative totals and incremental events, the larger wins
            for book, key, dst in ((self.event_rejected, "rejected", rejected),
                                   (self.event_dropped, "dropped", dropped)):
                tot: Counter[str] = Counter()
                _merge_counts(tot, st.get(key))
                ev = book.get(sender, Counter())
                for reason in set(tot) | set(ev):
                    dst[f"{role}:{reason}"] += max(tot[reason], ev[reason])
        dec = {d: int(c) for d, c in zip(DECISIONS, self.diff.decision_counts, strict=True)}
        classified = sum(dec.values())
        resolved = classified + sum(rejected.values()) + sum(dropped.values())
        unresolved = emitted - resolved
        if final and unresolved > 0:
            dropped["lost"] += unresolved
            unresolved = 0
        rej_total = sum(rejected.values())
        drop_total = sum(dropped.values())
        return {
            "emitted": emitted,
            **dec,
            "rejected": dict(rejected),
            "dropped": dict(dropped),
            "rejected_total": rej_total,
            "dropped_total": drop_total,
            "in_flight": max(0, unresolved),
            "excess": max(0, -unresolved),
            "duplicates": self.duplicates,
            "balanced": emitted == classified + rej_total + drop_total,
            "published": published,
            "messages_rejected": dict(self.messages_rejected),
        }

    def truth_snapshot(self) -> dict[str, Any] | None:
        """Ground-truth differential of the labelled cells (None without labels)."""
        n = int(self.truth.sum())
        if n == 0 and self.truth_ood == 0:
            return None
        full = self.diff.snapshot()
        snap = full["classes"]
        est = full["estimate"]["classes"]
        out = {}

        def pp(live: float | None, frac: float | None) -> float | None:
            return 100.0 * (live - frac) if live is not None and frac is not None else None

        for i, name in enumerate(self.classes):
            frac = float(self.truth[i] / n) if n else None
            # error of the reported (prior-shift corrected) differential, and of the plain
            # fraction of counted cells beside it
            out[name] = {"count": int(self.truth[i]), "fraction": frac,
                         "error_pp": pp(est[name]["fraction"], frac),
                         "counted_error_pp": pp(snap[name]["fraction"], frac)}
        return {"classes": out, "labelled": n, "ood_objects": self.truth_ood}

    def rate(self) -> float:
        """Cells classified per second over the last ~2 s."""
        now = time.monotonic()
        total = self.diff.classified
        self._rate_samples.append((now, total))
        while len(self._rate_samples) > 2 and now - self._rate_samples[0][0] > 2.0:
            self._rate_samples.popleft()
        t0, n0 = self._rate_samples[0]
        return (total - n0) / (now - t0) if now > t0 else 0.0

    def snapshot(self, final: bool = False) -> dict[str, Any]:
        """JSON-ready live state (also the run summary when ``final``)."""
        acc = self.accounting(final=final)
        diff = self.diff.snapshot(exact=final)
        span = ((self.t_last_ns - self.t_first_ns) / 1e9
                if self.t_first_ns is not None and self.t_last_ns is not None else 0.0)
        return {
            "run": self.run_id,
            "final": final,
            "elapsed_s": time.monotonic() - self.t_start,
            "accounting": acc,
            "differential": diff,
            "truth": self.truth_snapshot(),
            "throughput": {
                "cells_per_s": self.rate(),
                "mean_cells_per_s": (self.diff.classified / span) if span > 0 else 0.0,
                "classified": self.diff.classified,
                "span_s": span,
            },
            "latency": {
                "p50_s": _percentile(self.latencies, 50),
                "p99_s": _percentile(self.latencies, 99),
                "run_p50_s": _percentile(self.latency_all, 50),
                "run_p99_s": _percentile(self.latency_all, 99),
                "run_max_s": max(self.latency_all) if self.latency_all else None,
            },
            "restarts": dict(self.restarts),
            "collector_restarts": self.collector_restarts,
            "recording": dict(self.recording),
            "senders": {s: r["stats"] for s, r in self.reports.items()},
            **(self.watch.snapshot(final) if self.watch is not None else {}),
        }


# ----------------------------------------------------------------------------- service

@dataclass
class CollectorConfig:
    """Collector service parameters (section ``[collector]``, env ``LEUKOFLOW_COLLECTOR_*``).

    Attributes
    ----------
    results : str
        PULL endpoint (bound) for results and control messages.
    live : str
        PUB endpoint (bound) for the live state; empty disables it.
    metrics_port : int
        Port of ``/metrics``, ``/healthz``, ``/readyz`` (0: pick a free one).
    metrics_host : str
        Bind address of the metrics server.
    allow_remote : bool
        Bind the ZeroMQ endpoints and the metrics server to a non-loopback address (the
        endpoints then need CurveZMQ keys, ``LEUKOFLOW_KEYS``).
    run_dir : str
        Folder for ``cells.bin``, ``collector_state.json`` and ``summary.json``.
    run_id : str
        Run id (empty: accept any).
    record : str
        ``.rtdc`` path of the recording; empty records nothing. Needs the crop tap.
    tap_in : str
        Crop endpoint to PULL from (acquisition's PUSH), empty: no tap.
    tap_out : str
        Endpoint (bound) where the workers PULL the tapped crops.
    drain_timeout_s : float
        After end of stream or stop, finish when nothing arrived for this long [s].
    publish_interval_s : float
        Live-state publishing period [s].
    flush_interval_s : float
        The cell log and the state file are written and synced (``fsync``) this often [s]
        (the crash window of the counts; also at stop).
    record_flush_s : float
        The recording is flushed and synced (``fsync``) this often [s] (a crash of the
        collector or the machine loses at most this much of it; also at stop).
    exit_on_eos : bool
        Finish and exit when the stream ended and every cell is resolved.
    params_json : str
        JSON file with the run's parameters (stored in the recording and summary).
    hwm : int
        ZeroMQ high-water marks [messages].
    """

    results: str = transport.DEFAULT_ENDPOINTS["collector"]
    live: str = transport.DEFAULT_ENDPOINTS["live"]
    metrics_port: int = transport.DEFAULT_METRICS_PORTS["collector"]
    metrics_host: str = transport.LOOPBACK
    allow_remote: bool = False
    run_dir: str = "runs/latest"
    run_id: str = ""
    record: str = ""
    tap_in: str = ""
    tap_out: str = ""
    drain_timeout_s: float = 5.0
    publish_interval_s: float = bounded(0.25, 0.01, 3600.0)
    flush_interval_s: float = bounded(0.5, 0.01, 3600.0)
    record_flush_s: float = bounded(1.0, 0.01, 3600.0)
    exit_on_eos: bool = True
    params_json: str = ""
    hwm: int = 1000


class Collector:
    """The collector service (see the module docstring).

    Parameters
    ----------
    cfg : CollectorConfig
        Resolved parameters.
    """

    def __init__(self, cfg: CollectorConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state = RunState(run_id=cfg.run_id)
        self.params: dict[str, Any] = {"collector": asdict(cfg)}
        if cfg.params_json and Path(cfg.params_json).is_file():
            self.params.update(json.loads(Path(cfg.params_json).read_text()))
        self.state.watch = RunWatch(self.params)  # drift monitor, QC status, validity
        self._restore()
        self.cell_log = CellLog(self.run_dir / "cells.bin")
        self.recorder = None
        self.segments: list[str] = list(self._prev.get("segments", []))
        self._stop = threading.Event()
        self.finished = False
        self._m: Any = None
        self._health: Any = None
        self._sent_counts: dict[str, float] = {}

    # -- restart recovery ----------------------------------------------------------------
    def _restore(self) -> None:
        state_path = self.run_dir / "collector_state.json"
        self._prev: dict[str, Any] = {}
        if state_path.is_file():
            try:
                self._prev = json.loads(state_path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                log.error("ignoring unreadable %s: %s", state_path, exc)
        records = read_cell_log(self.run_dir / "cells.bin")
        if self._prev or len(records):
            self.state.collector_restarts = int(self._prev.get("collector_restarts", -1)) + 1
            self.state.restore(records)
            for sender, rep in self._prev.get("reports", {}).items():
                self.state.reports[sender] = rep
            for key in ("event_rejected", "event_dropped"):
                book = getattr(self.state, key)
                for sender, counts in self._prev.get(key, {}).items():
                    book[sender] = Counter(counts)
            self.state.eos_senders.update(self._prev.get("eos_senders", []))
            self.state.restarts.update(self._prev.get("restarts", {}))
            self.state.duplicates = max(self.state.duplicates, self._prev.get("duplicates", 0))
            self.state.watch.load_state(self._prev.get("drift"))
            for seg in self._prev.get("segments", []):
                if Path(seg).exists():

                    try:
                        repair_rtdc(seg)
                    except (OSError, ValueError) as exc:
                        log.error("recording segment %s: %s", seg, exc)
            log.warning("collector restarted: restored %d cells from the cell log", len(records))

    def _segment_path(self) -> Path:
        base = Path(self.cfg.record)
        k = len(self.segments)
        return base if k == 0 else base.with_name(f"{base.stem}.part{k}{base.suffix}")

    def _open_recorder(self) -> None:
        if not self.cfg.record:
            return

        path = self._segment_path()
        self.recorder = Recorder(path, params=self.params,
                                 flush_interval_s=self.cfg.record_flush_s)
        self.segments.append(str(path))

    def _save_state(self) -> None:
        st = self.state
        atomic_write_json(self.run_dir / "collector_state.json", {
            "run": st.run_id,
            "reports": st.reports,
            "event_rejected": st.event_rejected,
            "event_dropped": st.event_dropped,
            "eos_senders": sorted(st.eos_senders),
            "restarts": st.restarts,
            "duplicates": st.duplicates,
            "collector_restarts": st.collector_restarts,
            "segments": self.segments,
            "drift": st.watch.state_dict() if st.watch is not None else None,
            "saved_at_unix": time.time(),
        })

    # -- metrics -------------------------------------------------------------------------
    def _setup_metrics(self, on_stop: Any = None) -> None:

        self._m = ServiceMetrics("collector", self.cfg.run_id)
        for fam in ("leukoflow_run_cells_total", "leukoflow_differential_cells",
                    "leukoflow_differential_ratio", "leukoflow_differential_ratio_lower",
                    "leukoflow_differential_ratio_upper",
                    "leukoflow_differential_probabilistic_cells",
                    "leukoflow_recorder_events_total", "leukoflow_child_restarts_total",
                    "leukoflow_messages_rejected_total", "leukoflow_sequence_gaps_total",
                    "leukoflow_dropped_total", "leukoflow_e2e_latency_seconds",
                    "leukoflow_queue_depth", "leukoflow_drift_alarm", "leukoflow_drift_enabled",
                    "leukoflow_drift_max_score", "leukoflow_drift_score",
                    "leukoflow_differential_valid", "leukoflow_qc_status",
                    "leukoflow_qc_magnification"):
            self._m[fam]  # create the family so it is exported from the start
        self._health = ServiceScaffold(self._m, host=self.cfg.metrics_host,
                                       port=self.cfg.metrics_port,
                                       status=lambda: self.state.snapshot(),
                                       on_stop=on_stop).open()

    def _inc_to(self, metric: Any, key: str, value: float) -> None:
        """Advance a counter to the cumulative ``value`` (counters only go up)."""
        prev = self._sent_counts.get(key, 0.0)
        if value > prev:
            metric.inc(value - prev)
            self._sent_counts[key] = value

    def _update_metrics(self, snap: dict[str, Any]) -> None:
        m = self._m
        if m is None:
            return
        if self.state.watch is not None:
            self.state.watch.export(m, snap)
        acc = snap["accounting"]
        for outcome in DECISIONS:
            self._inc_to(m["leukoflow_run_cells_total"].labels(outcome), f"o:{outcome}",
                         acc[outcome])
        self._inc_to(m["leukoflow_run_cells_total"].labels("emitted"), "o:emitted",
                     acc["emitted"])
        self._inc_to(m["leukoflow_run_cells_total"].labels("rejected"), "o:rejected",
                     acc["rejected_total"])
        self._inc_to(m["leukoflow_run_cells_total"].labels("dropped"), "o:dropped",
                     acc["dropped_total"])
        self._inc_to(m["leukoflow_run_cells_total"].labels("duplicate"), "o:duplicate",
                     acc["duplicates"])
        for reason, n in acc["dropped"].items():
            self._inc_to(m["leukoflow_dropped_total"].labels("pipeline", reason),
                         f"d:{reason}", n)
        for reason, n in acc["messages_rejected"].items():
            self._inc_to(m["leukoflow_messages_rejected_total"].labels(reason),
                         f"r:{reason}", n)
        for name, c in snap["differential"]["classes"].items():
            m["leukoflow_differential_cells"].labels(name).set(c["count"])
            m["leukoflow_differential_ratio"].labels(name).set(c["fraction"] or 0.0)
            m["leukoflow_differential_ratio_lower"].labels(name).set(c["lower"])
            m["leukoflow_differential_ratio_upper"].labels(name).set(c["upper"])
            m["leukoflow_differential_probabilistic_cells"].labels(name).set(
                c["probabilistic_count"])
        for child, n in snap["restarts"].items():
            self._inc_to(m["leukoflow_child_restarts_total"].labels(child), f"c:{child}", n)
        if self.recorder is not None:
            self._inc_to(m["leukoflow_recorder_events_total"], "rec",
                         self.recorder.stats()["events"])
        self._inc_to(m["leukoflow_sequence_gaps_total"], "gaps", self._gaps.gaps)

    # -- main loop -----------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the loop to drain and finish (thread- and signal-safe)."""
        self.state.stop_requested = True
        self.state.last_progress = time.monotonic()

    def _done(self) -> bool:
        st = self.state
        if not (st.eos or st.stop_requested):
            return False
        acc = st.accounting()
        if st.eos and acc["in_flight"] == 0 and acc["emitted"] > 0:
            return True
        return time.monotonic() - st.last_progress > self.cfg.drain_timeout_s

    def run(self, install_signals: bool = True) -> dict[str, Any]:
        """Serve until end of stream (or stop) is drained; return the final summary."""
        import zmq


        self._gaps = wire.GapTracker()
        self.state.snapshot()  # warm up (the interval code imports scipy.stats: seconds)
        # health server, and SIGTERM/SIGINT -> drain and finish; both undone at the end
        self._setup_metrics(on_stop=(lambda _sig: self.request_stop()) if install_signals
                            else None)
        ctx = zmq.Context.instance()
        remote = self.cfg.allow_remote
        pull = transport.make_socket(ctx, "PULL", self.cfg.results, bind=True, hwm=self.cfg.hwm,
                                     serves="collector", allow_remote=remote)
        pub = (transport.make_socket(ctx, "PUB", self.cfg.live, bind=True, hwm=100,
                                     serves="live", allow_remote=remote)
               if self.cfg.live else None)
        tap_in = tap_out = None
        if self.cfg.tap_in:
            tap_in = transport.make_socket(ctx, "PULL", self.cfg.tap_in, bind=False,
                                           hwm=self.cfg.hwm, identity="collector")
            tap_out = transport.make_socket(ctx, "PUSH", self.cfg.tap_out, bind=True,
                                            hwm=self.cfg.hwm, immediate=False, serves="tap",
                                            allow_remote=remote)
        self._open_recorder()
        live_sender = wire.Sender(self.cfg.run_id or "run", "collector")
        pending: deque[list] = deque()
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        last_pub = last_flush = 0.0
        self._health.set_ready(True)
        try:
            while True:
                if tap_in is not None:
                    poller.register(tap_in, zmq.POLLIN if not pending else 0)
                    poller.register(tap_out, zmq.POLLOUT if pending else 0)
                events = dict(poller.poll(50))
                self._health.tick()
                if pull in events:
                    for _ in range(256):
                        try:
                            frames = pull.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(frames)
                if tap_in is not None:
                    self._tap(tap_in, tap_out, events, pending)
                now = time.monotonic()
                if now - last_flush >= self.cfg.flush_interval_s:
                    self._flush()
                    last_flush = now
                if now - last_pub >= self.cfg.publish_interval_s:
                    snap = self.state.snapshot()
                    self._publish(pub, live_sender, snap)
                    self._update_metrics(snap)
                    last_pub = now
                if self.cfg.exit_on_eos and self._done() and not pending:
                    break
                if self._stop.is_set():
                    break
        finally:
            summary = self._finish(pub, live_sender)
            for s in (pull, pub, tap_in, tap_out):
                if s is not None:
                    s.close(0)
            if self._health is not None:
                self._health.close()
        return summary

    def _handle(self, frames: list) -> None:

        try:
            msg = wire.decode(frames)
        except wire.WireError as exc:
            self.state.reject_message(exc.reason)
            log.warning("rejected message: %s", exc)
            return
        if not transport.authorize(frames, msg.header):  # CurveZMQ role may not send this
            self.state.reject_message("unauthorized")
            log.warning("unauthorized %s %s from %s refused", msg.kind,
                        msg.header.get("cmd", ""), msg.sender)
            return
        self._gaps.observe(msg.sender, msg.seq)
        if msg.kind == "results":
            recs, new = self.state.ingest_results(msg.header, msg.array)
            self.cell_log.append(recs)
            if self.recorder is not None and new.any():
                lat = np.full(len(new), np.nan)
                lat[new] = recs["latency_s"]
                self.recorder.add_results(msg.header, msg.array, latency_s=lat, mask=new)
            if self._m is not None and len(recs):
                hist = self._m["leukoflow_e2e_latency_seconds"]
                for v in recs["latency_s"][np.isfinite(recs["latency_s"])].tolist():
                    hist.observe(v)
        elif msg.kind in ("control", "heartbeat"):
            self.state.ingest_control(msg.header)
            if msg.header.get("cmd") == "hello" and self.state.run_id == "":
                self.state.run_id = msg.header.get("run", "")
        else:
            self.state.reject_message("unexpected_kind")

    def _tap(self, tap_in: Any, tap_out: Any, events: dict, pending: deque) -> None:
        import zmq


        if tap_in in events and not pending:
            for _ in range(64):
                try:
                    frames = tap_in.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if self.recorder is not None:
                    try:
                        msg = wire.decode(frames)
                        if msg.kind == "crops":
                            self.recorder.add_crops(msg.header, msg.array)
                    except wire.WireError:
                        pass  # forwarded unchanged: the worker rejects and reports it
                pending.append(frames)
        while pending:
            try:
                tap_out.send_multipart(pending[0], flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            pending.popleft()
        if self._m is not None:
            self._m["leukoflow_queue_depth"].labels("collector_tap").set(len(pending))

    def _flush(self) -> None:
        self.cell_log.flush()
        if self.recorder is not None:
            self.recorder.maybe_flush()
            self.state.recording = {**self.recorder.stats(), "segments": self.segments}
        self._save_state()

    def _publish(self, pub: Any, sender: Any, snap: dict[str, Any]) -> None:
        if pub is None:
            return
        import zmq


        try:
            live = {k: v for k, v in snap.items() if k not in ("senders", "params")}
            frames = wire.encode(heartbeat_message(sender, live))
            pub.send_multipart(frames, flags=zmq.NOBLOCK)
        except (zmq.Again, wire.WireError) as exc:
            log.debug("live state not published: %s", exc)

    def _finish(self, pub: Any, sender: Any) -> dict[str, Any]:
        rec_stats: dict[str, Any] = {}
        if self.recorder is not None:
            acc = self.state.accounting(final=True)
            rec_stats = self.recorder.close(extra_meta={
                "accounting": jsonutil.dumps(acc),
                "segment_index": len(self.segments) - 1,
                # every service's last report (acquisition's includes its pipeline params)
                "service_reports": jsonutil.dumps({s: r["stats"] for s, r in
                                                   self.state.reports.items()}),
            })
        self.cell_log.close()
        self.state.recording = {**rec_stats, "segments": self.segments} if self.segments else {}
        snap = self.state.snapshot(final=True)
        snap["params"] = self.params
        snap["sequence_gaps"] = self._gaps.gaps if hasattr(self, "_gaps") else 0
        self._save_state()
        atomic_write_json(self.run_dir / "summary.json", snap)
        self._update_metrics(snap)
        self._publish(pub, sender, snap)
        self.finished = True
        return snap

    def stop(self) -> None:
        """Break the loop immediately (tests); prefer :meth:`request_stop`."""
        self._stop.set()
