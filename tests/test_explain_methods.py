"""Explainer registry and the Captum-based methods (Guided Backprop, Grad-CAM, IG, occlusion)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from leukoflow.benchmarks.workload_explain import toy_crops
from leukoflow.explain.methods import EXPLAINERS
from leukoflow.explain.model import ExplainModel, ModelBundle


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    from leukoflow.models.architectures import LeNet5

    torch.manual_seed(1)
    return ModelBundle.from_module(LeNet5(), mean=0.4, std=0.5, temperature=0.8)


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    return toy_crops(1, seed=2)[0]


def test_registry_lists_all_methods():
    assert set(EXPLAINERS.names()) >= {"lime", "guided_backprop", "gradcam",
                                       "integrated_gradients", "occlusion"}


@pytest.mark.parametrize("name", ["guided_backprop", "gradcam", "integrated_gradients",
                                  "occlusion", "lime"])
def test_every_method_gives_finite_maps_and_params(bundle, crops, name):
    kw = {"n_samples": 60, "n_segments": (25,)} if name == "lime" else {}
    ex = EXPLAINERS.create(name, bundle=bundle, **kw)
    out = ex.explain(crops[:2], [0, 3], [5, 6])
    assert len(out) == 2
    for e in out:
        assert e.method == name and e.map.shape == (64, 64) and e.map.dtype == np.float32
        assert np.isfinite(e.map).all() and np.abs(e.map).max() > 0
        assert "unit" in e.params and e.duration_s > 0
    with pytest.raises(ValueError):
        ex.explain(crops[:1], [7])
    bad = crops[:1].copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError):
        ex.explain(bad, [0])


def test_guided_backprop_equals_captum_and_differs_from_gradient(bundle, crops):
    from captum.attr import GuidedBackprop, Saliency

    ex = EXPLAINERS.create("guided_backprop", bundle=bundle)
    ours = np.stack([e.map for e in ex.explain(crops, [2] * len(crops))])
    ref_model = ExplainModel(bundle.module.net, bundle.module.mean, bundle.module.std,
                             bundle.module.temperature)
    x = torch.as_tensor(crops).unsqueeze(1).requires_grad_(True)
    ref = GuidedBackprop(ref_model).attribute(x, target=2).detach().numpy()[:, 0]
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-9)
    grad = Saliency(ref_model).attribute(x, target=2, abs=False).detach().numpy()[:, 0]
    rel = np.abs(ours - grad).max() / np.abs(grad).max()
    assert rel > 0.05, "guided backprop equals the plain gradient: ReLU hooks not active"
    # the explainer's hooks live on its own copy: the shared model still runs under no_grad
    with torch.no_grad():
        assert bundle.module(x.detach()).shape == (len(crops), 4)


def test_guided_backprop_refuses_models_without_relu_modules():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(2 * 62 * 62, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    with pytest.raises(ValueError, match="ReLU"):
        EXPLAINERS.create("guided_backprop", bundle=ModelBundle.from_module(Functional()))


def test_gradcam_is_nonnegative_and_upsampled(bundle, crops):
    ex = EXPLAINERS.create("gradcam", bundle=bundle)
    e = ex.explain(crops[:1], [1])[0]
    assert e.params["layer"].endswith("trunk.3") and (e.map >= 0).all()
    assert e.map.shape == (64, 64)


def test_model_bundle_pads_other_crop_sizes(bundle):
    small = np.zeros((1, 48, 48), np.float32)
    big = np.zeros((1, 64, 64), np.float32)
    bund = ModelBundle.from_module(bundle.module.net, mean=0.4, std=0.5, input_size=64)
    np.testing.assert_allclose(bund.predict_proba(small), bund.predict_proba(big), atol=1e-6)
    np.testing.assert_allclose(bund.predict_proba(big).sum(1), 1.0, atol=1e-6)
