"""Keeping up with the camera: achieved vs nominal frame rate, frames dropped, warm-up.

:class:`RealtimeMonitor` is fed once per frame taken by the acquisition loop and answers
what an operator needs to know about falling behind: the frame rate the camera delivers
(nominal) and the rate frames are taken at (achieved, over a sliding window and over the
steady state after the warm-up), the frames dropped by reason (``overrun``: the camera's
ring buffer wrapped around before the acquisition took them; ``camera``: gaps in a real
camera's frame counter), the frame backlog, and an estimate of the cells that passed in
the dropped frames (cells per taken frame × dropped frames: the cells that crossed the
field while frames were lost; those crossing in fewer frames than were lost in a row are
missing from the count, the others were still seen in a neighbouring frame, so this bounds
the loss from above).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

#: Reasons a frame is dropped before the pipeline sees it.
FRAME_DROP_REASONS: tuple[str, ...] = ("overrun", "camera")


class RealtimeMonitor:
    """Frame-rate bookkeeping of one acquisition run (no I/O).

    Parameters
    ----------
    nominal_hz : float
        The camera's frame rate [frames/s]; 0 when frames are taken as fast as possible
        (no rate to keep up with).
    warmup_s : float
        Seconds after the first frame that are the warm-up [s].
    window_s : float
        Sliding window of the achieved rate [s].
    """

    def __init__(self, nominal_hz: float, warmup_s: float = 5.0, window_s: float = 5.0) -> None:
        self.nominal_hz = float(nominal_hz)
        self.warmup_s = float(warmup_s)
        self.window_s = float(window_s)
        self.dropped: Counter[str] = Counter()
        self.dropped_warmup = 0
        self.taken = 0
        self.backlog = 0
        self.backlog_max = 0
        self.t_first: float | None = None
        self.cpu_first: float | None = None
        self._steady_cpu: float | None = None
        #: CPU time spent inside the source's read (a simulated camera renders frames
        #: there, and advances its flow through dropped frames) [s]; added by the caller
        self.source_cpu_s = 0.0
        self._steady_source_cpu = 0.0
        self._steady: tuple[float, int, int] | None = None  # (t, taken, dropped) at warm-up end
        self._samples: deque[tuple[float, int]] = deque()
        self._last_sample = 0.0

    # ------------------------------------------------------------------ feed
    def frame(self, dropped: dict[str, int] | None = None, backlog: int = 0,
              now: float | None = None) -> None:
        """Record one frame taken, the frames dropped just before it and the backlog.

        Parameters
        ----------
        dropped : dict, optional
            Frames dropped just before this one, by reason (:data:`FRAME_DROP_REASONS`).
        backlog : int
            Frames captured and waiting behind this one [frames].
        now : float, optional
            Monotonic time [s] (default: now).
        """
        now = time.monotonic() if now is None else now
        if self.t_first is None:
            self.t_first = now
            self.cpu_first = time.process_time()
            self._samples.append((now, 0))
        n_drop = 0
        for reason, n in (dropped or {}).items():
            if n > 0:
                self.dropped[reason] += int(n)
                n_drop += int(n)
        if n_drop and self.warming_up(now):
            self.dropped_warmup += n_drop
        self.taken += 1
        self.backlog = max(int(backlog), 0)
        self.backlog_max = max(self.backlog_max, self.backlog)
        if self._steady is None and not self.warming_up(now):
            self._steady = (now, self.taken, self.dropped_total)
            self._steady_cpu = time.process_time()
            self._steady_source_cpu = self.source_cpu_s
        if now - self._last_sample >= 0.1:
            self._last_sample = now
            self._samples.append((now, self.taken))
            while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
                self._samples.popleft()

    # ------------------------------------------------------------------ read-out
    @property
    def paced(self) -> bool:
        """True when there is a camera rate to keep up with."""
        return self.nominal_hz > 0

    @property
    def dropped_total(self) -> int:
        """Frames dropped so far, all reasons."""
        return int(sum(self.dropped.values()))

    def warming_up(self, now: float | None = None) -> bool:
        """True before the first frame and during the ``warmup_s`` after it."""
        if self.t_first is None:
            return True
        now = time.monotonic() if now is None else now
        return now - self.t_first < self.warmup_s

    def achieved_hz(self, now: float | None = None) -> float:
        """Frames taken per second over the last ``window_s`` [frames/s]."""
        if len(self._samples) < 2:
            return 0.0
        now = time.monotonic() if now is None else now
        t0, n0 = self._samples[0]
        dt = max(now, self._samples[-1][0]) - t0
        return (self.taken - n0) / dt if dt > 0 else 0.0

    def steady_hz(self, now: float | None = None) -> float | None:
        """Frames taken per second since the end of the warm-up (None during it)."""
        if self._steady is None:
            return None
        now = time.monotonic() if now is None else now
        t0, n0, _ = self._steady
        return (self.taken - n0) / (now - t0) if now > t0 else None

    def cpu_per_frame_s(self) -> float | None:
        """CPU time of this process per frame taken since the end of the warm-up [s]
        (all threads; independent of how busy the machine is, unlike the frame rate)."""
        if self._steady is None or self._steady_cpu is None:
            return None
        n = self.taken - self._steady[1]
        return (time.process_time() - self._steady_cpu) / n if n > 0 else None

    def source_cpu_per_frame_s(self) -> float | None:
        """CPU time inside the source per frame taken since the warm-up [s]."""
        if self._steady is None:
            return None
        n = self.taken - self._steady[1]
        return (self.source_cpu_s - self._steady_source_cpu) / n if n > 0 else None

    def steady_dropped(self) -> int:
        """Frames dropped since the end of the warm-up."""
        return self.dropped_total - (self._steady[2] if self._steady else self.dropped_total)

    def cells_in_dropped_frames(self, cells: int) -> float:
        """Estimated cells that passed in the dropped frames.

        Parameters
        ----------
        cells : int
            Cells found in the frames taken so far (emitted and rejected objects of
            finished tracks).
        """
        if not self.taken:
            return 0.0
        return cells / self.taken * self.dropped_total

    def summary(self, cells: int = 0, now: float | None = None) -> dict[str, Any]:
        """JSON-ready state (the ``camera`` part of the acquisition accounting)."""
        now = time.monotonic() if now is None else now
        steady = self.steady_hz(now)
        captured = self.taken + self.dropped_total
        return {
            "paced": self.paced,
            "nominal_hz": self.nominal_hz,
            "achieved_hz": self.achieved_hz(now),
            "steady_hz": steady,
            "steady_ratio": (steady / self.nominal_hz) if steady and self.paced else None,
            "warming_up": self.warming_up(now),
            "warmup_s": self.warmup_s,
            "frames_taken": self.taken,
            "frames_captured": captured,
            "frames_dropped": {r: int(self.dropped[r]) for r in FRAME_DROP_REASONS
                               if self.dropped[r]},
            "frames_dropped_total": self.dropped_total,
            "frames_dropped_warmup": self.dropped_warmup,
            "frames_dropped_fraction": self.dropped_total / captured if captured else 0.0,
            "backlog": self.backlog,
            "backlog_max": self.backlog_max,
            "cells_in_dropped_frames_estimate": self.cells_in_dropped_frames(cells),
            "cpu_ms_per_frame": None if (c := self.cpu_per_frame_s()) is None else 1e3 * c,
            "source_cpu_ms_per_frame": None if (c := self.source_cpu_per_frame_s()) is None
            else 1e3 * c,
        }


def camera_summary(senders: dict[str, Any]) -> dict[str, Any] | None:
    """Keeping-up figures of a run from the collector's per-sender accounting.

    Sums over the acquisition senders (``acquire-…``: one per process start, so a restarted
    acquisition adds up); None when no acquisition reported (replay of crop recordings).

    Parameters
    ----------
    senders : dict
        ``summary["senders"]``: sender id -> its last accounting report.
    """
    cams = [st["camera"] for s, st in senders.items()
            if str(s).split("-", 1)[0] == "acquire" and isinstance(st, dict)
            and isinstance(st.get("camera"), dict) and "frames_taken" in st["camera"]]
    if not cams:
        return None
    dropped: Counter[str] = Counter()
    for c in cams:
        for reason, n in (c.get("frames_dropped") or {}).items():
            dropped[str(reason)] += int(n)
    taken = sum(int(c.get("frames_taken", 0)) for c in cams)
    captured = sum(int(c.get("frames_captured", 0)) for c in cams)
    last = cams[-1]
    return {
        "paced": any(bool(c.get("paced")) for c in cams),
        "nominal_hz": max(float(c.get("nominal_hz") or 0.0) for c in cams),
        "steady_hz": last.get("steady_hz"),
        "steady_ratio": last.get("steady_ratio"),
        "frames_taken": taken,
        "frames_captured": captured,
        "frames_dropped": dict(dropped),
        "frames_dropped_total": int(sum(dropped.values())),
        "frames_dropped_warmup": sum(int(c.get("frames_dropped_warmup", 0)) for c in cams),
        "frames_dropped_fraction": sum(dropped.values()) / captured if captured else 0.0,
        "cells_in_dropped_frames_estimate": float(sum(
            float(c.get("cells_in_dropped_frames_estimate", 0.0)) for c in cams)),
        "backlog_max": max(int(c.get("backlog_max", 0)) for c in cams),
        "cpu_ms_per_frame": last.get("cpu_ms_per_frame"),
        "source_cpu_ms_per_frame": last.get("source_cpu_ms_per_frame"),
        "processes": len(cams),
    }
