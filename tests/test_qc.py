"""Reference-particle QC (#16): sphere fit, bead QC runs, records, policy, scale correction.

Every number is checked against ground truth: the simulator's certified beads and
magnification, a synthetic sphere, and qpsphere's fit of the real microgel-bead image in
``../shared/data/real/qpimage-examples``.
"""

from __future__ import annotations

import datetime as dt
import importlib.resources
import json
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from leukoflow.acquisition.pipeline import AcquisitionPipeline, PipelineConfig
from leukoflow.acquisition.qc.measure import QCConfig, run_qc
from leukoflow.acquisition.qc.record import QCError, enforce, qc_status, write_record
from leukoflow.acquisition.qc.scale import rescale_crop
from leukoflow.acquisition.qc.sphere import fit_sphere_phase, sphere_model, tilt_corrected
from leukoflow.acquisition.sources import create_source

REAL = Path(__file__).resolve().parents[2] / "shared/data/real/qpimage-examples"
BEADS_NPZ = REAL / "phase_beads_close.npz"


def test_sphere_fit_recovers_a_noisy_sphere():
    rng = np.random.default_rng(0)
    img = sphere_model((72, 80), 35.3, 41.7, 18.4, 2.7, 0.04) + rng.normal(0, 0.03, (72, 80))
    f = fit_sphere_phase(img)
    assert f.success
    assert (f.cy, f.cx) == pytest.approx((35.3, 41.7), abs=0.05)
    assert f.radius_px == pytest.approx(18.4, rel=0.003)
    assert f.peak_rad == pytest.approx(2.7, rel=0.005)
    # index from the peak: A = 2π/λ·Δn·2R -> Δn
    n = f.index(0.34, 0.53, 1.335)
    assert n == pytest.approx(1.335 + 2.7 * 0.53 / (4 * np.pi * 18.4 * 0.34), abs=2e-4)
    with pytest.raises(ValueError):
        fit_sphere_phase(np.zeros((32, 32)))


def _qpsphere():
    """Import qpsphere 0.5.9, which imports ``pkg_resources`` (removed from setuptools >= 81,
    the version in this environment) only to locate its bundled Mie binaries: a two-line
    stand-in with ``resource_filename`` lets it import; the projection fit does not use it."""
    if "pkg_resources" not in sys.modules:
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            shim = types.ModuleType("pkg_resources")
            shim.resource_filename = lambda pkg, name: str(importlib.resources.files(pkg) / name)
            sys.modules["pkg_resources"] = shim
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import qpimage
        import qpsphere
    return qpimage, qpsphere


@pytest.mark.skipif(not BEADS_NPZ.is_file(), reason="real bead image not available")
def test_real_bead_fit_agrees_with_qpsphere():
    qpimage, qpsphere = _qpsphere()
    ph = tilt_corrected(np.load(BEADS_NPZ)["phase"].astype(np.float64))
    lam, px, nm = 0.55, 0.14, 1.335  # same assumptions for both fits
    ours = fit_sphere_phase(ph, fit_radius=1e9)  # whole image, as qpsphere's image fit
    qpi = qpimage.QPImage(data=ph, which_data="phase",
                          meta_data={"wavelength": lam * 1e-6, "pixel size": px * 1e-6,
                                     "medium index": nm})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n_ref, r_ref, c_ref = qpsphere.analyze(qpi, r0=ours.radius_px * px * 1e-6,
                                               method="image", model="projection",
                                               ret_center=True)
    r_ref_px = r_ref / (px * 1e-6)
    assert 40 < r_ref_px < 55  # sanity: the bead is ~47 px in radius
    assert ours.radius_px == pytest.approx(r_ref_px, rel=0.01)
    assert ours.index(px, lam, nm) == pytest.approx(n_ref, abs=5e-4)
    assert (ours.cy, ours.cx) == pytest.approx(tuple(c_ref), abs=1.0)


def test_qc_on_nominal_beads_recovers_diameter_and_index():
    res = run_qc(create_source("sim:21:0.3:beads"), QCConfig(n_beads=40))
    b = res["beads"]
    assert res["passed"], res["failed_checks"]
    assert b["measured"] >= 38
    # certified 8.0 µm, n = 1.370 (simulator truth); the QC states ±1 % and ±0.001
    assert b["diameter_nominal_scale_um"] == pytest.approx(8.0, rel=0.01)
    assert b["index"] == pytest.approx(1.370, abs=1e-3)
    assert res["scale"]["magnification"] == pytest.approx(1.0, abs=0.01)
    assert abs(res["focus_um"]) < 0.3
    assert b["dry_mass_pg"] == pytest.approx(b["dry_mass_expected_pg"], rel=0.05)


@pytest.mark.parametrize("profile, mag", [("mag+5", 1.05), ("mag-5", 0.95)])
def test_qc_measures_a_magnification_change(profile, mag):
    res = run_qc(create_source(f"sim:22:0.3:{profile},beads"), QCConfig(n_beads=40))
    assert res["passed"], res["failed_checks"]
    assert res["scale"]["magnification"] == pytest.approx(mag, abs=0.008)
    assert res["scale"]["pixel_um"] == pytest.approx(0.34 / mag, rel=0.008)
    assert res["beads"]["index"] == pytest.approx(1.370, abs=1e-3)  # index needs the scale


