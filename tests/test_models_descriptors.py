"""Physical phase descriptors (models.descriptors) and the detectors built on them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from leukoflow.acquisition.sim.cells import OBJECT_MODELS
from leukoflow.acquisition.sim.render import RenderContext
from leukoflow.models.architectures import ARCHITECTURES
from leukoflow.models.descriptors import (
    NAMES,
    DescriptorConfig,
    PhaseDescriptors,
    density_to_delta_n,
    describe,
)
from leukoflow.models.export import convert_onnx_fp16, export_onnx, onnx_session
from leukoflow.models.ood import DETECTORS, auroc
from leukoflow.models.ood.descriptor_based import surprise

PX = 0.34
WL = 0.530
K0 = 2 * math.pi / WL


def _sphere(d_um: float, dn: float, n: int = 64) -> np.ndarray:
    """Phase [rad] of a homogeneous sphere (diameter d, index increment dn), centred."""
    c = (n - 1) / 2 + 0.3
    yy, xx = np.mgrid[:n, :n] * PX
    r2 = (yy - c * PX) ** 2 + (xx - c * PX) ** 2
    t = 2 * np.sqrt(np.clip((d_um / 2) ** 2 - r2, 0, None))
    return (K0 * dn * t).astype(np.float32)


@pytest.mark.parametrize("d_um,dn", [(7.0, 0.03), (10.0, 0.02), (6.5, 0.055)])
def test_sphere_descriptors_recover_size_and_refractive_index(d_um, dn):
    f = describe(_sphere(d_um, dn), PX)[0]
    col = dict(zip(NAMES, f, strict=True))
    area = math.exp(col["log_area"])
    # object threshold 0.15 rad trims a thin edge: area within 4 % of pi d^2 / 4
    assert area == pytest.approx(math.pi * d_um**2 / 4, rel=0.04)
    assert math.exp(col["log_peak"]) == pytest.approx(K0 * dn * d_um, rel=0.02)
    assert density_to_delta_n(col["log_density"], WL) == pytest.approx(dn, rel=0.05)
    # sphere profile: centre ~ peak, rim band 0.5-0.8 r_eq ~ mean of sqrt(1 - r^2) there
    assert col["centre_to_peak"] > 0.95
    assert 0.65 < col["rim_to_peak"] < 0.80


def test_biconcave_disc_has_a_rim_higher_than_its_centre():
    ctx = RenderContext(pixel_um=PX, wavelength_um=WL)
    rng = np.random.default_rng(3)
    model = OBJECT_MODELS.get("erythrocyte")()
    model.sphered_fraction = 0.0
    ob = model.render(rng, ctx)
    crop = np.zeros((64, 64), np.float32)
    h, w = ob.phase.shape
    crop[32 - h // 2:32 - h // 2 + h, 32 - w // 2:32 - w // 2 + w] = ob.phase
    col = dict(zip(NAMES, describe(crop, PX)[0], strict=True))
    assert col["rim_to_peak"] > col["centre_to_peak"] + 0.1


def test_spherocytes_are_denser_than_lymphocytes():
    """The physics the detector relies on: a spherocyte's dry-mass density exceeds a
    lymphocyte's, while their sizes overlap (why the learned features miss it)."""
    ctx = RenderContext(pixel_um=PX, wavelength_um=WL)
    rng = np.random.default_rng(0)
    rbc = OBJECT_MODELS.get("erythrocyte")()
    rbc.sphered_fraction = 1.0
    lym = OBJECT_MODELS.get("lymphocyte")()

    def crops(model, n):
        out = np.zeros((n, 64, 64), np.float32)
        for i in range(n):
            p = model.render(rng, ctx).phase
            h, w = p.shape
            out[i, 32 - h // 2:32 - h // 2 + h, 32 - w // 2:32 - w // 2 + w] = p
        return out

    fr, fl = describe(crops(rbc, 60), PX), describe(crops(lym, 60), PX)
    i = NAMES.index("log_density")
    assert auroc(fl[:, i], fr[:, i]) > 0.9
    assert auroc(fl[:, 0], fr[:, 0]) < 0.5  # spherocytes are not larger


def test_empty_noise_and_saturated_crops_stay_finite():
    rng = np.random.default_rng(0)
    x = np.stack([np.zeros((64, 64)), rng.normal(0, 0.05, (64, 64)),
                  np.full((64, 64), 4.0), -np.ones((64, 64))]).astype(np.float32)
    f = describe(x, PX)
    assert f.shape == (4, len(NAMES)) and np.isfinite(f).all()


def test_config_is_validated_and_recorded():
    with pytest.raises(ValueError):
        DescriptorConfig(rim_band=(0.8, 0.5))
    with pytest.raises(ValueError):
        DescriptorConfig(rel_threshold=1.5)
    d = DescriptorConfig().to_dict()
    assert DescriptorConfig(**json.loads(json.dumps(d))) == DescriptorConfig()


@pytest.mark.parametrize("arch", ["lenet5", "lenet5_vi"])
def test_descriptors_change_features_not_logits_or_weights(arch):
    torch.manual_seed(0)
    m = ARCHITECTURES.create(arch, in_size=64, num_classes=4).eval()
    keys = set(m.state_dict())
    x = torch.randn(5, 1, 64, 64)
    with torch.no_grad():
        z0, f0 = m.forward_with_features(x)
        m.attach_descriptors(PhaseDescriptors(64, 0.3, 0.7, PX))
        z1, f1 = m.forward_with_features(x)
    assert set(m.state_dict()) == keys  # weights files stay interchangeable
    assert m.n_descriptors == len(NAMES)
    torch.testing.assert_close(z0, z1)
    assert f1.shape == (5, f0.shape[1] + len(NAMES))
    torch.testing.assert_close(f1[:, :f0.shape[1]], f0)
    ref = describe(x[:, 0].numpy() * 0.7 + 0.3, PX)
    np.testing.assert_allclose(f1[:, f0.shape[1]:].numpy(), ref, rtol=1e-5, atol=1e-5)
    m.attach_descriptors(None)
    assert m.n_descriptors == 0


def _blobs(n, rng, scale):
    """Features of a toy 'network': 10 learned + 7 descriptor columns, 3 classes."""
    y = rng.integers(0, 3, n)
    learned = rng.normal(size=(n, 10)) + y[:, None]
    desc = rng.normal(size=(n, 7)) * scale + y[:, None] * 0.5
    return np.hstack([learned, desc]), y


def test_feature_sets_select_columns():
    rng = np.random.default_rng(0)
    f, y = _blobs(400, rng, 1.0)
    z = rng.normal(size=(400, 3))
    maha = DETECTORS.create("mahalanobis").fit(z, f, y, n_descriptors=7)
    assert maha.arrays["means"].shape == (3, 10)
    desc = DETECTORS.create("descriptors").fit(z, f, y, n_descriptors=7)
    assert desc.arrays["means"].shape == (3, 7) and desc.arrays["precisions"].shape == (3, 7, 7)
    with pytest.raises(ValueError, match="no phase descriptors"):
        DETECTORS.create("descriptors").fit(z, f, y)
    # a model without descriptors keeps the old behaviour (all columns)
    assert DETECTORS.create("mahalanobis").fit(z, f, y).arrays["means"].shape == (3, 17)


def test_combined_detects_what_either_member_sees_and_keeps_the_id_pass_rate():
    rng = np.random.default_rng(1)
    f_tr, y_tr = _blobs(3000, rng, 0.3)
    f_va, _ = _blobs(2000, rng, 0.3)
    f_te, _ = _blobs(2000, rng, 0.3)
    z = np.zeros((3000, 3))
    det = DETECTORS.create("combined").fit(z, f_tr, y_tr, n_descriptors=7)
    det.fit_threshold(det.score(z[:2000], f_va), 0.05)
    id_pass = (det.score(z[:2000], f_te) <= det.threshold).mean()
    assert 0.93 <= id_pass <= 0.97
    # OOD only in the descriptors (learned features normal), and only in the learned part
    o1, _ = _blobs(300, rng, 0.3)
    o1[:, 10:] += 2.0
    o2, _ = _blobs(300, rng, 0.3)
    o2[:, :10] += 4.0
    s_id = det.score(z[:2000], f_te)
    for o in (o1, o2):
        assert auroc(s_id, det.score(z[:300], o)) > 0.95
    maha = det.members()[0]
    assert auroc(maha.score(z[:2000], f_te), maha.score(z[:300], o1)) < 0.6  # blind to o1
    # pickle-free round trip through JSON params + arrays
    d = det.to_dict()
    back = DETECTORS.get("combined").from_dict(
        {**json.loads(json.dumps({"params": d["params"], "threshold": d["threshold"]})),
         "arrays": d["arrays"]})
    np.testing.assert_array_equal(back.score(z[:300], o1), det.score(z[:300], o1))


def test_surprise_is_monotone_continuous_and_nan_safe():
    ref = np.quantile(np.random.default_rng(0).normal(size=5000), np.linspace(0, 1, 257))
    s = np.linspace(-6, 12, 4001)
    u = surprise(s, ref, 5000)
    assert np.all(np.diff(u) >= -1e-12) and np.isfinite(u).all()
    assert u[-1] > -math.log(1 / 5001) + 1  # beyond the reference: still increasing
    assert surprise(np.array([np.nan]), ref, 5000)[0] == np.inf
    # p-value meaning: about 5 % of reference-distributed scores exceed -ln(0.05)
    x = np.random.default_rng(1).normal(size=20000)
    assert abs((surprise(x, ref, 5000) > -math.log(0.05)).mean() - 0.05) < 0.01


def test_descriptors_survive_fp16_onnx(tmp_path):
    """FP16 engines (the FP16 ONNX fallback, TensorRT FP16) compute the descriptor graph in
    half precision: large, dense objects must not overflow it (means, not sums)."""

    torch.manual_seed(0)
    m = ARCHITECTURES.create("lenet5", in_size=64, num_classes=4).eval()
    mean, std = 0.4, 0.9
    m.attach_descriptors(PhaseDescriptors(64, mean, std, PX))
    p16 = convert_onnx_fp16(export_onnx(m, tmp_path / "a.onnx", 64), tmp_path / "a16.onnx")
    crops = np.stack([_sphere(20.0, 0.06), _sphere(8.0, 0.03), _sphere(12.0, 0.05),
                      np.zeros((64, 64), np.float32)])
    assert crops.max() > 12  # a 20 um sphere of dn 0.06: ~14 rad over most of the crop
    x = ((crops - mean) / std)[:, None].astype(np.float32)
    got = onnx_session(p16).run(["features"], {"crops": x})[0][:, -len(NAMES):]
    ref = describe(crops, PX)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, atol=0.03)


def test_descriptor_detector_skips_classes_without_enough_cells():
    rng = np.random.default_rng(3)
    f, y = _blobs(300, rng, 1.0)
    y[y == 2] = 0
    y[:5] = 2  # class 2: 5 cells < 7 descriptors + 1
    det = DETECTORS.create("descriptors").fit(np.zeros((300, 3)), f, y, n_descriptors=7)
    assert det.params["classes"] == [0, 1] and det.params["classes_skipped"] == [2]
    assert det.arrays["means"].shape == (2, 7) and np.isfinite(det.score(None, f)).all()
    with pytest.raises(ValueError, match="no class"):
        DETECTORS.create("descriptors").fit(np.zeros((6, 3)), f[:6], y[:6], n_descriptors=7)
