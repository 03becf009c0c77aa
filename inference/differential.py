"""The live four-part differential: counts, percentages with 95 % intervals, accounting.

:class:`Differential` is shared by the inference worker (its own live view and metrics) and
the collector (the run's official count). It keeps

* counted cells per class (argmax of the calibrated probabilities),
* cells per decision (``counted``, ``uncertain``, ``ood``),
* rejected and dropped cells by reason,
* a *probabilistic count* per class: the sum of calibrated probabilities over counted cells
  (beside the argmax count; it does not round confident-but-not-certain cells to 1), and the
  same sum over every in-distribution cell (counted + uncertain),

and an **estimated differential** corrected for prior shift: the model is trained and
calibrated on class-balanced data, but blood is not balanced (about 60 % neutrophils, 3 %
eosinophils), so counting argmax decisions — or summing calibrated probabilities —
over-reports rare classes in proportion to the model's confusions. The estimate re-weights
the calibrated posteriors of every in-distribution cell (counted + uncertain) to the class
priors of the sample with the EM algorithm of Saerens, Latinne & Decaestecker (Neural Comput.
14:21, 2002), with a bootstrap 95 % interval. It is the number to report; the argmax count is
kept beside it.

Each class fraction of the counted cells is reported with a 95 % **Wilson score interval**
(default; Clopper–Pearson "exact" intervals on request with ``method="clopper-pearson"``).
Wilson is used by default because its coverage stays close to nominal for small counts and
fractions near 0 or 1, where the normal (Wald) interval fails, and it is less conservative
than Clopper–Pearson (Brown, Cai & DasGupta, Statist. Sci. 16:101, 2001).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from leukoflow.core.stats import clopper_pearson_interval, em_prior_shift, wilson_interval
from leukoflow.core.vocabulary import CLASS_NAMES, DECISIONS

INTERVAL_METHODS = ("wilson", "clopper-pearson")


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

    #: cells kept for the prior-shift estimate (float32 posteriors; 16 B/cell at K=4)
    MAX_KEPT = 2_000_000
    #: bootstrap resamples and the cell cap per resample for the estimate's interval
    BOOTSTRAP = 100
    BOOTSTRAP_CAP = 5_000
    #: live snapshots reuse the estimate until the cell count grew by this fraction
    REFRESH = 0.02

    def __init__(self, class_names: Sequence[str] = CLASS_NAMES, confidence: float = 0.95,
                 method: str = "wilson", train_prior: Sequence[float] | None = None,
                 seed: int = 0) -> None:
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
        self.train_prior = (np.full(k, 1.0 / k) if train_prior is None
                            else np.asarray(train_prior, dtype=np.float64))
        self._kept: list[np.ndarray] = []
        self._n_kept = 0
        self._rng = np.random.default_rng(seed)
        self._estimate_cache: tuple[int, dict[str, Any]] | None = None

    def _keep(self, probs: np.ndarray) -> None:
        room = self.MAX_KEPT - self._n_kept
        if room > 0 and len(probs):
            part = np.asarray(probs[:room], dtype=np.float32)
            self._kept.append(part)
            self._n_kept += len(part)

    def _kept_probs(self) -> np.ndarray:
        if len(self._kept) > 1:
            self._kept = [np.concatenate(self._kept)]
        return self._kept[0] if self._kept else np.zeros((0, len(self.class_names)), np.float32)

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
            self._keep(probs[dec <= 1])

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
        self._keep(other._kept_probs())

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

    def estimate(self, exact: bool = False) -> dict[str, Any]:
        """Prior-shift corrected differential with bootstrap intervals.

        Parameters
        ----------
        exact : bool
            Recompute for the current cells; otherwise a cached estimate is reused until the
            number of cells grew by :attr:`REFRESH` (live views call this every second).

        Returns
        -------
        dict
            ``n`` (in-distribution cells used), ``fraction``/``lower``/``upper`` per class
            (``None`` without cells) and the method description.
        """
        p = self._kept_probs()
        n = len(p)
        if self._estimate_cache is not None:
            n0, cached = self._estimate_cache
            if n0 == n or (not exact and n0 > 0 and n <= n0 * (1.0 + self.REFRESH)):
                return cached
        names = self.class_names
        out: dict[str, Any] = {
            "method": "EM prior-shift correction of calibrated posteriors (Saerens 2002), "
                      f"bootstrap {self.confidence:.0%} interval",
            "n": n, "classes": {c: {"fraction": None, "lower": 0.0, "upper": 1.0} for c in names},
        }
        if n:
            est = em_prior_shift(p, self.train_prior)
            m = min(n, self.BOOTSTRAP_CAP)
            boots = np.empty((self.BOOTSTRAP, len(names)))
            for b in range(self.BOOTSTRAP):
                idx = self._rng.integers(0, n, m)
                boots[b] = em_prior_shift(p[idx], self.train_prior, tol=1e-6, start=est)
            # spread of the capped resamples, scaled to the full sample (sd ~ 1/sqrt(n))
            scale = np.sqrt(m / n)
            a = (1.0 - self.confidence) / 2.0
            lo_q, hi_q = np.quantile(boots, [a, 1.0 - a], axis=0)
            for i, c in enumerate(names):
                lo = est[i] - (est[i] - lo_q[i]) * scale
                hi = est[i] + (hi_q[i] - est[i]) * scale
                out["classes"][c] = {"fraction": float(est[i]), "lower": float(max(0.0, lo)),
                                     "upper": float(min(1.0, hi))}
        self._estimate_cache = (n, out)
        return out

    def snapshot(self, exact: bool = False) -> dict[str, Any]:
        """JSON-ready summary (fractions are ``None`` while nothing is counted).

        ``exact`` recomputes the prior-shift estimate for every cell (final summaries).
        """
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
            "estimate": self.estimate(exact=exact),
            "total": self.total,
            "interval": {"method": self.method, "confidence": self.confidence},
        }