def test_qc_fails_out_of_focus():
    res = run_qc(create_source("sim:23:0.3:defocus2um,beads"), QCConfig(n_beads=25))
    assert not res["passed"] and "focus" in res["failed_checks"]
    assert res["focus_um"] == pytest.approx(2.0, abs=0.4)  # simulator: 2 ± 0.3 µm


def _rec(passed: bool, pixel: float = 0.33) -> dict:
    return {"passed": passed, "failed_checks": [] if passed else ["focus"],
            "scale": {"pixel_um": pixel, "magnification": 0.34 / pixel}}


def test_records_and_policy(tmp_path):
    cfg = QCConfig(folder=str(tmp_path), policy="refuse")
    st = qc_status(cfg)
    assert st.state == "none" and st.pixel_um is None and st.refuse
    with pytest.raises(QCError, match="no QC record"):
        enforce(st)
    assert qc_status(QCConfig(folder=str(tmp_path), policy="warn")).refuse is False
    write_record(_rec(True, 0.3238), tmp_path)
    st = enforce(qc_status(cfg))
    assert st.state == "pass" and st.pixel_um == pytest.approx(0.3238) and st.ok
    write_record(_rec(False, 0.36), tmp_path)  # newest failed: refuse, keep the last scale
    st = qc_status(cfg)
    assert st.state == "failed" and st.pixel_um == pytest.approx(0.3238) and st.refuse
    assert "focus" in st.message
    write_record(_rec(True, 0.3300), tmp_path)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=30)
    st = qc_status(cfg, now=later)
    assert st.state == "expired" and st.refuse and st.pixel_um == pytest.approx(0.33)
    (tmp_path / "qc-zzz-broken.json").write_text("{not json")
    assert qc_status(cfg).state == "pass"  # an unreadable file is skipped
    st = qc_status(QCConfig(folder=str(tmp_path), policy="off"))
    assert st.state == "off" and st.ok and st.pixel_um is None


def test_rescale_crop_matches_rendering_at_the_target_pixel():
    # a sphere seen at 0.34/1.05 µm px, resampled to 0.34 µm, equals the sphere at 0.34 µm
    r_um, a = 4.0, 2.5
    src = sphere_model((64, 64), 31.5, 31.5, r_um / (0.34 / 1.05), a)
    want = sphere_model((64, 64), 31.5, 31.5, r_um / 0.34, a)
    got = rescale_crop(src.astype(np.float32), 0.34 / 1.05, 0.34)
    assert got.shape == (64, 64) and got.dtype == np.float32
    assert np.abs(got - want).max() < 0.35  # the sphere edge is not band-limited
    assert np.abs(got - want).mean() < 0.01
    f = fit_sphere_phase(got)
    assert f.radius_px == pytest.approx(r_um / 0.34, rel=0.01)
    mask = rescale_crop(src > 0, 0.34 / 1.05, 0.34, order=0)
    assert mask.dtype == bool and abs(mask.sum() - (want > 0).sum()) < 0.05 * (want > 0).sum()


def test_pipeline_with_qc_scale_measures_true_size():
    """mag+5: at the nominal scale beads measure 5 % too large; with the QC pixel they
    measure their certified size and the crops come back at the model's pixel."""
    def diam(pixel_um: float) -> tuple[float, float]:
        src = create_source("sim:24:0.3:mag+5,beads")
        src.open()
        pipe = AcquisitionPipeline(PipelineConfig(pixel_um=pixel_um))
        pipe.set_background(src.background)
        cells = []
        for _ in range(500):
            cells += pipe.process(src.read()).cells
        assert len(cells) >= 15
        d = float(np.median([c.crop.features["diameter_um"] for c in cells]))
        r = float(np.median([fit_sphere_phase(c.crop.phase).radius_px for c in cells]))
        return d, r

    d_nom, r_nom = diam(0.0)
    d_qc, r_qc = diam(0.34 / 1.05)
    assert d_nom / d_qc == pytest.approx(1.05, rel=0.01)
    assert r_nom / r_qc == pytest.approx(1.05, rel=0.015)  # crops resampled to 0.34 µm
    assert r_qc * 0.34 * 2 == pytest.approx(8.0, rel=0.015)


def test_qc_cli(tmp_path):
    from leukoflow.cli import app

    r = CliRunner().invoke(app, ["qc", "status", "--folder", str(tmp_path), "--policy",
                                 "refuse"])
    assert r.exit_code == 1 and "none" in r.output
    r = CliRunner().invoke(app, ["qc", "run", "--source", "sim:25", "--beads", "40",
                                 "--folder", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["passed"] and Path(res["record"]).is_file()
    r = CliRunner().invoke(app, ["qc", "status", "--folder", str(tmp_path), "--json",
                                 "--policy", "refuse"])
    assert r.exit_code == 0 and json.loads(r.output)["state"] == "pass"
    if BEADS_NPZ.is_file():
        r = CliRunner().invoke(app, ["qc", "fit", str(BEADS_NPZ), "--pixel-um", "0.14",
                                     "--wavelength-um", "0.55", "--json"])
        assert r.exit_code == 0, r.output
        assert 44 < json.loads(r.output)["radius_px"] < 50
