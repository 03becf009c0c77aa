"""The in-process acquisition pipeline against ground truth.

The short simulated run here (~600 frames, ~180 fully crossing objects) checks yield,
duplicates, traceability and phase error with the real simulator and reconstruction; the
>= 10,000-cell run is ``benchmarks/bench_acquire.py`` (numbers in its output).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from leukoflow.acquisition.pipeline import AcquisitionPipeline, PipelineConfig, TruthScorer
from leukoflow.acquisition.sim import SimConfig
from leukoflow.acquisition.sim.flow import CellTruth
from leukoflow.acquisition.sources import create_source
from leukoflow.acquisition.sources.base import RawFrame
from leukoflow.core.config import build
from leukoflow.core.physics import PIXEL_UM


def _synthetic(n_frames=40, dx=58.8, seed=0):
    """Wrapped phase frames with hemispherical cells moving along +x (no simulator)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:80, :256]
    cells = [dict(id=k, y=40.0 + (-10 if k % 2 else 10), x=-20.0 - 75.0 * k, r=13.0,
                  v=dx * (1 + 0.05 * ((k % 3) - 1)), peak=2.0 + 1.5 * (k % 3)) for k in range(8)]
    for f in range(n_frames):
        ph = np.zeros((80, 256))
        truth = []
        for c in cells:
            c["x"] += c["v"]
            r2 = ((yy - c["y"]) ** 2 + (xx - c["x"]) ** 2) / c["r"] ** 2
            ph += np.where(r2 < 1, c["peak"] * np.sqrt(np.clip(1 - r2, 0, 1)), 0)
            if -c["r"] < c["x"] < 256 + c["r"]:
                inside = c["r"] <= c["x"] <= 256 - c["r"]
                truth.append(CellTruth(c["id"], "lymphocyte", 3, c["y"], c["x"], 26 * PIXEL_UM,
                                       inside))
        ph += rng.normal(0, 0.02, ph.shape)
        yield f, np.angle(np.exp(1j * ph)).astype(np.float32), truth, ph


def test_synthetic_phase_frames_each_cell_once():
    pipe = AcquisitionPipeline()
    sc = TruthScorer()
    for f, wrapped, truth, _ in _synthetic():
        res = pipe.process_phase(f, wrapped, truth=truth)
        sc.observe_truth(truth)
        sc.observe_cells(res.cells)
    sc.observe_cells(pipe.flush().cells)
    s = sc.summary()
    assert s["full_crossing"]["n"] == 8
    assert s["full_crossing"]["exactly_one"] == 8
    assert s["duplicates"] == 0 and s["traceable_rate"] == 1.0
    assert pipe.accounting()["cells_emitted"] == 8


def test_bad_frames_are_rejected_and_counted_pipeline_keeps_going():
    src = create_source("sim", seed=5, n_frames=6)
    src.open()
    pipe = AcquisitionPipeline(background=src.background)
    good = [src.read() for _ in range(6)]
    bad = {"wrong_size": np.zeros((10, 10), np.uint8),
           "non_finite": np.full((320, 1024), np.nan, np.float32),
           "all_zero": np.zeros((320, 1024), np.uint8),
           "saturated": np.full((320, 1024), 255, np.uint8)}
    for i, img in enumerate(bad.values()):
        res = pipe.process(RawFrame(100 + i, 0.0, 0, img))
        assert res.frame_reject is not None and not res.cells
    for raw in good:
        assert pipe.process(raw).frame_reject is None
    acc = pipe.accounting()
    assert acc["frames_rejected"] == dict.fromkeys(bad, 1)
    assert acc["frames"] == 6


def test_params_record_every_stage():
    src = create_source("sim", seed=5, n_frames=1)
    src.open()
    pipe = AcquisitionPipeline(build(PipelineConfig, {"segment.threshold": 0.3}),
                               background=src.background)
    p = pipe.params
    assert p["pipeline"]["segment"]["threshold"] == 0.3
    assert p["segmenter"].startswith("thresh:")
    assert p["reconstruct"]["sideband"] is not None
    assert p["pixel_um"] == pytest.approx(0.34)
    assert {"gates", "tracker", "crops", "optics"} <= set(p)


@pytest.mark.slow
def test_simulated_run_yield_duplicates_phase_error_traceability():

    # the former dense default (1.5 objects per field): many coincidences per frame
    src = create_source("sim", seed=21, config=SimConfig(seed=21, concentration=1.5))
    src.open()
    pipe = AcquisitionPipeline(background=src.background)
    sc = TruthScorer(pixel_um=pipe.pixel_um, true_phase=src.true_phase)
    labels: dict[int, tuple[int, str]] = {}
    emitted = []
    for _ in range(600):
        raw = src.read()
        res = pipe.process(raw)
        for t in raw.truth:
            labels[t.cell_id] = (t.label, t.kind)
        sc.observe_truth(raw.truth)
        sc.observe_cells(res.cells)
        emitted += res.cells
    last = pipe.flush(600)
    sc.observe_cells(last.cells)
    emitted += last.cells
    s = sc.summary()
    assert s["full_crossing"]["n"] > 150
    # cells not merged with a neighbour in every frame: exactly one crop each
    leuko = s["resolvable_leukocytes"]
    assert leuko["n"] > 100
    assert leuko["yield_exactly_one"] >= 0.97  # 157 cells here; 10,000 in the benchmark
    assert s["duplicate_rate"] <= 0.02
    # crop vs sim.true_phase at the same place, inside the cell masks
    assert s["phase_rmse_rad"] <= 0.05
    # every emitted cell traces to a simulated object, with that object's label and kind
    assert s["traceable_rate"] == 1.0
    for c in emitted:
        assert (c.label, c.kind) == labels[c.truth_id]
    ids = [c.cell_id for c in emitted]
    assert len(set(ids)) == len(ids)
    # accounting: every finished track is either emitted or rejected with a reason
    acc = pipe.accounting()
    assert acc["cells_emitted"] == len(emitted)
    assert all(isinstance(k, str) and v > 0 for k, v in acc["cells_rejected"].items())
    assert Counter(c.crop.phase.shape for c in emitted) == {(64, 64): len(emitted)}
