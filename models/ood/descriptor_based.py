"""Detectors on physical phase descriptors, and a combination of detectors by p-values.

``descriptors``
    Class-conditional Mahalanobis distance with one Ledoit-Wolf covariance *per class*
    on the phase descriptors (``leukoflow.models.descriptors``: area, phase volume, peak phase, dry
    mass density, centre and rim profile), which the network appends to its features. The
    classes differ in shape and spread of these quantities (neutrophils are large and
    flat-topped, lymphocytes small and dense), so a shared covariance would be too wide for
    the tightest class; per-class covariances keep each class's own spread.
``combined``
    Several fitted detectors (default ``mahalanobis`` on the learned features and
    ``descriptors``), each turned into an empirical p-value against its own in-distribution
    training scores; the combined score is ``-ln min_m p_m`` (the most surprised member
    decides, as in a Bonferroni test). Its threshold is then fitted split-conformally on the
    validation scores like any other detector, so the ≥ 95 % ID pass rate holds for the
    combination as a whole.

p-values use a stored reference of ``n_quantiles`` training-score quantiles (so the artifact
stays small): for a score ``s`` at or below the largest reference value,
``p = 1 - F(s) + 1/(n+1)`` with ``F`` linearly interpolated between quantiles; above it the
surprise ``-ln p`` continues linearly with slope ``1 / (q_max - q_0.9)`` so that scores far
outside the reference still rank (no ties at the smallest p-value).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from leukoflow.models.ood.base import DETECTORS, OODDetector
from leukoflow.models.ood.feature_based import _min_mahalanobis, _shrunk_precision


@DETECTORS.register("descriptors")
class DescriptorMahalanobis(OODDetector):
    """Minimum Mahalanobis distance to per-class Gaussians of the phase descriptors.

    Score = min_k (d - mu_k)^T Sigma_k^-1 (d - mu_k) (squared, unitless), ``d`` the
    descriptor vector (``feature_set='descriptors'``). Classes with no more training cells
    than descriptors are left out (listed in ``params['classes_skipped']``).
    """

    uses_features = True
    default_feature_set = "descriptors"

    def _fit(self, logits, features, labels, **_) -> None:
        if labels is None:
            raise ValueError("descriptors detector needs class labels")
        classes = np.unique(labels[labels >= 0])
        if classes.size == 0:
            raise ValueError("no in-distribution labels (>= 0) to fit on")
        d = features.shape[1]
        means, precs, kept = [], [], []
        for c in classes:
            fc = features[labels == c]
            if len(fc) <= d:  # too few cells for a covariance: the class is not modelled
                continue
            means.append(fc.mean(0))
            precs.append(_shrunk_precision(fc - means[-1]))
            kept.append(int(c))
        if not kept:
            raise ValueError(f"descriptors: no class has more than {d} training cells")
        self.params["classes"] = kept
        self.params["classes_skipped"] = [int(c) for c in classes if int(c) not in kept]
        self.arrays = {"means": np.asarray(means, np.float32),
                       "precisions": np.asarray(precs, np.float32)}

    def required_arrays(self) -> tuple[str, ...]:
        return ("means", "precisions")

    def _score(self, logits, features) -> np.ndarray:
        f = np.asarray(features, np.float64)
        means = self.arrays["means"].astype(np.float64)
        precs = self.arrays["precisions"].astype(np.float64)
        d = np.stack([_min_mahalanobis(f, means[c:c + 1], precs[c])[:, 0]
                      for c in range(len(means))], axis=1)
        return d.min(1)


def surprise(scores: np.ndarray, ref: np.ndarray, n_ref: int) -> np.ndarray:
    """``-ln p`` of ``scores`` against reference quantiles ``ref`` (see module docstring).

    Parameters
    ----------
    scores : np.ndarray
        Detector scores ``(N,)``.
    ref : np.ndarray
        Non-decreasing quantiles of the reference scores at levels ``linspace(0, 1, J)``.
    n_ref : int
        Number of reference scores the quantiles came from.
    """
    s = np.asarray(scores, np.float64)
    q = np.asarray(ref, np.float64)
    j = q.size
    levels = np.linspace(0.0, 1.0, j)
    hi = np.clip(np.searchsorted(q, s, side="right"), 1, j - 1)
    q0, q1 = q[hi - 1], q[hi]
    width = q1 - q0
    frac = np.where(width > 0, (s - q0) / np.where(width > 0, width, 1.0), 1.0)
    cdf = np.clip(levels[hi - 1] + np.clip(frac, 0.0, 1.0) * (levels[hi] - levels[hi - 1]),
                  0.0, 1.0)
    cdf = np.where(s < q[0], 0.0, cdf)
    floor = 1.0 / (n_ref + 1.0)
    body = -np.log(1.0 - cdf + floor)
    q90 = q[int(round(0.9 * (j - 1)))]
    slope = 1.0 / max(q[-1] - q90, 1e-12)
    tail = -np.log(floor) + (s - q[-1]) * slope
    out = np.where(s > q[-1], tail, body)
    return np.where(np.isnan(s), np.inf, out)


@DETECTORS.register("combined")
class Combined(OODDetector):
    """Minimum p-value combination of member detectors (see module docstring).

    Parameters
    ----------
    members : list of str or dict
        Member detectors: registered names or ``{"detector": name, "params": {...}}``.
        Default ``["mahalanobis", "descriptors"]``.
    n_quantiles : int
        Quantiles of each member's training scores kept as its p-value reference.
    """

    uses_features = True
    default_feature_set = "all"

    def __init__(self, members: list[Any] | None = None, n_quantiles: int = 1025,
                 **params: Any) -> None:
        members = [m if isinstance(m, dict) else {"detector": str(m), "params": {}}
                   for m in (members or ["mahalanobis", "descriptors"])]
        if not members or any(m["detector"] == "combined" for m in members):
            raise ValueError("combined needs at least one member detector (not 'combined')")
        super().__init__(members=members, n_quantiles=int(n_quantiles), **params)
        self._members: list[OODDetector] | None = None

    def members(self) -> list[OODDetector]:
        """The member detectors (fitted, or restored from the stored arrays)."""
        if self._members is None:
            out = []
            for i, m in enumerate(self.params["members"]):
                pre = f"{i}."
                arrays = {k[len(pre):]: v for k, v in self.arrays.items() if k.startswith(pre)
                          and k != f"{pre}ref"}
                out.append(DETECTORS.get(m["detector"]).from_dict(
                    {"params": m.get("params", {}), "threshold": None, "arrays": arrays}))
            self._members = out
        return self._members

    def _fit(self, logits, features, labels, **context) -> None:
        context = {k: v for k, v in context.items() if k != "n_descriptors"}
        nd = int(self.params.get("n_descriptors", 0))
        fitted, arrays, specs = [], {}, []
        for i, m in enumerate(self.params["members"]):
            det = DETECTORS.create(m["detector"], **m.get("params", {}))
            det.fit(logits, features, labels, n_descriptors=nd, **context)
            ref = det.score(logits, features)
            ref = ref[np.isfinite(ref)]
            if ref.size < 10:
                raise ValueError(f"combined: member {det.name} has < 10 finite ID scores")
            specs.append({"detector": det.name, "params": dict(det.params),
                          "n_ref": int(ref.size)})
            arrays.update({f"{i}.{k}": v for k, v in det.arrays.items()})
            arrays[f"{i}.ref"] = np.quantile(
                ref, np.linspace(0, 1, self.params["n_quantiles"])).astype(np.float64)
            fitted.append(det)
        self.params["members"] = specs
        self.arrays = arrays
        self._members = fitted

    def required_arrays(self) -> tuple[str, ...]:
        return tuple(f"{i}.ref" for i in range(len(self.params["members"])))

    def member_surprises(self, logits, features) -> np.ndarray:
        """``(N, M)`` surprise ``-ln p`` of each member (``features``: full network output)."""
        cols = []
        for i, (spec, det) in enumerate(zip(self.params["members"], self.members(), strict=True)):
            cols.append(surprise(det.score(logits, features), self.arrays[f"{i}.ref"],
                                 spec.get("n_ref", len(self.arrays[f"{i}.ref"]))))
        return np.stack(cols, axis=1)

    def _score(self, logits, features) -> np.ndarray:
        return self.member_surprises(logits, features).max(axis=1)
