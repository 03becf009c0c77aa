"""Batched LIME with fused multi-SLIC superpixels (see :mod:`leukoflow.explain.lime_batched`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from leukoflow.explain.lime_batched import LimeParams, Target, explain_many
from leukoflow.explain.methods import EXPLAINERS
from leukoflow.explain.methods.base import Explainer, Explanation
from leukoflow.explain.model import ModelBundle
from leukoflow.explain.segmentation import SlicParams


@EXPLAINERS.register("lime")
class LimeExplainer(Explainer):
    """Fused multi-segmentation LIME, all perturbations in batched no-grad forwards.

    Parameters
    ----------
    bundle : ModelBundle
        The model.
    n_samples : int
        Perturbations per segmentation.
    n_segments : tuple of int
        One SLIC segmentation per entry (approximate superpixels in the cell).
    compactness : float
        SLIC compactness on the scaled crop.
    batch_size : int
        Perturbed crops per forward.
    seed : int
        Sampler seed (combined with the cell id).
    baseline : float or None
        Value of switched-off superpixels [rad] (None: border median).
    """

    name = "lime"
    supports_contrast = True

    def __init__(self, bundle: ModelBundle, n_samples: int = 500,
                 n_segments: tuple[int, ...] = (25, 50, 100), compactness: float = 0.1,
                 batch_size: int = 32, seed: int = 0, baseline: float | None = 0.0,
                 kernel_width: float = 0.25, ridge_alpha: float = 1.0) -> None:
        super().__init__(bundle)
        self.lime_params = LimeParams(
            n_samples=int(n_samples), kernel_width=kernel_width, ridge_alpha=ridge_alpha,
            baseline=baseline, seed=seed, batch_size=int(batch_size),
            slic=dataclasses.replace(SlicParams(), n_segments=tuple(int(n) for n in n_segments),
                                     compactness=compactness))

    def params(self) -> dict[str, Any]:  # noqa: D102
        d = self.lime_params.to_dict()
        d["output"] = "calibrated probability of the target (pairs: log-odds z_a - z_b)"
        d["unit"] = "normalised surrogate coefficient (each segmentation / max|w|), mean"
        return d

    def _explain(self, crops: np.ndarray, targets: Sequence[Target],
                 cell_keys: Sequence[int]) -> list[Explanation]:
        res = explain_many(self.bundle.module, crops, targets, self.lime_params, cell_keys)
        p = self.params()
        out = []
        for r in res:
            info = {"r2": r.r2, "intercepts": r.intercepts,
                    "n_superpixels": [int(len(c)) for c in r.coefs]}
            extra = {"std": r.std, "mask": r.mask.astype(np.uint8)}
            out.append(Explanation(self.name, r.map, r.target, p, extra, info))
        return out
