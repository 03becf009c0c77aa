"""Simulated instrument: phase models, optics, hologram formation and flow (acceptance tests).

Everything runs the real simulator; nothing is mocked. The ideal demodulation is written
out here with numpy alone (FFT, crop the (H/4)×(W/4) box around the sideband, inverse FFT,
divide by the background field) so it checks ``leukoflow.acquisition.sim`` independently.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from leukoflow.acquisition.sim import (
    OBJECT_MODELS,
    FlowSimulator,
    SimConfig,
    angular_spectrum,
    fourier_upsample,
    reference_demodulate,
)
from leukoflow.acquisition.sim.flow import render_context
from leukoflow.acquisition.sim.render import RenderContext
from leukoflow.core.physics import DEFAULT_OPTICS
from leukoflow.core.vocabulary import CLASS_NAMES, OOD_KINDS

CTX = RenderContext()
K0 = 2 * math.pi / DEFAULT_OPTICS.wavelength_um
PX = DEFAULT_OPTICS.pixel_um

#: Plausible peak phase of a leukocyte at 530 nm [rad]: a 7-17 µm cell with index step
#: 0.02-0.05 gives 2π/λ·Δn·t ≈ 1.6-10 rad; we require every cell in [1.5, 8] rad.
PEAK_BOUNDS_RAD = (1.5, 8.0)


def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2 * np.pi) - np.pi


def ideal_demodulate(holo: np.ndarray, carrier=(-0.25, 0.25), d: int = 4) -> np.ndarray:
    """Independent numpy version: fftshift, crop a box at the sideband, ifft."""
    hh, ww = holo.shape
    h, w = hh // d, ww // d
    spec = np.fft.fftshift(np.fft.fft2(holo.astype(np.float64)))
    cy, cx = hh // 2 + int(round(carrier[0] * hh)), ww // 2 + int(round(carrier[1] * ww))
    box = spec[cy - h // 2:cy + h // 2, cx - w // 2:cx + w // 2]
    return np.fft.ifft2(np.fft.ifftshift(box))


@pytest.fixture(scope="module")
def cells() -> dict[str, list]:
    out = {}
    for k in CLASS_NAMES:
        model = OBJECT_MODELS.get(k)()
        rng = np.random.default_rng(CLASS_NAMES.index(k))
        out[k] = [model.render(rng, CTX) for _ in range(120)]
    return out


@pytest.fixture(scope="module")
def flow_run():
    sim = FlowSimulator(SimConfig(seed=5, concentration=1.5))  # dense: many cells per frame
    frames = list(sim.frames(240))
    return sim, frames


# ------------------------------------------------------------------------ phase models

def test_class_size_statistics_match_config(cells):
    for k, objs in cells.items():
        model = OBJECT_MODELS.get(k)()
        mean, sd = model.diameter_moments()
        d = np.array([o.diameter_um for o in objs])
        assert d.min() >= 6.5 and d.max() <= 17.0
        assert abs(d.mean() - mean) < 4 * sd / math.sqrt(len(d)) + 0.05, k
        assert 0.6 * sd < d.std() < 1.3 * sd, k
        # size measured from the rendered phase (mask > 0.25 rad) agrees with the drawn one
        d_eq = np.array([2 * math.sqrt((o.phase > 0.25).sum() * PX**2 / math.pi) for o in objs])
        assert np.median(np.abs(d_eq - d)) < 0.6, k


def test_class_phase_statistics_match_refractive_indices(cells):
    for k, objs in cells.items():
        ratios = []
        for o in objs:
            p = o.params
            # integrated phase of the cytoplasm ellipsoid: k0 (n_c - n_m) (4/3) π a b c
            v = 4.0 / 3.0 * math.pi * (p["diameter_um"] / 2) ** 2 * p["half_height_um"]
            body = K0 * (p["n_cytoplasm"] - DEFAULT_OPTICS.medium_index) * v
            ratios.append(o.phase.sum() * PX**2 / body)
            assert 1.356 <= p["n_cytoplasm"] <= 1.370
            assert p["n_cytoplasm"] < p["n_nucleus"] <= 1.395
        ratios = np.array(ratios)
        # the nucleus (higher index) adds 5-60 %, vacuoles/texture subtract a little
        assert 0.95 < np.median(ratios) < 1.6, (k, np.median(ratios))
        assert ratios.min() > 0.85, k


def test_leukocyte_phase_peak_plausible_for_wavelength(cells):
    peaks = {k: np.array([o.phase.max() for o in objs]) for k, objs in cells.items()}
    for k, p in peaks.items():
        assert PEAK_BOUNDS_RAD[0] <= p.min() and p.max() <= PEAK_BOUNDS_RAD[1], (k, p.min(),
                                                                                  p.max())
        assert 2.5 < p.mean() < 6.0, k
    # larger cells carry more phase: monocytes above lymphocytes on average
    assert peaks["monocyte"].mean() > peaks["lymphocyte"].mean()


def test_phase_maps_are_smooth_and_zero_at_border(cells):
    for objs in cells.values():
        for o in objs[:20]:
            ph = o.phase
            assert ph.dtype == np.float32
            assert np.abs(np.concatenate([ph[0], ph[-1], ph[:, 0], ph[:, -1]])).max() < 1e-3
            gy, gx = np.gradient(ph)
            assert np.hypot(gy, gx).max() < 1.5  # rad/px: well below aliasing (π)


def test_ood_models_render_every_kind():
    rng = np.random.default_rng(0)
    for kind in OOD_KINDS:
        objs = [OBJECT_MODELS.get(kind)().render(rng, CTX) for _ in range(4)]
        for o in objs:
            assert o.kind == kind and o.label == -1
            assert np.isfinite(o.phase).all() and o.phase.max() > 0.1
    ery = [OBJECT_MODELS.get("erythrocyte")().render(rng, CTX) for _ in range(30)]
    assert {o.params["shape"] for o in ery} == {"biconcave", "sphered"}
    bic = [o for o in ery if o.params["shape"] == "biconcave"]
    assert all(6.9 <= o.diameter_um <= 8.6 for o in bic)
    # biconcave: the centre is thinner than the rim
    for o in bic:
        c = o.phase.shape[0] // 2
        assert o.phase[c - 1:c + 2, c - 1:c + 2].mean() < 0.8 * o.phase.max()
    plt = [OBJECT_MODELS.get("platelet")().render(rng, CTX) for _ in range(10)]
    assert all(2.0 <= o.diameter_um <= 3.0 and o.phase.max() < 1.0 for o in plt)


def test_defocused_cells_expose_distance():
    cfg = SimConfig(defocus_um=(5.0, 10.0))
    ctx = render_context(cfg)
    rng = np.random.default_rng(3)
    objs = [OBJECT_MODELS.get("defocus")().render(rng, ctx) for _ in range(6)]
    for o in objs:
        assert 5.0 <= abs(o.defocus_um) <= 10.0
        assert o.amplitude is not None
        assert np.abs(o.amplitude - 1).max() > 0.05  # defocus turns phase into amplitude


def test_angular_spectrum_round_trip_and_energy():
    rng = np.random.default_rng(0)
    obj = OBJECT_MODELS.get("neutrophil")().render(rng, CTX)
    f = np.exp(1j * np.pad(obj.phase, 16).astype(np.float64))
    g = angular_spectrum(f, 8.0, PX, 0.53, 1.335)
    back = angular_spectrum(g, -8.0, PX, 0.53, 1.335)
    assert np.abs(back - f).max() < 1e-6
    assert abs(np.sum(np.abs(g) ** 2) / np.sum(np.abs(f) ** 2) - 1) < 1e-6
    assert np.abs(angular_spectrum(np.ones((32, 32)), 5.0, PX, 0.53, 1.335) - 1).max() < 1e-9


def test_fourier_upsample_passes_through_samples_and_is_band_limited():
    rng = np.random.default_rng(1)
    a = (rng.standard_normal((20, 24)) + 1j * rng.standard_normal((20, 24))).astype(np.complex64)
    up = fourier_upsample(a, 4)
    assert up.shape == (80, 96)
    assert np.abs(up[::4, ::4] - a).max() < 1e-4
    spec = np.fft.fft2(up)
    fy = np.abs(np.fft.fftfreq(80) * 80)
    fx = np.abs(np.fft.fftfreq(96) * 96)
    outside = (fy[:, None] > 10) | (fx[None, :] > 12)
    assert np.abs(spec[outside]).max() < 1e-3 * np.abs(spec).max()


# ------------------------------------------------------------------ holograms and flow

def test_frames_have_expected_format_and_no_saturation(flow_run):
    sim, frames = flow_run
    assert sim.background.shape == (320, 1024) and sim.background.dtype == np.uint8
    for fr in frames[:50]:
        assert fr.hologram.shape == (320, 1024) and fr.hologram.dtype == np.uint8
        assert 0 < fr.hologram.min() and fr.hologram.max() < 255
    assert [fr.index for fr in frames] == list(range(len(frames)))
    assert frames[1].t_s == pytest.approx(1 / 500)
    # static background (fringes, illumination, dust rings) identical in frames and in the
    # background hologram wherever no object is drawn; only camera noise differs
    for fr in frames[:20]:
        free = np.ones((320, 1024), bool)
        for fo, y0, x0 in fr.placements:
            h, w = fo.cam_shape
            free[max(y0, 0):max(y0 + h, 0), max(x0, 0):max(x0 + w, 0)] = False
        assert free.sum() > 100_000
        a = fr.hologram[free].astype(float)
        b = sim.background[free].astype(float)
        assert np.corrcoef(a, b)[0, 1] > 0.99
        assert 1.0 < np.std(a - b) < 4.0  # sqrt(2) x (shot + read + rounding) noise
    assert sim.background.std() > 20  # fringes present


def test_demodulation_reproduces_true_phase(flow_run):
    """Ideal demodulation with the known carrier: < 0.05 rad RMS inside cells."""
    sim, frames = flow_run
    bg = ideal_demodulate(sim.background)
    checked = 0
    yy, xx = np.mgrid[:80, :256]
    for fr in frames[:80]:
        cells = [c for c in fr.truth if c.fully_inside and c.label >= 0]
        if not cells:
            continue
        field = ideal_demodulate(fr.hologram) / bg
        truth = sim.true_phase(fr)
        err = _wrap(np.angle(field) - truth)
        for c in cells:
            r = 0.5 * c.diameter_um / PX
            m = ((yy - c.y_px) ** 2 + (xx - c.x_px) ** 2 < r**2) & (truth > 0.25)
            assert m.sum() > 50
            rms = float(np.sqrt(np.mean(err[m] ** 2)))
            assert rms < 0.05, (c, rms)
            assert truth[m].max() > 1.5  # a real cell, not a sliver
            checked += 1
        # the module's reference implementation agrees with the independent one
        ref = reference_demodulate(fr.hologram, sim.background)
        assert np.abs(_wrap(ref - np.angle(field))).max() < 1e-3
        # far from every object the phase is flat (background removed)
        far = truth == 0
        assert np.sqrt(np.mean(err[far] ** 2)) < 0.05
        # ... while without the background division the static artefacts are visible
        assert np.std(np.angle(ideal_demodulate(fr.hologram))[far]) > 0.05
    assert checked >= 20


def test_truth_positions_are_phase_centroids(flow_run):
    sim, frames = flow_run
    n = 0
    for fr in frames[:60]:
        inside = [c for c in fr.truth if c.fully_inside]
        if len(fr.truth) != 1 or not inside:
            continue
        c = inside[0]
        truth = sim.true_phase(fr)
        w = np.clip(truth, 0, None)
        cy = (w.sum(1) @ np.arange(80)) / w.sum()
        cx = (w.sum(0) @ np.arange(256)) / w.sum()
        assert abs(cy - c.y_px) < 0.15 and abs(cx - c.x_px) < 0.15
        n += 1
    assert n >= 3


def test_qpretrieve_sees_carrier_and_positive_phase(flow_run):
    sim, frames = flow_run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optional FFT backends missing
        import qpretrieve

        fr = next(f for f in frames if any(c.fully_inside and c.label >= 0 for c in f.truth))
        holo = qpretrieve.OffAxisHologram(data=fr.hologram.astype(float))
        field = np.squeeze(holo.field)  # runs the default pipeline incl. the sideband search
        fy, fx = holo.pipeline_kws["sideband_freq"]
        assert (fy, fx) == pytest.approx((-0.25, 0.25), abs=1e-3)
        bg = qpretrieve.OffAxisHologram(data=sim.background.astype(float), **holo.pipeline_kws)
        pha = np.angle(field / np.squeeze(bg.field))[::4, ::4]
    truth = sim.true_phase(fr)
    m = truth > 0.5
    assert np.sqrt(np.mean(_wrap(pha - truth)[m] ** 2)) < 0.1
    assert np.sqrt(np.mean(_wrap(-pha - truth)[m] ** 2)) > 0.5  # sign is not inverted


def test_each_cell_fully_visible_in_three_consecutive_frames(flow_run):
    sim, frames = flow_run
    seen: dict[int, list[int]] = {}
    kind: dict[int, str] = {}
    for fr in frames:
        for c in fr.truth:
            kind[c.cell_id] = c.kind
            if c.fully_inside:
                seen.setdefault(c.cell_id, []).append(fr.index)
    first = {cid: min(v) for cid, v in seen.items()}
    complete = [cid for cid in seen if 0 < first[cid] and max(seen[cid]) < len(frames) - 1
                and kind[cid] in CLASS_NAMES]
    assert len(complete) >= 30
    for cid in complete:
        idx = seen[cid]
        assert idx == list(range(idx[0], idx[0] + len(idx)))  # consecutive
        assert len(idx) >= 3, (cid, kind[cid], idx)
    # ids are unique and increase with arrival
    order = []
    for fr in frames:
        for c in fr.truth:
            if c.cell_id not in order:
                order.append(c.cell_id)
    assert order == sorted(order)


def test_flow_speed_concentration_and_lateral_position(flow_run):
    sim, frames = flow_run
    speeds = {c.cell_id: c.speed_um_s for fr in frames for c in fr.truth}
    v = np.array(list(speeds.values()))
    assert v.min() >= 9000 - 1e-6 and v.max() <= 11000 + 1e-6
    # displacement between frames equals speed / frame rate on the phase grid
    last: dict[int, float] = {}
    for fr in frames[:40]:
        for c in fr.truth:
            if c.cell_id in last:
                dx = c.x_px - last[c.cell_id]
                assert dx == pytest.approx(c.speed_um_s / 500 / PX, abs=0.3)
            last[c.cell_id] = c.x_px
    centres = [sum(0 <= c.x_px < 256 for c in fr.truth) for fr in frames]
    assert 0.9 < np.mean(centres) < 2.3  # configured 1.5 in the field on average
    ys = np.array([c.y_px for fr in frames for c in fr.truth])
    assert abs(np.median(ys) - 40) < 3


def test_ood_kinds_present_with_configured_fractions():
    fr = dict.fromkeys(OOD_KINDS, 0.07)
    sim = FlowSimulator(SimConfig(seed=2, concentration=6.0, ood_fractions=fr))
    kinds: dict[int, str] = {}
    for f in sim.frames(200):
        for c in f.truth:
            kinds[c.cell_id] = c.kind
    n = len(kinds)
    assert n > 250
    for k in OOD_KINDS:
        obs = sum(v == k for v in kinds.values())
        sd = math.sqrt(n * 0.07 * 0.93)
        assert abs(obs - n * 0.07) < 4 * sd, (k, obs, n)
    leuk = sum(v in CLASS_NAMES for v in kinds.values())
    assert abs(leuk - n * 0.51) < 4 * math.sqrt(n * 0.25)
    labels = {c.label for f in [sim.next_frame()] for c in f.truth}
    assert labels <= {-1, 0, 1, 2, 3}


def test_config_validation_and_round_trip():
    cfg = SimConfig(seed=4, concentration=2.0)
    again = SimConfig.from_dict(cfg.to_dict())
    assert again == cfg
    for bad in ({"concentration": 0}, {"class_fractions": {"basophil": 1.0}},
                {"ood_fractions": {"erythrocyte": 1.5}}, {"speed_spread": 1.5}):
        with pytest.raises(ValueError):
            SimConfig(**bad)
    with pytest.raises(ValueError):
        next(FlowSimulator(SimConfig()).frames(-1))
