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
with a rejection reason. A track whose passing instances all have the area of its doublet
instances (a merged pair that looked single in some frames), and that was seen as a doublet
more often than it passed, is rejected as ``doublet``.

Coincident cells (a neighbour overtakes, or two cells enter the field together) are handled
so that one cell never gives two crops: a blob that holds the predicted position of a track
but is larger than that track's cell by more than ``merge_area_ratio`` is a *merged*
observation of every such track (each coasts on its own velocity, takes no candidate from
it, and picks its cell up again when the pair separates); a track born merged that later
shows a single cell much smaller than its earlier instances drops those instances (they
were the pair); a single cell appearing outside the normal gate but within the extent of
such a coasting, larger track continues that track instead of starting a second one; and
displacements across a merge/separation (a centroid jump) never update the velocity.

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

from leukoflow.acquisition.features import Detection


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
        fraction (merged with a neighbour, or a fragment) are not emitted; a detection
        larger than a track's single-cell area by more than this fraction is a merged
        observation of that track (coincidence handling, see the module docstring).
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
    areas: list[float] = field(default_factory=list)
    merged_areas: list[float] = field(default_factory=list)
    last_area: float | None = None

    @property
    def ref_area(self) -> float | None:
        """Median area [µm²] of the track's clean single-cell instances (None if none)."""
        if not self.areas:
            return None
        a = sorted(self.areas)
        return a[(len(a) - 1) // 2]

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
        #: Track ids each detection of the last :meth:`update` went to (several for a
        #: merged observation), for diagnostics.
        self.last_assignment: list[tuple[int, ...]] = []

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
        if tr.last_area is not None and not (
                tr.last_area / (1.0 + c.merge_area_ratio) <= d.area_um
                <= tr.last_area * (1.0 + c.merge_area_ratio)):
            # merged -> separated (or back): the centroid jumped, not the cell
            full_pair = False
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
        regular = set(assign.values())
        # coincidences: a blob that holds the predicted position of an open track but is
        # larger than that track's cell (it merged with a neighbour) is a *merged*
        # observation of every such track: the tracks coast on their own velocity through
        # it (no position update, no candidate) and pick their cells up again when the
        # pair separates, so neither cell is lost nor restarted as a second track
        merged_of: dict[int, list[int]] = {}
        claimed: set[int] = set()
        for j, d in enumerate(dets):
            tid = assign.get(j)
            owners = self._merged_owners(frame, d, regular | claimed)
            if tid is not None and self._is_merged(self.open[tid], d):
                owners.insert(0, tid)
                del assign[j]
            elif tid is not None and owners:
                d.extra["merged"] = True  # its new track must not emit the pair
            if owners:
                merged_of[j] = owners
                claimed.update(owners)
        # separations: a single cell that appears, outside the normal gate, within the
        # extent of a coasting track that was larger (a merged pair whose centroid was off
        # the cell's own) continues that track instead of starting a second one for it
        for j, d in enumerate(dets):
            if j in assign or j in merged_of:
                continue
            tid = self._separation_owner(frame, d, set(assign.values()))
            if tid is None:
                self._split_off(frame, d, {t: dets[k] for k, t in assign.items()})
            if tid is not None:
                assign[j] = tid
                for k in list(merged_of):
                    if tid in merged_of[k]:
                        merged_of[k].remove(tid)
                        if not merged_of[k]:
                            del merged_of[k]
                self.stats["separations_joined"] += 1
        matched_tracks: set[int] = set(assign.values())
        for owners in merged_of.values():
            matched_tracks.update(owners)
        self.last_assignment = []
        for j, d in enumerate(dets):
            tid = assign.get(j)
            if j in merged_of:
                for mt in merged_of[j]:
                    self._merged(self.open[mt], d, frame)
                if tid is None:
                    self.last_assignment.append(tuple(merged_of[j]))
                    continue
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
            tr.last_area = d.area_um
            matched_tracks.add(tr.track_id)
            self.last_assignment.append((tr.track_id, *merged_of.get(j, ())))
            if d.extra.get("merged") and d.reason is None:
                tr.reasons["doublet"] += 1
                self._note_merged_area(tr, d.area_um)
            elif d.reason is not None:
                tr.reasons[d.reason] += 1
                if d.reason == "doublet" and not d.touches_flow_edge:
                    self._note_merged_area(tr, d.area_um)
            elif d.touches_flow_edge:
                tr.reasons["partial"] += 1
            else:
                self._separated(tr, d)
                tr.n_full += 1
                if len(tr.areas) < c.max_candidates:
                    tr.areas.append(d.area_um)
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

    # ------------------------------------------------------------------ coincidences
    def _is_merged(self, tr: Track, d: Detection) -> bool:
        """True when ``d`` is larger than ``tr``'s own cell by more than the area ratio."""
        ref = tr.ref_area
        if ref is None or d.touches_flow_edge:
            return False
        return d.area_um > ref * (1.0 + self.config.merge_area_ratio)

    def _merged_owners(self, frame: int, d: Detection, taken: set[int]) -> list[int]:
        """Open tracks (not in ``taken``, with a known single-cell area) whose predicted
        position lies in ``d``'s box while ``d`` is larger than their cell."""
        owners: list[int] = []
        y0, x0, h, w = d.bbox
        for oid, tr in self.open.items():
            if oid in taken or tr.stationary:
                continue
            py, px = tr.predict(frame, self.flow_dx)
            if y0 <= py < y0 + h and x0 <= px < x0 + w and self._is_merged(tr, d):
                owners.append(oid)
        return owners

    def _separation_owner(self, frame: int, d: Detection, matched: set[int]) -> int | None:
        """Unmatched track whose (larger, merged) extent holds the single cell ``d``."""
        c = self.config
        if d.reason is not None or d.touches_flow_edge:
            return None
        best, best_dx = None, None
        for oid, tr in self.open.items():
            ref = tr.ref_area
            if oid in matched or tr.stationary or ref is None:
                continue
            if d.area_um * (1.0 + c.merge_area_ratio) >= ref:
                continue
            py, px = tr.predict(frame, self.flow_dx)
            ex = abs(d.cx - px)
            if ex <= tr.half_width + c.gate_x_px and abs(d.cy - py) <= 2.0 * c.gate_y_px \
                    and (best_dx is None or ex < best_dx):
                best, best_dx = oid, ex
        return best

    def _split_off(self, frame: int, d: Detection, matched: dict[int, Detection]) -> None:
        """A single cell ``d`` starts a new track beside a track that shrank in this frame,
        within that track's extent: the pair it showed has separated into the two, so the
        track's earlier (pair-sized) instances are dropped as candidates."""
        c = self.config
        r = c.merge_area_ratio
        if d.reason is not None or d.touches_flow_edge:
            return
        for oid, md in matched.items():
            tr = self.open[oid]
            ref = tr.ref_area
            if ref is None or d.area_um * (1.0 + r) >= ref or md.area_um * (1.0 + r) >= ref:
                continue
            py, px = tr.predict(frame, self.flow_dx)
            if abs(d.cx - px) <= tr.half_width + c.gate_x_px and \
                    abs(d.cy - py) <= 2.0 * c.gate_y_px:
                self._separated(tr, d)

    def _merged(self, tr: Track, d: Detection, frame: int) -> None:
        """Record a merged observation: coast on the track's own velocity, no candidate."""
        tr.cy, tr.cx = tr.predict(frame, self.flow_dx)
        tr.last_frame = frame
        tr.n += 1
        tr.reasons["merged"] += 1
        self.stats["merged_observations"] += 1

    def _note_merged_area(self, tr: Track, area_um: float) -> None:
        if len(tr.merged_areas) < self.config.max_candidates:
            tr.merged_areas.append(area_um)

    def _separated(self, tr: Track, d: Detection) -> None:
        """A clean instance much smaller than the track's earlier ones: the earlier ones
        were a merged pair that has now separated (the track was born merged). Drop them as
        candidates so that the crop shows one cell, not the pair."""
        r = self.config.merge_area_ratio
        big = [cd for cd in tr.candidates if cd.det.area_um > d.area_um * (1.0 + r)]
        if not big:
            return
        for cd in big:
            self._note_merged_area(tr, cd.det.area_um)
        tr.candidates = [cd for cd in tr.candidates if cd not in big]
        tr.areas = [a for a in tr.areas if a <= d.area_um * (1.0 + r)]
        self.stats["separations"] += 1

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
        """Best instance: among the instances of single-cell area, the highest
        :func:`instance_score`.

        When the track was also seen merged with a neighbour (doublet instances, or
        instances dropped by a separation), instances with at least the median merged area
        / (1 + ``merge_area_ratio``) belong to the pair and are never emitted; if that
        leaves none (merged and single views look alike), the track is kept only when it
        passed more often than it was seen as a doublet. Among the remaining instances,
        those within ``merge_area_ratio`` of the lower-median area count (a cell merged
        with a neighbour looks larger, a fragment of a separating pair smaller).
        """
        r = self.config.merge_area_ratio
        cands = tr.candidates
        if tr.merged_areas:
            ma = sorted(tr.merged_areas)
            limit = ma[(len(ma) - 1) // 2] / (1.0 + r)
            singles = [cd for cd in cands if cd.det.area_um < limit]
            if singles:
                cands = singles
            elif tr.reasons["doublet"] > tr.n_full:
                return None
        if not cands:
            return None
        areas = sorted(cd.det.area_um for cd in cands)
        ref = areas[(len(areas) - 1) // 2]
        lo, hi = ref / (1.0 + r), ref * (1.0 + r)
        return max((cd for cd in cands if lo <= cd.det.area_um <= hi),
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
        elif tr.candidates and (best := self._choose(tr)) is not None:
            reason = None
        elif tr.candidates or tr.reasons["merged"]:
            # every instance that passed had the area of the merged pair: two coincident
            # cells that looked single in some frame (or coasted merged to the end)
            best, reason = None, "doublet"
        elif tr.reasons:
            # a gate reason beats "partial": the full view of the object was rejected
            gate = Counter({k: v for k, v in tr.reasons.items() if k != "partial"})
            reason = (gate or tr.reasons).most_common(1)[0][0]
            best = None
        else:
            best, reason = None, "partial"
        return FinishedTrack(tr.track_id, tr.first_frame, tr.last_frame, tr.n, best, reason, end)
