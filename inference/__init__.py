"""Inference worker: dynamic batching, backends, calibrated decisions, live differential.

Modules (one job each):

* :mod:`inference.batcher` — :class:`~inference.batcher.DynamicBatcher` (run at ``max_batch``
  cells or when the oldest waited ``max_delay``; bucket padding; injectable clock).
* :mod:`inference.backends` — registry ``BACKENDS`` (``torch-cpu``, ``onnxruntime``,
  ``torch-cuda``, ``tensorrt``) and :func:`~inference.backends.create_backend` (``auto``).
* :mod:`inference.decision` — ``softmax(logits / T)``, OOD test, confidence test.
* :mod:`inference.differential` — :class:`~inference.differential.Differential` (counts,
  Wilson / Clopper–Pearson 95 % intervals, probabilistic count, rejected/dropped).
* :mod:`inference.routing` — bounded, non-blocking routing of flagged cells to the explainer.
* :mod:`inference.accounting` — per-cell outcomes and sequence gaps.
* :mod:`inference.telemetry` — the worker's Prometheus families.
* :mod:`inference.worker` — the service (``leukoflow infer``).
* :mod:`inference.testing` — artifacts, crops, producer and sink for tests and benchmarks.
"""
