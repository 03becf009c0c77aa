"""OOD scores computed next to the network, in torch (on the GPU for the CUDA backend).

At hundreds of thousands of cells per second, scoring on the host becomes the bottleneck of
a GPU worker (e.g. the KNN detector's ``np.partition`` over a 2,000-feature bank is single
threaded). These modules reproduce the ``leukoflow.models.ood`` detectors' formulas in float32 torch
so the score can run inside the CUDA graph; the numpy detectors stay the reference
(``tests/test_infer_backends.py`` compares both).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
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


class DescriptorScore(_Scorer):
    """Minimum squared Mahalanobis distance with one precision matrix per class."""

    def __init__(self, means: Any, precisions: Any) -> None:
        super().__init__()
        self.register_buffer("means", torch.as_tensor(means, dtype=torch.float32))
        self.register_buffer("precs", torch.as_tensor(precisions, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        d = features.float()[:, None, :] - self.means[None]                  # (N, K, D)
        return torch.einsum("nkd,kde,nke->nk", d, self.precs, d).amin(dim=1)


class Columns(_Scorer):
    """Feed ``inner`` only the feature columns a detector reads (learned or descriptors)."""

    def __init__(self, inner: nn.Module, feature_set: str, n_descriptors: int) -> None:
        super().__init__()
        self.inner = inner
        self.feature_set = feature_set
        self.nd = int(n_descriptors)

    def forward(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if self.feature_set == "learned":
            features = features[:, :features.shape[1] - self.nd]
        elif self.feature_set == "descriptors":
            features = features[:, features.shape[1] - self.nd:]
        return self.inner(logits, features)


def _surprise(s: torch.Tensor, q: torch.Tensor, n_ref: int, slope: float) -> torch.Tensor:
    """torch twin of ``leukoflow.models.ood.descriptor_based.surprise`` (float32; no host sync, so
    it runs inside a captured CUDA graph). ``slope`` = 1 / (q_max - q_0.9), precomputed."""
    j = q.numel()
    hi = torch.searchsorted(q, s.contiguous(), right=True).clamp(1, j - 1)
    q0, q1 = q[hi - 1], q[hi]
    width = q1 - q0
    frac = torch.where(width > 0, (s - q0) / torch.where(width > 0, width, torch.ones_like(width)),
                       torch.ones_like(s)).clamp(0.0, 1.0)
    cdf = ((hi - 1).float() + frac) / (j - 1)
    cdf = torch.where(s < q[0], torch.zeros_like(cdf), cdf.clamp(0.0, 1.0))
    floor = 1.0 / (n_ref + 1.0)
    body = -torch.log(1.0 - cdf + floor)
    tail = -math.log(floor) + (s - q[-1]) * slope
    out = torch.where(s > q[-1], tail, body)
    return torch.where(torch.isnan(s), torch.full_like(s, float("inf")), out)


class CombinedScore(_Scorer):
    """Maximum member surprise ``-ln p`` (the ``combined`` detector)."""

    def __init__(self, members: list[nn.Module], refs: list[Any], n_refs: list[int]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.slopes = []
        for i, r in enumerate(refs):
            q = np.asarray(r, np.float64)
            self.register_buffer(f"ref{i}", torch.as_tensor(q, dtype=torch.float32))
            q90 = q[int(round(0.9 * (q.size - 1)))]
            self.slopes.append(1.0 / max(float(q[-1] - q90), 1e-12))
        self.n_refs = [int(n) for n in n_refs]

    def forward(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        cols = [_surprise(m(logits, features).float(), getattr(self, f"ref{i}"), self.n_refs[i],
                          self.slopes[i])
                for i, m in enumerate(self.members)]
        return torch.stack(cols, dim=1).amax(dim=1)


def torch_scorer(detector: Any) -> nn.Module | None:
    """A torch module computing ``detector.score``, or None for an unknown detector."""
    if detector is None:
        return None
    name = getattr(detector, "registry_name", "")
    p = getattr(detector, "params", {})
    if name == "combined":
        members = [torch_scorer(m) for m in detector.members()]
        if any(m is None for m in members):
            return None
        specs = p["members"]
        refs = [detector.arrays[f"{i}.ref"] for i in range(len(specs))]
        return CombinedScore(members, refs,
                             [s.get("n_ref", len(r)) for s, r in zip(specs, refs, strict=True)])
    inner = _plain_scorer(detector)
    nd = int(p.get("n_descriptors", 0))
    fs = p.get("feature_set", "learned")
    if inner is None or nd == 0 or fs == "all":
        return inner
    return Columns(inner, fs, nd)


def _plain_scorer(detector: Any) -> nn.Module | None:
    name = getattr(detector, "registry_name", "")
    p, a = getattr(detector, "params", {}), getattr(detector, "arrays", {})
    if name == "descriptors":
        return DescriptorScore(a["means"], a["precisions"])
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
