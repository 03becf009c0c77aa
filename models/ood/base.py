"""Base class, registry and threshold rule for OOD detectors.

Convention everywhere: **larger score = more out-of-distribution**. A cell is flagged OOD
when ``score > threshold``. Detectors are post-hoc: they see only the logits ``(N, K)`` and
the penultimate features ``(N, D)`` of a trained network (both float, numpy), and are fitted
on *in-distribution* data only (training features for the statistics, validation scores for
the threshold). Serialisation is pickle-free: :meth:`OODDetector.to_dict` returns JSON-able
``params`` plus numpy ``arrays`` (stored in the artifact's safetensors file).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from leukoflow.core.registry import Registry

DETECTORS: Registry = Registry("OOD detector")
"""Name -> :class:`OODDetector` subclass."""


def conformal_threshold(id_scores: np.ndarray, alpha: float = 0.05) -> float:
    """Split-conformal threshold so that >= (1 - alpha) of ID cells pass.

    tau is the ceil((n + 1)(1 - alpha))-th smallest in-distribution validation score
    (1-based); for exchangeable data P(score_new <= tau) >= 1 - alpha. When that index
    exceeds n, the largest score is used (too few samples for the guarantee).

    Parameters
    ----------
    id_scores : np.ndarray
        OOD scores of in-distribution validation cells (larger = more OOD).
    alpha : float
        Target fraction of ID cells flagged, in (0, 1).
    """
    s = np.sort(np.asarray(id_scores, dtype=np.float64).ravel())
    s = s[np.isfinite(s)]
    if s.size == 0:
        raise ValueError("no finite ID scores to fit a threshold on")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    k = math.ceil((s.size + 1) * (1.0 - alpha))
    return float(s[min(k, s.size) - 1])


class OODDetector:
    """Base class. Subclasses implement :meth:`_fit` and :meth:`score`.

    Attributes
    ----------
    threshold : float or None
        Flag OOD when ``score > threshold`` (fitted by :meth:`fit_threshold`).
    params : dict
        JSON-able hyper-parameters and fitted scalars.
    arrays : dict[str, np.ndarray]
        Fitted arrays (class means, feature bank, ...).
    """

    registry_name: ClassVar[str] = "base"
    uses_features: ClassVar[bool] = False
    #: Feature columns a feature-space detector reads by default (:meth:`select`).
    default_feature_set: ClassVar[str] = "learned"

    def __init__(self, **params: Any) -> None:
        self.params: dict[str, Any] = dict(params)
        self.arrays: dict[str, np.ndarray] = {}
        self.threshold: float | None = None

    @property
    def name(self) -> str:
        """Registered name."""
        return self.registry_name

    # --- fitting ----------------------------------------------------------------------
    def fit(self, logits: np.ndarray, features: np.ndarray, labels: np.ndarray | None = None,
            **context: Any) -> OODDetector:
        """Fit on in-distribution data (training split). Returns ``self``.

        Parameters
        ----------
        logits : np.ndarray
            ``(N, K)`` raw logits.
        features : np.ndarray
            ``(N, D)`` penultimate features.
        labels : np.ndarray, optional
            ``(N,)`` class indices (used by class-conditional detectors).
        **context
            ``temperature`` (float) for logit detectors; ``model`` for detectors that read
            network weights; ``n_descriptors`` (int, default ``model.n_descriptors`` or 0):
            how many trailing feature columns are physical phase descriptors
            (``leukoflow.models.descriptors``) rather than learned features.
        """
        if self.uses_features:
            model = context.get("model")
            nd = context.get("n_descriptors", getattr(model, "n_descriptors", 0) or 0)
            self.params["n_descriptors"] = int(nd)
            self.params.setdefault("feature_set", self.default_feature_set)
        self._fit(np.asarray(logits, np.float64), self.select(np.asarray(features, np.float64)),
                  None if labels is None else np.asarray(labels), **context)
        return self

    def select(self, features: np.ndarray | None) -> np.ndarray | None:
        """The feature columns this detector reads (``params['feature_set']``).

        ``learned`` (default): the network's features without trailing descriptors;
        ``descriptors``: only the ``n_descriptors`` trailing columns; ``all``: everything.
        Logit-only detectors get ``features`` unchanged.
        """
        if features is None or not self.uses_features:
            return features
        nd = int(self.params.get("n_descriptors", 0))
        which = self.params.get("feature_set", self.default_feature_set)
        f = np.asarray(features)
        if f.ndim != 2 or f.shape[1] <= nd:
            raise ValueError(f"{self.name}: features of shape {f.shape} cannot hold "
                             f"{nd} descriptor columns plus learned features")
        if which == "all" or (which == "learned" and nd == 0):
            return f
        if which == "learned":
            return f[:, :f.shape[1] - nd]
        if which == "descriptors":
            if nd == 0:
                raise ValueError(f"{self.name}: the model has no phase descriptors "
                                 "(train with descriptors on, see models.descriptors)")
            return f[:, f.shape[1] - nd:]
        raise ValueError(f"{self.name}: feature_set must be learned, descriptors or all, "
                         f"got {which!r}")

    def _fit(self, logits, features, labels, **context) -> None:  # pragma: no cover
        pass

    def fit_threshold(self, id_val_scores: np.ndarray, alpha: float = 0.05) -> float:
        """Set :attr:`threshold` by :func:`conformal_threshold` on ID validation scores."""
        self.threshold = conformal_threshold(id_val_scores, alpha)
        self.params["alpha"] = float(alpha)
        return self.threshold

    # --- scoring ----------------------------------------------------------------------
    def score(self, logits: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        """OOD scores ``(N,)`` float64, larger = more OOD.

        ``features`` are the network's full feature output (learned features plus any
        trailing descriptors); the detector picks its columns (:meth:`select`).
        """
        return self._score(logits, self.select(features))

    def _score(self, logits: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError  # pragma: no cover

    def is_ood(self, logits: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Boolean ``(N,)``: score above the fitted threshold."""
        if self.threshold is None:
            raise RuntimeError(f"{self.name}: threshold not fitted")
        return self.score(logits, features) > self.threshold

    # --- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"detector", "params", "threshold", "arrays"}`` (arrays: numpy, not JSON)."""
        return {"detector": self.name, "params": dict(self.params),
                "threshold": self.threshold, "arrays": dict(self.arrays)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OODDetector:
        """Rebuild a fitted detector from :meth:`to_dict` output (arrays as numpy)."""
        det = cls(**d.get("params", {}))
        det.arrays = {k: np.asarray(v) for k, v in (d.get("arrays") or {}).items()}
        missing = [k for k in det.required_arrays() if k not in det.arrays]
        if missing:
            raise KeyError(f"missing arrays for {cls.registry_name}: {missing}")
        t = d.get("threshold")
        det.threshold = None if t is None else float(t)
        return det

    def required_arrays(self) -> tuple[str, ...]:
        """Names of the arrays a fitted detector needs."""
        return ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threshold={self.threshold}, params={self.params})"
