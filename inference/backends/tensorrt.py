"""TensorRT (10/11) engine execution, with TensorRT and pycuda alone or on torch CUDA tensors.

The engine is built (:func:`leukoflow.models.tensorrt_build.build_engine`, cached by model
sha256, GPU, TensorRT version, precision and profile) from the *raw-crops* ONNX graph of the
local ONNX Runtime backend (:func:`leukoflow.inference.backends.onnx_cpu.export_onnx`):
``crops (N, S, S)`` float32 rad -> ``logits (N, K)``, ``features (N, D)``, normalisation
inside the graph, so no device kernel of our own is needed and the plan is the one a Triton
``tensorrt_plan`` model serves (``export --triton``). The graph is exported with torch once;
a machine without torch finds it in the cache (``$LEUKOFLOW_CACHE_DIR/onnx/``), where the lean
GPU image puts it at build time (``deploy/docker/Dockerfile.cuda``).

Two runtimes, chosen by ``runtime``:

* ``pycuda`` (the lean GPU image: TensorRT + pycuda, no torch): device buffers from
  ``pycuda.driver.mem_alloc`` sized once for the profile's maximum batch, page-locked host
  buffers (two input and two output slots, so the worker fills batch *k + 1* while batch *k*
  runs), one dedicated ``Stream`` (never the default stream), per batch ``memcpy_htod_async``
  -> ``set_input_shape`` + ``set_tensor_address`` -> ``execute_async_v3(stream.handle)`` ->
  ``memcpy_dtoh_async`` -> ``Event.record``; :meth:`collect` synchronises on the event. The
  CUDA context is the device's *primary* context (``retain_primary_context``, never
  ``pycuda.autoinit``, which would create a second context beside torch's), pushed around
  every call so the worker thread may differ from the constructing thread. The finite check
  of the crops runs on the host.
* ``torch`` (machines with a CUDA build of torch): torch CUDA tensors as device buffers,
  pinned torch host buffers, a ``torch.cuda.Stream``; the finite check runs on the device.

``auto`` takes ``torch`` where torch sees a GPU, else ``pycuda``. The pure-Python parts
(I/O specs, buffer sizing, profile selection, buckets) are plain functions, tested on the CPU.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from leukoflow.inference.backends.base import (
    BACKENDS,
    Backend,
    BackendOutput,
    BackendUnavailable,
    finite_rows,
    pow2_buckets,
)
from leukoflow.inference.backends.onnx_cpu import default_cache_dir, export_onnx, onnx_path
from leukoflow.models.tensorrt_build import Profile, build_engine

RUNTIMES = ("auto", "pycuda", "torch")
OUTPUTS = ("logits", "features")


# ----------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class TensorSpec:
    """One engine I/O tensor: name, direction, shape (-1 = dynamic) and numpy dtype."""

    name: str
    is_input: bool
    shape: tuple[int, ...]
    dtype: np.dtype


def trt_dtype(trt: ModuleType, dt: Any) -> np.dtype:
    """numpy dtype of a TensorRT ``DataType`` (float32/float16/int32/int8/bool)."""
    table = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT8": np.int8,
             "BOOL": np.bool_, "INT64": np.int64}
    for name, npt in table.items():
        if hasattr(trt.DataType, name) and dt == getattr(trt.DataType, name):
            return np.dtype(npt)
    raise BackendUnavailable(f"unsupported TensorRT dtype {dt}")


def engine_io(engine: Any, trt: ModuleType) -> list[TensorSpec]:
    """The I/O tensors of a deserialized engine (TensorRT 10+ name-based API)."""
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        out.append(TensorSpec(name, engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                              tuple(int(d) for d in engine.get_tensor_shape(name)),
                              trt_dtype(trt, engine.get_tensor_dtype(name))))
    return out


def check_io(specs: list[TensorSpec], input_size: int, num_classes: int) -> TensorSpec:
    """Check the engine is the raw-crops graph; return its input spec."""
    ins = [s for s in specs if s.is_input]
    names = {s.name for s in specs if not s.is_input}
    if len(ins) != 1 or names != set(OUTPUTS):
        raise BackendUnavailable(f"unexpected engine I/O {[s.name for s in specs]}")
    inp = ins[0]
    if inp.shape[1:] != (input_size, input_size) or inp.dtype != np.float32:
        raise BackendUnavailable(f"engine input {inp.shape} {inp.dtype}: expected (N, "
                                 f"{input_size}, {input_size}) float32 raw crops")
    lo = next(s for s in specs if s.name == "logits")
    if lo.shape[1:] not in ((num_classes,), (-1,)):
        raise BackendUnavailable(f"engine logits {lo.shape}, expected (N, {num_classes})")
    return inp


def profile_ranges(engine: Any, input_name: str) -> list[tuple[int, int, int]]:
    """``(min, opt, max)`` batch of every optimisation profile of the engine."""
    out = []
    for p in range(engine.num_optimization_profiles):
        mn, op, mx = engine.get_tensor_profile_shape(input_name, p)
        out.append((int(mn[0]), int(op[0]), int(mx[0])))
    return out


def select_profile(ranges: list[tuple[int, int, int]], batch: int) -> int:
    """Index of the profile that runs ``batch`` cells: the one covering it with the smallest
    maximum (its kernels were tuned closest to that size).

    Raises
    ------
    ValueError
        No profile covers ``batch``.
    """
    fits = [(mx, i) for i, (mn, _op, mx) in enumerate(ranges) if mn <= batch <= mx]
    if not fits:
        raise ValueError(f"no optimisation profile covers batch {batch}: {ranges}")
    return min(fits)[1]


def buffer_plan(specs: list[TensorSpec], max_batch: int,
                feature_dim: int | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every device/host buffer, sized for ``max_batch`` cells.

    The batch axis becomes ``max_batch``; a dynamic feature axis takes ``feature_dim``
    (read from the context after setting an input shape).
    """
    out = {}
    for s in specs:
        shape = [int(max_batch), *s.shape[1:]]
        for j in range(1, len(shape)):
            if shape[j] < 0:
                if feature_dim is None:
                    raise ValueError(f"{s.name}: dynamic axis {j} needs feature_dim")
                shape[j] = int(feature_dim)
        out[s.name] = (tuple(shape), s.dtype)
    return out


def nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Bytes of a buffer."""
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def engine_buckets(max_batch: int, profile_max: int, min_bucket: int = 8) -> tuple[int, ...]:
    """Batch sizes the worker pads to: powers of two up to ``max_batch``, within the profile."""
    if max_batch > profile_max:
        raise BackendUnavailable(f"max_batch {max_batch} above the engine profile's "
                                 f"maximum {profile_max}")
    return pow2_buckets(max_batch, min(min_bucket, max_batch))


def pick_runtime(requested: str) -> str:
    """``torch`` / ``pycuda`` for ``auto`` (torch where it sees a GPU, else pycuda)."""
    if requested not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {requested!r}")
    if requested != "auto":
        return requested
    try:
        import torch

        if torch.cuda.is_available():
            return "torch"
    except ImportError:
        pass
    return "pycuda"


# ----------------------------------------------------------------------------- engine file
def raw_onnx(artifact: Any, cache_dir: Any = None) -> Path:
    """The raw-crops ONNX graph: from the cache, or exported now (needs torch)."""
    path = onnx_path(artifact, cache_dir)
    if path.is_file():
        return path
    try:
        return export_onnx(artifact, cache_dir)
    except ImportError as exc:
        raise BackendUnavailable(
            f"no ONNX graph at {path} and no torch to export it: export it where torch is "
            "installed (leukoflow export --triton, or any onnxruntime run) and copy the "
            "cache") from exc


def _engine_file(artifact: Any, max_batch: int, precision: str, cache_dir: Any) -> Path:
    """Build (or reuse) the engine of the raw-crops graph for profile (1, opt, max_batch)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    onnx = raw_onnx(artifact, cache_dir)
    opt = min(256, max_batch)
    res = build_engine(onnx, artifact.sha256, artifact.input_size, precision=precision,
                       profile=Profile(1, opt, max_batch), cache_dir=root / "engines",
                       channel_dim=False)
    return Path(res.engine)


@dataclass
class _Handle:
    event: Any
    slot: int
    n: int


