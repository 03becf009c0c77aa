"""OOD evaluation metrics: AUROC and FPR at 95 % TPR (classic convention).

Convention (stated in every report): **in-distribution is the positive class** for the
FPR@95%TPR, as in ODIN / Hendrycks et al.: the threshold keeps 95 % of ID cells
(TPR = 0.95) and FPR is the fraction of OOD cells that are wrongly accepted. AUROC is
symmetric in that choice; it is computed with OOD scores as the ranking (larger = more OOD).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

FPR_CONVENTION = "classic: ID positive, FPR = fraction of OOD accepted at 95 % ID accepted"


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Probability that a random OOD sample scores above a random ID sample (ties 1/2)."""
    a = np.asarray(id_scores, np.float64).ravel()
    b = np.asarray(ood_scores, np.float64).ravel()
    if a.size == 0 or b.size == 0:
        return float("nan")
    r = rankdata(np.concatenate([a, b]))
    return float((r[a.size:].sum() - b.size * (b.size + 1) / 2) / (a.size * b.size))


def fpr_at_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of OOD samples accepted when ``tpr`` of ID samples are accepted.

    Accept = score <= tau, tau = the ``tpr`` quantile of the ID scores (higher method).
    """
    a = np.sort(np.asarray(id_scores, np.float64).ravel())
    b = np.asarray(ood_scores, np.float64).ravel()
    if a.size == 0 or b.size == 0:
        return float("nan")
    k = int(np.ceil(tpr * a.size)) - 1
    tau = a[min(max(k, 0), a.size - 1)]
    return float(np.mean(b <= tau))


def auroc_ci(id_scores: np.ndarray, ood_scores: np.ndarray, n_boot: int = 200, seed: int = 0,
             level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUROC (ID and OOD resampled separately)."""
    a = np.asarray(id_scores, np.float64).ravel()
    b = np.asarray(ood_scores, np.float64).ravel()
    if a.size == 0 or b.size == 0 or n_boot <= 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    vals = [auroc(a[rng.integers(0, a.size, a.size)], b[rng.integers(0, b.size, b.size)])
            for _ in range(n_boot)]
    q = (1 - level) / 2
    return float(np.quantile(vals, q)), float(np.quantile(vals, 1 - q))


def ood_report(id_scores: np.ndarray, ood_scores: np.ndarray, threshold: float | None = None,
               n_boot: int = 0) -> dict[str, float]:
    """AUROC (with a bootstrap 95 % CI when ``n_boot`` > 0), FPR@95%TPR and, given a
    threshold, the ID pass rate and OOD flag rate."""
    out = {"auroc": auroc(id_scores, ood_scores), "fpr95": fpr_at_tpr(id_scores, ood_scores),
           "n_id": int(np.size(id_scores)), "n_ood": int(np.size(ood_scores))}
    if n_boot > 0:
        out["auroc_ci95"] = list(auroc_ci(id_scores, ood_scores, n_boot))
    if threshold is not None:
        out["id_pass_rate"] = float(np.mean(np.asarray(id_scores) <= threshold))
        out["ood_flag_rate"] = float(np.mean(np.asarray(ood_scores) > threshold))
    return out
