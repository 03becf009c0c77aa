"""The network as every backend runs it: raw phase (N, H, W) in rad -> (logits, features).

Normalisation ``(x - mean) / std`` and the channel axis are part of the module so that the
ONNX graph, the TensorRT engine and the PyTorch backends compute the same function.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class InferenceModule(nn.Module):
    """Wrap an artifact's network.

    Parameters
    ----------
    model : torch.nn.Module
        Network with ``forward_with_features(x (N, 1, H, W)) -> (logits, features)``.
    mean, std : float
        Normalisation of the phase [rad].
    with_finite : bool
        Also return a boolean ``(N,)`` "crop is finite" mask computed on the device.
    float_outputs : bool
        Cast outputs to float32 (for fp16 execution).
    """

    def __init__(self, model: nn.Module, mean: float, std: float, with_finite: bool = False,
                 float_outputs: bool = True) -> None:
        super().__init__()
        self.model = model
        self.mean = float(mean)
        self.std = float(std)
        self.with_finite = with_finite
        self.float_outputs = float_outputs

    def forward(self, x: torch.Tensor) -> Any:
        """``x``: (N, H, W) phase [rad] -> ``(logits, features[, finite])``."""
        z = ((x - self.mean) / self.std).unsqueeze(1)
        logits, feats = self.model.forward_with_features(z)
        if self.float_outputs:
            logits, feats = logits.float(), feats.float()
        if self.with_finite:
            return logits, feats, torch.isfinite(x).flatten(1).all(dim=1)
        return logits, feats


def build_inference_module(artifact: Any, with_finite: bool = False) -> InferenceModule:
    """The artifact's network wrapped with its normalisation (CPU, float32, eval)."""
    norm = artifact.normalisation
    return InferenceModule(artifact.build_model(), norm["mean"], norm["std"],
                           with_finite=with_finite).eval()
