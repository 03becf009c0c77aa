"""Batched LIME: agreement with captum.attr.Lime, surrogate, kernel, segmentation, fusion."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from leukoflow.benchmarks.workload_explain import toy_crops
from leukoflow.explain.lime_batched import (
    LimeParams,
    cosine_kernel,
    explain_many,
    explain_one,
    fuse,
    lime_coefficients,
    sample_masks,
    weighted_ridge,
)
from leukoflow.explain.model import ModelBundle
from leukoflow.explain.segmentation import SlicParams, cell_mask, multi_slic, slic_segments


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    from leukoflow.models.architectures import LeNet5

    torch.manual_seed(3)
    return ModelBundle.from_module(LeNet5(), mean=0.5, std=0.6, temperature=1.3)


@pytest.fixture(scope="module")
def crops() -> tuple[np.ndarray, np.ndarray]:
    return toy_crops(2, seed=5)


def test_segments_are_contiguous_with_background_zero(crops):
    x = crops[0][0]
    segs, mask = multi_slic(x, SlicParams(n_segments=(25, 50, 100)))
    assert mask.sum() > 200 and not mask[0, 0]
    for s in segs:
        ids = np.unique(s)
        assert ids[0] == 0 and np.array_equal(ids, np.arange(len(ids)))  # 0..K-1
        assert (s[~mask] == 0).all() and (s[mask] > 0).all()
    # finer n_segments gives more superpixels
    assert segs[0].max() < segs[1].max() < segs[2].max()


def test_cell_mask_picks_centre_object_and_handles_blank():
    x = np.zeros((64, 64), np.float32)
    x[28:38, 28:38] = 2.0
    x[0:5, 0:5] = 3.0  # a corner fragment must not win
    m = cell_mask(x)
    assert m[32, 32] and not m[2, 2]
    blank = cell_mask(np.zeros((64, 64)))
    assert blank[32, 32] and blank.sum() < 64 * 64 / 4
    s = slic_segments(np.zeros((64, 64)), 25, blank)
    ids = np.unique(s)
    assert np.array_equal(ids, np.arange(len(ids))) and (s[~blank] == 0).all()


def test_kernel_values():
    z = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]])
    w = cosine_kernel(z, 0.25).numpy()
    assert w[0] == pytest.approx(1.0)
    assert w[1] == pytest.approx(np.sqrt(np.exp(-1 / 0.0625)))
    d = 1 - np.sqrt(1 / 4)
    assert w[2] == pytest.approx(np.sqrt(np.exp(-d ** 2 / 0.0625)))


def test_weighted_ridge_equals_sklearn():
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    z = (rng.random((200, 12)) < 0.5).astype(np.float64)
    y = z @ rng.normal(size=12) + rng.normal(0, 0.1, 200)
    w = rng.random(200)
    coef, icpt, r2 = weighted_ridge(torch.as_tensor(z), torch.as_tensor(y), torch.as_tensor(w), 1.0)
    ref = Ridge(alpha=1.0).fit(z, y, sample_weight=w)
    np.testing.assert_allclose(coef.numpy(), ref.coef_, rtol=1e-8, atol=1e-10)
    assert icpt == pytest.approx(ref.intercept_)
    assert r2 == pytest.approx(ref.score(z, y, sample_weight=w))


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_batched_lime_agrees_with_captum_lime(bundle, crops, engine):
    """Same masks, same perturbation samples, same kernel and ridge surrogate as Captum.

    ``onnxruntime`` is the CPU engine of :func:`explain_many` (windowed trunk)."""
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import Lime

    x = crops[0][1]
    params = LimeParams(n_samples=300)
    segs, _ = multi_slic(x, SlicParams(n_segments=(25, 50)))
    for m, seg in enumerate(segs):
        k = int(seg.max()) + 1
        z = sample_masks(k, params.n_samples, 0.5, np.random.default_rng(m))
        ours, _, _, _ = lime_coefficients(bundle.module, x, seg, z, 1, params, engine=engine)

        def perturb(_inp, _z=z, **_kw):
            for row in _z:  # Captum draws exactly our samples, in order
                yield torch.as_tensor(row[None]).long()

        def similarity(_orig, _pert, interp, **_kw):
            return float(cosine_kernel(interp, params.kernel_width)[0])

        def forward(inp):
            return torch.softmax(bundle.module(inp), dim=1)[:, 1]

        lime = Lime(forward, interpretable_model=SkLearnRidge(alpha=params.ridge_alpha),
                    similarity_func=similarity, perturb_func=perturb)
        ref = lime.attribute(torch.as_tensor(x)[None, None],
                             feature_mask=torch.as_tensor(seg)[None, None], baselines=0.0,
                             n_samples=params.n_samples, perturbations_per_eval=64,
                             return_input_shape=False).numpy().ravel()
        rho = spearmanr(ours, ref).statistic
        assert rho >= 0.9, (m, rho)
        np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-6 * np.abs(ref).max())


def test_fusion_normalises_and_measures_spread():
    seg = np.array([[0, 1], [1, 2]])
    mean, std = fuse([np.array([0.0, 2.0, -1.0]), np.array([0.0, 4.0, -2.0])], [seg, seg])
    np.testing.assert_allclose(mean, [[0, 1], [1, -0.5]])
    np.testing.assert_allclose(std, 0, atol=1e-7)
    mean2, std2 = fuse([np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])], [seg, seg])
    assert std2[0, 0] == pytest.approx(0.5) and mean2[0, 0] == pytest.approx(0.5)


def test_explain_many_is_batch_independent_and_recorded(bundle, crops):
    x = crops[0][:3]
    p = LimeParams(n_samples=120, slic=SlicParams(n_segments=(25, 50)))
    many = explain_many(bundle.module, x, [0, 1, (2, 1)], p, cell_keys=[10, 11, 12])
    one = explain_one(bundle.module, x[1], 1, p, cell_key=11)
    np.testing.assert_allclose(many[1].map, one.map, rtol=1e-5, atol=1e-7)
    for r in many:
        assert r.map.shape == (64, 64) and np.isfinite(r.map).all()
        assert np.abs(r.map).max() <= 1.0 + 1e-6
        assert len(r.coefs) == 2 and len(r.r2) == 2
    assert many[2].target == (2, 1)
    d = p.to_dict()
    assert d["n_samples"] == 120 and d["slic"]["n_segments"] == (25, 50)
    with pytest.raises(ValueError):
        explain_many(bundle.module, x[0], [0], p)


@pytest.mark.parametrize("engine", ["onnxruntime", "onnxruntime-full"])
def test_onnxruntime_engine_matches_torch(bundle, crops, engine):
    p = LimeParams(n_samples=80, slic=SlicParams(n_segments=(25, 50)), engine="torch")
    a = explain_many(bundle.module, crops[0][:2], [0, (1, 2)], p)
    tm: dict[str, float] = {}
    b = explain_many(bundle.module, crops[0][:2], [0, (1, 2)],
                     dataclasses.replace(p, engine=engine, batch_size=24), timings=tm)
    for u, v in zip(a, b, strict=True):
        for cu, cv in zip(u.coefs, v.coefs, strict=True):
            np.testing.assert_allclose(cu, cv, rtol=1e-4, atol=1e-7)
    assert set(tm) == {"segment_s", "sample_s", "perturb_s", "forward_s", "fit_s"}


def test_windowed_trunk_equals_full_model(bundle, crops):
    """The windowed ONNX Runtime trunk gives the full model's logits for every perturbation,
    also with a non-zero baseline and segmentations whose largest segment is not id 0."""
    from leukoflow.explain.ort_engine import ort_scorer, trunk_geometry

    assert trunk_geometry(bundle.module.net.trunk) == ((16, 16), (4, 4))
    win = ort_scorer(bundle.module, (64, 64))
    assert win is not None and win.windowed
    x = crops[0][3]  # small cell: the window is smaller than the crop
    segs, _ = multi_slic(x, SlicParams(n_segments=(25, 100)))
    fixed, (i0, i1, j0, j1) = win._window(segs[0])
    assert fixed == 0 and (i1 - i0 + 1) * (j1 - j0 + 1) < 13 * 13
    rng = np.random.default_rng(1)
    swapped = segs[1].copy()
    swapped[segs[1] == 0], swapped[segs[1] == 1] = 1, 0  # background gets id 1
    for seg, bl in ((segs[0], 0.0), (segs[1], 0.0), (segs[1], 0.3), (swapped, -0.2)):
        k = int(seg.max()) + 1
        z = sample_masks(k, 70, 0.5, rng)
        z[0] = 1
        z[1] = 0
        got = win.perturbed_logits(x, seg, z, bl, batch_size=16)
        keep = z[:, seg].astype(bool)
        crops_ref = np.where(keep, x, np.float32(bl)).astype(np.float32)
        with torch.no_grad():
            ref = bundle.module(torch.from_numpy(crops_ref)[:, None]).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    with pytest.raises(ValueError):
        win.perturbed_logits(x, segs[0], np.ones((3, 2), np.uint8), 0.0, 16)


def test_unsupported_models_use_the_full_model(crops):
    """Padded convolutions (or non-PhaseCNN nets) cannot be windowed: full model, same scores."""
    from leukoflow.explain.ort_engine import ort_scorer, trunk_geometry

    class Padded(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.f = torch.nn.Linear(4 * 64 * 64, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.f(torch.flatten(torch.relu(self.c(x)), 1))

    assert trunk_geometry(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1))) is None
    torch.manual_seed(0)
    b = ModelBundle.from_module(Padded())
    sc = ort_scorer(b.module, (64, 64))
    assert sc is not None and not sc.windowed
    p = LimeParams(n_samples=60, slic=SlicParams(n_segments=(25,)))
    a = explain_many(b.module, crops[0][:1], [0], dataclasses.replace(p, engine="torch"))
    c = explain_many(b.module, crops[0][:1], [0], dataclasses.replace(p, engine="onnxruntime"))
    np.testing.assert_allclose(a[0].coefs[0], c[0].coefs[0], rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError):
        explain_many(b.module, crops[0][:1], [0], dataclasses.replace(p, engine="tensorrt"))
