"""Logit-based detectors: maximum softmax probability (after temperature) and energy."""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp, softmax

from leukoflow.models.ood.base import DETECTORS, OODDetector


@DETECTORS.register("msp")
class MSP(OODDetector):
    """Negative maximum softmax probability of ``softmax(z / T)`` (Hendrycks & Gimpel 2017).

    Parameters
    ----------
    temperature : float
        Temperature T (set from the calibrated model at fit time if given as context).
    """

    def __init__(self, temperature: float = 1.0, **params) -> None:
        super().__init__(temperature=float(temperature), **params)

    def _fit(self, logits, features, labels, temperature: float | None = None, **_) -> None:
        if temperature is not None:
            self.params["temperature"] = float(temperature)

    def _score(self, logits, features=None) -> np.ndarray:
        z = np.asarray(logits, np.float64) / self.params["temperature"]
        return -softmax(z, axis=1).max(axis=1)


@DETECTORS.register("energy")
class Energy(OODDetector):
    """Negative free energy ``-T logsumexp(z / T)`` (Liu et al. 2020); T = 1 by default."""

    def __init__(self, temperature: float = 1.0, **params) -> None:
        super().__init__(temperature=float(temperature), **params)

    def _fit(self, logits, features, labels, **_) -> None:
        pass

    def _score(self, logits, features=None) -> np.ndarray:
        t = self.params["temperature"]
        return -t * logsumexp(np.asarray(logits, np.float64) / t, axis=1)
