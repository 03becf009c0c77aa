"""PyTorch on an NVIDIA GPU: fp16, pinned host buffers, one CUDA graph per batch bucket.

Data path per batch (all on one dedicated stream, nothing on the default stream):
worker gathers crops into a pinned host buffer (two, alternating) -> async H2D copy into a
static device buffer -> CUDA-graph replay of the bucket's captured forward (normalisation,
network, finite check, OOD score) -> async D2H copy of the outputs into pinned output
buffers -> event. :meth:`collect` waits on the event, so the worker can post-process the
previous batch while the GPU runs the current one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from leukoflow.inference.backends.base import (
    BACKENDS,
    Backend,
    BackendOutput,
    BackendUnavailable,
    pow2_buckets,
)


@dataclass
class _Handle:
    event: Any
    slot: int
    n: int


@BACKENDS.register("torch-cuda")
class TorchCudaBackend(Backend):
    """PyTorch CUDA backend.

    Parameters
    ----------
    artifact, max_batch
        See :class:`~leukoflow.inference.backends.base.Backend`.
    precision : {"fp16", "fp32"}
        Compute precision (outputs are float32).
    cuda_graphs : bool
        Capture one CUDA graph per bucket (default True).
    device : str
        Torch device, e.g. ``"cuda:0"``.
    min_bucket : int
        Smallest bucket; buckets are powers of two up to ``max_batch``.
    device_ood : bool
        Compute the artifact's OOD score on the GPU inside the graph
        (:mod:`leukoflow.inference.backends.device_ood`, float32) instead of on the host.
    """

    name = "torch-cuda"
    device_kind = "cuda"
    max_in_flight = 2

    def __init__(self, artifact: Any, max_batch: int = 256, precision: str = "fp16",
                 cuda_graphs: bool = True, device: str = "cuda:0", min_bucket: int = 8,
                 device_ood: bool = True, **_: Any) -> None:
        super().__init__(artifact, max_batch)
        ok, why = self.available()
        if not ok:
            raise BackendUnavailable(why)
        import torch

        from leukoflow.inference.backends.torch_module import build_inference_module

        if precision not in ("fp16", "fp32"):
            raise ValueError(f"precision must be fp16 or fp32, got {precision!r}")
        self._torch = torch
        self.precision = precision
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.input_dtype = np.dtype(np.float16 if precision == "fp16" else np.float32)
        self.device = torch.device(device)
        self.cuda_graphs = bool(cuda_graphs)
        self.buckets = pow2_buckets(self.max_batch, min(min_bucket, self.max_batch))
        module = build_inference_module(artifact, with_finite=True)
        self.scorer = None
        if device_ood and getattr(artifact, "ood", None):
            from leukoflow.inference.backends.device_ood import ScoredModule, torch_scorer

            self.scorer = torch_scorer(artifact.ood_detector())
            if self.scorer is not None:  # float32 scoring on the device, in the graph
                module = ScoredModule(module.to(self.dtype), self.scorer.float())
        self.module = module.to(self.device) if self.scorer is not None else module.to(
            self.device, self.dtype)
        self.module.eval()
        self.stream = torch.cuda.Stream(self.device)
        s, m = self.input_size, self.max_batch
        self._host_in = [torch.empty((m, s, s), dtype=self.dtype, pin_memory=True)
                         for _ in range(2)]
        self._host_in_np = [t.numpy() for t in self._host_in]
        self._dev_in = torch.zeros((m, s, s), dtype=self.dtype, device=self.device)
        with torch.inference_mode():
            f = self.module(self._dev_in[:1])[1]
        self._feature_dim = int(f.shape[1])
        k, d = self.num_classes, self._feature_dim
        self._host_out = [
            (torch.empty((m, k), dtype=torch.float32, pin_memory=True),
             torch.empty((m, d), dtype=torch.float32, pin_memory=True),
             torch.empty((m,), dtype=torch.bool, pin_memory=True),
             torch.empty((m,), dtype=torch.float32, pin_memory=True))
            for _ in range(2)
        ]
        self._graphs: dict[int, tuple[Any, tuple[Any, Any, Any]]] = {}
        self._slot = 0

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import torch
        except ImportError:  # pragma: no cover
            return False, "torch is not installed"
        if not torch.cuda.is_available():
            return False, "no CUDA device visible to torch"
        return True, ""

    # -- graphs ----------------------------------------------------------------------------
    def _graph(self, b: int) -> tuple[Any, tuple[Any, Any, Any]]:
        g = self._graphs.get(b)
        if g is not None:
            return g
        torch = self._torch
        x = self._dev_in[:b]
        with torch.inference_mode():
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                for _ in range(3):  # warm-up outside capture (cuDNN autotune, allocations)
                    self.module(x)
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            # a private memory pool per graph: replays in any bucket order stay independent
            with torch.cuda.graph(graph, stream=self.stream):
                outs = self.module(x)
        self._graphs[b] = (graph, outs)
        return self._graphs[b]

    # -- execution -------------------------------------------------------------------------
    def host_buffer(self, rows: int) -> np.ndarray:
        return self._host_in_np[self._slot][:rows]

    def submit(self, x: np.ndarray, n: int) -> _Handle:
        torch = self._torch
        b = x.shape[0]
        slot = self._slot
        hin = self._host_in[slot]
        if x.__array_interface__["data"][0] != hin.data_ptr():
            self._host_in_np[slot][:b] = x  # not our staging buffer: copy (and convert)
        lo, fe, fi, sc = self._host_out[slot]
        with torch.inference_mode(), torch.cuda.stream(self.stream):
            self._dev_in[:b].copy_(hin[:b], non_blocking=True)
            if self.cuda_graphs:
                graph, outs = self._graph(b)
                graph.replay()
            else:
                outs = self.module(self._dev_in[:b])
            lo[:b].copy_(outs[0], non_blocking=True)
            fe[:b].copy_(outs[1], non_blocking=True)
            fi[:b].copy_(outs[2], non_blocking=True)
            if self.scorer is not None:
                sc[:b].copy_(outs[3], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self._slot ^= 1
        return _Handle(ev, slot, n)

    def collect(self, handle: _Handle) -> BackendOutput:
        handle.event.synchronize()
        lo, fe, fi, sc = self._host_out[handle.slot]
        n = handle.n
        return BackendOutput(lo[:n].numpy().copy(), fe[:n].numpy().copy(),
                             fi[:n].numpy().copy(),
                             sc[:n].numpy().copy() if self.scorer is not None else None)

    def describe(self) -> dict[str, Any]:
        torch = self._torch
        return {**super().describe(), "cuda_graphs": self.cuda_graphs,
                "device": torch.cuda.get_device_name(self.device),
                "device_ood": type(self.scorer).__name__ if self.scorer is not None else None}

    def close(self) -> None:
        self._graphs.clear()
