"""Explanations for flagged cells: methods, async service, meta-explanations, dataset audit.

* :mod:`explain.methods` - explanation methods behind the :data:`explain.methods.EXPLAINERS`
  registry (batched fused multi-SLIC LIME, Guided Backprop, Grad-CAM, Integrated Gradients,
  occlusion).
* :mod:`explain.lime_batched` - the vectorised LIME core (one batched forward per cell).
* :mod:`explain.service` - the ``leukoflow explain`` service (bounded backlog, artifacts).
* :mod:`explain.meta` - meta-explanations (per class/confidence, SpRAy clustering, TCAV,
  relevance location).
* :mod:`explain.audit` - dataset audit for mislabeled samples and outliers.

Helpers: :mod:`explain.model` (the explainer's model copy), :mod:`explain.segmentation`
(cell mask, maskSLIC), :mod:`explain.artifacts` (per-cell JSON/NPZ/PNG),
:mod:`explain.evaluation` (deletion curves, randomisation check), :mod:`explain.location`
(interior vs rim relevance), :mod:`explain.spray`, :mod:`explain.tcav`,
:mod:`explain.descriptors` (rotation-invariant phase descriptors for the audit),
:mod:`explain.ort_engine` (ONNX Runtime scorer), :mod:`explain.testing` (seeded fixtures).

Heavy dependencies (torch, captum, scikit-image) are imported by the submodules only.
"""
