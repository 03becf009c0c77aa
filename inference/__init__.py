"""Inference worker: dynamic batching, backends, calibrated decisions, live differential.

Modules (one job each):

* :mod:`leukoflow.inference.batcher` — :class:`~leukoflow.inference.batcher.DynamicBatcher` (run at
  ``max_batch``
  cells or when the oldest waited ``max_delay``; bucket padding; injectable clock).
* :mod:`leukoflow.inference.backends` — registry ``BACKENDS`` (``torch-cpu``, ``onnxruntime``,
  ``torch-cuda``, ``tensorrt``) and :func:`~leukoflow.inference.backends.create_backend` (``auto``).
* :mod:`leukoflow.inference.decision` — ``softmax(logits / T)``, OOD test, confidence
  test.
* :mod:`leukoflow.inference.differential` — :class:`~leukoflow.inference.differential.Differential`
  (counts, Wilson / Clopper–Pearson 95 % intervals, probabilistic count, rejected/dropped).
* :mod:`leukoflow.inference.routing` — bounded, non-blocking routing of flagged cells to the
  explainer.
* :mod:`leukoflow.inference.accounting` — per-cell outcomes and sequence
  gaps.
* :mod:`leukoflow.inference.telemetry` — the worker's Prometheus families.
* :mod:`leukoflow.inference.worker` — the service (``leukoflow infer``).
"""