# ----------------------------------------------------------------------------- runtimes
class PyCudaRuntime:
    """Engine execution with pycuda alone (see module docstring).

    Parameters
    ----------
    engine : tensorrt.ICudaEngine or bytes
        A deserialized engine, or a serialized plan (deserialized here, inside the primary
        context that then owns its memory).
    trt, cuda : module
        ``tensorrt`` and ``pycuda.driver`` (injected in tests).
    max_batch, input_size, num_classes : int
    device : int
        CUDA device ordinal.
    """

    slots = 2

    def __init__(self, engine: Any, trt: ModuleType, cuda: ModuleType, max_batch: int,
                 input_size: int, num_classes: int, device: int = 0) -> None:
        self.trt, self.cuda = trt, cuda
        cuda.init()
        self._ctx = cuda.Device(device).retain_primary_context()
        if isinstance(engine, bytes | bytearray):
            with self.current():
                engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
                    bytes(engine))
            if engine is None:
                self._ctx.detach()
                raise BackendUnavailable("cannot deserialize the TensorRT plan (built for "
                                         "another GPU or TensorRT version?)")
        self.engine = engine
        specs = engine_io(engine, trt)
        self.input = check_io(specs, input_size, num_classes)
        ranges = profile_ranges(engine, self.input.name)
        self.profile = select_profile(ranges, max_batch)
        with self.current():
            self.context = engine.create_execution_context()
            self.stream = cuda.Stream()
            if self.profile:
                self.context.set_optimization_profile_async(self.profile, self.stream.handle)
            self.context.set_input_shape(self.input.name, (1, input_size, input_size))
            fshape = tuple(self.context.get_tensor_shape("features"))
            self.plan = buffer_plan(specs, max_batch, int(fshape[1]))
            self.feature_dim = int(fshape[1])
            self.device_buffers = {n: cuda.mem_alloc(nbytes(*p)) for n, p in self.plan.items()}
            self.host_in = [cuda.pagelocked_empty(self.plan[self.input.name][0], np.float32)
                            for _ in range(self.slots)]
            self.host_out = [{n: cuda.pagelocked_empty(*self.plan[n]) for n in OUTPUTS}
                             for _ in range(self.slots)]

    @contextmanager
    def current(self) -> Any:
        """Make the primary context current in this thread for the duration."""
        self._ctx.push()
        try:
            yield
        finally:
            self.cuda.Context.pop()

    def submit(self, slot: int, b: int, n: int) -> _Handle:
        cuda = self.cuda
        name = self.input.name
        s = self.plan[name][0][1:]
        with self.current():
            cuda.memcpy_htod_async(self.device_buffers[name], self.host_in[slot][:b], self.stream)
            self.context.set_input_shape(name, (b, *s))
            for t, buf in self.device_buffers.items():
                self.context.set_tensor_address(t, int(buf))
            if not self.context.execute_async_v3(self.stream.handle):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            for t in OUTPUTS:
                cuda.memcpy_dtoh_async(self.host_out[slot][t][:b], self.device_buffers[t],
                                       self.stream)
            ev = cuda.Event()
            ev.record(self.stream)
        return _Handle(ev, slot, n)

    def collect(self, h: _Handle) -> tuple[np.ndarray, np.ndarray]:
        with self.current():
            h.event.synchronize()
        out = self.host_out[h.slot]
        return (out["logits"][:h.n].astype(np.float32, copy=True),
                out["features"][:h.n].astype(np.float32, copy=True))

    def close(self) -> None:
        with self.current():
            for buf in self.device_buffers.values():
                buf.free()
            self.device_buffers = {}
        self._ctx.detach()


