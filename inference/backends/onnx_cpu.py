"""ONNX Runtime on the CPU (CPU execution provider, float32).

The artifact's network, wrapped with its normalisation (:mod:`.torch_module`), is exported
once to ONNX with a dynamic batch axis and cached as
``<cache_dir>/onnx/<architecture>-<model sha256[:16]>-<key>.onnx``; ``key`` hashes the input
size, normalisation, opset and exporter so a changed preprocessing never reuses a stale
graph. Default cache dir: ``$LEUKOFLOW_CACHE_DIR`` or ``~/.cache/leukoflow``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from leukoflow.inference.backends.base import (
    BACKENDS,
    Backend,
    BackendOutput,
    BackendUnavailable,
    finite_rows,
)

OPSET = 17


def default_cache_dir() -> Path:
    """``$LEUKOFLOW_CACHE_DIR`` or ``~/.cache/leukoflow``."""
    env = os.environ.get("LEUKOFLOW_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "leukoflow"


def onnx_path(artifact: Any, cache_dir: Path | str | None = None) -> Path:
    """Cache path of the exported graph for ``artifact``."""
    key = json.dumps({"size": artifact.input_size, "norm": artifact.normalisation,
                      "opset": OPSET, "io": "crops->logits,features", "v": 1}, sort_keys=True)
    tag = hashlib.sha256(key.encode()).hexdigest()[:8]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return root / "onnx" / f"{artifact.architecture}-{artifact.sha256[:16]}-{tag}.onnx"


def export_onnx(artifact: Any, cache_dir: Path | str | None = None) -> Path:
    """Export (or reuse) the ONNX graph ``crops (N, H, W) -> logits (N, K), features (N, D)``.

    The file is written to a temporary name and renamed, so concurrent workers never read a
    half-written graph.
    """
    path = onnx_path(artifact, cache_dir)
    if path.is_file():
        return path
    import torch

    from leukoflow.inference.backends.torch_module import build_inference_module

    path.parent.mkdir(parents=True, exist_ok=True)
    module = build_inference_module(artifact)
    s = artifact.input_size
    x = torch.zeros(2, s, s)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (x,), tmp, input_names=["crops"], output_names=["logits", "features"],
                dynamic_axes={"crops": {0: "n"}, "logits": {0: "n"}, "features": {0: "n"}},
                opset_version=OPSET, dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@BACKENDS.register("onnxruntime")
class OnnxRuntimeBackend(Backend):
    """ONNX Runtime, CPU execution provider.

    Parameters
    ----------
    artifact, max_batch
        See :class:`~leukoflow.inference.backends.base.Backend`.
    pipeline : bool
        Compute in a background thread (see :class:`~leukoflow.inference.backends.base.Backend`).
    threads : int or None
        Intra-op threads (default 1; inter-op is always 1, sequential execution).
    cache_dir : path, optional
        Root of the export cache.
    """

    name = "onnxruntime"

    def __init__(self, artifact: Any, max_batch: int = 256, threads: int | None = None,
                 pipeline: bool = False,
                 cache_dir: str | Path | None = None, **_: Any) -> None:
        super().__init__(artifact, max_batch, pipeline=pipeline)
        ok, why = self.available()
        if not ok:
            raise BackendUnavailable(why)
        import onnxruntime as ort

        self.threads = int(threads or 1)
        self.path = export_onnx(artifact, cache_dir)
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), sess_options=so,
                                            providers=["CPUExecutionProvider"])
        _, f = self.session.run(None, {"crops": np.zeros((1, self.input_size, self.input_size),
                                                         np.float32)})
        self._feature_dim = int(f.shape[1])

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError:
            return False, "onnxruntime is not installed"
        if "CPUExecutionProvider" not in ort.get_available_providers():
            return False, "onnxruntime has no CPU execution provider"
        return True, ""

    def compute(self, x: np.ndarray, n: int) -> BackendOutput:
        xv = np.ascontiguousarray(x[:n], dtype=np.float32)
        logits, feats = self.session.run(None, {"crops": xv})
        return BackendOutput(logits, feats, finite_rows(xv))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "threads": self.threads, "onnx": str(self.path),
                "provider": "CPUExecutionProvider"}
