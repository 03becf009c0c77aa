"""Completeness of every source's crop stream, checked while the run is going.

Each crop message of a source (one acquisition start, one replay) has a sequence number
``seq`` (0, 1, 2, ... per sender, no holes: a message acquisition drops at back-pressure gives
its number back) and ``cum``, the cells the source published before it. The inference workers
copy both into every result and every rejection (``src_sender``, ``src_seq``, ``src_n``,
``src_cum``); the acquisition's accounting reports how many messages and cells it published.
From these the :class:`Ledger` knows, per source, which messages came back complete, which are
still in flight, and how many cells a missing message held (``cum`` of the next message minus
the cells before it): a message is *lost* when a later message of the same source came back
``timeout_s`` ago and it did not (or its source ended or died ``timeout_s`` ago, or the run
ended). A loss is attributed to a stage and reason from what the collector saw happen:

========================  ===================================================================
``acquire:source_died``   published by an acquisition that died before a worker took them
``infer:worker_died``     a worker died (killed, crashed) while holding them
``infer:shutdown``        a worker stopped on purpose while crops were still queued to it
``collector:restart``     results a collector received but died before logging
``collector:drain_timeout`` the run ended before they came back (nothing else explains it)
``pipeline:unattributed`` missing, and no failure was seen that explains it
========================  ===================================================================

A message declared lost that arrives after all (a slow worker) is counted and taken off the
lost count (``late``), so ``lost`` is a live gauge, not a counter. Every input and every
declaration is written to a journal (one JSON line each, the collector's ``ledger.jsonl``)
from which a restarted collector rebuilds the ledger exactly (:meth:`Ledger.replay`).
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LOSS_REASONS", "Ledger", "SourceLedger"]

#: stage:reason of a loss -> what it means (the run report and the runbooks use these)
LOSS_REASONS: dict[str, str] = {
    "acquire:source_died": "published by an acquisition that died before a worker took them",
    "infer:worker_died": "held by an inference worker that died (killed or crashed)",
    "infer:shutdown": "queued to an inference worker that stopped on purpose",
    "collector:restart": "results received by a collector that died before logging them",
    "collector:drain_timeout": "still missing when the run ended",
    "pipeline:unattributed": "missing, with no failure seen that explains it",
}

#: spans of lost messages kept for late arrivals and the summary (per source)
MAX_SPANS = 2000


@dataclass
class _Msg:
    n: int        # cells in the message
    cum: int      # cells the source published before it
    done: int     # cells resolved (classified or rejected)
    t_seen: float  # first result/rejection [s, monotonic]


@dataclass
class _Span:
    seq_from: int
    seq_to: int
    cells: int
    reason: str
    left: int      # cells of the span not (yet) arrived late
    t: float


@dataclass
class SourceLedger:
    """Completeness of one source (see the module docstring).

    Attributes
    ----------
    name : str
        Sender id of the source's crop messages.
    next : int
        Watermark: every message below is complete or declared lost.
    next_cum : int
        Cells published before message ``next``.
    """

    name: str
    next: int = 0
    next_cum: int = 0
    open: dict[int, _Msg] = field(default_factory=dict)
    known_msgs: int = 0       # messages known to exist (seen or reported)
    known_cells: int = 0      # cells known to be published (seen or reported)
    reported_msgs: int = 0
    reported_cells: int = 0
    t_reported: float = 0.0
    resolved_cells: int = 0
    late_cells: int = 0
    ended: bool = False       # sent end of stream
    dead: bool = False        # died without end of stream
    t_dead: float = 0.0
    first_seq_after_restart: int | None = None
    lost: Counter = field(default_factory=Counter)
    lost_msgs: int = 0
    spans: list[_Span] = field(default_factory=list)
    inconsistent: int = 0     # cum values that contradict each other (counted, never trusted)

    # -- inputs ------------------------------------------------------------------------
    def resolved(self, seq: int, n: int, cum: int, cells: int, t: float) -> str | None:
        """``cells`` cells of message ``seq`` (``n`` cells, ``cum`` before it) resolved.

        Returns the reason they had been declared lost with when they arrived late."""
        self.known_msgs = max(self.known_msgs, seq + 1)
        self.known_cells = max(self.known_cells, cum + n)
        self.resolved_cells += cells
        if seq < self.next:
            return self._late(seq, cells)
        m = self.open.get(seq)
        if m is None:
            self.open[seq] = _Msg(n, cum, cells, t)
        else:
            m.done += cells
        return None

    def _late(self, seq: int, cells: int) -> str | None:
        i = bisect.bisect_right([s.seq_from for s in self.spans], seq) - 1
        if i < 0 or not self.spans[i].seq_from <= seq <= self.spans[i].seq_to:
            return None
        span = self.spans[i]
        k = min(cells, span.left)
        if k <= 0:
            return None
        span.left -= k
        self.lost[span.reason] -= k
        if self.lost[span.reason] <= 0:
            del self.lost[span.reason]
        self.late_cells += k
        return span.reason

    def reported(self, msgs: int, cells: int, t: float) -> None:
        """The source's cumulative report: ``msgs`` messages, ``cells`` cells published."""
        if msgs > self.reported_msgs or cells > self.reported_cells:
            self.t_reported = t
        self.reported_msgs = max(self.reported_msgs, msgs)
        self.reported_cells = max(self.reported_cells, cells)
        self.known_msgs = max(self.known_msgs, msgs)
        self.known_cells = max(self.known_cells, cells)

    # -- read-out ------------------------------------------------------------------------
    @property
    def lost_cells(self) -> int:
        """Cells declared lost (net of late arrivals)."""
        return int(sum(self.lost.values()))

    def summary(self) -> dict[str, Any]:
        """JSON-ready state of this source."""
        return {"messages": self.known_msgs, "cells": self.known_cells,
                "resolved": self.resolved_cells, "complete_below": self.next,
                "open_messages": len(self.open), "lost": dict(self.lost),
                "lost_messages": self.lost_msgs, "late": self.late_cells,
                "ended": self.ended, "dead": self.dead, "inconsistent": self.inconsistent,
                "lost_spans": [{"seq": [s.seq_from, s.seq_to], "cells": s.cells,
                                "reason": s.reason} for s in self.spans[-20:]]}


