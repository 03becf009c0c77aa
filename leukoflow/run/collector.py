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

**Loss while the run is going.** Results and rejections name the crop message they came
from (``src_*``); the :class:`leukoflow.run.ledger.Ledger` checks every source's messages for
completeness and declares a missing one *lost* (stage and reason: ``infer:worker_died``,
``acquire:source_died``, ``collector:restart``, ...) once a later one came back
``loss_timeout_s`` ago. The collector learns of failures from the supervisor's restart
counts, from a new acquisition start of the same run, and from services that fall silent
(no heartbeat for ``silence_s``) without a final report. ``in_flight`` and ``lost`` are
exported live (``leukoflow_run_cells_in_flight``, ``leukoflow_run_cells_lost``)::

    emitted = counted + uncertain + ood + rejected + dropped + lost + in_flight

**Identity.** Cell ids carry the acquisition's epoch (:mod:`leukoflow.core.identity`), so a
restarted acquisition never reuses an id; a cell id seen twice is a true duplicate (the same
cell sent twice), counted once and reported (``leukoflow_run_cells_total{outcome="duplicate"}``).

**Crash safety.** The cell log and the ledger journal (``ledger.jsonl``: every completeness
input, failure and loss declaration, and every per-cell rejection event) are written through
to the operating system as each message is handled (and fsynced every ``flush_interval_s``),
so a restarted collector rebuilds exactly what its predecessor had handled.

**Error boundary.** Every message that decodes is handled inside its own error boundary: a
failure rejects that message (``leukoflow_messages_rejected_total{reason="handler_error"}``;
its cells, when it has any, count as rejected ``collector:handler_error``), never the service.

**Run after run.** With ``runs_root`` set (systemd, compose) the collector keeps serving: each
run gets its own folder ``<runs_root>/<run id>``, a ``hello`` from an acquisition of a new
run finishes the current run (its summary) and starts a new run state, and a restarted
collector resumes the unfinished run named in ``<runs_root>/current.json``.
"""

from __future__ import annotations

import json
import logging
import math
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
from leukoflow.core.config import bounded, pipeline_hash
from leukoflow.core.identity import MAX_LOCAL_ID, split_ids
from leukoflow.core.jsonutil import atomic_write_json
from leukoflow.core.metrics import ServiceMetrics
from leukoflow.core.service import ServiceScaffold, heartbeat_message
from leukoflow.core.vocabulary import CLASS_NAMES, DECISIONS
from leukoflow.inference.differential import Differential
from leukoflow.run.drift_watch import RunWatch
from leukoflow.run.ledger import Ledger
from leukoflow.run.recorder import Recorder, repair_rtdc

log = logging.getLogger(__name__)

EMITTER_ROLES: frozenset[str] = frozenset({"acquire", "acquisition", "replay"})

F32_MAX = float(np.finfo(np.float32).max)

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
    """Membership of cell ids: per acquisition epoch (:mod:`leukoflow.core.identity`) a
    growing bitmap over the epoch's cell numbers, a set for anything else.

    Parameters
    ----------
    bitmap_limit : int
        Cell numbers below this use one byte each in a numpy array (dense, fast, vectorised);
        larger ones (or negative ids) a set.
    """

    def __init__(self, bitmap_limit: int = 1 << 27) -> None:
        self._maps: dict[int, np.ndarray] = {}
        self._limit = min(int(bitmap_limit), MAX_LOCAL_ID + 1)
        self._big: set[int] = set()
        self.size = 0

    def _bitmap(self, epoch: int, top: int) -> np.ndarray:
        bits = self._maps.get(epoch)
        size = 1 << 16 if bits is None else bits.size
        while size <= top:
            size *= 2
        size = min(size, self._limit)
        if bits is None or bits.size < size:
            grown = np.zeros(size, dtype=bool)
            if bits is not None:
                grown[: bits.size] = bits
            bits = self._maps[epoch] = grown
        return bits

    def add_new(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Add ``ids``; return a mask that is True where an id was not seen before.

        Repeated ids inside ``ids`` count as new only at their first position.
        """
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        new = np.zeros(arr.size, dtype=bool)
        if not arr.size:
            return new
        first = np.zeros(arr.size, dtype=bool)
        first[np.unique(arr, return_index=True)[1]] = True
        epoch, local = split_ids(arr)
        dense = (arr >= 0) & (local < self._limit)
        for ep in np.unique(epoch[dense]).tolist():
            sel = np.flatnonzero(dense & (epoch == ep))
            loc = local[sel]
            bits = self._bitmap(int(ep), int(loc.max()))
            fresh = first[sel] & ~bits[loc]
            new[sel] = fresh
            bits[loc[fresh]] = True
        for i in np.flatnonzero(~dense).tolist():
            cid = int(arr[i])
            if first[i] and cid not in self._big:
                self._big.add(cid)
                new[i] = True
        self.size += int(new.sum())
        return new

    def __contains__(self, cid: int) -> bool:
        cid = int(cid)
        if cid >= 0:
            ep, loc = (int(v[0]) for v in split_ids([cid]))
            if loc < self._limit:
                bits = self._maps.get(ep)
                return bits is not None and loc < bits.size and bool(bits[loc])
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
        """Append records, handed to the operating system at once (they survive a kill of
        the process; :meth:`flush` makes them survive a crash of the machine)."""
        if len(records):
            self._fh.write(np.ascontiguousarray(records, dtype=CELL_DTYPE).tobytes())
            self._fh.flush()
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


