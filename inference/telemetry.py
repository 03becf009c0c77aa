"""Prometheus metrics of the inference worker (Triton-like families, base units).

Per-cell histograms (confidence, OOD score, queue time, end-to-end latency) are updated
with one vectorised bucket count per batch (:func:`observe_many`) instead of one Python call
per cell, so metrics stay cheap at hundreds of thousands of cells per second.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from leukoflow.core.metrics import ServiceMetrics
from leukoflow.core.vocabulary import DECISIONS


def observe_many(hist: Any, values: np.ndarray, weights: np.ndarray | None = None) -> None:
    """Add many observations to a ``prometheus_client`` Histogram (unlabelled child).

    Parameters
    ----------
    hist : prometheus_client.Histogram
        Histogram (or a labelled child).
    values : ndarray
        Observed values (base units); non-finite values are skipped.
    weights : ndarray, optional
        Integer multiplicity of each value (default 1).
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    w = np.ones(v.shape, np.int64) if weights is None else np.asarray(weights, np.int64)
    keep = np.isfinite(v)
    v, w = v[keep], w[keep]
    if v.size == 0:
        return
    bounds = getattr(hist, "_upper_bounds", None)
    buckets = getattr(hist, "_buckets", None)
    total = getattr(hist, "_sum", None)
    if bounds is None or buckets is None or total is None:  # pragma: no cover - other client
        for x, k in zip(v, w, strict=True):
            for _ in range(int(k)):
                hist.observe(float(x))
        return
    # prometheus_client counts x in the first bucket with x <= bound (non-cumulative store)
    idx = np.searchsorted(np.asarray(bounds, dtype=np.float64), v, side="left")
    counts = np.bincount(idx, weights=w, minlength=len(bounds))
    for i in np.flatnonzero(counts):
        buckets[i].inc(int(counts[i]))
    total.inc(float(np.dot(v, w)))


class InferMetrics:
    """The worker's metric families, created eagerly so ``/metrics`` lists them all.

    Parameters
    ----------
    run_id : str
        Run id label of ``leukoflow_service_info``.
    class_names : sequence of str
        Classes (label values of ``leukoflow_cells_classified_total``).
    """

    FAMILIES = (
        "leukoflow_inference_request_success_total",
        "leukoflow_inference_request_failure_total",
        "leukoflow_inference_count_total",
        "leukoflow_inference_exec_count_total",
        "leukoflow_inference_pending_requests",
        "leukoflow_inference_queue_duration_seconds",
        "leukoflow_inference_compute_infer_duration_seconds",
        "leukoflow_inference_request_duration_seconds",
        "leukoflow_batch_size",
        "leukoflow_e2e_latency_seconds",
        "leukoflow_cells_classified_total",
        "leukoflow_decisions_total",
        "leukoflow_confidence",
        "leukoflow_ood_score",
        "leukoflow_explainer_routed_total",
        "leukoflow_model_info",
        "leukoflow_dropped_total",
        "leukoflow_messages_rejected_total",
        "leukoflow_sequence_gaps_total",
        "leukoflow_queue_depth",
        "leukoflow_stage_duration_seconds",
    )

    def __init__(self, run_id: str = "", class_names: tuple[str, ...] = ()) -> None:
        self.m = ServiceMetrics("infer", run_id=run_id)
        for name in self.FAMILIES:
            self.m[name]
        self.class_names = tuple(class_names)
        self._classified = [self.m["leukoflow_cells_classified_total"].labels(c)
                            for c in self.class_names]

        self._decisions = [self.m["leukoflow_decisions_total"].labels(d) for d in DECISIONS]
        for c in self._classified + self._decisions:
            c.inc(0)

    def __getitem__(self, name: str) -> Any:
        return self.m[name]

    def batch(self, n: int, compute_s: float) -> None:
        """One executed batch of ``n`` cells that took ``compute_s`` [s]."""
        self.m["leukoflow_inference_exec_count_total"].inc()
        self.m["leukoflow_inference_count_total"].inc(n)
        self.m["leukoflow_batch_size"].observe(n)
        self.m["leukoflow_inference_compute_infer_duration_seconds"].observe(compute_s)

    def decisions(self, pred: np.ndarray, code: np.ndarray, conf: np.ndarray,
                  ood_margin: np.ndarray) -> None:
        """Per-cell counters and histograms of one batch."""
        k = len(self.class_names)
        per_class = np.bincount(pred[code == 0], minlength=k)
        for i in np.flatnonzero(per_class):
            self._classified[i].inc(int(per_class[i]))
        per_dec = np.bincount(code, minlength=len(self._decisions))
        for i in np.flatnonzero(per_dec):
            self._decisions[i].inc(int(per_dec[i]))
        observe_many(self.m["leukoflow_confidence"], conf)
        observe_many(self.m["leukoflow_ood_score"], ood_margin)

    def reject(self, reason: str, cells: int, message: bool = False) -> None:
        """Rejected input (cells dropped at the inference stage, by reason)."""
        if message:
            self.m["leukoflow_messages_rejected_total"].labels(reason).inc()
            self.m["leukoflow_inference_request_failure_total"].labels(reason).inc()
        if cells:
            self.m["leukoflow_dropped_total"].labels("infer", reason).inc(cells)
