"""PyTorch on the CPU (float32, one intra-op thread per worker unless told otherwise).

One thread is the default because LeNet-sized models are pathologically slower with two
threads at small batches on a 2-core machine (DESIGN.md performance model), and several
workers on one host should not oversubscribe the cores.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from leukoflow.inference.backends.base import BACKENDS, Backend, BackendOutput, finite_rows


@BACKENDS.register("torch-cpu")
class TorchCpuBackend(Backend):
    """PyTorch eager execution on the CPU.

    Parameters
    ----------
    artifact, max_batch
        See :class:`~leukoflow.inference.backends.base.Backend`.
    pipeline : bool
        Compute in a background thread (see :class:`~leukoflow.inference.backends.base.Backend`).
    threads : int or None
        ``torch.set_num_threads`` (process-wide); None leaves it at 1.
    """

    name = "torch-cpu"

    def __init__(self, artifact: Any, max_batch: int = 256, threads: int | None = None,
                 pipeline: bool = False,
                 **_: Any) -> None:
        super().__init__(artifact, max_batch, pipeline=pipeline)
        import torch

        from leukoflow.inference.backends.torch_module import build_inference_module

        self.threads = int(threads or 1)
        torch.set_num_threads(self.threads)
        self._torch = torch
        self.module = build_inference_module(artifact)
        with torch.inference_mode():
            _, f = self.module(torch.zeros(1, self.input_size, self.input_size))
        self._feature_dim = int(f.shape[1])

    def compute(self, x: np.ndarray, n: int) -> BackendOutput:
        torch = self._torch
        xv = np.ascontiguousarray(x[:n], dtype=np.float32)
        with torch.inference_mode():
            logits, feats = self.module(torch.from_numpy(xv))
        return BackendOutput(logits.numpy(), feats.numpy(), finite_rows(xv))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "threads": self.threads}