class LatencyHistogram:
    """Latencies of a whole run in fixed log-spaced bins: bounded memory and constant-time
    percentiles however long the run (a list of every cell's latency grew by ~32 bytes per
    cell and its percentile cost grew with it). Bins from 1 µs to 10^4 s, 200 per decade
    (a percentile is within 1.2 % of the exact one); the maximum is exact.
    """

    LO_S, HI_S, PER_DECADE = 1e-6, 1e4, 200

    def __init__(self) -> None:
        self.n_bins = int(round(math.log10(self.HI_S / self.LO_S) * self.PER_DECADE))
        self.counts = np.zeros(self.n_bins + 2, dtype=np.int64)  # under, bins..., over
        self.n = 0
        self.max: float | None = None

    def add(self, values: np.ndarray | Sequence[float]) -> None:
        """Count latencies [s] (non-finite ones are ignored)."""
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        v = v[np.isfinite(v)]
        if not v.size:
            return
        pos = np.log10(np.maximum(v, self.LO_S) / self.LO_S) * self.PER_DECADE
        idx = np.where(v < self.LO_S, 0, np.clip(np.floor(pos).astype(np.int64) + 1, 1,
                                                 self.n_bins + 1))
        self.counts += np.bincount(idx, minlength=self.counts.size)
        self.n += int(v.size)
        top = float(v.max())
        self.max = top if self.max is None else max(self.max, top)

    def percentile(self, q: float) -> float | None:
        """The ``q``-th percentile [s] (None before the first latency)."""
        if not self.n:
            return None
        i = int(np.searchsorted(np.cumsum(self.counts), q / 100.0 * self.n, side="left"))
        if i == 0:
            return self.LO_S
        value = self.LO_S * 10 ** ((i - 0.5) / self.PER_DECADE)  # bin centre (log scale)
        return min(value, self.max) if self.max is not None else value


def _percentile(values: Sequence[float] | np.ndarray, q: float) -> float | None:
    arr = np.asarray(values, dtype=float)
    return float(np.percentile(arr, q)) if arr.size else None


def _role(sender: str) -> str:
    return sender.split("-", 1)[0]


class Journal:
    """Append-only JSON-lines file, each line handed to the operating system at once
    (:meth:`flush` fsyncs). A kill leaves at most one torn last line, which
    :func:`read_journal` skips."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", buffering=1)  # noqa: SIM115 (line buffered: each line)
        self.lines = 0

    def write(self, line: Mapping[str, Any]) -> None:
        """Append one line."""
        self._fh.write(json.dumps(line, separators=(",", ":")) + "\n")
        self.lines += 1

    def flush(self) -> None:
        """``fsync`` (the lines survive a crash of the machine)."""
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Flush and close."""
        if not self._fh.closed:
            self.flush()
            self._fh.close()


def read_journal(path: str | Path) -> list[dict[str, Any]]:
    """Every whole line of a journal (a torn or unreadable line is skipped)."""
    p = Path(path)
    out: list[dict[str, Any]] = []
    if not p.exists():
        return out
    with open(p, "rb") as fh:
        for raw in fh:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict):
                out.append(line)
    return out


