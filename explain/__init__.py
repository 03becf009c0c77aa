"""Explanations for flagged cells: methods, async service, meta-explanations, dataset audit.

* :mod:`leukoflow.explain.methods` - explanation methods behind the
  :data:`leukoflow.explain.methods.EXPLAINERS`
  registry (batched fused multi-SLIC LIME, Guided Backprop, Grad-CAM, Integrated Gradients,
  occlusion).
* :mod:`leukoflow.explain.lime_batched` - the vectorised LIME core (one batched forward per cell).
* :mod:`leukoflow.explain.service` - the ``leukoflow explain`` service (bounded backlog, artifacts).
* :mod:`leukoflow.research.meta` - meta-explanations (per class/confidence, SpRAy clustering, TCAV,
  relevance location).
* :mod:`leukoflow.research.audit` - dataset audit for mislabeled samples and outliers.

Helpers: :mod:`leukoflow.explain.model` (the explainer's model copy),
:mod:`leukoflow.explain.segmentation`
(cell mask, maskSLIC), :mod:`leukoflow.explain.artifacts` (per-cell
JSON/NPZ/PNG),
:mod:`leukoflow.research.evaluation` (deletion curves, randomisation check),
:mod:`leukoflow.research.location`
(interior vs rim relevance), :mod:`leukoflow.research.spray`,
:mod:`leukoflow.research.tcav`,
:mod:`leukoflow.research.ring_descriptors` (rotation-invariant phase descriptors for the audit),
:mod:`leukoflow.explain.ort_engine` (ONNX Runtime scorer),
:mod:`leukoflow.benchmarks.workload_explain` (seeded fixtures).

Heavy dependencies (torch, captum, scikit-image) are imported by the submodules only.
"""
