"""The live four-part differential: counts, percentages with 95 % intervals, accounting.

:class:`Differential` is shared by the inference worker (its own live view and metrics) and
the collector (the run's official count). It keeps

* counted cells per class (argmax of the calibrated probabilities),
* cells per decision (``counted``, ``uncertain``, ``ood``),
* rejected and dropped cells by reason,
* a *probabilistic count* per class: the sum of calibrated probabilities over counted cells
  (beside the argmax count; it does not round confident-but-not-certain cells to 1), and the
  same sum over every in-distribution cell (counted + uncertain),

and reports each class fraction of the counted cells with a 95 % **Wilson score interval**
(default; Clopper–Pearson "exact" intervals on request with ``method="clopper-pearson"``).
Wilson is used by default because its coverage stays close to nominal for small counts and
fractions near 0 or 1, where the normal (Wald) interval fails, and it is less conservative
than Clopper–Pearson (Brown, Cai & DasGupta, Statist. Sci. 16:101, 2001).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from inference.decision import DECISIONS
from leukoflow import CLASS_NAMES

INTERVAL_METHODS = ("wilson", "clopper-pearson")


def _z(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2.0))


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
        Bounds in [0, 1]; ``(0.0, 1.0)`` when ``n == 0``.
    """
    _check_kn(k, n)
    if n == 0:
        return 0.0, 1.0
    z = _z(confidence)
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
    from scipy.stats import beta

    _check_kn(k, n)
    if n == 0:
        return 0.0, 1.0
    a = 1.0 - confidence
    lo = 0.0 if k == 0 else float(beta.ppf(a / 2.0, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1.0 - a / 2.0, k + 1, n - k))
    return lo, hi


def _check_kn(k: int, n: int) -> None:
    if not (0 <= k <= n):
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")


class Differential:
    """Running differential count with intervals and full cell accounting.

    Parameters
    ----------
    class_names : sequence of str
        Class names in model output order.
    confidence : float
        Coverage of the reported intervals (0.95).
    method : {"wilson", "clopper-pearson"}
        Interval method for the class fractions.
    """

    def __init__(self, class_names: Sequence[str] = CLASS_NAMES, confidence: float = 0.95,
                 method: str = "wilson") -> None:
        if method not in INTERVAL_METHODS:
            raise ValueError(f"unknown interval method {method!r}; use one of {INTERVAL_METHODS}")
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        self.class_names = tuple(class_names)
        self.confidence = float(confidence)
        self.method = method
        k = len(self.class_names)
        self.class_counts = np.zeros(k, dtype=np.int64)
        self.decision_counts = np.zeros(len(DECISIONS), dtype=np.int64)
        self.prob_counted = np.zeros(k, dtype=np.float64)
        self.prob_in_dist = np.zeros(k, dtype=np.float64)
        self.rejected: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()

    # -- updates -------------------------------------------------------------------------
    def add(self, pred: Iterable[int] | np.ndarray, decision: Iterable[Any] | np.ndarray,
            probs: np.ndarray | None = None) -> None:
        """Add classified cells.

        Parameters
        ----------
        pred : array of int, shape (N,)
            Predicted class index per cell.
        decision : array, shape (N,)
            Decision per cell, as codes (index into ``DECISIONS``) or names.
        probs : ndarray (N, K), optional
            Calibrated probabilities (for the probabilistic count).
        """
        pred = np.asarray(pred, dtype=np.int64).reshape(-1)
        dec = np.asarray(decision).reshape(-1)
        if dec.dtype.kind in "UO":
            lut = {name: i for i, name in enumerate(DECISIONS)}
            try:
                dec = np.fromiter((lut[d] for d in dec), dtype=np.int64, count=dec.size)
            except KeyError as exc:
                raise ValueError(f"unknown decision {exc.args[0]!r}") from None
        else:
            dec = dec.astype(np.int64)
        if pred.shape != dec.shape:
            raise ValueError(f"pred {pred.shape} and decision {dec.shape} differ")
        k = len(self.class_names)
        if pred.size and (pred.min() < 0 or pred.max() >= k):
            raise ValueError(f"class index out of range 0..{k - 1}")
        if dec.size and (dec.min() < 0 or dec.max() >= len(DECISIONS)):
            raise ValueError("decision code out of range")
        self.decision_counts += np.bincount(dec, minlength=len(DECISIONS))
        counted = dec == 0
        self.class_counts += np.bincount(pred[counted], minlength=k)
        if probs is not None:
            probs = np.asarray(probs, dtype=np.float64)
            if probs.shape != (pred.size, k):
                raise ValueError(f"probs shape {probs.shape}, expected ({pred.size}, {k})")
            self.prob_counted += probs[counted].sum(axis=0)
            self.prob_in_dist += probs[dec <= 1].sum(axis=0)

    def add_results(self, header: Mapping[str, Any], probs: np.ndarray | None = None) -> None:
        """Add the cells of a wire ``results`` message (header keys ``pred``, ``decision``)."""
        self.add(header["pred"], list(header["decision"]), probs)

    def reject(self, reason: str, n: int = 1) -> None:
        """Count ``n`` cells rejected (bad input) with ``reason``."""
        if n:
            self.rejected[reason] += int(n)

    def drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` cells dropped (lost, back-pressure, gap) with ``reason``."""
        if n:
            self.dropped[reason] += int(n)

    def merge(self, other: Differential) -> None:
        """Add another differential (e.g. from a second worker) into this one."""
        if other.class_names != self.class_names:
            raise ValueError("class names differ")
        self.class_counts += other.class_counts
        self.decision_counts += other.decision_counts
        self.prob_counted += other.prob_counted
        self.prob_in_dist += other.prob_in_dist
        self.rejected.update(other.rejected)
        self.dropped.update(other.dropped)

    # -- read-out ------------------------------------------------------------------------
    @property
    def counted(self) -> int:
        """Cells counted into the differential."""
        return int(self.decision_counts[0])

    @property
    def classified(self) -> int:
        """Cells with any decision (counted + uncertain + OOD)."""
        return int(self.decision_counts.sum())

    @property
    def total(self) -> int:
        """Every cell accounted for: classified + rejected + dropped."""
        return self.classified + sum(self.rejected.values()) + sum(self.dropped.values())

    def interval(self, k: int, n: int) -> tuple[float, float]:
        """Interval of the configured method for ``k / n``."""
        f = wilson_interval if self.method == "wilson" else clopper_pearson_interval
        return f(k, n, self.confidence)

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready summary (fractions are ``None`` while nothing is counted)."""
        n = self.counted
        classes = {}
        for i, name in enumerate(self.class_names):
            k = int(self.class_counts[i])
            lo, hi = self.interval(k, n)
            classes[name] = {
                "count": k,
                "fraction": (k / n) if n else None,
                "lower": lo,
                "upper": hi,
                "probabilistic_count": float(self.prob_counted[i]),
                "probabilistic_count_in_distribution": float(self.prob_in_dist[i]),
            }
        return {
            "classes": classes,
            "decisions": {d: int(c) for d, c in zip(DECISIONS, self.decision_counts, strict=True)},
            "rejected": dict(self.rejected),
            "dropped": dict(self.dropped),
            "counted": n,
            "total": self.total,
            "interval": {"method": self.method, "confidence": self.confidence},
        }