Attribute = Callable[[SourceLedger, str, float, bool], str]


class Ledger:
    """Completeness of every source of a run, with live loss attribution.

    Parameters
    ----------
    timeout_s : float
        A missing message is declared lost when a later message of its source came back
        this long ago (or its source ended/died this long ago) [s].
    sink : callable, optional
        Called with one JSON-ready dict per input and declaration (the journal).
    clock : callable
        Monotonic clock [s] (system-wide on one host, so times survive a collector restart).
    """

    def __init__(self, timeout_s: float = 10.0, sink: Callable[[dict], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = float(timeout_s)
        self.sink = sink
        self.clock = clock
        self.sources: dict[str, SourceLedger] = {}
        #: failures seen: (time [s], "worker_died" | "worker_stopped" | "collector_restart",
        #: who)
        self.events: list[tuple[float, str, str]] = []
        self.t_restart: float | None = None

    # -- inputs (each journaled) -----------------------------------------------------------
    def _log(self, line: dict[str, Any]) -> None:
        if self.sink is not None:
            self.sink(line)

    def source(self, name: str) -> SourceLedger:
        """The ledger of source ``name`` (created on first use)."""
        src = self.sources.get(name)
        if src is None:
            src = self.sources[name] = SourceLedger(name)
        return src

    def resolved(self, sender: str, seq: int, n: int, cum: int, cells: int,
                 t: float | None = None, log_end: int | None = None) -> str | None:
        """Cells of crop message ``(sender, seq)`` came back (results or a rejection).

        ``log_end``: records in the collector's cell log once these cells are appended to it
        (journaled as ``log``; a restart drops a line whose cells never reached the log).
        """
        t = self.clock() if t is None else t
        line = {"k": "res", "src": sender, "seq": seq, "n": n, "cum": cum, "c": cells, "t": t}
        if log_end is not None:
            line["log"] = log_end
        self._log(line)
        src = self.source(sender)
        if self.t_restart is not None and src.first_seq_after_restart is None:
            src.first_seq_after_restart = seq
        return src.resolved(seq, n, cum, cells, t)

    def reported(self, sender: str, msgs: int, cells: int, *, ended: bool = False,
                 t: float | None = None) -> None:
        """A source's cumulative report (``ended``: its end of stream)."""
        t = self.clock() if t is None else t
        src = self.source(sender)
        if (msgs, cells, ended) == (src.reported_msgs, src.reported_cells, src.ended):
            return  # nothing new (reports repeat every second)
        self._log({"k": "rep", "src": sender, "m": msgs, "c": cells, "end": ended, "t": t})
        src.reported(msgs, cells, t)
        src.ended = src.ended or ended

    def source_died(self, sender: str, t: float | None = None) -> None:
        """The source ``sender`` died without end of stream."""
        t = self.clock() if t is None else t
        src = self.source(sender)
        if src.dead or src.ended:
            return
        self._log({"k": "dead", "src": sender, "t": t})
        src.dead, src.t_dead = True, t

    def source_alive(self, sender: str, t: float | None = None) -> None:
        """A source taken for dead was heard again (it was only slow)."""
        src = self.sources.get(sender)
        if src is None or not src.dead:
            return
        self._log({"k": "alive", "src": sender, "t": self.clock() if t is None else t})
        src.dead = False

    def event(self, kind: str, who: str, t: float | None = None) -> None:
        """A failure that explains losses: ``worker_died``, ``worker_stopped`` (with crops
        possibly still queued to it) or ``collector_restart``."""
        t = self.clock() if t is None else t
        self._log({"k": "ev", "ev": kind, "who": who, "t": t})
        self.events.append((t, kind, who))
        if kind == "collector_restart":
            self.t_restart = t
            for src in self.sources.values():
                src.first_seq_after_restart = None

    # -- loss ----------------------------------------------------------------------------
    def attribute(self, src: SourceLedger, kind: str, t_ref: float, final: bool,
                  seq_from: int) -> str:
        """``stage:reason`` of a lost span of ``src`` (see the module docstring).

        ``kind``: ``gap`` (before a message that came back), ``partial`` (part of a message
        that came back) or ``trailing`` (after the last one that came back); ``t_ref``: when
        the evidence appeared (the later message came back, the source reported/ended/died).
        """
        horizon = t_ref - self.timeout_s
        if kind == "trailing" and src.dead:
            return "acquire:source_died"
        if any(k == "worker_died" and t >= horizon for t, k, _ in self.events):
            return "infer:worker_died"
        if self.t_restart is not None and (
                t_ref <= self.t_restart + self.timeout_s
                or (src.first_seq_after_restart is not None
                    and seq_from < src.first_seq_after_restart)):
            return "collector:restart"
        if any(k == "worker_stopped" and t >= horizon for t, k, _ in self.events):
            return "infer:shutdown"
        if final:
            return "collector:drain_timeout"
        return "pipeline:unattributed"

    def _lose(self, src: SourceLedger, seq_from: int, seq_to: int, cells: int, kind: str,
              t_ref: float, now: float, final: bool) -> None:
        if cells < 0:
            src.inconsistent += 1
            cells = 0
        reason = self.attribute(src, kind, t_ref, final, seq_from)
        self._log({"k": "lost", "src": src.name, "a": seq_from, "b": seq_to, "c": cells,
                   "why": reason, "t": now})
        self._apply_lost(src, seq_from, seq_to, cells, reason, now)

    @staticmethod
    def _apply_lost(src: SourceLedger, seq_from: int, seq_to: int, cells: int, reason: str,
                    t: float) -> None:
        if cells:
            src.lost[reason] += cells
        src.lost_msgs += seq_to - seq_from + 1
        src.spans.append(_Span(seq_from, seq_to, cells, reason, cells, t))
        if len(src.spans) > MAX_SPANS:
            del src.spans[: len(src.spans) - MAX_SPANS]

    @staticmethod
    def _pass_complete(src: SourceLedger) -> None:
        m = src.open.get(src.next)
        while m is not None and m.done >= m.n:
            del src.open[src.next]
            src.next += 1
            src.next_cum = m.cum + m.n
            m = src.open.get(src.next)

    def advance(self, final: bool = False, now: float | None = None) -> None:
        """Move every source's watermark: pass complete messages, declare lost ones."""
        now = self.clock() if now is None else now
        for src in self.sources.values():
            self._advance(src, now, final)

    def _advance(self, src: SourceLedger, now: float, final: bool) -> None:
        timeout = self.timeout_s
        while True:
            m = src.open.get(src.next)
            if m is not None:
                if m.done >= m.n:
                    pass
                elif final or now - m.t_seen >= timeout:
                    self._lose(src, src.next, src.next, m.n - m.done, "partial", m.t_seen, now,
                               final)
                else:
                    return
                if m.cum != src.next_cum:
                    src.inconsistent += 1
                del src.open[src.next]
                src.next += 1
                src.next_cum = m.cum + m.n
                continue
            if src.open:
                j = min(src.open)
                mj = src.open[j]
                if final or now - mj.t_seen >= timeout:
                    self._lose(src, src.next, j - 1, mj.cum - src.next_cum, "gap", mj.t_seen,
                               now, final)
                    src.next, src.next_cum = j, mj.cum
                    continue
                return
            if src.reported_msgs > src.next:
                t_ref = max(src.t_reported, src.t_dead)
                if final or ((src.dead or src.ended) and now - t_ref >= timeout):
                    self._lose(src, src.next, src.reported_msgs - 1,
                               src.reported_cells - src.next_cum, "trailing", t_ref, now, final)
                    src.next, src.next_cum = src.reported_msgs, src.reported_cells
            return

    # -- read-out ------------------------------------------------------------------------
    def lost(self) -> Counter:
        """Cells lost by ``stage:reason`` over all sources."""
        out: Counter = Counter()
        for src in self.sources.values():
            out.update(src.lost)
        return +out

    def known_cells(self, sender: str) -> int:
        """Cells known to be published by ``sender`` (0 when unknown)."""
        src = self.sources.get(sender)
        return src.known_cells if src is not None else 0

    def summary(self) -> dict[str, Any]:
        """JSON-ready state: per source, and the failures seen."""
        return {"timeout_s": self.timeout_s,
                "sources": {n: s.summary() for n, s in self.sources.items()},
                "events": [{"t": t, "event": k, "who": w} for t, k, w in self.events[-50:]]}

    # -- journal -------------------------------------------------------------------------
    def replay(self, line: Mapping[str, Any]) -> None:
        """Apply one journal line (restart of the collector); unknown lines are ignored."""
        sink, self.sink = self.sink, None
        try:
            k = line.get("k")
            if k == "res":
                self.resolved(str(line["src"]), int(line["seq"]), int(line["n"]),
                              int(line["cum"]), int(line["c"]), float(line["t"]))
            elif k == "rep":
                self.reported(str(line["src"]), int(line["m"]), int(line["c"]),
                              ended=bool(line.get("end")), t=float(line["t"]))
            elif k == "dead":
                self.source_died(str(line["src"]), float(line["t"]))
            elif k == "alive":
                self.source_alive(str(line["src"]))
            elif k == "ev":
                self.event(str(line["ev"]), str(line.get("who", "")), float(line["t"]))
            elif k == "lost":
                src = self.source(str(line["src"]))
                a, b, cells = int(line["a"]), int(line["b"]), int(line["c"])
                self._pass_complete(src)
                if a == src.next:  # the declaration moved the watermark past [a, b]
                    m = src.open.pop(a, None) if a == b else None
                    if m is None:
                        for s in range(a, b + 1):
                            src.open.pop(s, None)
                    nxt = src.open.get(b + 1)
                    src.next = b + 1
                    src.next_cum = (m.cum + m.n if m is not None else
                                    nxt.cum if nxt is not None else src.next_cum + cells)
                self._apply_lost(src, a, b, cells, str(line["why"]), float(line["t"]))
        finally:
            self.sink = sink
