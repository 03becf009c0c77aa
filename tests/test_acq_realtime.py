"""Keeping up with the camera (issue 15): the camera clock and ring buffer, frames dropped at
the source and counted, the acquisition's frame-rate metrics, and the empty-frame prescreen
(skipped frames lose no cell).

Nothing here depends on the machine's speed: the slow readers are slowed on purpose (a
sleep far longer than a frame interval), so frames are dropped on any machine, and the
assertions are on counts that must agree with each other and with the simulator's truth.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from leukoflow.acquisition.pipeline import (
    CELL_KINDS,
    AcquisitionPipeline,
    PipelineConfig,
    TruthScorer,
)
from leukoflow.acquisition.prescreen import (
    EmptyFramePrescreen,
    PrescreenConfig,
    carrier_spread,
    choose_stride,
)
from leukoflow.acquisition.realtime import RealtimeMonitor
from leukoflow.acquisition.service import AcquireConfig, AcquireService
from leukoflow.acquisition.sim import SimConfig
from leukoflow.acquisition.sources import EndOfStream, FrameClock, StallMonitor, create_source
from leukoflow.acquisition.sources.sim import SimSource
from leukoflow.core import transport
from leukoflow.core.config import build


def test_frame_clock_keeps_the_newest_frames_of_its_ring_buffer():
    clock = FrameClock(rate_hz=1000.0, buffer_frames=4)
    clock.start(time.monotonic_ns() - 100_000_000)  # the camera started 100 ms ago
    idx, lost = clock.next(0, timeout_s=1.0)
    assert idx >= 96 and lost == idx and clock.dropped == lost  # only the newest 4 remain
    assert clock.capture_ns(idx) - clock.t0_ns == pytest.approx(idx * 1e6, abs=1)
    idx2, lost2 = clock.next(idx + 1, timeout_s=1.0)
    assert idx2 == idx + 1 + lost2 and clock.dropped == lost + lost2
    # a reader ahead of the camera waits for the frame (or gets None after its timeout)
    ahead = clock.captured() + 500
    assert clock.next(ahead, timeout_s=0.01) == (None, 0)
    with pytest.raises(ValueError):
        FrameClock(rate_hz=0.0)


def _slow_reads(src: SimSource, n: int, sleep_s: float) -> list:
    out = []
    with src:
        while len(out) < n:
            raw = src.read(timeout_s=1.0)
            if raw is not None:
                out.append(raw)
                time.sleep(sleep_s)
    return out


def test_paced_sim_drops_frames_a_slow_reader_did_not_take_and_says_which():
    dropped_truth: list = []
    src = SimSource(seed=3, rate_hz=500.0, buffer_frames=8,
                    config=SimConfig(seed=3, concentration=1.5))
    src.on_drop = dropped_truth.append
    frames = _slow_reads(src, 12, sleep_s=0.03)  # ~33 frames/s read from a 500 frames/s camera
    idx = [f.index for f in frames]
    assert idx == sorted(idx) and len(set(idx)) == len(idx)
    gaps = [b - a - 1 for a, b in zip(idx, idx[1:], strict=False)]
    assert gaps == [f.dropped_before for f in frames[1:]]
    assert frames[0].dropped_before == idx[0]
    assert src.frames_dropped == sum(f.dropped_before for f in frames) > 0
    # every dropped frame advanced the simulated flow (its truth, no hologram)
    assert len(dropped_truth) == src.frames_dropped
    assert all(fr.hologram is None for fr in dropped_truth)
    assert sorted({fr.index for fr in dropped_truth} | set(idx)) == list(range(idx[-1] + 1))
    # acquisition time is the capture time on the camera clock, not the time of reading
    for f in frames:
        assert f.t_acq_ns == src.clock.capture_ns(f.index)
    assert frames[-1].backlog >= 0


def test_unpaced_sim_never_drops():
    src = create_source("sim", seed=3)
    assert not src.paced and src.nominal_rate_hz == 500.0
    frames = _slow_reads(src, 5, sleep_s=0.03)
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    assert src.frames_dropped == 0 and all(f.dropped_before == 0 for f in frames)


def test_paced_file_replay_drops_and_ends(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.integers(0, 200, (40, 16, 16), dtype=np.uint8))
    src = create_source(f"file:{tmp_path / 'x.npy'}")
    src.open()
    src.pace(1000.0, buffer_frames=2)  # no rate in a .npy: explicit 1,000 frames/s
    assert src.paced and src.nominal_rate_hz == 1000.0
    got = []
    with pytest.raises(EndOfStream):
        while True:
            raw = src.read(timeout_s=1.0)
            if raw is not None:
                got.append(raw)
                time.sleep(0.01)
    assert len(got) + src.frames_dropped == 40
    assert src.frames_dropped > 0
    assert [g.index for g in got] == sorted(g.index for g in got)


def test_stall_monitor_separates_source_drops_from_camera_gaps():
    m = StallMonitor()
    assert m.frame(0) == 0
    assert m.frame(5, explained=4) == 0  # the source dropped 1..4 itself
    assert m.frame(9, explained=1) == 2  # 6..8 missing, only one of them explained
    assert m.dropouts == 1 and m.frames_missing == 2


def test_realtime_monitor_rates_warmup_and_estimate():
    rt = RealtimeMonitor(nominal_hz=500.0, warmup_s=1.0, window_s=2.0)
    assert rt.warming_up(0.0)
    for k in range(300):  # 300 frames taken over 3 s: 100 frames/s, 4 dropped before each
        rt.frame({"overrun": 4}, backlog=7, now=k / 100.0)
    assert not rt.warming_up(3.0)
    assert rt.achieved_hz(now=3.0) == pytest.approx(100.0, rel=0.05)
    assert rt.steady_hz(now=3.0) == pytest.approx(100.0, rel=0.05)
    assert rt.dropped_total == 1200 and rt.dropped_warmup == 400
    s = rt.summary(cells=30, now=3.0)
    assert s["frames_captured"] == 1500 and s["frames_dropped"] == {"overrun": 1200}
    assert s["cells_in_dropped_frames_estimate"] == pytest.approx(30 / 300 * 1200)
    assert s["steady_ratio"] == pytest.approx(0.2, rel=0.05)
    assert RealtimeMonitor(0.0).summary()["paced"] is False


class SlowedService(AcquireService):
    """The acquisition service with a deliberately slow stage (3 ms per frame)."""

    def _account_frame(self, res, src):
        time.sleep(0.003)
        super()._account_frame(res, src)


def test_slowed_acquisition_counts_dropped_frames_and_reports_the_rate():
    """The test-sized version of ``bench realtime``: a paced camera at 1,000 frames/s and a
    pipeline slowed to < 333 frames/s drop frames at the source; the service counts them,
    exports achieved < nominal, and its accounting balances frame by frame."""
    ctx = zmq.Context()
    coll_ep = transport.tcp_endpoint(transport.free_tcp_port())
    coll = transport.make_socket(ctx, "PULL", coll_ep, bind=True)
    crops_ep = transport.tcp_endpoint(transport.free_tcp_port())
    src = SimSource(seed=5, rate_hz=1000.0, buffer_frames=32,
                    config=SimConfig(seed=5, concentration=0.5))
    dropped_truth: list = []
    src.on_drop = dropped_truth.append
    cfg = AcquireConfig(frames=150, metrics_port=0, collector_endpoint=coll_ep,
                        crops_endpoint=crops_ep, warmup_s=0.1)
    svc = SlowedService(cfg, source=src)
    try:
        final = svc.run()
    finally:
        coll.close()
        ctx.term()
    cam = final["camera"]
    assert cam["paced"] and cam["nominal_hz"] == 1000.0
    assert final["frames"] == 150 == cam["frames_taken"]
    n_drop = cam["frames_dropped"]["overrun"]
    assert n_drop == src.frames_dropped == len(dropped_truth) > 0
    assert cam["frames_captured"] == 150 + n_drop
    assert cam["frames_missing"] == 0 and cam["dropouts"] == 0  # explained, not the camera
    assert cam["steady_hz"] < 1000.0 * 0.5
    # CPU per frame (load-robust), the simulated camera's share of it measured apart
    assert cam["cpu_ms_per_frame"] > 0
    assert 0 < cam["source_cpu_ms_per_frame"] < cam["cpu_ms_per_frame"]
    # the dropped frames held cells (truth) and the estimate says so
    assert any(fr.truth for fr in dropped_truth)
    assert cam["cells_in_dropped_frames_estimate"] > 0
    # scored live against the truth, dropped frames included
    seen = {t.cell_id for fr in dropped_truth for t in fr.truth
            if t.fully_inside and t.kind in CELL_KINDS}
    fc = final["truth"]["full_crossing_cells"]
    assert fc["n"] >= len(seen) > 0
    assert fc["exactly_one"] + fc["missed"] + fc["multiple"] == fc["n"]
    expo = svc.metrics.exposition().decode()
    assert f'leukoflow_frames_dropped_total{{reason="overrun"}} {float(n_drop)}' in expo
    assert "leukoflow_frame_rate_nominal_hertz 1000.0" in expo
    achieved = next(float(ln.split()[1]) for ln in expo.splitlines()
                    if ln.startswith("leukoflow_frame_rate_achieved_hertz "))
    assert 0 < achieved < 0.95 * 1000.0  # what LeukoflowFrameRateBelowNominal alerts on


# ---------------------------------------------------------------------------- prescreen
def test_stride_sees_the_fringe_at_spread_phases():
    carrier = (-0.25, 0.25)
    sy, sx = choose_stride(carrier, block=8)
    assert sy * sx > 1 and carrier_spread(carrier, (sy, sx), 8) < 0.2
    assert carrier_spread(carrier, (2, 2), 8) > 0.9  # two fringe phases only: blind spots
    assert choose_stride((0.5, 0.5), block=8, max_stride=1) == (1, 1)


def _run(pipe: AcquisitionPipeline, frames: list, src) -> tuple[dict, list]:
    sc = TruthScorer(pixel_um=pipe.pixel_um, true_phase=src.true_phase)
    cells = []
    for raw in frames:
        res = pipe.process(raw)
        sc.observe_truth(raw.truth)
        sc.observe_cells(res.cells)
        cells += res.cells
    res = pipe.flush(frames[-1].index + 1)
    sc.observe_cells(res.cells)
    return sc.summary(), cells + res.cells


def test_prescreen_skips_empty_frames_and_loses_no_cell():
    src = create_source("sim", seed=7, config=SimConfig(seed=7, concentration=0.3))
    src.open()
    frames = [src.read() for _ in range(600)]
    on = AcquisitionPipeline(background=src.background)
    off = AcquisitionPipeline(build(PipelineConfig, {"prescreen.enabled": False}),
                              background=src.background)
    s_on, c_on = _run(on, frames, src)
    s_off, c_off = _run(off, frames, src)
    empty = sum(1 for f in frames if not f.truth)
    acc = on.accounting()
    assert acc["frames_skipped_empty"] >= 0.8 * empty  # most empty frames skipped
    assert acc["frames_skipped_empty"] <= empty  # never a frame with an object in view
    assert acc["prescreen"]["audit_missed"] == 0 and acc["prescreen"]["audited"] > 0
    assert off.accounting()["frames_skipped_empty"] == 0
    assert len(c_on) == len(c_off) > 10
    assert [c.truth_id for c in c_on] == [c.truth_id for c in c_off]
    for a, b in zip(c_on, c_off, strict=True):
        np.testing.assert_array_equal(a.crop.phase, b.crop.phase)
    assert s_on["phase_rmse_rad"] == s_off["phase_rmse_rad"]
    assert on.params["prescreen"]["stride"] == list(on.prescreen.stride)


def test_prescreen_audit_counts_objects_in_skipped_frames():
    """A prescreen made blind on purpose (threshold far above any object) skips frames with
    cells; the audit processes some of them in full and counts the misses."""
    src = create_source("sim", seed=7, config=SimConfig(seed=7, concentration=1.5))
    src.open()
    pipe = AcquisitionPipeline(build(PipelineConfig, {"prescreen": {"factor": 1e9,
                                                                    "audit_every": 2}}),
                               background=src.background)
    for _ in range(200):
        pipe.process(src.read())
    ps = pipe.accounting()["prescreen"]
    assert ps["audited"] > 0 and ps["audit_missed"] > 0
    blind = EmptyFramePrescreen(PrescreenConfig(factor=1e9), src.background, (-0.25, 0.25))
    assert not blind.has_object(src.read().image)
