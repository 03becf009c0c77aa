"""Explanations for flagged cells: methods, async service, meta-explanations, dataset audit.

* :mod:`explain.methods` - explanation methods behind the :data:`explain.methods.EXPLAINERS`
  registry (batched fused multi-SLIC LIME, Guided Backprop, Grad-CAM, Integrated Gradients,
  occlusion).
* :mod:`explain.lime_batched` - the vectorised LIME core (one batched forward per cell).
* :mod:`explain.service` - the ``leukoflow explain`` service (bounded backlog, artifacts).
* :mod:`explain.meta` - meta-explanations (per class/confidence, SpRAy clustering, TCAV,
  relevance location).
* :mod:`explain.audit` - dataset audit for mislabeled samples and outliers.

Heavy dependencies (torch, captum, scikit-image) are imported by the submodules only.
"""
