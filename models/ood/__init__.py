"""Post-hoc OOD detectors behind one registry, :data:`DETECTORS`.

Registered names: ``msp`` (max softmax after temperature), ``energy``, ``mahalanobis``,
``rmds`` (relative Mahalanobis), ``knn`` (normalised features, k = 50), ``mutual_info``
(variational model only), ``descriptors`` (per-class Mahalanobis on the physical phase
descriptors of ``leukoflow.models.descriptors``) and ``combined`` (minimum p-value of members,
default ``mahalanobis`` + ``descriptors``). Larger score = more OOD; threshold from
:func:`conformal_threshold` on ID validation scores.
"""

from leukoflow.models.ood import descriptor_based, feature_based, logit_based, mc  # noqa: F401
from leukoflow.models.ood.base import DETECTORS, OODDetector, conformal_threshold
from leukoflow.models.ood.metrics import FPR_CONVENTION, auroc, fpr_at_tpr, ood_report

__all__ = ["DETECTORS", "OODDetector", "conformal_threshold", "auroc", "fpr_at_tpr",
           "ood_report", "FPR_CONVENTION"]
