"""Statistics shared by the worker, the collector, model training and the reports.

One implementation each of

* :func:`softmax_t` — calibrated probabilities ``softmax(logits / T)``;
* :func:`wilson_interval`, :func:`clopper_pearson_interval` — 95 % intervals of a binomial
  proportion (class fractions of the differential, recalls, OOD rejection rates);
* :func:`em_prior_shift` — class priors of a sample from calibrated posteriors (the
  prior-shift corrected differential);
* :func:`bin_sums`, :func:`bin_stats`, :func:`reliability_bins` — top-label reliability bins
  (sums pool across recordings: :func:`ece_from_sums`, :func:`reliability_from_sums`);
* :func:`ece`, :func:`adaptive_ece`, :func:`mce` — calibration errors.

Conventions (../shared/notes/xai-calibration-ood.md section 4): **ECE** is top-label with
``N_BINS = 15`` equal-width confidence bins ``(lower, upper]`` (a confidence of exactly 0
falls in the first bin), ``ECE = sum_b (n_b / n) |acc_b - conf_b|`` (Guo et al. 2017),
reported as a fraction (x100 = %). **Adaptive ECE** uses equal-mass bins (Nixon et al.
2019). **MCE** is ``max_b |acc_b - conf_b|`` over bins with at least ``min_bin_count``
cells. All quantities are dimensionless.

Wilson is the default interval: its coverage stays close to nominal for small counts and
fractions near 0 or 1, where the normal (Wald) interval fails, and it is less conservative
than Clopper–Pearson (Brown, Cai & DasGupta, Statist. Sci. 16:101, 2001).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

__all__ = ["N_BINS", "softmax_t", "z_score", "wilson_interval", "clopper_pearson_interval",
           "em_prior_shift", "bin_sums", "bin_stats", "ece_from_sums", "reliability_from_sums",
           "reliability_bins", "ece", "adaptive_ece", "mce"]

N_BINS = 15
"""Equal-width confidence bins of the ECE and the reliability diagram."""


# ----------------------------------------------------------------------------- softmax

def softmax_t(logits: np.ndarray, temperature: float = 1.0,
              dtype: np.dtype | type = np.float64) -> np.ndarray:
    """Temperature-scaled softmax ``softmax(logits / T)`` along the last axis.

    Computed in float64 with the maximum subtracted (no overflow for any finite logits).

    Parameters
    ----------
    logits : ndarray, shape (..., K)
        Raw class logits (or the log of a Monte-Carlo mean predictive).
    temperature : float
        Calibration temperature ``T > 0`` (dimensionless).
    dtype : numpy dtype
        Output type (float64 by default; the worker asks for float32, the wire type).

    Returns
    -------
    ndarray, shape (..., K)
        Class probabilities; each row sums to 1.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z if np.dtype(dtype) == np.float64 else z.astype(dtype)


# ----------------------------------------------------------------------------- intervals

def z_score(confidence: float = 0.95) -> float:
    """Two-sided standard-normal quantile: 1.959964 for ``confidence = 0.95``."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def _check_kn(k: int, n: int) -> None:
    if not (0 <= k <= n):
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``k / n``.

    Parameters
    ----------
    k, n : int
        Successes and trials (``0 <= k <= n``).
    confidence : float
        Two-sided coverage (0.95 for a 95 % interval).

    Returns
    -------
    (lower, upper) : tuple of float
        Bounds in [0, 1] (exactly 0 at ``k = 0`` and 1 at ``k = n``); ``(0.0, 1.0)`` when
        ``n == 0`` (no data: every proportion is possible).
    """
    _check_kn(k, n)
    if n == 0:
        return 0.0, 1.0
    z = z_score(confidence)
    p = k / n
    z2n = z * z / n
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(p * (1.0 - p) / n + z2n / (4.0 * n))
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    # exact endpoints at the boundaries (rounding otherwise leaves 1e-17)
    return (0.0 if k == 0 else lo), (1.0 if k == n else hi)


