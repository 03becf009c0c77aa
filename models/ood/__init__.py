"""Post-hoc OOD detectors behind one registry, :data:`DETECTORS`.

Registered names: ``msp`` (max softmax after temperature), ``energy``, ``mahalanobis``,
``rmds`` (relative Mahalanobis), ``knn`` (normalised features, k = 50) and ``mutual_info``
(variational model only). Larger score = more OOD; threshold from
:func:`conformal_threshold` on ID validation scores.
"""

from models.ood import feature_based, logit_based, mc  # noqa: F401  (registration)
from models.ood.base import DETECTORS, OODDetector, conformal_threshold
from models.ood.metrics import FPR_CONVENTION, auroc, fpr_at_tpr, ood_report

__all__ = ["DETECTORS", "OODDetector", "conformal_threshold", "auroc", "fpr_at_tpr",
           "ood_report", "FPR_CONVENTION"]
