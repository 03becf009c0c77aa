"""Gradient and perturbation methods from Captum: Guided Backprop, Grad-CAM, IG, occlusion.

Each method works on its **own deep copy** of the explainer model in ``eval()``: Captum's
Guided Backprop registers hooks on every ``nn.ReLU`` module, and a hooked model must not be
used for no-grad forwards elsewhere. Gradient methods explain the temperature-scaled logit
of the target class; occlusion explains the calibrated probability.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from leukoflow.explain.lime_batched import Target
from leukoflow.explain.methods import EXPLAINERS
from leukoflow.explain.methods.base import Explainer, Explanation
from leukoflow.explain.model import ModelBundle


class _CaptumExplainer(Explainer):
    def __init__(self, bundle: ModelBundle) -> None:
        super().__init__(bundle)
        self.model = copy.deepcopy(bundle.module).eval()
        n_relu = sum(isinstance(m, nn.ReLU) for m in self.model.modules())
        self.n_relu_modules = n_relu

    def _inputs(self, crops: np.ndarray) -> torch.Tensor:
        dev = next(iter(self.model.parameters()), torch.zeros(())).device
        return torch.as_tensor(crops, device=dev).unsqueeze(1).requires_grad_(True)

    def _wrap(self, attr: torch.Tensor, targets: Sequence[Target]) -> list[Explanation]:
        a = attr.detach().cpu().numpy()[:, 0].astype(np.float32)
        p = self.params()
        return [Explanation(self.name, a[i], int(targets[i]), p) for i in range(len(a))]


@EXPLAINERS.register("guided_backprop")
class GuidedBackpropExplainer(_CaptumExplainer):
    """Guided Backpropagation (Springenberg 2015) via ``captum.attr.GuidedBackprop``.

    Needs ``nn.ReLU`` modules in the network (functional ReLUs are not hooked and would
    silently give the plain gradient); :attr:`n_relu_modules` reports how many were found.
    """

    name = "guided_backprop"

    def __init__(self, bundle: ModelBundle) -> None:
        super().__init__(bundle)
        if self.n_relu_modules == 0:
            raise ValueError("guided_backprop needs nn.ReLU modules; the model has none")
        from captum.attr import GuidedBackprop

        self.method = GuidedBackprop(self.model)

    def params(self) -> dict[str, Any]:  # noqa: D102
        return {"library": "captum.attr.GuidedBackprop", "output": "calibrated logit",
                "unit": "d(logit/T)/d(phase) with ReLU-guided backward [1/rad]",
                "relu_modules": self.n_relu_modules}

    def _explain(self, crops, targets, cell_keys):  # noqa: D102
        x = self._inputs(crops)
        tg = torch.as_tensor([int(t) for t in targets], device=x.device)
        return self._wrap(self.method.attribute(x, target=tg), targets)


def _last_conv(model: nn.Module) -> tuple[str, nn.Module]:
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            last = (name, m)
    if last is None:
        raise ValueError("gradcam needs a Conv2d layer; the model has none")
    return last


@EXPLAINERS.register("gradcam")
class GradCamExplainer(_CaptumExplainer):
    """Grad-CAM on the last convolution (``captum.attr.LayerGradCam``), ReLU applied,
    upsampled bilinearly to the crop size."""

    name = "gradcam"

    def __init__(self, bundle: ModelBundle, layer: str | None = None) -> None:
        super().__init__(bundle)
        from captum.attr import LayerGradCam

        if layer is None:
            self.layer_name, mod = _last_conv(self.model)
        else:
            self.layer_name, mod = layer, dict(self.model.named_modules())[layer]
        self.method = LayerGradCam(self.model, mod)

    def params(self) -> dict[str, Any]:  # noqa: D102
        return {"library": "captum.attr.LayerGradCam", "layer": self.layer_name,
                "relu_attributions": True, "upsample": "bilinear",
                "output": "calibrated logit", "unit": "channel-weighted activation (a.u.)"}

    def _explain(self, crops, targets, cell_keys):  # noqa: D102
        from captum.attr import LayerAttribution

        x = self._inputs(crops)
        tg = torch.as_tensor([int(t) for t in targets], device=x.device)
        a = self.method.attribute(x, target=tg, relu_attributions=True)
        a = LayerAttribution.interpolate(a, tuple(crops.shape[-2:]), "bilinear")
        return self._wrap(a, targets)


@EXPLAINERS.register("integrated_gradients")
class IntegratedGradientsExplainer(_CaptumExplainer):
    """Integrated Gradients from a 0 rad (background) baseline."""

    name = "integrated_gradients"

    def __init__(self, bundle: ModelBundle, n_steps: int = 32,
                 internal_batch_size: int = 256) -> None:
        super().__init__(bundle)
        from captum.attr import IntegratedGradients

        self.n_steps = int(n_steps)
        self.internal_batch_size = int(internal_batch_size)
        self.method = IntegratedGradients(self.model)

    def params(self) -> dict[str, Any]:  # noqa: D102
        return {"library": "captum.attr.IntegratedGradients", "baseline_rad": 0.0,
                "n_steps": self.n_steps, "method": "gausslegendre",
                "internal_batch_size": self.internal_batch_size,
                "output": "calibrated logit", "unit": "logit/T contribution per pixel"}

    def _explain(self, crops, targets, cell_keys):  # noqa: D102
        x = self._inputs(crops)
        tg = torch.as_tensor([int(t) for t in targets], device=x.device)
        a = self.method.attribute(x, baselines=0.0, target=tg, n_steps=self.n_steps,
                                  internal_batch_size=self.internal_batch_size)
        return self._wrap(a, targets)


class _Probability(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.softmax(self.model(x), dim=1)


@EXPLAINERS.register("occlusion")
class OcclusionExplainer(_CaptumExplainer):
    """Occlusion with a square window set to 0 rad (``captum.attr.Occlusion``)."""

    name = "occlusion"

    def __init__(self, bundle: ModelBundle, window_px: int = 8, stride_px: int = 4,
                 perturbations_per_eval: int = 128) -> None:
        super().__init__(bundle)
        from captum.attr import Occlusion

        self.window_px, self.stride_px = int(window_px), int(stride_px)
        self.ppe = int(perturbations_per_eval)
        self.method = Occlusion(_Probability(self.model))

    def params(self) -> dict[str, Any]:  # noqa: D102
        return {"library": "captum.attr.Occlusion", "window_px": self.window_px,
                "stride_px": self.stride_px, "baseline_rad": 0.0,
                "perturbations_per_eval": self.ppe, "output": "calibrated probability",
                "unit": "probability drop when occluded"}

    @torch.no_grad()
    def _explain(self, crops, targets, cell_keys):  # noqa: D102
        x = torch.as_tensor(crops).unsqueeze(1)
        tg = torch.as_tensor([int(t) for t in targets])
        a = self.method.attribute(x, sliding_window_shapes=(1, self.window_px, self.window_px),
                                  strides=(1, self.stride_px, self.stride_px), baselines=0.0,
                                  target=tg, perturbations_per_eval=self.ppe)
        return self._wrap(a, targets)
