"""Dynamic batching of crops (Triton-style: run when full, or when the oldest cell waited).

Crops arrive in messages of any size (1 to thousands of cells). The batcher keeps
*segments* (views into each message's crop array, never per-cell Python objects) in arrival
order and forms a batch

* immediately once ``max_batch`` cells are pending (``reason="full"``), or
* once the oldest pending cell has waited ``max_delay`` (``reason="delay"``), or
* on :meth:`DynamicBatcher.flush` (end of stream, stop).

A message larger than the remaining room is split across batches. Backends that want fixed
sizes (CUDA graphs, TensorRT profiles) give ``buckets``; the batch then reports the smallest
bucket that holds it and :meth:`Batch.gather` zero-pads the rows beyond ``n``.

Time comes from an injectable ``clock`` (seconds, monotonic) so the logic can be tested
without sleeping.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Segment:
    """A contiguous run of cells of one message inside the batcher.

    Attributes
    ----------
    crops : ndarray (n, H, W)
        View into the message's crops.
    ctx : Any
        Opaque per-message context of the caller (header, ids ...).
    start : int
        Index of ``crops[0]`` within the message's (accepted) cells.
    t_enq : float
        Clock time the message entered the batcher [s].
    """

    crops: np.ndarray
    ctx: Any
    start: int
    t_enq: float

    @property
    def n(self) -> int:
        """Cells in the segment."""
        return int(self.crops.shape[0])

    @property
    def stop(self) -> int:
        """End index (exclusive) within the message."""
        return self.start + self.n


@dataclass
class Batch:
    """Cells selected for one model execution.

    Attributes
    ----------
    segments : list of Segment
        In arrival order.
    n : int
        Cells in the batch.
    bucket : int
        Execution size (``>= n``; rows beyond ``n`` are padding).
    t_formed : float
        Clock time the batch was formed [s].
    reason : str
        ``"full"``, ``"delay"`` or ``"flush"``.
    """

    segments: list[Segment]
    n: int
    bucket: int
    t_formed: float
    reason: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def oldest_wait(self) -> float:
        """Wait of the oldest cell when the batch formed [s]."""
        return self.t_formed - self.segments[0].t_enq if self.segments else 0.0

    def gather(self, out: np.ndarray) -> np.ndarray:
        """Copy the crops into ``out[:n]`` and zero the padding rows up to ``bucket``.

        Parameters
        ----------
        out : ndarray, shape (>= bucket, H, W)
            Staging buffer (e.g. a backend's pinned host buffer); dtype conversion happens
            during the copy.

        Returns
        -------
        ndarray
            ``out[:bucket]``.
        """
        if out.shape[0] < self.bucket:
            raise ValueError(f"buffer holds {out.shape[0]} rows, batch needs {self.bucket}")
        i = 0
        for seg in self.segments:
            out[i:i + seg.n] = seg.crops
            i += seg.n
        if self.bucket > self.n:
            out[self.n:self.bucket] = 0
        return out[:self.bucket]


class DynamicBatcher:
    """Collects crops and forms batches by size or age.

    Parameters
    ----------
    max_batch : int
        Largest batch [cells]; a full batch goes at once.
    max_delay_s : float
        Longest time the oldest pending cell may wait before a partial batch goes [s].
    buckets : sequence of int, optional
        Execution sizes the backend supports (sorted ascending, ``max(buckets) >=
        max_batch``); ``None``: any size.
    clock : callable, optional
        Monotonic time source in seconds (default :func:`time.monotonic`).
    """

    def __init__(self, max_batch: int, max_delay_s: float,
                 buckets: Sequence[int] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s must be >= 0, got {max_delay_s}")
        self.max_batch = int(max_batch)
        self.max_delay_s = float(max_delay_s)
        self.buckets = tuple(sorted(int(b) for b in buckets)) if buckets else None
        if self.buckets and self.buckets[-1] < self.max_batch:
            raise ValueError(f"largest bucket {self.buckets[-1]} < max_batch {self.max_batch}")
        self.clock = clock
        self._segments: deque[Segment] = deque()
        self._pending = 0

    # -- state ---------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Cells waiting [cells]."""
        return self._pending

    def deadline(self) -> float | None:
        """Clock time at which the oldest pending cell reaches ``max_delay`` (None if empty)."""
        if not self._segments:
            return None
        return self._segments[0].t_enq + self.max_delay_s

    def time_to_deadline(self, now: float | None = None) -> float | None:
        """Seconds until :meth:`deadline` (>= 0; 0 when a batch is due; None if empty)."""
        if not self._segments:
            return None
        if self._pending >= self.max_batch:
            return 0.0
        now = self.clock() if now is None else now
        return max(0.0, self._segments[0].t_enq + self.max_delay_s - now)

    def ready(self, now: float | None = None) -> bool:
        """True when a batch should run now (full, or the oldest cell waited ``max_delay``)."""
        if self._pending >= self.max_batch:
            return True
        if not self._segments:
            return False
        now = self.clock() if now is None else now
        return now >= self._segments[0].t_enq + self.max_delay_s

    def bucket_for(self, n: int) -> int:
        """Execution size for ``n`` cells (smallest bucket >= n, or n)."""
        if not self.buckets:
            return n
        i = bisect.bisect_left(self.buckets, n)
        if i == len(self.buckets):
            raise ValueError(f"{n} cells exceed the largest bucket {self.buckets[-1]}")
        return self.buckets[i]

    # -- input / output --------------------------------------------------------------------
    def put(self, crops: np.ndarray, ctx: Any = None, now: float | None = None) -> None:
        """Enqueue the cells of one message.

        Parameters
        ----------
        crops : ndarray (n, H, W)
            The message's crops (kept as a view, not copied).
        ctx : Any
            Caller's per-message context, returned with each segment.
        now : float, optional
            Arrival time [s] (default: the clock).
        """
        if crops.ndim != 3:
            raise ValueError(f"crops must be (n, H, W), got shape {crops.shape}")
        if crops.shape[0] == 0:
            return
        now = self.clock() if now is None else now
        self._segments.append(Segment(crops, ctx, 0, now))
        self._pending += crops.shape[0]

    def pop(self, now: float | None = None, force: bool = False) -> Batch | None:
        """Form the next batch if one is due (or ``force``), else return ``None``.

        Takes up to ``max_batch`` cells from the front, splitting a segment if needed.
        """
        if not self._segments:
            return None
        now = self.clock() if now is None else now
        full = self._pending >= self.max_batch
        if not (full or force or self.ready(now)):
            return None
        reason = "full" if full else ("delay" if self.ready(now) else "flush")
        room = self.max_batch
        segs: list[Segment] = []
        while self._segments and room:
            seg = self._segments[0]
            if seg.n <= room:
                self._segments.popleft()
                segs.append(seg)
                room -= seg.n
            else:
                segs.append(Segment(seg.crops[:room], seg.ctx, seg.start, seg.t_enq))
                self._segments[0] = Segment(seg.crops[room:], seg.ctx, seg.start + room,
                                            seg.t_enq)
                room = 0
        n = self.max_batch - room
        self._pending -= n
        return Batch(segs, n, self.bucket_for(n), now, reason)

    def flush(self, now: float | None = None) -> list[Batch]:
        """Every pending cell as batches (end of stream or stop)."""
        out = []
        while self._segments:
            b = self.pop(now, force=True)
            if b is None:  # pragma: no cover - pop with force always returns
                break
            out.append(b)
        return out
