"""Crops: size, centring on the phase centroid, padding, per-crop unwrapping."""

from __future__ import annotations

import numpy as np
import pytest

from leukoflow.acquisition.crops import (
    CropConfig,
    CropExtractor,
    has_jumps,
    unwrap_fast,
    unwrap_robust,
    window,
)
from leukoflow.acquisition.features import measure_objects
from leukoflow.acquisition.segment import ThresholdSegmenter
from leukoflow.core.physics import PIXEL_UM


def _cell(shape, cy, cx, r, peak):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / r**2
    return np.where(r2 < 1, peak * np.sqrt(np.clip(1 - r2, 0, 1)), 0.0)


def _crop(phase_true, noise=0.0, offset=0.0, amplitude=False, seed=0):
    rng = np.random.default_rng(seed)
    ph = phase_true + offset + rng.normal(0, noise, phase_true.shape)
    wrapped = np.angle(np.exp(1j * ph)).astype(np.float32)
    seg = ThresholdSegmenter(threshold=0.3).segment(wrapped)
    amp = np.ones_like(wrapped) if amplitude else None
    dets = measure_objects(seg.labels, seg.n, wrapped, amplitude=amp)
    ex = CropExtractor(CropConfig(with_amplitude=amplitude))
    caps = [ex.capture(d, wrapped, seg.labels, amp) for d in dets]
    return [ex.finalize(c) for c in caps], ex


def test_thick_cell_unwrapped_and_background_zero():
    true = _cell((80, 256), 40.3, 120.6, 20, 9.0)  # 9 rad: wraps twice
    (crop,), ex = _crop(true, noise=0.02, offset=0.15)
    assert crop.phase.shape == (64, 64) and crop.phase.dtype == np.float32
    y0, x0, h, w = crop.bbox
    tw, valid = window(true, y0, x0, h, w, 0.0)
    assert valid.all()
    err = crop.phase - tw
    assert np.sqrt(np.mean(err[crop.mask] ** 2)) < 0.03  # offset removed, no 2π jumps
    assert abs(np.median(crop.phase[~crop.mask])) < 0.02
    # centred on the phase centroid
    assert abs(y0 + 32 - 40.3) <= 1 and abs(x0 + 32 - 120.6) <= 1
    assert crop.features["pha_max"] == pytest.approx(9.0, abs=0.15)
    # positions in µm (dclab's pos_x/pos_y): phase-grid px times the pixel size
    assert crop.features["pos_x"] == pytest.approx(120.6 * PIXEL_UM, abs=0.3 * PIXEL_UM)
    assert crop.features["pos_y"] == pytest.approx(40.3 * PIXEL_UM, abs=0.3 * PIXEL_UM)
    assert ex.stats["fast"] + ex.stats["skimage"] == 1


def test_crop_at_frame_edge_is_padded_with_zero():
    true = _cell((80, 256), 22.0, 240.0, 12, 2.0)
    (crop,), _ = _crop(true, amplitude=True)
    y0, x0, h, w = crop.bbox
    assert x0 + w > 256 and y0 < 0  # extends past the frame
    outside = np.zeros((64, 64), bool)
    outside[:, 256 - x0:] = True
    outside[: -y0, :] = True
    assert np.all(crop.phase[outside] == 0.0)
    assert crop.amplitude is not None and np.all(crop.amplitude[outside] == 1.0)


def test_unwrap_fast_rejects_inconsistent_and_robust_handles_it():
    yy, xx = np.mgrid[:64, :64]
    smooth = 0.3 * (xx - 32) + 0.2 * (yy - 32)
    w = np.angle(np.exp(1j * smooth))
    out = unwrap_fast(w)
    assert out is not None
    d = out - smooth
    assert np.allclose(d, d[0, 0], atol=1e-9)
    # a phase vortex (residue) has no consistent unwrapping: fast path must refuse
    vortex = np.arctan2(yy - 31.5, xx - 31.5)
    assert unwrap_fast(vortex) is None
    assert unwrap_robust(vortex).shape == (64, 64)


def test_window_padding():
    a = np.arange(12.0).reshape(3, 4)
    win, valid = window(a, -1, 2, 3, 4, -5.0)
    assert win.shape == (3, 4)
    assert valid.sum() == 4
    assert win[1, 0] == 2.0 and win[0, 0] == -5.0


def test_failed_unwrap_is_detected():

    yy, xx = np.mgrid[:64, :64]
    vortex = np.arctan2(yy - 31.5, xx - 31.5)  # a residue: no unwrapping without a 2π cut
    region = np.ones((64, 64), bool)
    assert has_jumps(unwrap_robust(vortex), region)
    smooth = 0.2 * (xx - 32)
    assert not has_jumps(unwrap_robust(np.angle(np.exp(1j * smooth))), region)
    # masked (padded) pixels are ignored by the robust unwrapper
    valid = xx < 40
    out = unwrap_robust(np.angle(np.exp(1j * smooth)), valid)
    assert np.all(out[~valid] == 0.0)
    d = out[valid] - smooth[valid]
    assert np.allclose(d, d[0], atol=1e-6)


def test_crop_isolates_its_cell_from_a_neighbour():
    """Parts of a neighbouring cell inside the crop window are set to background (0 rad)."""
    true = _cell((80, 256), 40.0, 100.0, 12, 3.0) + _cell((80, 256), 40.0, 128.0, 10, 3.0)
    crops, _ = _crop(true, noise=0.01)
    assert len(crops) == 2
    a = min(crops, key=lambda c: c.bbox[1])  # the left cell
    y0, x0, _, _ = a.bbox
    tw, _ = window(true, y0, x0, 64, 64, 0.0)
    neighbour = tw > 0.5
    neighbour[:, : 128 - 10 - x0 - 4] = False  # only the right cell's pixels
    assert neighbour.sum() > 50  # the neighbour does reach into this crop window
    assert np.all(a.phase[neighbour] == 0.0)
    assert np.sqrt(np.mean((a.phase - tw)[a.mask] ** 2)) < 0.03  # own cell intact
    # isolate_px=0 keeps the neighbour
    wrapped = np.angle(np.exp(1j * true)).astype(np.float32)
    seg = ThresholdSegmenter(threshold=0.3).segment(wrapped)
    dets = measure_objects(seg.labels, seg.n, wrapped)
    ex = CropExtractor(CropConfig(isolate_px=0))
    left = min(dets, key=lambda d: d.cx)
    b = ex.finalize(ex.capture(left, wrapped, seg.labels, None))
    tw_b, _ = window(true, b.bbox[0], b.bbox[1], 64, 64, 0.0)
    nb = (tw_b > 0.5) & ~b.mask
    assert nb.sum() > 50 and np.all(b.phase[nb] > 0.3)
