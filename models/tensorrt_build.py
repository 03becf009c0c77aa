"""TensorRT engine build from ONNX, for TensorRT 10 and 11, with an engine and timing cache.

API facts this module relies on (../shared/notes/streaming-and-serving.md section 6):

* ``builder.create_network(flags)``: TensorRT 10 is always explicit-batch (flag 0);
  ``STRONGLY_TYPED`` is opt-in in 10.x and always on in 11. ``OnnxParser.parse_from_file``
  returns False without raising: the errors are read with ``get_error(i)``.
* ``config.set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)``; optimisation profile
  ``set_shape(name, min, opt, max)``; timing cache ``create_timing_cache`` /
  ``set_timing_cache`` / ``serialize``; ``build_serialized_network`` returns None on failure.
  Calls removed since 10.0 (``build_engine``, ``max_workspace_size``, ``max_batch_size``,
  binding APIs) are never used.
* FP16: TensorRT 10 has ``BuilderFlag.FP16``; TensorRT 11 removed it (and the other
  precision flags). Strategy (:func:`fp16_strategy`): use the flag when
  ``hasattr(trt.BuilderFlag, "FP16")``; otherwise build a strongly typed network from an
  FP16-converted ONNX model (:func:`leukoflow.models.export.convert_onnx_fp16`, float32 I/O kept);
  if that conversion is not possible, build FP32 and say so in the result.
* Plans are tied to GPU architecture and exact TensorRT version: the cache key holds the
  model sha256, GPU name, compute capability, SM count, TensorRT version, precision and the
  profile (after Holoscan HoloInfer's ``generate_engine_path``, plus model hash and profile).

Everything takes the ``tensorrt`` module as an optional argument ``trt`` so that the logic
is unit-tested with a fake module (TensorRT cannot run on the CPU-only test machine).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from leukoflow.models.export import ExportError, convert_onnx_fp16

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE = 1 << 30
INPUT_NAME = "crops"


class TensorRTError(RuntimeError):
    """TensorRT is missing, or parsing / building / loading an engine failed."""


@dataclass(frozen=True)
class GpuInfo:
    """Identity of the target GPU (part of the engine cache key)."""

    name: str
    cc_major: int
    cc_minor: int
    sm_count: int

    @classmethod
    def current(cls, device: int = 0) -> GpuInfo:
        """Query the CUDA device through torch, or through pycuda where torch is absent
        (the lean GPU image)."""
        try:
            import torch
        except ImportError:
            return cls.from_pycuda(device)
        if not torch.cuda.is_available():  # e.g. a CPU build of torch beside pycuda
            try:
                return cls.from_pycuda(device)
            except TensorRTError:
                raise TensorRTError("no CUDA device: TensorRT engines need an NVIDIA GPU"
                                    ) from None
        p = torch.cuda.get_device_properties(device)
        return cls(p.name, int(p.major), int(p.minor), int(p.multi_processor_count))

    @classmethod
    def from_pycuda(cls, device: int = 0, cuda: Any = None) -> GpuInfo:
        """Query the CUDA device through pycuda (``cuda`` = ``pycuda.driver``, injectable)."""
        if cuda is None:
            try:
                import pycuda.driver as cuda
            except ImportError as exc:
                raise TensorRTError("neither torch nor pycuda is installed: cannot query "
                                    "the GPU") from exc
        try:
            cuda.init()
            dev = cuda.Device(device)
            a = cuda.device_attribute
            return cls(str(dev.name()), int(dev.get_attribute(a.COMPUTE_CAPABILITY_MAJOR)),
                       int(dev.get_attribute(a.COMPUTE_CAPABILITY_MINOR)),
                       int(dev.get_attribute(a.MULTIPROCESSOR_COUNT)))
        except Exception as exc:  # pycuda.driver.Error and friends: no usable device
            raise TensorRTError(f"no CUDA device through pycuda: {exc}") from exc


@dataclass(frozen=True)
class Profile:
    """Optimisation profile over the batch dimension (cells); input is (N, 1, S, S)."""

    min_batch: int = 1
    opt_batch: int = 256
    max_batch: int = 2048

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= min <= opt <= max batch, got {self}")

    def shapes(self, input_size: int, channel_dim: bool = True) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) input shapes: ``(N, 1, S, S)``, or ``(N, S, S)`` without the
        channel axis (the raw-crops graph of the ONNX Runtime / Triton / lean TensorRT
        path, normalisation inside)."""
        ch = (1,) if channel_dim else ()
        return tuple((b, *ch, input_size, input_size)
                     for b in (self.min_batch, self.opt_batch, self.max_batch))


def load_tensorrt() -> ModuleType:
    """Import ``tensorrt`` or raise :class:`TensorRTError` with an install hint."""
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTError(
            "TensorRT is not installed (pip install tensorrt-cu12 on a CUDA machine; "
            "it is not needed for the CPU backends)") from exc
    return tensorrt


