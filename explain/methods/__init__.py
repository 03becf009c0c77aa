"""Explanation methods behind one registry.

``EXPLAINERS.create("lime", bundle=bundle, n_samples=500)`` returns an
:class:`~leukoflow.explain.methods.base.Explainer`;
:meth:`~leukoflow.explain.methods.base.Explainer.explain`
takes crops (B, H, W) [rad] and one target per crop and returns
:class:`~leukoflow.explain.methods.base.Explanation` objects.

Registered: ``lime`` (batched fused multi-SLIC LIME), ``guided_backprop``, ``gradcam``,
``integrated_gradients``, ``occlusion`` (Captum).
"""

from __future__ import annotations

from leukoflow.core.registry import Registry

EXPLAINERS: Registry = Registry("explainer")

from leukoflow.explain.methods import captum_methods, lime  # noqa: E402,F401  (register plugins)
from leukoflow.explain.methods.base import Explainer, Explanation  # noqa: E402

__all__ = ["EXPLAINERS", "Explainer", "Explanation"]
