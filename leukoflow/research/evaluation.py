"""Checks of explanation quality: deletion curves and the model-randomisation sanity check.

* Deletion (Samek et al. 2017; Petsiuk et al. 2018): remove the cell's pixels in order of
  decreasing relevance (set to the baseline, 0 rad) and follow the calibrated probability
  of the explained class; a faithful map makes it fall faster than a random order (lower
  area under the curve).
* Model-parameter randomisation (Adebayo et al. 2018, arXiv:1810.03292): re-initialise the
  weights; a method whose maps stay similar does not depend on what the model learned.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import spearmanr

from leukoflow.explain.model import ModelBundle


@torch.no_grad()
def deletion_curve(module: torch.nn.Module, x: np.ndarray, order: np.ndarray, target: int,
                   steps: int = 16, baseline: float = 0.0) -> np.ndarray:
    """Probability of ``target`` while the pixels ``order`` are removed in ``steps`` chunks.

    Parameters
    ----------
    module : nn.Module
        Crops (N, 1, H, W) [rad] -> calibrated logits.
    x : ndarray (H, W)
        Crop [rad].
    order : ndarray of int
        Flat pixel indices, most relevant first (usually the cell-mask pixels).
    target : int
        Class index.
    steps : int
        Number of deletion steps; the curve has ``steps + 1`` points (0 % ... 100 %).
    baseline : float
        Value of removed pixels [rad].

    Returns
    -------
    ndarray (steps + 1,)
        Calibrated probability after removing ``round(k / steps * len(order))`` pixels.
    """
    flat = np.asarray(x, np.float32).ravel()
    crops = np.repeat(flat[None], steps + 1, axis=0)
    for k in range(1, steps + 1):
        crops[k, order[: int(round(k / steps * len(order)))]] = baseline
    xt = torch.as_tensor(crops.reshape(steps + 1, 1, *np.shape(x)))
    return torch.softmax(module(xt), dim=1)[:, target].numpy()


def deletion_auc(curve: np.ndarray) -> float:
    """Area under a deletion curve on [0, 1] (trapezoid); lower = more faithful."""
    c = np.asarray(curve, np.float64)
    return float(((c[1:] + c[:-1]) / 2).mean())


def deletion_vs_random(module: torch.nn.Module, x: np.ndarray, relevance: np.ndarray,
                       mask: np.ndarray, target: int, rng: np.random.Generator,
                       steps: int = 16, n_random: int = 3, baseline: float = 0.0
                       ) -> tuple[float, float]:
    """(AUC by relevance order, mean AUC of ``n_random`` random orders) over the cell mask."""
    idx = np.flatnonzero(np.asarray(mask).ravel())
    rel = np.asarray(relevance).ravel()[idx]
    order = idx[np.argsort(-rel, kind="stable")]
    auc = deletion_auc(deletion_curve(module, x, order, target, steps, baseline))
    rnd = [deletion_auc(deletion_curve(module, x, rng.permutation(idx), target, steps,
                                       baseline)) for _ in range(n_random)]
    return auc, float(np.mean(rnd))


def randomised_bundle(bundle: ModelBundle, seed: int = 0) -> ModelBundle:
    """Copy of ``bundle`` with every layer re-initialised (full randomisation)."""
    b = copy.deepcopy(bundle)
    torch.manual_seed(seed)
    for m in b.module.net.modules():
        if m is not b.module.net and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    for p in b.module.net.parameters():
        p.requires_grad_(False)
    b.name = f"{bundle.name}+randomised(seed={seed})"
    return b


def map_similarity(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Spearman rank correlation of two maps (signed and absolute) and SSIM of |maps|."""
    from skimage.metrics import structural_similarity

    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)

    def _rho(u: np.ndarray, v: np.ndarray) -> float:
        if np.ptp(u) == 0 or np.ptp(v) == 0:
            return 0.0
        return float(spearmanr(u.ravel(), v.ravel()).statistic)

    def _n(u: np.ndarray) -> np.ndarray:
        m = np.abs(u).max()
        return np.abs(u) / m if m > 0 else np.abs(u)

    return {"spearman": _rho(a, b), "spearman_abs": _rho(np.abs(a), np.abs(b)),
            "ssim_abs": float(structural_similarity(_n(a), _n(b), data_range=1.0))}


def randomisation_check(explain_fn: Callable[[ModelBundle, np.ndarray, list[int]], list],
                        bundle: ModelBundle, crops: np.ndarray, targets: list[int],
                        seed: int = 0) -> dict[str, float]:
    """Mean similarity between maps of the trained and the randomised model.

    ``explain_fn(bundle, crops, targets)`` returns one map per crop.
    """
    a = explain_fn(bundle, crops, targets)
    b = explain_fn(randomised_bundle(bundle, seed), crops, targets)
    sims = [map_similarity(u, v) for u, v in zip(a, b, strict=True)]
    return {k: float(np.mean([s[k] for s in sims])) for k in sims[0]}
