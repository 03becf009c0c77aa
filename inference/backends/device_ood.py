"""OOD scores computed next to the network, in torch (on the GPU for the CUDA backend).

At hundreds of thousands of cells per second, scoring on the host becomes the bottleneck of
a GPU worker (e.g. the KNN detector's ``np.partition`` over a 2,000-feature bank is single
threaded). These modules reproduce the ``models.ood`` detectors' formulas in float32 torch
so the score can run inside the CUDA graph; the numpy detectors stay the reference
(``tests/test_infer_backends.py`` compares both).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _Scorer(nn.Module):
    """``forward(logits (N, K), features (N, D)) -> score (N,)``, larger = more OOD."""


class MSPScore(_Scorer):
    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.t = float(temperature)

    def forward(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return -torch.softmax(logits.float() / self.t, dim=1).amax(dim=1)


class EnergyScore(_Scorer):
    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.t = float(temperature)

    def forward(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return -self.t * torch.logsumexp(logits.float() / self.t, dim=1)


def _min_md(f: torch.Tensor, means: torch.Tensor, prec: torch.Tensor) -> torch.Tensor:
    d = f[:, None, :] - means[None]                      # (N, K, D)
    return ((d @ prec) * d).sum(dim=-1)                  # (N, K) squared distances


class MahalanobisScore(_Scorer):
    def __init__(self, means: Any, precision: Any) -> None:
        super().__init__()
        self.register_buffer("means", torch.as_tensor(means, dtype=torch.float32))
        self.register_buffer("prec", torch.as_tensor(precision, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return _min_md(features.float(), self.means, self.prec).amin(dim=1)


class RMDSScore(MahalanobisScore):
    def __init__(self, means: Any, precision: Any, mean0: Any, precision0: Any) -> None:
        super().__init__(means, precision)
        self.register_buffer("mean0", torch.as_tensor(mean0, dtype=torch.float32))
        self.register_buffer("prec0", torch.as_tensor(precision0, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        f = features.float()
        d0 = f - self.mean0
        md0 = ((d0 @ self.prec0) * d0).sum(dim=1)
        return (_min_md(f, self.means, self.prec) - md0[:, None]).amin(dim=1)


class KNNScore(_Scorer):
    def __init__(self, bank: Any, k: int) -> None:
        super().__init__()
        self.register_buffer("bank_t", torch.as_tensor(bank, dtype=torch.float32).T.contiguous())
        self.k = min(int(k), self.bank_t.shape[1])

    def forward(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        f = features.float()
        q = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
        d2 = (2.0 - 2.0 * (q @ self.bank_t)).clamp_min(0.0)
        # k-th smallest squared distance (the k-1 index of numpy's partition)
        return torch.topk(d2, self.k, dim=1, largest=False, sorted=True).values[:, -1].sqrt()


def torch_scorer(detector: Any) -> nn.Module | None:
    """A torch module computing ``detector.score``, or None for an unknown detector."""
    if detector is None:
        return None
    name = getattr(detector, "registry_name", "")
    p, a = getattr(detector, "params", {}), getattr(detector, "arrays", {})
    if name == "msp":
        return MSPScore(p.get("temperature", 1.0))
    if name == "energy":
        return EnergyScore(p.get("temperature", 1.0))
    if name == "mahalanobis":
        return MahalanobisScore(a["means"], a["precision"])
    if name == "rmds":
        return RMDSScore(a["means"], a["precision"], a["mean0"], a["precision0"])
    if name == "knn":
        return KNNScore(a["bank"], p.get("k", 50))
    return None


class ScoredModule(nn.Module):
    """``InferenceModule`` (with finite mask) plus the OOD score: 4 outputs."""

    def __init__(self, inner: nn.Module, scorer: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.scorer = scorer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, feats, finite = self.inner(x)
        return logits, feats, finite, self.scorer(logits, feats)