def trt_version(trt: ModuleType) -> str:
    """TensorRT version string, e.g. ``10.13.0.35``."""
    return str(getattr(trt, "__version__", "unknown"))


def fp16_strategy(trt: ModuleType, precision: str, fp16_onnx_possible: bool = True) -> str:
    """How to obtain the requested precision with this TensorRT.

    Returns
    -------
    str
        ``"fp32"`` (precision fp32, or fp16 impossible), ``"builder_flag"`` (TensorRT 10:
        ``BuilderFlag.FP16``), or ``"fp16_onnx"`` (TensorRT 11: strongly typed build of an
        FP16-converted ONNX model).
    """
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"precision must be fp16 or fp32, got {precision!r}")
    if precision == "fp32":
        return "fp32"
    if hasattr(trt.BuilderFlag, "FP16"):
        return "builder_flag"
    return "fp16_onnx" if fp16_onnx_possible else "fp32"


def cache_key(model_sha256: str, gpu: GpuInfo, version: str, precision: str,
              profile: Profile, input_size: int, channel_dim: bool = True) -> str:
    """File name of the cached engine.

    ``<sha256[:16]>.<gpu name>.<cc major>.<cc minor>.<SM count>.trt.<version>.<precision>.
    b<min>-<opt>-<max>.s<input_size>[.nhw].<digest>.engine``; the trailing digest covers all
    fields (names are sanitised to ``[A-Za-z0-9_-]``); ``.nhw`` marks the raw-crops graph
    without a channel axis.
    """
    gname = re.sub(r"[^A-Za-z0-9_-]+", "_", gpu.name).strip("_") or "gpu"
    ver = re.sub(r"[^0-9.]+", "", version) or "unknown"
    fields = {"model": model_sha256, "gpu": asdict(gpu), "trt": version,
              "precision": precision, "profile": asdict(profile), "input_size": input_size}
    if not channel_dim:
        fields["layout"] = "nhw"
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    layout = "" if channel_dim else ".nhw"
    return (f"{model_sha256[:16]}.{gname}.{gpu.cc_major}.{gpu.cc_minor}.{gpu.sm_count}.trt."
            f"{ver}.{precision}.b{profile.min_batch}-{profile.opt_batch}-{profile.max_batch}."
            f"s{input_size}{layout}.{digest}.engine")


@dataclass
class BuildResult:
    """Outcome of :func:`build_engine`."""

    engine: str
    key: str
    precision: str
    strategy: str
    cached: bool
    trt_version: str
    timing_cache: str | None
    onnx_built: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return asdict(self)


def _network_flags(trt: ModuleType, strongly_typed: bool) -> int:
    """Creation flags: 0 (explicit batch is the only mode since TensorRT 10), plus
    STRONGLY_TYPED when requested and available (TensorRT 11 is always strongly typed)."""
    flags = 0
    enum = getattr(trt, "NetworkDefinitionCreationFlag", None)
    if strongly_typed and enum is not None and hasattr(enum, "STRONGLY_TYPED"):
        flags |= 1 << int(enum.STRONGLY_TYPED)
    return flags


def _parse(trt: ModuleType, network: Any, onnx_path: Path, logger: Any) -> Any:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TensorRTError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errs or
                                                                                  ["no detail"]))
    return parser


