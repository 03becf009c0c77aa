"""Architectures: shapes, ReLU modules (Guided Backprop), variational MC sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from leukoflow.models.architectures import (
    ARCHITECTURES,
    AlexNet,
    LeNet5,
    LeNet5VI,
    build_model,
    predictive_uncertainty,
)

SMALL_ALEX = {"width": 0.25, "hidden": 64}


@pytest.mark.parametrize(("name", "kw", "dim"), [("lenet5", {}, 84), ("alexnet", SMALL_ALEX, 64),
                                                 ("lenet5_vi", {"n_samples": 4}, 120)])
@pytest.mark.parametrize("size", [48, 64])
def test_forward_shapes_and_features(name, kw, dim, size):
    torch.manual_seed(0)
    m = build_model(name, in_size=size, num_classes=4, **kw).eval()
    x = torch.randn(3, 1, size, size)
    with torch.no_grad():
        z, f = m.forward_with_features(x)
        assert z.shape == (3, 4) and f.shape == (3, dim)
        assert torch.allclose(m(x), z) and torch.allclose(m.features(x), f)


def test_registry_and_bad_input():
    assert {"lenet5", "alexnet", "lenet5_vi"} <= set(ARCHITECTURES.names())
    m = LeNet5()
    with pytest.raises(ValueError, match="64x64"):
        m(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        m(torch.zeros(1, 3, 64, 64))
    with pytest.raises(KeyError, match="available"):
        build_model("resnet")


@pytest.mark.parametrize("model", [LeNet5(), AlexNet(**SMALL_ALEX), LeNet5VI(n_samples=2)])
def test_relu_modules_are_distinct_and_functional_relu_is_not_used(model):
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    n_linear_conv = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules())
    assert len(relus) >= 4
    assert len({id(r) for r in relus}) == len(relus)  # never one module reused
    # every ReLU module fires exactly once per forward: counted through forward hooks
    calls: list[int] = []
    hooks = [r.register_forward_hook(lambda mod, i, o: calls.append(id(mod))) for r in relus]
    with torch.no_grad():
        model.eval()(torch.randn(2, 1, 64, 64))
    for h in hooks:
        h.remove()
    assert sorted(calls) == sorted(id(r) for r in relus)
    assert n_linear_conv >= 1


def test_guided_backprop_differs_from_plain_gradient():
    """Captum hooks nn.ReLU modules; with F.relu GBP would equal the plain gradient."""
    from captum.attr import GuidedBackprop, Saliency

    torch.manual_seed(1)
    m = LeNet5().eval()
    x = torch.randn(2, 1, 64, 64)
    gbp = GuidedBackprop(m).attribute(x, target=0)
    grad = Saliency(m).attribute(x, target=0, abs=False)
    assert not torch.allclose(gbp, grad, atol=1e-6)


def test_vi_samples_differ_within_one_batched_forward():
    torch.manual_seed(0)
    m = LeNet5VI(n_samples=16).eval()
    with torch.no_grad():
        for layer in (m.fc2, m.fc_out):  # a wider posterior makes the spread obvious
            layer.weight_rho.fill_(-1.0)
        x = torch.randn(5, 1, 64, 64)
        s = m.mc_logits(x)
    assert s.shape == (16, 5, 4)
    # all 16 samples of one forward differ from each other for every cell
    d = (s[:, None] - s[None]).abs().amax(-1)  # (S, S, N)
    off = ~torch.eye(16, dtype=torch.bool)
    assert (d[off] > 1e-4).all()
    u = predictive_uncertainty(s)
    assert (u["mutual_info"] > 0).all()
    assert torch.allclose(u["mean"].sum(-1), torch.ones(5), atol=1e-5)


def test_vi_eval_is_deterministic_and_batch_independent():
    torch.manual_seed(0)
    m = LeNet5VI(n_samples=8).eval()
    x = torch.randn(6, 1, 64, 64)
    with torch.no_grad():
        a, b = m(x), m(x)
        c = m(x[2:4])
        s = m.mc_logits(x)
    assert torch.equal(a, b)
    assert torch.allclose(a[2:4], c, atol=1e-6)
    # eval logits = log of the mean MC predictive
    assert torch.allclose(a.exp(), torch.softmax(s, -1).mean(0), atol=1e-6)
    # training mode draws fresh samples
    m.train()
    with torch.no_grad():
        assert not torch.equal(m(x), m(x))
    assert m.kl().item() > 0


def test_mutual_information_zero_for_identical_samples():
    z = torch.randn(1, 7, 4).expand(10, 7, 4)
    u = predictive_uncertainty(z)
    assert torch.allclose(u["mutual_info"], torch.zeros(7), atol=1e-6)
    assert np.allclose(u["entropy"].numpy(), u["expected_entropy"].numpy(), atol=1e-6)