def clopper_pearson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper–Pearson ("exact") interval for ``k / n`` from beta quantiles.

    Parameters and return value as :func:`wilson_interval`.
    """
    from scipy.special import betaincinv  # quantile of the beta distribution

    _check_kn(k, n)
    if n == 0:
        return 0.0, 1.0
    a = 1.0 - confidence
    lo = 0.0 if k == 0 else float(betaincinv(k, n - k + 1, a / 2.0))
    hi = 1.0 if k == n else float(betaincinv(k + 1, n - k, 1.0 - a / 2.0))
    return lo, hi


# ----------------------------------------------------------------------------- prior shift

def em_prior_shift(probs: np.ndarray, train_prior: np.ndarray | None = None,
                   max_iter: int = 1000, tol: float = 1e-9,
                   start: np.ndarray | None = None) -> np.ndarray:
    """Class priors of a sample from calibrated posteriors (Saerens et al. 2002 EM).

    Iterates ``post_i ∝ p_i * prior / train_prior``, ``prior = mean_i post_i`` (Saerens,
    Latinne & Decaestecker, Neural Comput. 14:21, 2002).

    Parameters
    ----------
    probs : ndarray (N, K)
        Calibrated class probabilities of the model for the N cells of the sample.
    train_prior : ndarray (K,), optional
        Class priors the posteriors were calibrated under (uniform by default: class-balanced
        training and calibration data).
    max_iter, tol : int, float
        EM stopping rule (max change of any prior).
    start : ndarray (K,), optional
        Starting priors (default: the mean posterior).

    Returns
    -------
    ndarray (K,)
        Estimated class fractions of the sample (sum 1); NaN when ``N == 0``.
    """
    p = np.asarray(probs, dtype=np.float64)
    k = p.shape[1]
    tr = np.full(k, 1.0 / k) if train_prior is None else np.asarray(train_prior, np.float64)
    if len(p) == 0:
        return np.full(k, np.nan)
    prior = p.mean(axis=0) if start is None else np.asarray(start, np.float64)
    for _ in range(max_iter):
        post = p * (prior / tr)
        post /= np.maximum(post.sum(axis=1, keepdims=True), 1e-300)
        new = post.mean(axis=0)
        if np.abs(new - prior).max() < tol:
            return new
        prior = new
    return prior


# ----------------------------------------------------------------------------- calibration

def bin_sums(conf: np.ndarray, correct: np.ndarray, edges: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin count, sum of confidences and number correct for bins ``(edges[i], edges[i+1]]``.

    Sums (not means) so that bins of several recordings can be pooled by adding them.

    Parameters
    ----------
    conf : ndarray (N,)
        Top-label confidence per cell, in [0, 1].
    correct : ndarray (N,) of bool
        Whether the top label is the true class.
    edges : ndarray (B + 1,)
        Increasing bin edges (a confidence at or below ``edges[0]`` goes to the first bin).

    Returns
    -------
    count, sum_confidence, sum_correct : ndarray (B,)
        Float64.
    """
    conf = np.asarray(conf, np.float64)
    nb = len(edges) - 1
    idx = np.clip(np.searchsorted(np.asarray(edges, np.float64), conf, side="left") - 1,
                  0, nb - 1)
    count = np.bincount(idx, minlength=nb).astype(np.float64)
    sconf = np.bincount(idx, weights=conf, minlength=nb)
    sacc = np.bincount(idx, weights=np.asarray(correct, np.float64), minlength=nb)
    return count, sconf, sacc


def bin_stats(conf: np.ndarray, correct: np.ndarray, edges: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin count, mean confidence and accuracy (NaN for empty bins); see :func:`bin_sums`."""
    count, sconf, sacc = bin_sums(conf, correct, edges)
    with np.errstate(invalid="ignore", divide="ignore"):
        return count, sconf / count, sacc / count


def ece_from_sums(count: np.ndarray, sum_conf: np.ndarray, sum_correct: np.ndarray) -> float:
    """ECE ``sum_b |sum_correct_b - sum_conf_b| / n`` from :func:`bin_sums` (NaN if n = 0)."""
    n = float(np.sum(count))
    if n == 0:
        return float("nan")
    return float(np.sum(np.abs(np.asarray(sum_correct) - np.asarray(sum_conf))) / n)


def reliability_from_sums(edges: np.ndarray, count: np.ndarray, sum_conf: np.ndarray,
                          sum_correct: np.ndarray) -> dict[str, list]:
    """Reliability bins as JSON lists from :func:`bin_sums` (see :func:`reliability_bins`)."""
    count = np.asarray(count, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mc, ma = np.asarray(sum_conf) / count, np.asarray(sum_correct) / count
    return {"edges": np.asarray(edges, np.float64).tolist(),
            "count": count.astype(int).tolist(),
            "confidence": [float(v) if np.isfinite(v) else None for v in mc],
            "accuracy": [float(v) if np.isfinite(v) else None for v in ma]}


def _top(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, np.float64)
    return p.max(1), p.argmax(1) == np.asarray(labels)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS
                     ) -> dict[str, list]:
    """Reliability-diagram bins as JSON lists (equal-width, ``(lower, upper]``).

    Parameters
    ----------
    probs : ndarray (N, K)
        Calibrated probabilities.
    labels : ndarray (N,)
        True class index per cell (in-distribution cells only).
    n_bins : int
        Number of equal-width confidence bins.

    Returns
    -------
    dict
        ``edges`` (B + 1), ``count`` (int per bin), ``confidence`` and ``accuracy`` (mean per
        bin, ``None`` for empty bins).
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return reliability_from_sums(edges, *bin_sums(*_top(probs, labels), edges))


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """Top-label expected calibration error, equal-width bins (fraction, not %).

    NaN for no cells.
    """
    return ece_from_sums(*bin_sums(*_top(probs, labels), np.linspace(0.0, 1.0, n_bins + 1)))


def adaptive_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """Top-label ECE with equal-mass bins (Nixon et al. 2019; fraction)."""
    conf, correct = _top(probs, labels)
    correct = correct.astype(np.float64)
    order = np.argsort(conf, kind="stable")
    total = 0.0
    for chunk in np.array_split(order, min(n_bins, len(order))):
        if chunk.size:
            total += chunk.size * abs(correct[chunk].mean() - conf[chunk].mean())
    return float(total / len(conf))


def mce(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS,
        min_bin_count: int = 10) -> float:
    """Maximum calibration error over equal-width bins with >= ``min_bin_count`` cells.

    NaN when no bin has that many cells.
    """
    count, mc, ma = bin_stats(*_top(probs, labels), np.linspace(0.0, 1.0, n_bins + 1))
    ok = count >= min_bin_count
    return float(np.max(np.abs(ma[ok] - mc[ok]))) if ok.any() else float("nan")
