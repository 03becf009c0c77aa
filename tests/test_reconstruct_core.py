"""Unit tests of the reconstruction building blocks (filters, sideband, fast path, backends,
unwrap, background fits, configuration, errors) on small synthetic holograms."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from leukoflow.acquisition.reconstruct import (
    FILTERS,
    RECON_BACKENDS,
    OffAxisConfig,
    Reconstructor,
    find_sideband_rfft,
    find_sideband_shifted,
    fit_background,
    resolve_filter_radius,
    unwrap_phase,
)
from leukoflow.acquisition.reconstruct.filters import get_filter, qpretrieve_filter_array
from leukoflow.acquisition.reconstruct.synth import synthetic_hologram
from leukoflow.core.config import resolve
from leukoflow.core.physics import DEFAULT_OPTICS

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import qpretrieve
    from qpretrieve.filter import get_filter_array
    from qpretrieve.fourier import FFTFilterNumpy


@pytest.fixture(scope="module")
def small():
    """4 frames of 64×256 with two cells, on the default carrier."""
    return synthetic_hologram((64, 256), n_frames=4, seed=3)


def test_registries_list_all_names():
    assert FILTERS.names() == ["disk", "smooth disk", "gauss", "square", "smooth square",
                               "tukey"]
    assert set(RECON_BACKENDS.names()) == {"numpy", "torch"}
    with pytest.raises(KeyError, match="available"):
        get_filter("triangle")


@pytest.mark.parametrize("name", ["disk", "smooth disk", "gauss", "square", "smooth square",
                                  "tukey"])
def test_qpretrieve_filter_arrays_match_oracle(name):
    sb = (-0.203125, -0.12109375)
    r = 0.0788
    ours = qpretrieve_filter_array(name, r, sb, 128)
    theirs = get_filter_array(name, r, sb, (128, 128))
    np.testing.assert_allclose(ours, np.asarray(theirs, dtype=np.float64), atol=1e-12)


@pytest.mark.parametrize("name", FILTERS.names())
def test_grid_filters_peak_centred_and_bounded(name):
    f = get_filter(name)
    d = (np.arange(-32, 33) / 128.0)
    w = f.weights(d.reshape(-1, 1), d.reshape(1, -1), 0.1)
    assert w.shape == (65, 65)
    assert w.max() == pytest.approx(1.0) and w.min() >= 0
    assert w[32, 32] == pytest.approx(1.0, abs=0.02)
    # symmetric about the centre, ~0 beyond the declared support
    np.testing.assert_allclose(w, w[::-1, ::-1], atol=1e-9)
    far = np.hypot(d.reshape(-1, 1), d.reshape(1, -1)) > f.support(0.1) * 1.5
    assert w[far].max() < 1e-3


def test_filter_size_units_match_qpretrieve():
    sb = (-0.2, 0.15)
    assert resolve_filter_radius(1 / 3, "sideband distance", sb, 512) == pytest.approx(0.25 / 3)
    assert resolve_filter_radius(20, "frequency index", sb, 512) == pytest.approx(20 / 512)
    assert resolve_filter_radius(0.1, "frequency", sb, 512) == 0.1
    holo = np.random.default_rng(0).random((100, 100))
    oah = qpretrieve.OffAxisHologram(holo, fft_interface=FFTFilterNumpy)
    for size, unit in ((0.4, "sideband distance"), (12.0, "frequency index"),
                       (0.05, "frequency")):
        want = float(oah.compute_filter_size(size, unit, sideband_freq=sb))
        assert resolve_filter_radius(size, unit, sb, oah.fft.shape[-1]) == pytest.approx(want)
    for bad in ((1.2, "sideband distance"), (300, "frequency index"), (0.7, "frequency"),
                (0.1, "furlongs")):
        with pytest.raises(ValueError):
            resolve_filter_radius(bad[0], bad[1], sb, 512)


def test_rfft_sideband_search_equals_shifted_search():
    rng = np.random.default_rng(1)
    for carrier in ((-0.25, 0.25), (-0.203125, -0.12109375), (-0.125, -0.3125)):
        holo, _, _ = synthetic_hologram((128, 128), carrier, noise=0.02, seed=int(rng.integers(9)))
        x = holo.astype(np.float64) - holo.mean()
        a = find_sideband_shifted(np.fft.fftshift(np.fft.fft2(x)))
        b = find_sideband_rfft(np.fft.rfft2(x), 128)
        assert a == b == pytest.approx(carrier, abs=1 / 128)
        assert a[0] < 0
        ref = qpretrieve.OffAxisHologram(holo, fft_interface=FFTFilterNumpy, padding=0)
        ref.run_pipeline()
        assert a == tuple(float(v) for v in ref.pipeline_kws["sideband_freq"])


def test_refined_sideband_off_grid():
    carrier = (-0.2317, 0.1893)
    holo, bg, _ = synthetic_hologram((96, 160), carrier, noise=0.0)
    x = bg.astype(np.float64) - bg.mean()
    sb = find_sideband_rfft(np.fft.rfft2(x), 160, refine=True)
    assert sb == pytest.approx(carrier, abs=0.002)


def _reference_fast_field(frame, rec):
    """Independent implementation: complex fft2, explicit box gather, ifft2."""
    p = rec.params
    hp, wp = p["fft_shape"]
    bh, bw = p["crop_box"]
    sb = rec.sideband
    m0, m1 = round(sb[0] * hp), round(sb[1] * wp)
    x = frame.astype(np.float64) - frame.mean()
    spec = np.fft.fft2(x, s=(hp, wp))
    rows = m0 + np.fft.fftfreq(bh, 1 / bh).astype(int)
    cols = m1 + np.fft.fftfreq(bw, 1 / bw).astype(int)
    box = spec[np.ix_(rows % hp, cols % wp)]
    dfy = (rows / hp - sb[0]).reshape(-1, 1)
    dfx = (cols / wp - sb[1]).reshape(1, -1)
    w = get_filter(rec.config.filter_name).weights(dfy, dfx, p["filter_radius_cycles_per_px"])
    return np.fft.ifft2(box * w) * bh * bw / (hp * wp)


@pytest.mark.parametrize("sideband, kind", [((-0.25, 0.25), "direct"),
                                            ((-0.25, -0.2), "mirror"),
                                            ((-0.25, -0.0625), "mixed"),
                                            ((0.1875, 0.25), "direct")])
def test_fast_field_equals_reference_for_every_gather_kind(sideband, kind):
    holo, _, _ = synthetic_hologram((64, 256), sideband, noise=0.0, seed=5)
    rec = Reconstructor(OffAxisConfig(sideband=sideband, precision="float64",
                                      filter_name="disk"))
    f = rec.raw_field(holo)
    assert rec._plan.kind == kind
    ref = _reference_fast_field(holo, rec)
    np.testing.assert_allclose(f, ref, atol=1e-5 * np.abs(ref).max())


def test_default_geometry_gives_phase_grid_and_accuracy():
    """Default camera ROI 320×1024 and carrier (-0.25, 0.25): 80×256 phase frame at
    4 camera px, cells positive, phase within 0.03 rad RMS of the ground truth."""
    holo, bg, gt = synthetic_hologram(DEFAULT_OPTICS.roi_shape, DEFAULT_OPTICS.carrier, seed=2)
    rec = Reconstructor(OffAxisConfig(), background=bg)
    ph = rec.phase(holo)
    assert ph.shape == DEFAULT_OPTICS.phase_shape == (80, 256)
    assert rec.pixel_scale == (4.0, 4.0)
    assert rec.sideband == pytest.approx(DEFAULT_OPTICS.carrier, abs=0.002)
    p = rec.params
    assert p["filter_radius_cycles_per_px"] == pytest.approx(0.1179, abs=1e-3)
    assert not p["filter_truncated"]
    json.dumps(p)  # serialisable
    truth = gt[::4, ::4]
    e = rec.edge_px
    err = (ph - truth)[e:-e, e:-e]
    assert float(np.sqrt(np.mean(err**2))) < 0.03
    assert ph[int(truth.argmax() // 256), int(truth.argmax() % 256)] > 2.0
    amp = rec.amplitude(holo)
    assert amp.dtype == np.float32 and amp.shape == (80, 256)
    assert 0.8 < float(np.median(amp)) < 1.2


def test_invert_phase_flips_sign(small):
    holo, bg, _ = small
    a = Reconstructor(OffAxisConfig(), background=bg).wrapped_phase(holo[0])
    b = Reconstructor(OffAxisConfig(invert_phase=True), background=bg).wrapped_phase(holo[0])
    np.testing.assert_allclose(a, -b, atol=1e-5)


def test_fast_2d_loop_equals_3d_stack(small):
    holo, bg, _ = small
    rec = Reconstructor(OffAxisConfig(), background=bg)
    stack = rec.field(holo)
    assert stack.shape == (4, 16, 64) and stack.dtype == np.complex64
    for i in range(4):
        assert np.array_equal(rec.field(holo[i]), stack[i])
    ph = rec.phase(holo)
    assert ph.shape == (4, 16, 64)
    np.testing.assert_array_equal(rec.phase(holo[2]), ph[2])


@pytest.mark.parametrize("mode", ["fast", "compatible"])
def test_numpy_and_torch_cpu_backends_agree(small, mode):
    holo, bg, _ = small
    a = Reconstructor(OffAxisConfig(mode=mode), background=bg)
    b = Reconstructor(OffAxisConfig(mode=mode, backend="torch", device="cpu"), background=bg)
    assert a.sideband == b.sideband
    fa, fb = a.field(holo), b.field(holo)
    np.testing.assert_allclose(fa, fb, atol=2e-5 * np.abs(fa).max())
    np.testing.assert_allclose(a.phase(holo), b.phase(holo), atol=1e-4)
    assert b.params["backend"] == "torch" and b.params["device"] == "cpu"


def test_torch_backend_accepts_and_returns_tensors(small):
    import torch

    holo, bg, _ = small
    rec = Reconstructor(OffAxisConfig(backend="torch"), background=bg)
    out = rec.field(torch.from_numpy(holo), to_numpy=False)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.complex64
    np.testing.assert_array_equal(out.numpy(), rec.field(holo))


def test_sideband_detected_once_and_reused(small):
    holo, bg, _ = small
    rec = Reconstructor(OffAxisConfig(sideband_source="hologram"))
    assert not rec.is_calibrated and rec.params["sideband"] is None
    rec.field(holo[0])
    sb = rec.sideband
    rec.field(np.roll(holo[1], 3, axis=1))
    assert rec.sideband == sb
    rec2 = Reconstructor(OffAxisConfig(), background=bg)
    assert rec2.is_calibrated and rec2.params["sideband_source"] == "background"


def test_padding_and_downsample_shapes():
    holo, bg, _ = synthetic_hologram((100, 150), (-0.25, 0.25), seed=1)
    rec = Reconstructor(OffAxisConfig(padding=1.5, downsample=4), background=bg)
    assert rec.field(holo).shape == (25, 38)
    hp, wp = rec.params["fft_shape"]
    assert hp % 4 == 0 and wp % 4 == 0 and hp >= 150 and wp >= 225
    rec1 = Reconstructor(OffAxisConfig(downsample=1), background=bg)
    assert rec1.field(holo).shape == (100, 150)


def test_truncated_filter_is_flagged(small, caplog):
    holo, bg, _ = small
    rec = Reconstructor(OffAxisConfig(filter_size=0.2, filter_size_interpretation="frequency"),
                        background=bg)
    assert rec.params["filter_truncated"] is True


@pytest.mark.parametrize("bad", [
    dict(mode="slow"), dict(filter_name="blob"), dict(filter_size=-1),
    dict(filter_size_interpretation="px"), dict(downsample=0), dict(padding=0.5),
    dict(sideband=(0.7, 0.1)), dict(bg_fit="cubic"), dict(precision="float16"),
])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        OffAxisConfig(**bad)


def test_config_resolves_from_env_and_cli():
    cfg = resolve("reconstruct", OffAxisConfig, {"downsample": 2},
                  toml={"reconstruct": {"filter_name": "gauss"}},
                  env={"LEUKOFLOW_RECONSTRUCT_SIDEBAND": "-0.25,0.25",
                       "LEUKOFLOW_RECONSTRUCT_MODE": "compatible"})
    assert cfg.downsample == 2 and cfg.filter_name == "gauss" and cfg.mode == "compatible"
    assert cfg.sideband == (-0.25, 0.25)


def test_bad_frames_raise_clear_errors(small):
    holo, bg, _ = small
    rec = Reconstructor(OffAxisConfig(), background=bg)
    with pytest.raises(ValueError, match="does not match"):
        rec.field(holo[0, :32])
    nan = holo[0].astype(np.float32)
    nan[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        rec.field(nan)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        rec.field(holo[None])
    with pytest.raises(ValueError, match="dtype"):
        rec.field(holo[0].astype(np.complex64))
    with pytest.raises(ValueError, match="background"):
        Reconstructor(OffAxisConfig(sideband_source="background"))
    with pytest.raises(ValueError, match="square"):
        Reconstructor(OffAxisConfig(mode="compatible", padding=0)).field(holo[0])
    with pytest.raises(RuntimeError, match="CUDA"):
        import torch

        if torch.cuda.is_available():  # pragma: no cover - GPU machines
            raise RuntimeError("CUDA present: nothing to test")
        Reconstructor(OffAxisConfig(backend="torch", device="cuda"))


def test_unwrap_phase_recovers_ramp_and_rebases():
    yy, xx = np.mgrid[0:40, 0:50]
    true = 0.4 * xx + 0.1 * yy + 2 * np.pi * 3
    wrapped = np.angle(np.exp(1j * true))
    un = unwrap_phase(wrapped, rebase="none")
    d = un - true
    assert np.ptp(d) < 1e-9 and abs(d[0, 0] / (2 * np.pi) - round(d[0, 0] / (2 * np.pi))) < 1e-9
    bump = 6 * np.exp(-((yy - 20) ** 2 + (xx - 25) ** 2) / 60.0) + 2 * np.pi
    rb = unwrap_phase(np.angle(np.exp(1j * bump)), rebase="border")
    np.testing.assert_allclose(rb, bump - 2 * np.pi, atol=1e-9)
    stack = unwrap_phase(np.stack([wrapped, wrapped]).astype(np.float32), rebase="median")
    assert stack.shape == (2, 40, 50) and stack.dtype == np.float32
    with pytest.raises(ValueError):
        unwrap_phase(np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        unwrap_phase(np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="rebase"):
        unwrap_phase(wrapped, rebase="top")


def test_fit_background_recovers_polynomials():
    yy, xx = np.mgrid[0:60, 0:80].astype(np.float64)
    poly = 0.3 + 0.01 * xx - 0.02 * yy + 1e-4 * xx**2 + 2e-4 * xx * yy - 1e-4 * yy**2
    cell = 3 * np.exp(-((yy - 30) ** 2 + (xx - 40) ** 2) / 40.0)
    fit = fit_background(cell + poly, "poly2o", border_px=5)
    np.testing.assert_allclose(fit.corrected, cell, atol=1e-4)
    tilt_only = 0.3 + 0.01 * xx - 0.02 * yy
    t = fit_background(cell + tilt_only, "tilt", border_px=3)
    np.testing.assert_allclose(t.background, tilt_only, atol=1e-4)
    o = fit_background(cell + 1.5, "offset", border_px=3, offset="median")
    assert float(np.median(o.corrected[:3])) == pytest.approx(0.0, abs=1e-4)
    s = fit_background(np.stack([cell + poly, cell + 2 * poly]), "poly2o", border_px=5)
    assert s.corrected.shape == (2, 60, 80) and s.coefficients.shape == (2, 6)
    np.testing.assert_allclose(s.corrected[1], cell, atol=2e-4)
    with pytest.raises(ValueError, match="at least"):
        fit_background(cell, "poly2o", border_px=2, mask=np.zeros(cell.shape, bool))
    with pytest.raises(ValueError, match="profile"):
        fit_background(cell, "cubic")


def test_phase_applies_configured_bg_fit(small):
    holo, bg, _ = small
    rec = Reconstructor(OffAxisConfig(bg_fit="tilt", bg_border_px=2), background=bg)
    ph = rec.phase(holo[0])
    plain = rec.phase(holo[0], bg_fit=None)
    assert not np.array_equal(ph, plain)
    expect = fit_background(plain, "tilt", border_px=2).corrected
    np.testing.assert_allclose(ph, expect, atol=1e-6)


def test_set_background_recomputes_field_and_records_pixel_size(small):
    holo, bg, _ = small
    rec = Reconstructor(OffAxisConfig(camera_pixel_um=0.085), background=bg)
    assert rec.params["pixel_size_um"] == pytest.approx(0.34)
    before = rec.field(holo[0])
    sb = rec.sideband
    rec.set_background(np.roll(bg, 1, axis=1))  # shifted fringes = other reference phase
    after = rec.field(holo[0])
    assert rec.sideband == sb
    assert not np.allclose(before, after)
    fresh = Reconstructor(OffAxisConfig(sideband=sb), background=np.roll(bg, 1, axis=1))
    np.testing.assert_allclose(after, fresh.field(holo[0]), atol=1e-5)
    rec.set_background(bg, redetect=True)
    np.testing.assert_allclose(rec.field(holo[0]), before, atol=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        rec.set_background(bg[:32])
