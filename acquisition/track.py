"""Track detections across frames along the flow (+x) so that each cell is counted once.

Cells move along +x by roughly the same displacement per frame (58.8 phase px at the
default optics). The tracker predicts each open track's position from its own measured
displacement (or the online flow estimate for new tracks), associates detections inside a
gate around the prediction (greedy, lowest normalised distance first), and keeps for every
track a few candidate instances (accepted by the quality gates, not cut by the entry/exit
edge). The emitted instance is, among those of typical area for the track (an instance
merged with a neighbour looks larger, a fragment smaller), the most central and best focused
one. When a track ends (the cell
left the field of view, or it was not seen for ``max_missed`` frames, or it exceeded
``max_age_frames``) it is reported once: either with its best instance (a cell to emit) or
with a rejection reason. A track seen as a doublet more often than as a single cell is
rejected as ``doublet``.

Objects that do not move (stuck debris, a cell adhering to the wall) would otherwise start
a new track every frame; they are recognised by a near-zero displacement and rejected once
with the reason ``stationary``.

Memory and time are bounded: at most ``max_open`` open tracks (the oldest is closed and
counted as ``overflow`` beyond that) and at most ``max_age_frames`` frames per track.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from acquisition.features import Detection


@dataclass(frozen=True)
class TrackConfig:
    """Tracker parameters.

    Attributes
    ----------
    expected_dx_px : float
        Configured mean displacement per frame along +x [phase px] (flow speed / frame
        rate / pixel size; 58.8 at the default optics).
    dx_tolerance : float
        The online velocity estimate is clamped to ``expected_dx_px · (1 ± dx_tolerance)``.
    track_dx_tolerance : float
        A track's own displacement is used for its prediction only when it lies within
        ``± track_dx_tolerance · expected_dx_px`` of the flow estimate.
    gate_x_px : float
        Largest |x − predicted x| for an association [px] (covers per-cell speed spread and
        the centroid shift of cells cut by the entry/exit edge).
    gate_y_px : float
        Largest |y − predicted y| for an association [px].
    stationary_px : float
        Displacement per frame below which a matched pair counts as stationary [px].
    max_missed : int
        Frames a track may go unseen before it ends: bridges frames in which the cell was
        merged with a neighbour (coincidence) or missed; the gates widen by 25 % per
        missed frame.
    max_age_frames : int
        Tracks older than this are closed (bounds time per track).
    max_open : int
        Most open tracks; beyond it the oldest is closed (bounds memory).
    max_candidates : int
        Most instances kept per track as candidates (bounds memory).
    merge_area_ratio : float
        Instances whose area differs from the track's lower-median area by more than this
        fraction (merged with a neighbour, or a fragment) are not emitted.
    velocity_window : int
        Number of recent full-view displacements whose median is the flow estimate.
    frame_width : int
        Width of the phase frame [px] (exit edge).
    """

    expected_dx_px: float = 58.8
    dx_tolerance: float = 0.30
    track_dx_tolerance: float = 0.15
    gate_x_px: float = 18.0
    gate_y_px: float = 6.0
    stationary_px: float = 3.0
    max_missed: int = 3
    max_age_frames: int = 64
    max_open: int = 256
    max_candidates: int = 8
    merge_area_ratio: float = 0.25
    velocity_window: int = 64
    frame_width: int = 256

    def to_dict(self) -> dict:
        """Plain dict (for metadata)."""
        return asdict(self)


@dataclass
class Candidate:
    """The best instance of a track so far, with whatever the pipeline stored for it."""

    score: float
    det: Detection
    payload: Any = None


@dataclass
class Track:
    """One open track (internal state)."""

    track_id: int
    first_frame: int
    last_frame: int
    cy: float
    cx: float
    half_width: float
    dx: float | None = None
    n: int = 1
    n_full: int = 0
    stationary: bool = False
    moving: bool = False
    edge: bool = False
    candidates: list[Candidate] = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)

    def predict(self, frame: int, flow_dx: float) -> tuple[float, float]:
        """Predicted (y, x) [px] at ``frame``."""
        gap = frame - self.last_frame
        if self.stationary:
            return self.cy, self.cx
        return self.cy, self.cx + (self.dx if self.dx is not None else flow_dx) * gap


@dataclass
class FinishedTrack:
    """A track reported once when it ends.

    Attributes
    ----------
    track_id : int
        Tracker-internal id (unique per tracker).
    first_frame, last_frame : int
        Frames of the first and last instance.
    n_instances : int
        Number of associated detections.
    best : Candidate or None
        The instance to emit (None when rejected).
    reason : str or None
        Rejection reason when ``best`` is None: a gate reason, ``partial`` (only seen cut by
        the entry/exit edge), ``stationary`` or ``overflow``.
    end : str
        Why the track ended: ``exit``, ``lost``, ``age``, ``overflow`` or ``flush``.
    """

    track_id: int
    first_frame: int
    last_frame: int
    n_instances: int
    best: Candidate | None
    reason: str | None
    end: str


def instance_score(det: Detection, frame_width: int, focus_weight: float = 1.0) -> float:
    """Score of one instance: most central along x first, then best focused.

    ``1 − |x − W/2| / (W/2)`` in [0, 1], minus ``focus_weight`` × the relative amplitude
    std (when known; ~0.0–0.1 for focused cells).
    """
    half = frame_width / 2.0
    score = 1.0 - abs(det.cx - half) / half
    if det.amp_std == det.amp_std:  # not NaN
        score -= focus_weight * det.amp_std
    return score


class Tracker:
    """Online tracker along +x.

    Parameters
    ----------
    config : TrackConfig
        Parameters.
    """

    def __init__(self, config: TrackConfig | None = None) -> None:
        self.config = config or TrackConfig()
        c = self.config
        self.flow_dx = float(c.expected_dx_px)
        self._lo = c.expected_dx_px * (1.0 - c.dx_tolerance)
        self._hi = c.expected_dx_px * (1.0 + c.dx_tolerance)
        self.open: dict[int, Track] = {}
        self._steps: deque[float] = deque(maxlen=c.velocity_window)
        self._next_id = 0
        self.stats: Counter = Counter()

    @property
    def n_open(self) -> int:
        """Number of open tracks."""
        return len(self.open)

    # ------------------------------------------------------------------ association
    def _match(self, frame: int, dets: Sequence[Detection]) -> dict[int, int]:
        """Greedy association: detection index -> track id."""
        c = self.config
        pairs: list[tuple[float, int, int]] = []
        for tid, tr in self.open.items():
            py, px = tr.predict(frame, self.flow_dx)
            # (y, x, gate_x, gate_y, penalty): the flow hypothesis, and for a new track
            # away from the entry/exit edges also "stuck in place" (tight gate, penalised
            # so that any flow match wins)
            gap = max(frame - tr.last_frame, 1)
            grow = 1.0 + 0.25 * (gap - 1)  # a coasting track's prediction is less certain
            hyps = [(py, px, c.gate_x_px * grow, c.gate_y_px * grow, 0.0)]
            if not tr.moving and not tr.stationary and not tr.edge:
                g = 2.0 * c.stationary_px
                hyps.append((tr.cy, tr.cx, g, g, 2.0))
            elif tr.stationary:
                g = 2.0 * c.stationary_px
                hyps = [(tr.cy, tr.cx, g, g, 0.0)]
            for j, d in enumerate(dets):
                best = None
                for hy, hx, gx, gy, pen in hyps:
                    ex = (d.cx - hx) / gx
                    ey = (d.cy - hy) / gy
                    if abs(ex) <= 1.0 and abs(ey) <= 1.0:
                        cost = ex * ex + ey * ey + pen
                        if best is None or cost < best:
                            best = cost
                if best is not None:
                    pairs.append((best, tid, j))
        pairs.sort()
        used_t: set[int] = set()
        out: dict[int, int] = {}
        for _, tid, j in pairs:
            if tid in used_t or j in out:
                continue
            used_t.add(tid)
            out[j] = tid
        return out

    def _update_velocity(self, tr: Track, d: Detection, frame: int) -> None:
        c = self.config
        gap = max(frame - tr.last_frame, 1)
        step = (d.cx - tr.cx) / gap
        if abs(step) <= c.stationary_px and not tr.moving:
            tr.stationary = True
            return
        tr.moving = True
        tr.stationary = False
        full_pair = not d.touches_flow_edge and not tr.edge
        if not (full_pair and self._lo <= step <= self._hi):
            return
        # the flow estimate is the median of recent full-view steps (robust to centroid
        # jumps when two cells merge or separate), clamped to the configured ± tolerance
        self._steps.append(step)
        self.flow_dx = min(max(float(np.median(self._steps)), self._lo), self._hi)
        self.stats["velocity_updates"] += 1
        # per-cell speeds spread by ~±10 %: a larger deviation from the flow is a centroid
        # jump, not the cell's own velocity
        if abs(step - self.flow_dx) <= c.track_dx_tolerance * c.expected_dx_px:
            tr.dx = step

    # ------------------------------------------------------------------ main entry
    def update(
        self,
        frame: int,
        dets: Sequence[Detection],
        on_candidate: Callable[[Detection], Any] | None = None,
    ) -> list[FinishedTrack]:
        """Associate one frame's detections and return the tracks that ended.

        Parameters
        ----------
        frame : int
            Frame index (monotonic; gaps from dropped frames are allowed).
        dets : sequence of Detection
            This frame's detections with their gate ``reason`` set.
        on_candidate : callable, optional
            Called with a detection whenever it becomes its track's best instance; its
            return value (e.g. the extracted crop) is stored as the candidate payload, so
            the frame data are only copied for instances that may be emitted.

        Returns
        -------
        list[FinishedTrack]
            Tracks that ended in this step.
        """
        c = self.config
        finished: list[FinishedTrack] = []
        assign = self._match(frame, dets)
        matched_tracks: set[int] = set()
        for j, d in enumerate(dets):
            tid = assign.get(j)
            if tid is None:
                if len(self.open) >= c.max_open:
                    oldest = min(self.open.values(), key=lambda t: (t.first_frame, t.track_id))
                    finished.append(self._finish(oldest, "overflow"))
                tr = Track(self._next_id, frame, frame, d.cy, d.cx, d.bbox[3] / 2.0,
                           edge=d.touches_flow_edge)
                self._next_id += 1
                self.open[tr.track_id] = tr
                self.stats["tracks_started"] += 1
            else:
                tr = self.open[tid]
                self._update_velocity(tr, d, frame)
                tr.n += 1
                tr.last_frame = frame
                tr.cy, tr.cx = d.cy, d.cx
                tr.edge = d.touches_flow_edge
                tr.half_width = max(tr.half_width, d.bbox[3] / 2.0)
            matched_tracks.add(tr.track_id)
            if d.reason is not None:
                tr.reasons[d.reason] += 1
            elif d.touches_flow_edge:
                tr.reasons["partial"] += 1
            else:
                tr.n_full += 1
                self._offer(tr, d, on_candidate)
        # end tracks: left the field, lost, or too old
        for tid in list(self.open):
            tr = self.open[tid]
            if frame - tr.first_frame + 1 >= c.max_age_frames:
                finished.append(self._finish(tr, "age"))
            elif not tr.stationary and (
                    tr.predict(frame + 1, self.flow_dx)[1] - tr.half_width >= c.frame_width):
                finished.append(self._finish(tr, "exit"))  # it will be past the exit edge
            elif tid not in matched_tracks and frame - tr.last_frame > c.max_missed:
                finished.append(self._finish(tr, "lost"))
        return finished

    def _offer(self, tr: Track, d: Detection, on_candidate: Callable[[Detection], Any] | None
               ) -> None:
        """Keep ``d`` as a candidate instance if it may become the track's best one."""
        c = self.config
        score = instance_score(d, c.frame_width)
        cands = tr.candidates
        if len(cands) >= c.max_candidates:
            worst = min(range(len(cands)), key=lambda i: cands[i].score)
            if cands[worst].score >= score:
                return
            del cands[worst]
        payload = on_candidate(d) if on_candidate is not None else None
        cands.append(Candidate(score, d, payload))

    def _choose(self, tr: Track) -> Candidate | None:
        """Best instance: among the instances whose area is within ``merge_area_ratio`` of
        the track's lower-median area (a cell merged with a neighbour looks larger, a
        fragment of a separating pair smaller), the highest :func:`instance_score`."""
        if not tr.candidates:
            return None
        areas = sorted(cd.det.area_um for cd in tr.candidates)
        ref = areas[(len(areas) - 1) // 2]
        r = self.config.merge_area_ratio
        lo, hi = ref / (1.0 + r), ref * (1.0 + r)
        return max((cd for cd in tr.candidates if lo <= cd.det.area_um <= hi),
                   key=lambda cd: cd.score)

    def flush(self) -> list[FinishedTrack]:
        """End every open track (end of stream)."""
        return [self._finish(tr, "flush") for tr in list(self.open.values())]

    def _finish(self, tr: Track, end: str) -> FinishedTrack:
        del self.open[tr.track_id]
        self.stats[f"end_{end}"] += 1
        if tr.stationary and not tr.moving:
            best, reason = None, "stationary"
        elif end == "overflow":
            best, reason = None, "overflow"
        elif tr.candidates and tr.reasons["doublet"] > tr.n_full:
            # seen as a doublet more often than it passed: two coincident cells that
            # looked single in some frame (emitting it would trace to one of them twice)
            best, reason = None, "doublet"
        elif tr.candidates:
            best, reason = self._choose(tr), None
        elif tr.reasons:
            # a gate reason beats "partial": the full view of the object was rejected
            gate = Counter({k: v for k, v in tr.reasons.items() if k != "partial"})
            reason = (gate or tr.reasons).most_common(1)[0][0]
            best = None
        else:
            best, reason = None, "partial"
        return FinishedTrack(tr.track_id, tr.first_frame, tr.last_frame, tr.n, best, reason, end)
