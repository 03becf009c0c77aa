"""The decision rule per cell (DESIGN.md "Decision per cell").

``p = softmax(logits / T)`` with the artifact's temperature ``T``. A cell is

* ``ood`` if its OOD score (larger = more out-of-distribution) is above the detector's
  threshold, or if the score is not finite (a detector that cannot score a cell must not let
  it be counted);
* otherwise ``uncertain`` if ``max p`` is below the confidence threshold;
* otherwise ``counted`` as class ``argmax p``.

Everything is vectorised over a batch; no per-cell Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from leukoflow.core.stats import softmax_t
from leukoflow.core.vocabulary import DECISIONS

COUNTED, UNCERTAIN, OOD = 0, 1, 2
_DECISION_ARRAY = np.array(DECISIONS, dtype=object)


class OODScorer(Protocol):
    """What the decision rule needs from an OOD detector (``leukoflow.models.ood``)."""

    def score(self, logits: np.ndarray, features: np.ndarray) -> np.ndarray:
        """OOD score per cell (larger = more out-of-distribution)."""


@dataclass
class Decisions:
    """Per-cell outputs of :class:`DecisionRule` for one batch.

    Attributes
    ----------
    probs : ndarray (N, K) float32
        Calibrated probabilities.
    pred : ndarray (N,) int64
        ``argmax`` class index (also for uncertain/OOD cells).
    conf : ndarray (N,) float32
        ``max p``.
    ood_score : ndarray (N,) float32
        Raw detector score (NaN when no detector).
    code : ndarray (N,) uint8
        Index into :data:`DECISIONS`.
    """

    probs: np.ndarray
    pred: np.ndarray
    conf: np.ndarray
    ood_score: np.ndarray
    code: np.ndarray

    def __len__(self) -> int:
        return int(self.code.shape[0])

    def names(self) -> list[str]:
        """Decision names per cell."""
        return _DECISION_ARRAY[self.code].tolist()

    def take(self, idx: np.ndarray | slice) -> Decisions:
        """Subset of cells."""
        return Decisions(self.probs[idx], self.pred[idx], self.conf[idx], self.ood_score[idx],
                         self.code[idx])


@dataclass
class DecisionRule:
    """Temperature scaling, OOD test and confidence test.

    Parameters
    ----------
    temperature : float
        Calibration temperature ``T``.
    confidence_threshold : float
        Cells with ``max p`` below this are ``uncertain`` (probability, 0..1).
    detector : OODScorer or None
        OOD detector; ``None`` disables the OOD test (never in production artifacts).
    ood_threshold : float
        A cell is OOD when ``score > ood_threshold`` (detector units).
    """

    temperature: float
    confidence_threshold: float
    detector: OODScorer | None = None
    ood_threshold: float = float("inf")

    def __call__(self, logits: np.ndarray, features: np.ndarray,
                 ood_score: np.ndarray | None = None) -> Decisions:
        """Decide every cell of a batch (see module docstring).

        ``ood_score`` (N,) is a score the backend already computed with the same detector
        (on the GPU); otherwise the detector scores on the host.
        """
        probs = softmax_t(logits, self.temperature, np.float32)
        pred = probs.argmax(axis=1).astype(np.int64)
        conf = probs.max(axis=1)
        n = probs.shape[0]
        if self.detector is not None and n:
            score = np.asarray(self.detector.score(logits, features) if ood_score is None
                               else ood_score, dtype=np.float32)
            if score.shape != (n,):
                raise ValueError(f"detector returned shape {score.shape}, expected ({n},)")
            is_ood = ~(score <= self.ood_threshold)  # NaN scores count as OOD
        else:
            score = np.full(n, np.nan, dtype=np.float32)
            is_ood = np.zeros(n, dtype=bool)
        code = np.where(is_ood, OOD, np.where(conf < self.confidence_threshold, UNCERTAIN,
                                              COUNTED)).astype(np.uint8)
        return Decisions(probs, pred, conf, score, code)

    def describe(self) -> dict[str, Any]:
        """Parameters for metadata records."""
        return {
            "temperature": float(self.temperature),
            "confidence_threshold": float(self.confidence_threshold),
            "ood_threshold": float(self.ood_threshold),
            "detector": getattr(self.detector, "registry_name",
                                type(self.detector).__name__ if self.detector else None),
        }


def rule_from_artifact(artifact: Any) -> DecisionRule:
    """The :class:`DecisionRule` of a loaded model artifact
    (``leukoflow.models.artifact.Artifact``).

    The detector comes from ``artifact.ood_detector()`` (``leukoflow.models.ood``); its threshold is
    the card's ``ood.threshold``. An artifact without a detector gets no OOD test.
    """
    ood = artifact.ood or {}
    detector = artifact.ood_detector() if ood else None
    thr = ood.get("threshold")
    if thr is None and detector is not None:
        thr = detector.threshold
    return DecisionRule(
        temperature=float(artifact.temperature),
        confidence_threshold=float(artifact.confidence_threshold),
        detector=detector,
        ood_threshold=float(thr) if thr is not None else float("inf"),
    )
