"""The model as the explainer sees it: phase crops in, temperature-scaled logits out.

Every explanation method works on an :class:`ExplainModel`, a small ``nn.Module`` that takes
crops in radians, shape (N, 1, H, W), applies the artifact's normalisation (and resizes to
the model's input size if needed), runs the network and divides the logits by the
calibration temperature. The explainer always works on its **own deep copy** of the
network in ``eval()`` mode (Captum's Guided Backprop registers hooks on every ``nn.ReLU``
module; sharing the module with another thread would break a concurrent no-grad forward).
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from leukoflow.core.vocabulary import CLASS_NAMES
from leukoflow.models.artifact import load_artifact


class ExplainModel(nn.Module):
    """Normalise -> (resize) -> network -> logits / T.

    Parameters
    ----------
    net : nn.Module
        The classifier; ``net(x)`` returns logits (N, K). It is deep-copied.
    mean, std : float
        Input normalisation ``(x - mean) / std`` applied to phase [rad].
    temperature : float
        Calibration temperature T (> 0); the output is ``logits / T``.
    input_size : int or None
        Side of the network input [px]; crops of another size are centre-cropped or padded
        with 0 rad (as ``leukoflow.models.artifact.fit_size``; the pixel size is never changed).
    """

    def __init__(self, net: nn.Module, mean: float = 0.0, std: float = 1.0,
                 temperature: float = 1.0, input_size: int | None = None) -> None:
        super().__init__()
        if not std > 0 or not temperature > 0:
            raise ValueError(f"std and temperature must be > 0 (got {std}, {temperature})")
        self.net = copy.deepcopy(net).float().eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.mean = float(mean)
        self.std = float(std)
        self.temperature = float(temperature)
        self.input_size = input_size
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size,) * 2:
            x = fit_size(x, self.input_size)
        z = self.net((x - self.mean) / self.std)
        return z / self.temperature


@dataclass
class ModelBundle:
    """An :class:`ExplainModel` plus what the artifacts must record about it.

    Attributes
    ----------
    module : ExplainModel
        Crops [rad] (N, 1, H, W) -> calibrated logits (N, K).
    class_names : tuple of str
        Output class order.
    name : str
        Model name (artifact name or a description).
    sha256 : str
        Hash of the weights (identifies the model in TCAV caches and artifacts).
    card : dict
        The artifact card (empty for ad-hoc models).
    """

    module: ExplainModel
    class_names: tuple[str, ...] = CLASS_NAMES
    name: str = "model"
    sha256: str = ""
    card: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_module(cls, net: nn.Module, *, mean: float = 0.0, std: float = 1.0,
                    temperature: float = 1.0, input_size: int | None = None,
                    class_names: tuple[str, ...] = CLASS_NAMES, name: str = "model") -> ModelBundle:
        """Wrap a plain network (tests, audit folds)."""
        mod = ExplainModel(net, mean, std, temperature, input_size)
        return cls(mod, tuple(class_names), name, weights_sha256(mod))

    @classmethod
    def from_artifact(cls, path_or_name: str) -> ModelBundle:
        """Load a model artifact (``leukoflow.models.artifact.load_artifact``) for explanation."""

        art = load_artifact(path_or_name)
        norm = art.normalisation or {"mean": 0.0, "std": 1.0}
        mod = ExplainModel(art.build_model(), float(norm["mean"]), float(norm["std"]),
                           float(art.temperature), int(art.input_size))
        card = dict(art.card)
        return cls(mod, tuple(art.class_names), str(card.get("name", path_or_name)),
                   str(art.sha256), card)

    def describe(self) -> dict[str, Any]:
        """Plain dict recorded with every explanation."""
        m = self.module
        return {"name": self.name, "sha256": self.sha256, "temperature": m.temperature,
                "normalisation": {"mean": m.mean, "std": m.std}, "input_size": m.input_size,
                "class_names": list(self.class_names)}

    @torch.no_grad()
    def predict_proba(self, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Calibrated probabilities (N, K) for crops ``x`` (N, H, W) [rad]."""
        out = []
        for i in range(0, len(x), batch_size):
            xb = torch.as_tensor(np.ascontiguousarray(x[i:i + batch_size]), dtype=torch.float32)
            out.append(torch.softmax(self.module(xb.unsqueeze(1)), dim=1).numpy())
        if not out:
            return np.zeros((0, len(self.class_names)), np.float32)
        return np.concatenate(out)


def fit_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-crop or zero-pad (N, C, H, W) to (N, C, size, size) [px], no resampling."""
    h, w = x.shape[-2:]
    sy, sx = max(0, (h - size) // 2), max(0, (w - size) // 2)
    x = x[..., sy:sy + min(h, size), sx:sx + min(w, size)]
    ph, pw = size - x.shape[-2], size - x.shape[-1]
    if ph or pw:
        x = nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    return x


def weights_sha256(module: nn.Module) -> str:
    """sha256 over the module's parameters and buffers (name order), hex."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
