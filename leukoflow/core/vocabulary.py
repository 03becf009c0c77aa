"""The instrument's vocabulary: class, OOD-kind and decision names (one source for each).

Every stage and the application import these names from here; nothing restates them.
"""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = ("neutrophil", "eosinophil", "monocyte", "lymphocyte")
"""Leukocyte class names in model output order (same order as the PBC real-data set)."""

SCORE_FEATURES: tuple[str, ...] = ("ml_score_neu", "ml_score_eos", "ml_score_mon", "ml_score_lym")
"""dclab feature names carrying the calibrated class probabilities, in CLASS_NAMES order."""

OOD_KINDS: tuple[str, ...] = (
    "erythrocyte", "platelet", "debris", "doublet", "defocus", "digit", "noise",
)
"""Out-of-distribution object kinds produced by the simulated instrument."""

DECISIONS: tuple[str, ...] = ("counted", "uncertain", "ood")
"""Per-cell decisions of the worker, in the order used by metrics and recordings."""
