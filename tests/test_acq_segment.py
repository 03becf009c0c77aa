"""Segmentation: dcnum-exact morphology on real flow frames, and phase-frame behaviour."""

from __future__ import annotations

import numpy as np
import pytest

from leukoflow.acquisition.segment import (
    SEGMENTERS,
    ThresholdSegmenter,
    clear_border,
    dcnum_thresh_segmenter,
    disk,
    fill_holes,
    label8,
    opening,
    remove_small,
)

DCNUM_FRAME_PIXELS = [1504, 553, 800, 486, 592, 389, 574, 627, 524, 590, 513]


@pytest.fixture(scope="module")
def dcnum_events(real_data):
    h5py = pytest.importorskip("h5py")
    import hdf5plugin  # noqa: F401  (registers the zstd filter)

    path = real_data / "dcnum-thresh-segmentation" / "dcnum_thresh_example.rtdc"
    with h5py.File(path, "r") as f:
        ev = f["events"]
        return {k: ev[k][:] for k in ("image", "image_bg", "bg_off", "mask", "frame")}


def test_dcnum_masks_reproduced_exactly(dcnum_events):
    ev = dcnum_events
    seg = dcnum_thresh_segmenter()
    frames = np.unique(ev["frame"])
    assert len(frames) == 11
    counts = []
    for fno in frames:
        idx = np.flatnonzero(ev["frame"] == fno)
        i = idx[0]
        corr = ev["image"][i].astype(np.float64) - (ev["image_bg"][i] + ev["bg_off"][i])
        out = seg.segment(corr)
        ref = np.any(ev["mask"][idx] > 0, axis=0)
        assert np.array_equal(out.labels > 0, ref), f"frame {fno} differs"
        assert out.n == len(idx)
        counts.append(int(ref.sum()))
    assert counts == DCNUM_FRAME_PIXELS


def test_dcnum_order_matters(dcnum_events):
    """Opening before hole filling (the wrong order) does not reproduce every frame."""
    ev = dcnum_events
    mismatches = 0
    for fno in np.unique(ev["frame"]):
        idx = np.flatnonzero(ev["frame"] == fno)
        i = idx[0]
        corr = ev["image"][i].astype(np.float64) - (ev["image_bg"][i] + ev["bg_off"][i])
        m = fill_holes(opening(clear_border(corr < -6), 2))
        lab, _ = remove_small(label8(m)[0], 10)
        ref = np.any(ev["mask"][idx] > 0, axis=0)
        mismatches += not np.array_equal(lab > 0, ref)
    assert mismatches > 0


def test_disk_matches_skimage():
    from skimage.morphology import disk as skdisk

    for r in range(0, 6):
        assert np.array_equal(disk(r), skdisk(r).astype(bool))


def test_primitives_small_cases():
    m = np.zeros((12, 12), bool)
    m[0:3, 0:3] = True        # touches top/left
    m[5:10, 5:10] = True      # inner square with a hole
    m[7, 7] = False
    m[10:12, 0:2] = True      # touches bottom/left
    assert clear_border(m, "")[0, 0]
    cb = clear_border(m, "t")
    assert not cb[0:3, 0:3].any() and cb[10:12, 0:2].all()
    cb = clear_border(m)
    assert cb.sum() == 24
    assert fill_holes(cb).sum() == 25
    lab, n = label8(np.eye(4, dtype=bool))  # diagonal: one object with 8-connectivity
    assert n == 1
    lab, n = remove_small(label8(m)[0], 4)
    assert n == 2  # the 2x2 corner object (4 px) is dropped


def test_opening_does_not_erode_from_frame_edge():
    m = np.zeros((20, 20), bool)
    m[:, :8] = True  # object flush with the left edge
    out = opening(m, 2)
    assert out[:, :8].all()


def _disc_phase(shape=(80, 256), centres=((40, 60), (30, 180)), radius=12.0, peak=2.5):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    ph = np.zeros(shape, np.float32)
    for cy, cx in centres:
        r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / radius**2
        ph += np.where(r2 < 1, peak * np.sqrt(np.clip(1 - r2, 0, 1)), 0).astype(np.float32)
    return ph


def test_phase_threshold_finds_discs_and_fills_wraps():
    ph = _disc_phase(peak=5.0)
    wrapped = np.angle(np.exp(1j * ph)).astype(np.float32)  # centre wraps to negative
    rng = np.random.default_rng(0)
    wrapped += rng.normal(0, 0.03, wrapped.shape).astype(np.float32)
    seg = SEGMENTERS.create("thresh", threshold=0.3)
    out = seg.segment(wrapped)
    assert out.n == 2
    true_mask = ph > 0.3
    inter = ((out.labels > 0) & true_mask).sum() / true_mask.sum()
    assert inter > 0.97


def test_segmenter_params_and_errors():
    seg = ThresholdSegmenter(threshold=0.2)
    assert seg.params["threshold"] == 0.2
    assert seg.ppid.startswith("thresh:")
    with pytest.raises(ValueError):
        ThresholdSegmenter(polarity="sideways")
    with pytest.raises(ValueError):
        ThresholdSegmenter(clear_border_edges="x")
    with pytest.raises(ValueError):
        seg.segment(np.zeros((2, 3, 4)))
    nan_img = _disc_phase()
    nan_img[0:5, 0:5] = np.nan
    assert seg.segment(nan_img).n == 2
