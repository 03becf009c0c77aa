"""Inference backends behind one registry, :data:`BACKENDS`.

``torch-cpu``, ``onnxruntime``, ``torch-cuda``, ``tensorrt`` and ``triton`` (forward passes on a
Triton Inference Server) register themselves here;
:func:`create_backend` builds one by name, with ``"auto"`` picking the fastest available in
the order of :data:`AUTO_ORDER` (measured: ONNX Runtime beats PyTorch on the CPU for
LeNet5 about 3x; on a GPU TensorRT >= PyTorch CUDA graphs).
"""

from __future__ import annotations

import logging
from typing import Any

from leukoflow.inference.backends import (  # noqa: F401
    onnx_cpu,
    tensorrt,
    torch_cpu,
    torch_cuda,
    triton,
)
from leukoflow.inference.backends.base import BACKENDS, BackendUnavailable

AUTO_ORDER: tuple[str, ...] = ("tensorrt", "torch-cuda", "onnxruntime", "torch-cpu")
"""Preference of ``--backend auto``, fastest first (``triton`` needs a server: never automatic)."""

log = logging.getLogger(__name__)


def available_backends() -> dict[str, str]:
    """Name -> ``""`` if usable here, else the reason it is not."""
    out = {}
    for name in BACKENDS:
        ok, why = BACKENDS.get(name).available()
        out[name] = "" if ok else why
    return out


def create_backend(name: str, artifact: Any, **options: Any) -> Any:
    """Build backend ``name`` (or the fastest available for ``"auto"``) for ``artifact``.

    Parameters
    ----------
    name : str
        Registry name or ``"auto"``.
    artifact : models.artifact.Artifact
        Loaded model.
    **options
        Backend keyword arguments (``max_batch``, ``threads``, ``precision`` ...).
    """

    if name != "auto":
        return BACKENDS.create(name, artifact=artifact, **options)
    errors = []
    for cand in AUTO_ORDER:
        ok, why = BACKENDS.get(cand).available()
        if not ok:
            errors.append(f"{cand}: {why}")
            continue
        try:
            return BACKENDS.create(cand, artifact=artifact, **options)
        except BackendUnavailable as exc:
            errors.append(f"{cand}: {exc}")
            log.info("backend %s unavailable: %s", cand, exc)
    raise BackendUnavailable("no inference backend available: " + "; ".join(errors))
