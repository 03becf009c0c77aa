"""The batched device acquisition path (issue 15), run with torch on the CPU: every device
function against its NumPy/SciPy counterpart, and the whole batched pipeline against the
CPU pipeline on the same simulated frames (same cells, same crops). The same code runs on
CUDA in ``tests/test_cuda.py`` (lent GPU only)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

torch = pytest.importorskip("torch")

from leukoflow.acquisition import batched as B  # noqa: E402
from leukoflow.acquisition.features import measure_objects  # noqa: E402
from leukoflow.acquisition.pipeline import AcquisitionPipeline  # noqa: E402
from leukoflow.acquisition.segment import (  # noqa: E402
    ThresholdSegmenter,
    clear_border,
    fill_holes,
    opening,
)
from leukoflow.acquisition.sim import SimConfig  # noqa: E402
from leukoflow.acquisition.sources import create_source  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def frames():
    """Dense simulated frames (3 objects per field: coincidences, doublets, edge cells)."""
    src = create_source("sim", seed=3, config=SimConfig(seed=3, concentration=3.0))
    src.open()
    pipe = AcquisitionPipeline(background=src.background)
    ph, am = [], []
    for _ in range(24):
        f = pipe.reconstructor.field(src.read().image)
        ph.append(np.angle(f).astype(np.float32))
        am.append(np.abs(f).astype(np.float32))
    return np.stack(ph), np.stack(am), pipe.pixel_um


def test_components_match_scipy_labels_on_random_masks():
    rng = np.random.default_rng(0)
    m = rng.random((6, 40, 96)) < 0.55  # percolating tangles: long, winding components
    _, lab8 = B.components(torch.from_numpy(m), conn8=True)
    _, lab4 = B.components(torch.from_numpy(m), conn8=False)
    for i in range(len(m)):
        np.testing.assert_array_equal(lab8[i].numpy(), ndi.label(m[i], np.ones((3, 3)))[0])
        np.testing.assert_array_equal(lab4[i].numpy(), ndi.label(m[i])[0])


def test_morphology_matches_the_cpu_functions():
    rng = np.random.default_rng(1)
    m = rng.random((4, 40, 96)) < 0.5
    t = torch.from_numpy(m)
    for i in range(len(m)):
        np.testing.assert_array_equal(B.fill_holes(t)[i].numpy(), fill_holes(m[i]))
        np.testing.assert_array_equal(B.opening(t, 2)[i].numpy(), opening(m[i], 2))
        np.testing.assert_array_equal(B.clear_border(t, "tl")[i].numpy(),
                                      clear_border(m[i], "tl"))


def test_segmentation_matches_the_thresh_segmenter(frames):
    ph, _, _ = frames
    for kw in ({}, {"offset": "median", "clear_border_edges": "lr", "threshold": 0.4}):
        seg = ThresholdSegmenter(**kw)
        labels, counts = B.segment_batch(torch.from_numpy(ph), **{
            "fill": True, "opening_radius": 2, "max_small_px": 10, **kw})
        n = 0
        for i in range(len(ph)):
            s = seg.segment(ph[i])
            n += s.n
            assert int(counts[i]) == s.n
            np.testing.assert_array_equal(labels[i].numpy(), s.labels)
        assert n > 30  # the frames hold objects


def test_object_measurements_match_measure_objects(frames):
    ph, am, pixel_um = frames
    labels, counts = B.segment_batch(torch.from_numpy(ph))
    table = B.measure_batch(labels, counts, torch.from_numpy(ph), torch.from_numpy(am))
    seg = ThresholdSegmenter()
    concave = 0
    for i in range(len(ph)):
        s = seg.segment(ph[i])
        ref = measure_objects(s.labels, s.n, ph[i], amplitude=am[i], frame=i,
                              pixel_um=pixel_um)
        got = B.detections_from_table(table, np.flatnonzero(table.frame == i), i,
                                      ph[i].shape, pixel_um, labels_host=s.labels)
        assert len(got) == len(ref)
        for a, b in zip(ref, got, strict=True):
            assert (a.label, a.bbox, a.area_px, a.touch, a.n_peaks) == \
                (b.label, b.bbox, b.area_px, b.touch, b.n_peaks)
            assert a.solidity == b.solidity  # exact convex hull (Pick) on the device
            concave += a.solidity < 0.95
            for k in ("cy", "cx", "eccentricity", "focus", "amp_std", "area_um"):
                assert getattr(b, k) == pytest.approx(getattr(a, k), rel=1e-5, abs=1e-9), k
    assert concave > 0  # the host-side peak test was exercised


def test_batched_pipeline_gives_the_cpu_pipelines_cells():
    src = create_source("sim", seed=5, config=SimConfig(seed=5, concentration=1.5))
    src.open()
    raws = [src.read() for _ in range(160)]
    raws[7].image = np.zeros_like(raws[7].image)  # a bad frame in a batch: rejected alone
    cpu = AcquisitionPipeline(background=src.background)
    dev = B.BatchedPipeline(background=src.background, device="cpu")
    res_c = [cpu.process(r) for r in raws] + [cpu.flush(len(raws))]
    res_d = []
    for i in range(0, len(raws), 48):
        res_d += dev.process_batch(raws[i:i + 48])
    res_d.append(dev.flush(len(raws)))
    cells_c = [c for r in res_c for c in r.cells]
    cells_d = [c for r in res_d for c in r.cells]
    assert len(cells_c) > 20
    assert [c.truth_id for c in cells_d] == [c.truth_id for c in cells_c]
    for a, b in zip(cells_c, cells_d, strict=True):
        assert a.crop.bbox == b.crop.bbox
        np.testing.assert_allclose(b.crop.phase, a.crop.phase, atol=1e-4)
    acc_c, acc_d = cpu.accounting(), dev.accounting()
    for k in ("frames_rejected", "cells_rejected", "splits", "cells_emitted"):
        assert acc_d[k] == acc_c[k], k
    assert acc_d["frames_rejected"] == {"all_zero": 1}
    assert dev.params["device"]["batched"] and dev.batch_stats["batches"] == 4


def test_acquire_service_batches_frames_on_the_device_path():
    """``device`` torch-cpu: the service collects frames into device batches (here 16 or
    20 ms) and accounts for every one of them like the frame-by-frame CPU service."""
    import zmq

    from leukoflow.acquisition.service import AcquireConfig, AcquireService
    from leukoflow.core import transport

    finals = {}
    for device in ("cpu", "torch-cpu"):
        ctx = zmq.Context()
        coll_ep = transport.tcp_endpoint(transport.free_tcp_port())
        coll = transport.make_socket(ctx, "PULL", coll_ep, bind=True)
        cfg = AcquireConfig(source="sim:5:1.5", frames=80, metrics_port=0,
                            collector_endpoint=coll_ep, as_fast_as_possible=True,
                            crops_endpoint=transport.tcp_endpoint(transport.free_tcp_port()),
                            device=device, batch_frames=16)
        svc = AcquireService(cfg)
        try:
            finals[device] = svc.run()
        finally:
            coll.close()
            ctx.term()
        if device != "cpu":
            assert svc.pipeline.batch_stats["frames"] == 80
            assert svc.pipeline.batch_stats["batches"] >= 5
    a, b = finals["cpu"], finals["torch-cpu"]
    assert b["frames"] == a["frames"] == 80
    assert b["cells_total"] == a["cells_total"] > 0
    assert b["cells_rejected"] == a["cells_rejected"]
    assert b["detections"] == a["detections"]


def test_gpu_acquire_benchmark_script_runs_on_the_cpu():
    """``benchmarks/gpu_acquire.py`` (the gpu_check.sh row) on the CPU, small: it measures
    and checks agreement with the CPU pipeline."""
    from leukoflow.benchmarks.gpu_acquire import run

    res = run(device="cpu", frames=48, batch=24, check_frames=48, cpu_frames=24)
    assert res["agreement_cell_ids"] == 1.0 and res["cells_cpu"] > 0
    assert res["pipeline_frames_per_s"] > 0 and res["device_frames_per_s"] > 0
    assert {r["stage"] for r in res["rows"]} >= {"acquisition on device, whole pipeline"}
