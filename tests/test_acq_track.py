"""Tracker: one finished track per cell, online velocity, bounds, stationary objects."""

from __future__ import annotations

from leukoflow.acquisition.features import Detection
from leukoflow.acquisition.track import TrackConfig, Tracker

W = 256


def _det(frame, cx, cy=40.0, r=14.0, reason=None, label=1):
    touch = ""
    if cx - r <= 0:
        touch += "l"
    if cx + r >= W - 1:
        touch += "r"
    x0 = max(int(cx - r), 0)
    x1 = min(int(cx + r), W)
    return Detection(label=label, frame=frame, cy=cy, cx=cx, bbox=(int(cy - r), x0, int(2 * r),
                     x1 - x0), area_px=600, area_um=70.0, diameter_um=9.5, eccentricity=0.2,
                     solidity=0.98, n_peaks=1, focus=1.0, amp_std=0.02, touch=touch,
                     reason=reason)


def _run(tracker, cells, n_frames, dx=58.8):
    """cells: list of (x at frame 0, y, speed factor). Returns finished tracks."""
    out = []
    for f in range(n_frames):
        dets = []
        for i, (x0, y, s) in enumerate(cells):
            x = x0 + f * dx * s
            if -10 < x < W + 10:
                dets.append(_det(f, min(max(x, 3.0), W - 4.0), y, label=i + 1))
        out += tracker.update(f, dets, on_candidate=lambda d: (d.frame, d.cx))
    return out + tracker.flush()


def test_single_cell_one_track_best_is_most_central():
    tr = Tracker()
    fin = _run(tr, [(5.0, 40.0, 1.0)], 8)
    assert len(fin) == 1
    ft = fin[0]
    assert ft.best is not None and ft.reason is None
    frame, cx = ft.best.payload
    assert abs(cx - W / 2) < 30  # the most central instance was kept
    assert ft.n_instances >= 4
    assert ft.end == "exit"


def test_cells_in_a_row_and_side_by_side_are_separate():
    tr = Tracker()
    cells = [(5.0, 40.0, 1.0), (5.0 - 90, 40.0, 1.05), (5.0 - 200, 25.0, 0.95),
             (5.0 - 200, 55.0, 1.0)]
    fin = _run(tr, cells, 14)
    good = [f for f in fin if f.best is not None]
    assert len(good) == 4
    labels = sorted(f.best.det.label for f in good)
    assert labels == [1, 2, 3, 4]


def test_velocity_learned_when_configured_value_is_off():
    tr = Tracker(TrackConfig(expected_dx_px=50.0))  # true flow 58.8 (+17.6 %)
    cells = [(5.0 - 75 * k, 40.0 + (k % 3 - 1) * 12, 1.0) for k in range(40)]
    fin = _run(tr, cells, 60)
    good = [f for f in fin if f.best is not None]
    assert len(good) == 40
    assert abs(tr.flow_dx - 58.8) < 2.0


def test_entry_edge_cell_counts_once():
    tr = Tracker()
    # first seen cut by the entry edge, then fully inside
    dets0 = [_det(0, 4.0)]
    dets0[0].touch = "l"
    out = tr.update(0, dets0)
    out += tr.update(1, [_det(1, 62.8)])
    out += tr.update(2, [_det(2, 121.6)])
    out += tr.update(3, [_det(3, 180.4)])
    out += tr.update(4, [_det(4, 239.2)])
    out += tr.flush()
    assert len(out) == 1 and out[0].best is not None and out[0].n_instances == 5


def test_rejected_instances_give_one_rejected_track():
    tr = Tracker()
    out = []
    for f in range(5):
        out += tr.update(f, [_det(f, 5 + 58.8 * f, reason="doublet")])
    out += tr.flush()
    assert len(out) == 1
    assert out[0].best is None and out[0].reason == "doublet"


def test_missed_frame_is_bridged():
    tr = Tracker(TrackConfig(max_missed=1))
    out = tr.update(0, [_det(0, 30.0)])
    out += tr.update(1, [_det(1, 88.8)])
    out += tr.update(2, [])  # detection missed
    out += tr.update(3, [_det(3, 206.4)])
    out += tr.flush()
    assert len(out) == 1 and out[0].n_instances == 3


def test_stationary_object_rejected_once():
    tr = Tracker()
    out = []
    for f in range(20):
        out += tr.update(f, [_det(f, 120.0, cy=30.0)])
    out += tr.flush()
    assert len(out) == 1
    assert out[0].reason == "stationary"


def test_bounds_max_open_and_max_age():
    tr = Tracker(TrackConfig(max_open=3, max_age_frames=5))
    out = tr.update(0, [_det(0, 120.0, cy=float(y)) for y in (10, 25, 40, 55, 70)])
    assert tr.n_open == 3
    assert sum(f.reason == "overflow" for f in out) == 2
    for f in range(1, 6):
        out += tr.update(f, [_det(f, 120.0, cy=float(y)) for y in (40, 55, 70)])
    assert any(f.end == "age" for f in out)
    assert tr.n_open <= 3