def consistent_logs(run_dir: Path, records: np.ndarray, lines: list[dict[str, Any]]
                    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Cell log and ledger journal of a killed collector, made to agree.

    The ledger line of a results message is written just before its cells are appended to
    the cell log, with the log's length after the append (``log``). A kill between the two
    leaves a line whose cells are not (or only partly) in the log: that line is dropped (so
    the message is missing and declared lost with ``collector:restart``) and the log is cut
    back to the records before it; both files are rewritten so the next restart agrees too.
    Without this the message's cells would be neither counted nor lost.
    """
    torn = [i for i, x in enumerate(lines)
            if x.get("k") == "res" and isinstance(x.get("log"), int) and x["log"] > len(records)]
    if not torn:
        return records, lines
    keep = min(lines[i]["log"] - int(lines[i].get("c", 0)) for i in torn)
    drop = set(torn)
    lines = [x for i, x in enumerate(lines) if i not in drop]
    log.warning("collector restart: the results message handled at the kill was not (fully) "
                "in the cell log (%d of its records cut); it is declared lost", len(records) - keep)
    records = records[:keep]
    if (run_dir / "cells.bin").exists():
        with open(run_dir / "cells.bin", "r+b") as fh:
            fh.truncate(keep * CELL_DTYPE.itemsize)
    tmp = run_dir / "ledger.jsonl.tmp"
    tmp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    os.replace(tmp, run_dir / "ledger.jsonl")
    return records, lines


def _src(h: Mapping[str, Any]) -> tuple[str, int, int, int] | None:
    """``(sender, seq, n, cum)`` of the crop message a result/rejection came from."""
    try:
        src = (str(h["src_sender"]), int(h["src_seq"]), int(h["src_n"]), int(h["src_cum"]))
    except (KeyError, TypeError, ValueError):
        return None
    return src if src[1] >= 0 and src[2] > 0 and src[3] >= 0 else None


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
    loss_timeout_s : float
        A missing crop message is declared lost this long after a later one of its source
        came back (:class:`leukoflow.run.ledger.Ledger`) [s].
    silence_s : float
        A worker or acquisition not heard for this long, without a final report, is taken
        for dead (loss attribution) [s].
    journal : callable, optional
        Called with one JSON-ready dict per completeness input, failure, loss declaration and
        per-cell event (the collector's ``ledger.jsonl``; :meth:`replay` takes them back).
    """

    def __init__(self, classes: Sequence[str] = CLASS_NAMES, run_id: str = "",
                 latency_window: int = 5000, loss_timeout_s: float = 10.0,
                 silence_s: float = 5.0, journal: Any = None) -> None:

        self.classes = tuple(classes)
        self.run_id = run_id
        self.diff = Differential(self.classes)
        self.ids = IdSet()
        self.duplicates = 0
        self.journal = journal
        self.ledger = Ledger(timeout_s=loss_timeout_s, sink=journal)
        self.silence_s = float(silence_s)
        #: services heard from: sender -> {"role", "t" (last heard, monotonic s), "final",
        #: "dead"}
        self.peers: dict[str, dict[str, Any]] = {}
        #: emitter's accounting sender -> the sender id of its crop messages
        self.crops_sender_of: dict[str, str] = {}
        self.closed = False  # final summary written (runs_root mode keeps serving)
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
        self.latency_all = LatencyHistogram()  # the whole run, in bounded memory
        self.t_start = time.monotonic()
        self.t_first_ns: int | None = None
        self.t_last_ns: int | None = None
        self.last_progress = time.monotonic()
        self._rate_samples: deque[tuple[float, int]] = deque(maxlen=64)
        self.restarts: dict[str, int] = {}
        self.collector_restarts = 0
        #: records in the cell log (restored ones included) once the last results are logged
        self.cell_log_records = 0
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
        if self.run_id and header.get("run") and header["run"] != self.run_id:
            self.messages_rejected["run_mismatch"] += 1
            return np.zeros(0, dtype=CELL_DTYPE), np.zeros(n, dtype=bool)
        src = _src(header)
        if tuple(header["classes"]) != self.classes:
            new = self.ids.add_new(ids)  # rejected once; a resend is a duplicate
            self.duplicates += int(n - new.sum())
            self.collector_rejected["class_mismatch"] += int(new.sum())
            self.messages_rejected["class_mismatch"] += 1
            self._resolved(src, int(new.sum()))
            return np.zeros(0, dtype=CELL_DTYPE), np.zeros(n, dtype=bool)
        new = self.ids.add_new(ids)
        self.duplicates += int(n - new.sum())
        k = int(new.sum())
        # journaled before the caller appends the k records to the cell log: the line says
        # how long the log will be, so a restart can tell whether they got there
        self._resolved(src, k, log_end=self.cell_log_records + k)
        self.cell_log_records += k
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
        # the wire allows any finite score; the log keeps float32 (saturate, never inf)
        rec["ood"] = np.clip(np.asarray(header["ood_score"], dtype=np.float64), -F32_MAX, F32_MAX)
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
        self.latency_all.add(lat)
        t0 = int(rec["t_recv_ns"].min())
        t1 = int(rec["t_recv_ns"].max())
        self.t_first_ns = t0 if self.t_first_ns is None else min(self.t_first_ns, t0)
        self.t_last_ns = t1 if self.t_last_ns is None else max(self.t_last_ns, t1)
        self.last_progress = time.monotonic()

    def _resolved(self, src: tuple[str, int, int, int] | None, cells: int,
                  log_end: int | None = None) -> None:
        """``cells`` cells of the crop message ``src`` came back (completeness check)."""
        if src is not None and cells > 0:
            self.ledger.resolved(src[0], src[1], src[2], src[3], cells, log_end=log_end)

    def restore(self, records: np.ndarray) -> None:
        """Rebuild counts from a cell log written by a predecessor (after a restart)."""
        if not len(records):
            return
        new = self.ids.add_new(records["id"])
        self.duplicates += int((~new).sum())
        self.cell_log_records = len(records)
        self._count(records[new])

    def replay(self, line: Mapping[str, Any]) -> None:
        """Take back one journal line written by a predecessor (after a restart)."""
        if line.get("k") == "cell_event":
            key = (str(line["sender"]), int(line["seq"]))
            if key not in self._event_seen:
                self._event_seen.add(key)
                book = self.event_rejected if line["event"] == "rejected" else self.event_dropped
                book.setdefault(key[0], Counter())[str(line["reason"])] += int(line["cells"])
        else:
            self.ledger.replay(line)

    def handler_failed(self, header: Mapping[str, Any]) -> None:
        """Error boundary: a message the collector could not handle is rejected
        (``handler_error``); its cells, if any were not counted, are rejected with it (and a
        resend of them is a duplicate)."""
        self.messages_rejected["handler_error"] += 1
        if header.get("kind") != "results":
            return
        try:
            ids = np.asarray(header.get("ids", []), dtype=np.int64).reshape(-1)
            new = self.ids.add_new(ids)
            self.collector_rejected["handler_error"] += int(new.sum())
            self._resolved(_src(header), int(new.sum()))
        except Exception as exc:  # noqa: BLE001 - counting must not fail in turn
            log.error("could not count the cells of a failed message: %s", exc)

    def _heard(self, sender: str, role: str, stats: Mapping[str, Any], cmd: str | None,
               now: float) -> None:
        """Track services for failure detection (silence, final reports, new starts)."""
        peer = self.peers.setdefault(sender, {"role": role, "t": now, "final": False,
                                              "dead": False})
        peer["t"] = now
        if peer["dead"]:  # heard again: it was only slow
            peer["dead"] = False
            if role in EMITTER_ROLES and sender in self.crops_sender_of:
                self.ledger.source_alive(self.crops_sender_of[sender])
        if role in EMITTER_ROLES:
            crops = stats.get("crops_sender")
            if isinstance(crops, str) and crops:
                self.crops_sender_of[sender] = crops
                if cmd == "hello":  # a new start of this run: starts that did not end died
                    for other, cs in self.crops_sender_of.items():
                        if cs != crops and other not in self.eos_senders:
                            self.ledger.source_died(cs)
                            self.peers.get(other, {})["dead"] = True
            if cmd in ("accounting", "eos") and sender in self.crops_sender_of:
                msgs, cells = stats.get("crops_seq"), stats.get("cells_emitted",
                                                               stats.get("emitted"))
                if isinstance(msgs, int) and isinstance(cells, int):
                    self.ledger.reported(self.crops_sender_of[sender], msgs, cells,
                                         ended=cmd == "eos")
            if cmd == "eos":
                peer["final"] = True
        elif role == "infer" and stats.get("final") is True and not peer["final"]:
            peer["final"] = True
            self.ledger.event("worker_stopped", sender)

    def check_liveness(self, now: float | None = None) -> None:
        """Services silent for ``silence_s`` without a final report are taken for dead
        (worker: ``worker_died``; acquisition: its crop stream's source died)."""
        now = time.monotonic() if now is None else now
        for sender, peer in self.peers.items():
            if peer["final"] or peer["dead"] or now - peer["t"] < self.silence_s:
                continue
            if peer["role"] == "infer":
                peer["dead"] = True
                self.ledger.event("worker_died", sender, t=peer["t"])
            elif peer["role"] in EMITTER_ROLES and sender in self.crops_sender_of:
                peer["dead"] = True
                self.ledger.source_died(self.crops_sender_of[sender], t=peer["t"])

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
        run = header.get("run", "")
        if self.run_id and run and run != self.run_id and cmd != "stop":
            # a report about another run (a worker's totals of the run before): it is alive,
            # but its counts are not this run's
            if sender in self.peers:
                self.peers[sender]["t"] = time.monotonic()
            return
        if cmd in ("accounting", "eos", "heartbeat", "hello"):
            self._heard(sender, _role(sender), stats, cmd, time.monotonic())
        if cmd in ("accounting", "eos", "heartbeat"):
            if stats.get("event") in ("rejected", "dropped"):
                key = (sender, seq)
                if key not in self._event_seen:
                    self._event_seen.add(key)
                    n = stats.get("cells", len(stats.get("ids", []) or []))
                    reason = str(stats.get("reason", "unknown"))
                    if isinstance(n, int) and n > 0:
                        if self.journal is not None:
                            self.journal({"k": "cell_event", "sender": sender, "seq": seq,
                                          "event": stats["event"], "reason": reason,
                                          "cells": n, "ids": stats.get("ids", []),
                                          "src": stats.get("src_sender", ""),
                                          "src_seq": stats.get("src_seq", -1)})
                        book = self.event_rejected if stats["event"] == "rejected" \
                            else self.event_dropped
                        book.setdefault(sender, Counter())[reason] += n
                        self._resolved(_src(stats), n)
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
                        if n > self.restarts.get(str(child), 0):
                            self._child_failed(str(child))
                        self.restarts[str(child)] = n
            if cmd != "heartbeat":
                self.last_progress = time.monotonic()
        elif cmd == "stop":
            self.stop_requested = True
            self.last_progress = time.monotonic()

    def _child_failed(self, child: str) -> None:
        """The supervisor restarted ``child`` after a crash: a failure that explains loss."""
        if child.startswith("infer"):
            self.ledger.event("worker_died", child)
        elif child == "source":  # every start of the source that did not end is gone
            for sender, crops in self.crops_sender_of.items():
                if sender not in self.eos_senders:
                    self.ledger.source_died(crops)
                    self.peers.get(sender, {})["dead"] = True

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
        """The run's accounting (see the module docstring).

        ``lost`` (by ``stage:reason``) are the cells the completeness check declared lost;
        with ``final`` every source's missing messages are declared lost, and cells still
        unresolved beyond those (sources without sequence information) are lost
        ``pipeline:unattributed``. ``published`` counts the cells of every source known from
        its reports or from its messages that came back (a killed acquisition's last crops).
        """
        if final:
            self.ledger.advance(final=True)
        emitted = 0
        published = 0
        covered: set[str] = set()
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
                crops = self.crops_sender_of.get(sender)
                if crops:
                    covered.add(crops)
                    pub = max(pub, self.ledger.known_cells(crops))
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
        for name, src in self.ledger.sources.items():  # sources that never reported
            if name not in covered and _role(name) in EMITTER_ROLES:
                published += src.known_cells
                emitted += src.known_cells
        dec = {d: int(c) for d, c in zip(DECISIONS, self.diff.decision_counts, strict=True)}
        classified = sum(dec.values())
        lost = self.ledger.lost()
        resolved = classified + sum(rejected.values()) + sum(dropped.values()) \
            + sum(lost.values())
        unresolved = emitted - resolved
        if final and unresolved > 0:
            lost["pipeline:unattributed"] += unresolved
            unresolved = 0
        rej_total = sum(rejected.values())
        drop_total = sum(dropped.values())
        lost_total = sum(lost.values())
        late = sum(s.late_cells for s in self.ledger.sources.values())
        return {
            "emitted": emitted,
            **dec,
            "rejected": dict(rejected),
            "dropped": dict(dropped),
            "lost": dict(lost),
            "rejected_total": rej_total,
            "dropped_total": drop_total,
            "lost_total": lost_total,
            "in_flight": max(0, unresolved),
            "excess": max(0, -unresolved),
            "late": late,
            "duplicates": self.duplicates,
            "balanced": emitted == classified + rej_total + drop_total + lost_total,
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
                "run_p50_s": self.latency_all.percentile(50),
                "run_p99_s": self.latency_all.percentile(99),
                "run_max_s": self.latency_all.max,
            },
            "restarts": dict(self.restarts),
            "collector_restarts": self.collector_restarts,
            "recording": dict(self.recording),
            "senders": {s: r["stats"] for s, r in self.reports.items()},
            "completeness": self.ledger.summary(),
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
        Finish and exit when the stream ended and every cell is resolved (ignored with
        ``runs_root``: the collector then keeps serving run after run).
    params_json : str
        JSON file with the run's parameters (stored in the recording and summary).
    hwm : int
        ZeroMQ high-water marks [messages].
    loss_timeout_s : float
        A missing crop message is declared lost once a later message of its source came
        back this long ago, or its source ended or died this long ago [s].
    silence_s : float
        A worker or acquisition not heard from for this long, without a final report, is
        taken for dead when losses are attributed [s] (they report every second).
    runs_root : str
        Serve run after run (systemd, compose): each run in ``<runs_root>/<run id>``
        (``run_dir`` is then unused); '' = one run in ``run_dir``.
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
    loss_timeout_s: float = bounded(10.0, 0.1, 86400.0)
    silence_s: float = bounded(5.0, 0.5, 86400.0)
    runs_root: str = ""


class Collector:
    """The collector service (see the module docstring).

    Parameters
    ----------
    cfg : CollectorConfig
        Resolved parameters.
    """

    def __init__(self, cfg: CollectorConfig) -> None:
        self.cfg = cfg
        self.params: dict[str, Any] = {"collector": asdict(cfg)}
        if cfg.params_json and Path(cfg.params_json).is_file():
            self.params.update(json.loads(Path(cfg.params_json).read_text()))
        self._stop = threading.Event()
        self.finished = False
        self._m: Any = None
        self._health: Any = None
        self._sent_counts: dict[str, float] = {}
        self._lost_labels: set[tuple[str, str]] = set()
        self.recorder = None
        self.cell_log: CellLog | None = None
        self.journal: Journal | None = None
        self.runs_root = Path(cfg.runs_root) if cfg.runs_root else None
        if self.runs_root is None:
            self._open_run(Path(cfg.run_dir), cfg.run_id)
        else:
            self.runs_root.mkdir(parents=True, exist_ok=True)
            current = self._unfinished_run()
            if current:  # a restarted collector resumes the run it was serving
                self._open_run(self.runs_root / current, current)
            else:  # the first message names the run (_adopt)
                self.run_dir = self.runs_root
                self.state = self._new_state("")
                self._prev = {}
                self.segments = []

    # -- runs ----------------------------------------------------------------------------
    def _journal_line(self, line: dict[str, Any]) -> None:
        if self.journal is not None:
            self.journal.write(line)

    def _new_state(self, run_id: str) -> RunState:
        st = RunState(run_id=run_id, loss_timeout_s=self.cfg.loss_timeout_s,
                      silence_s=self.cfg.silence_s, journal=self._journal_line)
        st.watch = RunWatch(self.params)  # drift monitor, QC status, validity
        return st

    def _open_run(self, run_dir: Path, run_id: str) -> None:
        """Make ``run_dir`` the current run: restore what a predecessor left there."""
        self.run_dir = run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.journal = None
        self.state = self._new_state(run_id)
        self._restore()
        self.cell_log = CellLog(self.run_dir / "cells.bin")
        self.journal = Journal(self.run_dir / "ledger.jsonl")
        if self.state.collector_restarts:
            self.state.ledger.event("collector_restart", "collector")
        self.segments = list(self._prev.get("segments", []))
        if self.runs_root is not None and run_id:
            atomic_write_json(self.runs_root / "current.json", {"run": run_id})

    def _unfinished_run(self) -> str:
        """The run named in ``<runs_root>/current.json`` unless its summary is final."""
        assert self.runs_root is not None
        try:
            run = json.loads((self.runs_root / "current.json").read_text()).get("run", "")
        except (OSError, ValueError, AttributeError):
            return ""
        if not isinstance(run, str) or not run or "/" in run or run.startswith("."):
            return ""
        try:
            done = json.loads((self.runs_root / run / "summary.json").read_text())
            return "" if done.get("final") else run
        except (OSError, ValueError, AttributeError):
            return run

    def _adopt(self, run: str) -> None:
        """``runs_root`` mode: the first message names the run this collector serves."""
        if not run or "/" in run or run.startswith(".") or len(run) > wire.MAX_STR:
            return
        pending = self.state
        self._open_run(self.runs_root / run, run)
        self.state.peers.update(pending.peers)
        self._open_recorder()

    def _switch_run(self, run: str, pub: Any, sender: Any) -> None:
        """``runs_root`` mode: an acquisition of a new run said hello."""
        if not run or "/" in run or run.startswith(".") or len(run) > wire.MAX_STR:
            return
        log.info("new run %s: finishing run %s", run, self.state.run_id)
        self._finish_run(pub, sender)
        self._sent_counts = {}  # counters go on from their totals with the new run's counts
        self._open_run(self.runs_root / run, run)
        self._open_recorder()

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
        lines = read_journal(self.run_dir / "ledger.jsonl")
        records, lines = consistent_logs(self.run_dir, records, lines)
        if self._prev or len(records) or lines:
            self.state.collector_restarts = int(self._prev.get("collector_restarts", 0)) + 1
            self.state.restore(records)
            for sender, rep in self._prev.get("reports", {}).items():
                self.state.reports[sender] = rep
            # per-cell events and the completeness ledger: exactly what the predecessor
            # handled (the journal is written through as messages are handled)
            for line in lines:
                try:
                    self.state.replay(line)
                except (KeyError, TypeError, ValueError) as exc:
                    log.error("ignoring a bad journal line %s: %s", line, exc)
            for sender, rep in self.state.reports.items():  # who emitted what
                crops = rep.get("stats", {}).get("crops_sender")
                if rep.get("role") in EMITTER_ROLES and isinstance(crops, str) and crops:
                    self.state.crops_sender_of[sender] = crops
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
        if self.runs_root is not None:  # one recording per run, in its folder
            base = self.run_dir / base.name
        k = len(self.segments)
        return base if k == 0 else base.with_name(f"{base.stem}.part{k}{base.suffix}")

    def _open_recorder(self) -> None:
        if not self.cfg.record or (self.runs_root is not None and not self.state.run_id):
            return

        path = self._segment_path()
        self.recorder = Recorder(path, params=self.params,
                                 flush_interval_s=self.cfg.record_flush_s)
        self.segments.append(str(path))

    def _save_state(self) -> None:
        st = self.state
        if self.cell_log is None:  # runs_root mode before the first run is known
            return
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
                    "leukoflow_qc_magnification", "leukoflow_run_cells_in_flight",
                    "leukoflow_run_cells_lost"):
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
        # loss while the run is going (gauges: a late message takes its cells back)
        m["leukoflow_run_cells_in_flight"].set(acc.get("in_flight", 0))
        lost = {tuple(k.split(":", 1)) if ":" in k else ("pipeline", k): n
                for k, n in acc.get("lost", {}).items()}
        for key in self._lost_labels | set(lost):
            m["leukoflow_run_cells_lost"].labels(*key).set(lost.get(key, 0))
        self._lost_labels |= set(lost)
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
        self._switch_to = ""
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
                if self._switch_to:
                    self._switch_run(self._switch_to, pub, live_sender)
                    self._switch_to = ""
                now = time.monotonic()
                if now - last_flush >= self.cfg.flush_interval_s:
                    self._guarded(self._flush)
                    last_flush = now
                if now - last_pub >= self.cfg.publish_interval_s:
                    self._guarded(self._periodic, pub, live_sender)
                    last_pub = now
                if self.runs_root is not None:
                    if not self.state.closed and self.state.run_id and self._done():
                        self._guarded(self._write_summary, pub, live_sender)
                        self.state.closed = True  # keep serving: late messages still count
                    if self._stop.is_set() or (self.state.stop_requested and self._done()):
                        break
                    continue
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

    def _guarded(self, job: Any, *args: Any) -> None:
        """Run a periodic job; a failure is logged, never the end of the service."""
        try:
            job(*args)
        except Exception as exc:  # noqa: BLE001
            log.exception("%s failed: %s", getattr(job, "__name__", job), exc)

    def _periodic(self, pub: Any, live_sender: Any) -> None:
        """Failure detection, completeness check, live state and metrics."""
        self.state.check_liveness()
        self.state.ledger.advance()
        snap = self.state.snapshot()
        self._publish(pub, live_sender, snap)
        self._update_metrics(snap)

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
        try:
            self._dispatch(msg)
        except Exception as exc:  # noqa: BLE001 - one message never ends the collector
            log.exception("handling %s from %s failed: %s", msg.kind, msg.sender, exc)
            self.state.handler_failed(msg.header)

    def _dispatch(self, msg: wire.Message) -> None:
        """Handle one validated message (inside :meth:`_handle`'s error boundary)."""
        if self.runs_root is not None:
            run = msg.header.get("run", "")
            if not self.state.run_id and run:
                self._adopt(run)
            elif (run and run != self.state.run_id and msg.kind == "control"
                  and msg.header.get("cmd") == "hello" and _role(msg.sender) in EMITTER_ROLES):
                self._switch_to = run  # after this batch of messages (in the loop)
                return
        self._gaps.observe(msg.sender, msg.seq)
        if msg.kind == "results":
            recs, new = self.state.ingest_results(msg.header, msg.array)
            if self.cell_log is not None:
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
                    except Exception as exc:  # noqa: BLE001 - the crops still go on
                        log.exception("recording crops failed: %s", exc)
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
        if self.cell_log is None:
            return
        self.cell_log.flush()
        if self.journal is not None:
            self.journal.flush()
        if self.recorder is not None:
            self.recorder.maybe_flush()
            self.state.recording = {**self.recorder.stats(), "segments": self.segments}
        self._save_state()

    def _publish(self, pub: Any, sender: Any, snap: dict[str, Any]) -> None:
        if pub is None:
            return
        import zmq


        try:
            live = {k: v for k, v in snap.items()
                    if k not in ("senders", "params", "completeness")}
            frames = wire.encode(heartbeat_message(sender, live))
            pub.send_multipart(frames, flags=zmq.NOBLOCK)
        except (zmq.Again, wire.WireError) as exc:
            log.debug("live state not published: %s", exc)

    def _write_summary(self, pub: Any, sender: Any) -> dict[str, Any]:
        """The run's final summary (``summary.json``), exported and published."""
        snap = self.state.snapshot(final=True)
        snap["params"] = self.params
        # a standalone collector: the pipeline the acquisition reported (no model part)
        ident = {} if "pipeline" in self.params else self._reported_pipeline()
        if ident:
            snap["params"] = {**self.params, "pipeline": ident}
        snap["sequence_gaps"] = self._gaps.gaps if hasattr(self, "_gaps") else 0
        if self.cell_log is not None:
            self._save_state()
            atomic_write_json(self.run_dir / "summary.json", snap)
        self._update_metrics(snap)
        self._publish(pub, sender, snap)
        return snap

    def _reported_pipeline(self) -> dict[str, Any]:
        """The pipeline identity an acquisition of this run reported ({} when none did)."""
        for sender, rep in self.state.reports.items():
            ident = (rep.get("stats") or {}).get("pipeline")
            if _role(sender) not in EMITTER_ROLES or not isinstance(ident, dict):
                continue
            parts = ident.get("id_parts")
            if (isinstance(parts, list) and parts and all(isinstance(p, str) for p in parts)
                    and isinstance(ident.get("hash"), str)):
                text = "".join(parts)
                if pipeline_hash(text) != ident["hash"]:  # validate what came from outside
                    log.warning("%s reported a pipeline whose hash does not match", sender)
                    continue
                return {"id": text, "hash": ident["hash"],
                        "generation": ident.get("generation")}
        return {}

    def _pipeline_meta(self) -> dict[str, str]:
        """``user:pipeline id/hash`` of a recording made without ``leukoflow run``'s params
        (a standalone collector: the identity the acquisition reported)."""
        if "pipeline" in self.params:
            return {}
        ident = self._reported_pipeline()
        return {"pipeline id": ident["id"], "pipeline hash": ident["hash"]} if ident else {}

    def _finish_run(self, pub: Any, sender: Any) -> dict[str, Any]:
        """Close the current run: recording, logs, final summary."""
        rec_stats: dict[str, Any] = {}
        if self.recorder is not None:
            acc = self.state.accounting(final=True)
            rec_stats = self.recorder.close(extra_meta={
                "accounting": jsonutil.dumps(acc),
                "segment_index": len(self.segments) - 1,
                # every service's last report (acquisition's includes its pipeline params)
                "service_reports": jsonutil.dumps({s: r["stats"] for s, r in
                                                   self.state.reports.items()}),
                **self._pipeline_meta(),
            })
            self.recorder = None
        self.state.recording = {**rec_stats, "segments": self.segments} if self.segments else {}
        snap = self._write_summary(pub, sender)
        for f in (self.cell_log, self.journal):
            if f is not None:
                f.close()
        return snap

    def _finish(self, pub: Any, sender: Any) -> dict[str, Any]:
        snap = self._finish_run(pub, sender)
        self.finished = True
        return snap

    def stop(self) -> None:
        """Break the loop immediately (tests); prefer :meth:`request_stop`."""
        self._stop.set()