class TorchRuntime:
    """Engine execution on torch CUDA tensors (machines with a CUDA build of torch)."""

    slots = 2

    def __init__(self, engine: Any, trt: ModuleType, max_batch: int, input_size: int,
                 num_classes: int) -> None:
        import torch

        self.torch, self.trt, self.engine = torch, trt, engine
        specs = engine_io(engine, trt)
        self.input = check_io(specs, input_size, num_classes)
        self.profile = select_profile(profile_ranges(engine, self.input.name), max_batch)
        self.context = engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        if self.profile:
            self.context.set_optimization_profile_async(self.profile, self.stream.cuda_stream)
        self.context.set_input_shape(self.input.name, (1, input_size, input_size))
        self.feature_dim = int(self.context.get_tensor_shape("features")[1])
        plan = buffer_plan(specs, max_batch, self.feature_dim)
        tt = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}
        self.dev = {n: torch.empty(shape, dtype=tt[np.dtype(dt)], device="cuda")
                    for n, (shape, dt) in plan.items()}
        m = max_batch
        self.host_in = [torch.empty(plan[self.input.name][0], dtype=torch.float32,
                                    pin_memory=True) for _ in range(self.slots)]
        self.host_in_np = [t.numpy() for t in self.host_in]
        self.host_out = [(torch.empty((m, num_classes), pin_memory=True),
                          torch.empty((m, self.feature_dim), pin_memory=True),
                          torch.empty((m,), dtype=torch.bool, pin_memory=True))
                         for _ in range(self.slots)]

    def submit(self, slot: int, b: int, n: int) -> _Handle:
        torch = self.torch
        lo, fe, fi = self.host_out[slot]
        name = self.input.name
        with torch.cuda.stream(self.stream):
            xin = self.dev[name][:b]
            xin.copy_(self.host_in[slot][:b], non_blocking=True)
            self.context.set_input_shape(name, tuple(xin.shape))
            for t, buf in self.dev.items():
                self.context.set_tensor_address(t, buf.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            lo[:b].copy_(self.dev["logits"][:b], non_blocking=True)
            fe[:b].copy_(self.dev["features"][:b], non_blocking=True)
            fi[:b].copy_(torch.isfinite(xin).flatten(1).all(dim=1), non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return _Handle(ev, slot, n)

    def collect(self, h: _Handle) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h.event.synchronize()
        lo, fe, fi = self.host_out[h.slot]
        return (lo[:h.n].numpy().copy(), fe[:h.n].numpy().copy(), fi[:h.n].numpy().copy())

    def close(self) -> None:
        self.dev = {}


# ----------------------------------------------------------------------------- backend
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
        Root of the ONNX export and engine caches.
    runtime : {"auto", "pycuda", "torch"}
        Device memory, streams and events through pycuda (no torch needed) or torch.
    min_bucket : int
        Smallest batch bucket.
    trt, cuda : module, optional
        ``tensorrt`` and ``pycuda.driver`` (injected in tests; default: imported).
    engine : object, optional
        An already deserialized engine (tests).
    """

    name = "tensorrt"
    device_kind = "cuda"
    max_in_flight = 2

    def __init__(self, artifact: Any, max_batch: int = 256, precision: str = "fp16",
                 cache_dir: Any = None, min_bucket: int = 8, runtime: str = "auto",
                 trt: ModuleType | None = None, cuda: ModuleType | None = None,
                 engine: Any = None, device: int = 0, **_: Any) -> None:
        super().__init__(artifact, max_batch)
        injected = trt is not None
        if not injected:
            ok, why = self.available()
            if not ok:
                raise BackendUnavailable(why)
            import tensorrt as trt
        self.runtime_name = pick_runtime(runtime) if not injected or runtime != "auto" \
            else "pycuda"
        self.precision = precision
        if engine is None:
            try:
                engine_path = _engine_file(artifact, self.max_batch, precision, cache_dir)
            except BackendUnavailable:
                raise
            except Exception as exc:  # TensorRTError, ExportError: not usable here
                raise BackendUnavailable(f"no TensorRT engine: {exc}") from exc
            if self.runtime_name == "pycuda":
                engine = engine_path.read_bytes()  # deserialized inside the runtime's context
            else:
                engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
                    engine_path.read_bytes())
                if engine is None:
                    raise BackendUnavailable(f"cannot deserialize {engine_path} (GPU/TensorRT "
                                             "mismatch)")
        k = self.num_classes
        if self.runtime_name == "pycuda":
            self._rt: Any = PyCudaRuntime(engine, trt, cuda or _pycuda(), self.max_batch,
                                          self.input_size, k, device)
        else:
            self._rt = TorchRuntime(engine, trt, self.max_batch, self.input_size, k)
        self.engine = self._rt.engine
        self._feature_dim = self._rt.feature_dim
        self._finite: list[np.ndarray | None] = [None, None]
        mx = profile_ranges(self.engine, self._rt.input.name)[self._rt.profile][2]
        self.buckets = engine_buckets(self.max_batch, mx, min_bucket)
        self._slot = 0

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return False, "tensorrt is not installed"
        try:
            import torch

            if torch.cuda.is_available():
                return True, ""
        except ImportError:
            pass
        try:
            cuda = _pycuda()
            cuda.init()
            if cuda.Device.count() > 0:
                return True, ""
            return False, "no CUDA device visible to pycuda"
        except Exception as exc:  # ImportError, pycuda.driver.Error
            return False, f"no CUDA device (torch without CUDA; pycuda: {exc})"

    def host_buffer(self, rows: int) -> np.ndarray:
        rt = self._rt
        buf = rt.host_in_np[self._slot] if self.runtime_name == "torch" else \
            rt.host_in[self._slot]
        return buf[:rows]

    def submit(self, x: np.ndarray, n: int) -> _Handle:
        b = x.shape[0]
        slot = self._slot
        staging = self.host_buffer(b)
        if x.__array_interface__["data"][0] != staging.__array_interface__["data"][0]:
            staging[:b] = x  # not our staging buffer: copy
        if self.runtime_name == "pycuda":  # host-side finite check of the crops
            self._finite[slot] = finite_rows(staging[:n])
        h = self._rt.submit(slot, b, n)
        self._slot ^= 1
        return h

    def collect(self, handle: _Handle) -> BackendOutput:
        if self.runtime_name == "pycuda":
            lo, fe = self._rt.collect(handle)
            return BackendOutput(lo, fe, self._finite[handle.slot])
        lo, fe, fi = self._rt.collect(handle)
        return BackendOutput(lo, fe, fi)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "runtime": self.runtime_name,
                "profile": self._rt.profile}

    def close(self) -> None:
        rt = getattr(self, "_rt", None)
        if rt is not None:
            rt.close()
            self._rt = None


def _pycuda() -> ModuleType:
    import pycuda.driver as cuda

    return cuda
