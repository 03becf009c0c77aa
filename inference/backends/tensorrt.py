"""TensorRT (10/11) engine execution, kept thin.

The ONNX graph comes from ``leukoflow.models.export.export_onnx`` (normalised
``crops (N, 1, S, S) -> logits, features``) and the serialized engine from
``leukoflow.models.tensorrt_build.build_engine``
(cached by model sha256, GPU, TensorRT version, precision and profile). The raw phase crops
are normalised on the device in torch, on the same dedicated stream that runs the engine.
Device buffers are torch CUDA tensors; each batch runs ``set_input_shape`` +
``set_tensor_address`` + ``execute_async_v3`` on that stream (never the default stream),
then async D2H copies into pinned buffers and an event. The finite check of the crops runs
in torch on the same stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leukoflow.inference.backends.base import (
    BACKENDS,
    Backend,
    BackendOutput,
    BackendUnavailable,
    pow2_buckets,
)
from leukoflow.inference.backends.onnx_cpu import default_cache_dir
from leukoflow.models.export import export_onnx
from leukoflow.models.tensorrt_build import Profile, build_engine


@dataclass
class _Handle:
    event: Any
    n: int


def _engine_file(artifact: Any, max_batch: int, precision: str, cache_dir: Any) -> Path:
    """Export the ONNX graph (cached); build the engine (:mod:`leukoflow.models.tensorrt_build`)."""

    root = Path(cache_dir) if cache_dir else default_cache_dir()
    onnx = root / "onnx" / f"{artifact.architecture}-{artifact.sha256[:16]}-trt-input.onnx"
    if not onnx.is_file():
        export_onnx(artifact.build_model(), onnx, artifact.input_size)
    opt = min(256, max_batch)
    res = build_engine(onnx, artifact.sha256, artifact.input_size, precision=precision,
                       profile=Profile(1, opt, max_batch), cache_dir=root / "engines")
    return Path(res.engine)


@BACKENDS.register("tensorrt")
class TensorRTBackend(Backend):
    """TensorRT engine with one optimisation profile (batch 1 .. max_batch).

    Parameters
    ----------
    artifact, max_batch
        See :class:`~leukoflow.inference.backends.base.Backend`.
    precision : {"fp16", "fp32"}
        Engine precision (the I/O stays float32).
    cache_dir : path, optional
        Root of the ONNX export cache.
    """

    name = "tensorrt"
    device_kind = "cuda"

    def __init__(self, artifact: Any, max_batch: int = 256, precision: str = "fp16",
                 cache_dir: Any = None, min_bucket: int = 8, **_: Any) -> None:
        super().__init__(artifact, max_batch)
        ok, why = self.available()
        if not ok:
            raise BackendUnavailable(why)
        import tensorrt as trt
        import torch

        self._torch = torch
        self.precision = precision
        self.buckets = pow2_buckets(self.max_batch, min(min_bucket, self.max_batch))
        try:
            engine_path = _engine_file(artifact, self.max_batch, precision, cache_dir)
        except Exception as exc:  # TensorRTError, ExportError: not usable here
            raise BackendUnavailable(f"no TensorRT engine: {exc}") from exc
        norm = artifact.normalisation
        self._mean, self._std = float(norm["mean"]), float(norm["std"])
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise BackendUnavailable(f"cannot deserialize {engine_path} (GPU/TensorRT mismatch)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names
                  if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1 or "logits" not in names or "features" not in names:
            raise BackendUnavailable(f"unexpected engine I/O {names}")
        self._in = inputs[0]
        s, m = self.input_size, self.max_batch
        self.stream = torch.cuda.Stream()
        self._dev_in = torch.zeros((m, s, s), dtype=torch.float32, device="cuda")
        self._dev_norm = torch.zeros((m, 1, s, s), dtype=torch.float32, device="cuda")
        self.context.set_input_shape(self._in, (1, 1, s, s))
        d = int(self.context.get_tensor_shape("features")[1])
        self._feature_dim = d
        def tdtype(name: str) -> Any:
            half = self.engine.get_tensor_dtype(name) == trt.DataType.HALF
            return torch.float16 if half else torch.float32

        if tdtype(self._in) != torch.float32:
            raise BackendUnavailable("engine input must be float32 (keep_io_types)")
        self._dev_out = {"logits": torch.empty((m, self.num_classes), dtype=tdtype("logits"),
                                               device="cuda"),
                         "features": torch.empty((m, d), dtype=tdtype("features"),
                                                 device="cuda")}
        self._host_in = torch.empty((m, s, s), dtype=torch.float32, pin_memory=True)
        self._host_in_np = self._host_in.numpy()
        self._host_out = (torch.empty((m, self.num_classes), pin_memory=True),
                          torch.empty((m, d), pin_memory=True),
                          torch.empty((m,), dtype=torch.bool, pin_memory=True))

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return False, "tensorrt is not installed"
        try:
            import torch
        except ImportError:  # pragma: no cover
            return False, "torch is not installed"
        if not torch.cuda.is_available():
            return False, "no CUDA device visible to torch"
        return True, ""

    def host_buffer(self, rows: int) -> np.ndarray:
        return self._host_in_np[:rows]

    def submit(self, x: np.ndarray, n: int) -> _Handle:
        torch = self._torch
        b = x.shape[0]
        if x.__array_interface__["data"][0] != self._host_in.data_ptr():
            self._host_in_np[:b] = x
        s = self.input_size
        lo, fe, fi = self._host_out
        with torch.cuda.stream(self.stream):
            xin = self._dev_in[:b]
            xin.copy_(self._host_in[:b], non_blocking=True)
            xn = self._dev_norm[:b]
            torch.sub(xin, self._mean, out=xn[:, 0])
            xn.div_(self._std)
            self.context.set_input_shape(self._in, (b, 1, s, s))
            self.context.set_tensor_address(self._in, xn.data_ptr())
            for name, t in self._dev_out.items():
                self.context.set_tensor_address(name, t.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            lo[:b].copy_(self._dev_out["logits"][:b], non_blocking=True)
            fe[:b].copy_(self._dev_out["features"][:b], non_blocking=True)
            fi[:b].copy_(torch.isfinite(xin).flatten(1).all(dim=1), non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return _Handle(ev, n)

    def collect(self, handle: _Handle) -> BackendOutput:
        # single buffer set: the worker collects before the next submit reuses it
        handle.event.synchronize()
        lo, fe, fi = self._host_out
        n = handle.n
        return BackendOutput(lo[:n].numpy().copy(), fe[:n].numpy().copy(),
                             fi[:n].numpy().copy())