def build_engine(onnx_path: str | Path, model_sha256: str, input_size: int,
                 precision: str = "fp16", profile: Profile | tuple[int, int, int] = Profile(),
                 cache_dir: str | Path = "engines", gpu: GpuInfo | None = None,
                 trt: ModuleType | None = None, workspace: int = DEFAULT_WORKSPACE,
                 rebuild: bool = False, input_name: str = INPUT_NAME,
                 channel_dim: bool = True) -> BuildResult:
    """Build (or reuse from the cache) a serialized TensorRT engine for an ONNX model.

    Parameters
    ----------
    onnx_path : str or Path
        ONNX model with a dynamic batch dimension (``leukoflow.models.export.export_onnx``).
    model_sha256 : str
        ``Artifact.sha256``; part of the cache key.
    input_size : int
        Crop side length S (px).
    precision : str
        ``fp16`` (where the TensorRT version allows it) or ``fp32``.
    profile : Profile or (min, opt, max)
        Batch sizes of the optimisation profile.
    cache_dir : str or Path
        Folder for engines and the timing cache (``timing.cache``, shared across builds on
        one GPU + TensorRT version).
    gpu : GpuInfo, optional
        Target GPU (default: queried through torch).
    trt : module, optional
        The ``tensorrt`` module (injected in tests).
    workspace : int
        Builder workspace limit (bytes).
    rebuild : bool
        Ignore a cached engine.
    input_name : str
        Name of the graph input.
    channel_dim : bool
        Input ``(N, 1, S, S)`` (normalised, :mod:`leukoflow.models.export`) or, when False,
        ``(N, S, S)`` raw crops with the normalisation inside the graph
        (:func:`leukoflow.inference.backends.onnx_cpu.export_onnx`).

    Raises
    ------
    TensorRTError
        TensorRT missing, parse or build failure.
    """
    trt = trt or load_tensorrt()
    prof = profile if isinstance(profile, Profile) else Profile(*profile)
    gpu = gpu or GpuInfo.current()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise TensorRTError(f"ONNX model not found: {onnx_path}")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    version = trt_version(trt)
    strategy = fp16_strategy(trt, precision, fp16_onnx_possible=True)
    used_precision = "fp32" if strategy == "fp32" else "fp16"
    key = cache_key(model_sha256, gpu, version, used_precision, prof, input_size,
                    channel_dim)
    engine_path = cache / key
    timing_path = cache / f"timing.{re.sub(r'[^A-Za-z0-9_-]+', '_', gpu.name)}.trt{version}.cache"
    if engine_path.is_file() and not rebuild:
        return BuildResult(str(engine_path), key, used_precision, strategy, True, version,
                           str(timing_path) if timing_path.is_file() else None, str(onnx_path))
    src = onnx_path
    if strategy == "fp16_onnx":

        src = cache / f"{onnx_path.stem}.fp16.onnx"
        try:
            convert_onnx_fp16(onnx_path, src)
        except ExportError as exc:
            log.warning("FP16 ONNX conversion failed (%s); building FP32", exc)
            strategy, used_precision, src = "fp32", "fp32", onnx_path
            key = cache_key(model_sha256, gpu, version, used_precision, prof, input_size,
                    channel_dim)
            engine_path = cache / key
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, strategy == "fp16_onnx"))
    _parse(trt, network, src, logger)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    if strategy == "builder_flag":
        config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = builder.create_optimization_profile()
    mn, op, mx = prof.shapes(input_size, channel_dim)
    opt_profile.set_shape(input_name, mn, op, mx)
    config.add_optimization_profile(opt_profile)
    blob = timing_path.read_bytes() if timing_path.is_file() else b""
    tcache = config.create_timing_cache(blob)
    config.set_timing_cache(tcache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTError(f"TensorRT build failed for {src} ({used_precision}); see the "
                            "TensorRT log above")
    tmp = engine_path.with_suffix(".tmp")
    tmp.write_bytes(bytes(plan))
    tmp.replace(engine_path)
    timing_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return BuildResult(str(engine_path), key, used_precision, strategy, False, version,
                       str(timing_path), str(src))


def load_engine(path: str | Path, trt: ModuleType | None = None) -> Any:
    """Deserialize an engine (None from TensorRT -> :class:`TensorRTError`)."""
    trt = trt or load_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise TensorRTError(f"cannot deserialize {path}: built for another GPU or TensorRT "
                            "version? delete it to rebuild")
    return engine


class EngineRunner:
    """Run a deserialized engine on torch CUDA tensors (one context, own stream).

    Buffers are allocated once for the profile's maximum batch; per call the input shape
    is set, every I/O tensor address is bound and ``execute_async_v3`` runs on a non-default
    stream.
    """

    def __init__(self, engine: Any, trt: ModuleType | None = None) -> None:
        import torch

        self.trt = trt or load_tensorrt()
        self.engine = engine
        self.context = engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in self.names
                       if engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        inp = self.inputs[0]
        self.max_shape = tuple(engine.get_tensor_profile_shape(inp, 0)[2])
        self.buffers: dict[str, Any] = {}
        for n in self.names:
            shape = list(engine.get_tensor_shape(n))
            shape[0] = self.max_shape[0]
            if n == inp:
                shape = list(self.max_shape)
            dt = torch.float16 if engine.get_tensor_dtype(n) == self.trt.DataType.HALF \
                else torch.float32
            self.buffers[n] = torch.empty([int(s) for s in shape], dtype=dt, device="cuda")

    def __call__(self, x) -> dict[str, Any]:
        """Run on a CUDA tensor ``(N, 1, S, S)``; returns views of the output buffers."""
        import torch

        n = x.shape[0]
        if n > self.max_shape[0]:
            raise ValueError(f"batch {n} above the profile maximum {self.max_shape[0]}")
        inp = self.inputs[0]
        self.buffers[inp][:n].copy_(x)
        self.context.set_input_shape(inp, tuple(x.shape))
        for name in self.names:
            self.context.set_tensor_address(name, self.buffers[name].data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            ok = self.context.execute_async_v3(self.stream.cuda_stream)
        if not ok:
            raise TensorRTError("execute_async_v3 failed")
        self.stream.synchronize()
        return {o: self.buffers[o][:n] for o in self.outputs}
