"""Per-object features and quality gates on synthetic phase frames."""

from __future__ import annotations

import math

import numpy as np
import pytest

from leukoflow.acquisition.features import (
    Detection,
    measure_objects,
    phase_features,
    refocus_distance_um,
)
from leukoflow.acquisition.gates import REJECT_REASONS, GateConfig, GateCounter, QualityGates
from leukoflow.acquisition.segment import ThresholdSegmenter
from leukoflow.core.physics import dry_mass_pg

PX = 0.34


def _ellipse(shape, cy, cx, ry, rx, peak=2.0):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    return np.where(r2 < 1, peak * np.sqrt(np.clip(1 - r2, 0, 1)), 0.0).astype(np.float32)


def _measure(phase, amplitude=None):
    seg = ThresholdSegmenter(threshold=0.1).segment(phase)
    return measure_objects(seg.labels, seg.n, phase, amplitude=amplitude, pixel_um=PX)


def test_disc_size_shape_and_position():
    ph = _ellipse((80, 256), 40.0, 100.0, 15, 15)
    (d,) = _measure(ph)
    # threshold 0.1 of a 2.0 rad hemisphere: radius 15*sqrt(1-0.05^2)
    r_exp = 15 * math.sqrt(1 - 0.05**2)
    assert d.diameter_um == pytest.approx(2 * r_exp * PX, rel=0.03)
    assert d.area_um == pytest.approx(math.pi * (r_exp * PX) ** 2, rel=0.05)
    assert (d.cy, d.cx) == pytest.approx((40.0, 100.0), abs=0.1)
    assert d.eccentricity < 0.2
    assert d.solidity > 0.95
    assert d.n_peaks == 1
    assert d.touch == ""
    assert math.isnan(d.amp_std)
    assert d.focus > 0


def test_ellipse_eccentricity():
    (d,) = _measure(_ellipse((80, 256), 40, 100, 10, 20))
    assert d.eccentricity == pytest.approx(math.sqrt(1 - 0.25), abs=0.03)


def test_touching_pair_is_a_doublet_single_is_not():
    ph = _ellipse((80, 256), 40, 100, 14, 14) + _ellipse((80, 256), 40, 126, 14, 14)
    (d,) = _measure(ph)
    assert d.n_peaks == 2 or d.solidity < 0.85
    gates = QualityGates()
    assert gates.reason(d) == "doublet"
    (single,) = _measure(_ellipse((80, 256), 40, 100, 14, 14))
    assert gates.reason(single) is None


def test_border_contact_flags():
    ph = _ellipse((80, 256), 8, 100, 14, 14) + _ellipse((80, 256), 40, 5, 14, 14)
    dets = sorted(_measure(ph), key=lambda d: d.cx)
    assert "l" in dets[0].touch and dets[0].touches_flow_edge
    assert "t" in dets[1].touch and dets[1].touches_channel_wall
    assert QualityGates().reason(dets[1]) == "channel_border"
    # a cell cut by the entry edge is not called a doublet (its shape is incomplete)
    assert QualityGates().reason(dets[0]) != "doublet"


def test_amplitude_focus_metric_flags_defocus():
    ph = _ellipse((80, 256), 40, 100, 15, 15)
    amp = np.ones_like(ph)
    (d,) = _measure(ph, amp)
    assert d.amp_std == pytest.approx(0.0, abs=1e-6)
    yy, xx = np.mgrid[:80, :256]
    rings = 1 + 0.5 * np.cos(np.hypot(yy - 40, xx - 100) * 1.3)
    (d2,) = _measure(ph, rings.astype(np.float32))
    assert d2.amp_std > 0.25
    assert QualityGates().reason(d2) == "out_of_focus"


def test_phase_features_dry_mass():
    ph = _ellipse((64, 64), 32, 30, 12, 12, peak=3.0)
    mask = ph > 0
    f = phase_features(ph, mask, pixel_um=PX)
    s = float(ph[mask].sum())
    assert f["pha_int"] == pytest.approx(s, rel=1e-6)
    assert f["dm_pg"] == pytest.approx(dry_mass_pg(s, PX), rel=1e-6)
    assert f["pha_max"] == pytest.approx(3.0, abs=0.05)
    assert (f["phase_cy"], f["phase_cx"]) == pytest.approx((32, 30), abs=0.05)
    empty = phase_features(ph, np.zeros_like(mask))
    assert math.isnan(empty["dm_pg"])


def _det(**kw):
    base = dict(label=1, frame=0, cy=40.0, cx=100.0, bbox=(30, 90, 20, 20), area_px=700,
                area_um=80.0, diameter_um=10.0, eccentricity=0.3, solidity=0.98, n_peaks=1,
                focus=1.0, amp_std=0.02, touch="")
    base.update(kw)
    return Detection(**base)


@pytest.mark.parametrize("kw,reason", [
    ({}, None),
    ({"area_um": 3.0}, "too_small"),
    ({"area_um": 400.0}, "too_large"),
    ({"touch": "b"}, "channel_border"),
    ({"solidity": 0.7}, "doublet"),
    ({"n_peaks": 2}, "doublet"),
    ({"eccentricity": 0.97}, "doublet"),
    ({"amp_std": 0.5}, "out_of_focus"),
])
def test_gate_reasons(kw, reason):
    assert QualityGates().reason(_det(**kw)) == reason


def test_gate_counter_and_config():
    g = QualityGates(GateConfig(min_focus=2.0))
    dets = g.apply([_det(), _det(area_um=1.0), _det(focus=0.5)])
    cnt = GateCounter()
    cnt.add(dets)
    assert cnt == {"too_small": 1, "out_of_focus": 2}
    assert set(REJECT_REASONS) >= {d.reason for d in dets if d.reason}
    assert g.config.to_dict()["min_focus"] == 2.0


@pytest.mark.parametrize("dz_um", [-3.0, -1.5, 0.0, 1.5, 3.0])
def test_refocus_distance_against_a_propagated_cell(dz_um):
    """The TIE focus distance undoes a known defocus (angular-spectrum propagation)."""
    from skimage.restoration import unwrap_phase

    from leukoflow.acquisition.sim.optics import angular_spectrum
    from leukoflow.core.physics import DEFAULT_OPTICS as O

    cell = _ellipse((96, 96), 48.0, 48.0, 13, 15, peak=2.5).astype(np.float64)
    field = angular_spectrum(np.exp(1j * cell), dz_um, PX, O.wavelength_um, O.medium_index)
    phase = unwrap_phase(np.angle(field))
    phase -= np.median(phase[:8])
    est = refocus_distance_um(phase, np.abs(field), cell > 0.1, pixel_um=PX,
                              wavelength_um=O.wavelength_um, medium_index=O.medium_index)
    # propagating the field by the estimate brings it back into focus: est = -dz
    assert est == pytest.approx(-dz_um, abs=0.15 + 0.15 * abs(dz_um))
    assert math.isnan(refocus_distance_um(phase, None, cell > 0.1))
