"""TensorRT builder logic, tested with a FAKE ``tensorrt`` module.

TensorRT cannot run on this CPU-only test machine, so the real library is replaced by
:class:`FakeTRT`, a small stand-in that records the calls the builder makes and exposes only
the TensorRT 10 or 11 API surface (no ``build_engine``, ``max_workspace_size`` or
``max_batch_size``: calling a removed API raises AttributeError). What these tests show:
the cache key, profile shapes, version branches (FP16 flag on 10, FP16 ONNX + strongly
typed on 11), timing-cache reuse and error handling. They do not show that a real engine
builds or runs; ``benchmarks/gpu_models.py`` does that on a GPU with TensorRT.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from leukoflow.models.export import export_onnx, onnx_session
from leukoflow.models.tensorrt_build import (
    BuildResult,
    GpuInfo,
    Profile,
    TensorRTError,
    build_engine,
    cache_key,
    fp16_strategy,
    load_engine,
)

GPU = GpuInfo("NVIDIA H100 80GB HBM3", 9, 0, 132)


def make_fake_trt(version: str, fp16_flag: bool, parse_ok: bool = True, build_ok: bool = True):
    """A fake ``tensorrt`` module (see module docstring); ``calls`` records what ran."""
    calls: list[tuple] = []
    trt = types.SimpleNamespace(__version__=version, calls=calls)

    class Logger:
        WARNING = 2

        def __init__(self, level):
            calls.append(("Logger", level))

    flags = {"PREFER_PRECISION_CONSTRAINTS": 5}
    if fp16_flag:
        flags["FP16"] = 0
    trt.BuilderFlag = types.SimpleNamespace(**flags)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)

    class TimingCache:
        def __init__(self, blob):
            self.blob = bytes(blob) or b"T0"

        def serialize(self):
            return self.blob + b"+"

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.pool, self.tc = [], [], {}, None

        def set_memory_pool_limit(self, pool, size):
            self.pool[pool] = size

        def set_flag(self, flag):
            self.flags.append(flag)

        def add_optimization_profile(self, p):
            self.profiles.append(p)

        def create_timing_cache(self, blob):
            calls.append(("create_timing_cache", bytes(blob)))
            return TimingCache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.tc = cache
            return True

        def get_timing_cache(self):
            return self.tc

    class Profile_:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, mn, op, mx):
            self.shapes[name] = (tuple(mn), tuple(op), tuple(mx))

    class Builder:
        def __init__(self, logger):
            self.config = None

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return object()

        def create_builder_config(self):
            self.config = Config()
            trt.last_config = self.config
            return self.config

        def create_optimization_profile(self):
            return Profile_()

        def build_serialized_network(self, network, config):
            calls.append(("build", tuple(config.flags)))
            return b"PLAN" if build_ok else None

    class OnnxParser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls.append(("parse", Path(path).name))
            return parse_ok

        def get_error(self, i):
            return "Unsupported operator Foo"

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return None if blob != b"PLAN" else "ENGINE"

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, OnnxParser, Runtime
    return trt


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    import torch

    from leukoflow.models.architectures import build_model

    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("onnx") / "m.onnx"
    return export_onnx(build_model("lenet5", in_size=32), p, 32)


def test_cache_key_has_every_field():
    base = dict(model_sha256="a" * 64, gpu=GPU, version="10.13.0.35", precision="fp16",
                profile=Profile(1, 256, 2048), input_size=64)
    k = cache_key(**base)
    assert k.startswith("aaaaaaaaaaaaaaaa.NVIDIA_H100_80GB_HBM3.9.0.132.trt.10.13.0.35.fp16."
                        "b1-256-2048.s64.")
    assert k.endswith(".engine") and "/" not in k
    variants = [dict(model_sha256="b" * 64), dict(gpu=GpuInfo("NVIDIA H100", 9, 0, 114)),
                dict(gpu=GpuInfo("NVIDIA H100 80GB HBM3", 8, 9, 132)),
                dict(version="11.4.0.1"), dict(precision="fp32"),
                dict(profile=Profile(1, 128, 2048)), dict(input_size=48)]
    keys = {cache_key(**{**base, **v}) for v in variants}
    assert len(keys) == len(variants) and k not in keys


def test_profile_validation():
    assert Profile(1, 8, 16).shapes(64) == ((1, 1, 64, 64), (8, 1, 64, 64), (16, 1, 64, 64))
    with pytest.raises(ValueError):
        Profile(4, 2, 8)


def test_fp16_strategy_branches():
    assert fp16_strategy(make_fake_trt("10.13.0", True), "fp16") == "builder_flag"
    assert fp16_strategy(make_fake_trt("11.4.0", False), "fp16") == "fp16_onnx"
    assert fp16_strategy(make_fake_trt("11.4.0", False), "fp16", False) == "fp32"
    assert fp16_strategy(make_fake_trt("10.13.0", True), "fp32") == "fp32"
    with pytest.raises(ValueError):
        fp16_strategy(make_fake_trt("10.13.0", True), "int8")


def test_trt10_build_uses_fp16_flag_profile_and_timing_cache(onnx_file, tmp_path):
    trt = make_fake_trt("10.13.0.35", fp16_flag=True)
    r = build_engine(onnx_file, "c" * 64, 32, "fp16", (1, 64, 512), tmp_path, GPU, trt)
    assert isinstance(r, BuildResult) and not r.cached and r.strategy == "builder_flag"
    assert Path(r.engine).read_bytes() == b"PLAN" and r.precision == "fp16"
    cfg = trt.last_config
    assert cfg.flags == [trt.BuilderFlag.FP16] and cfg.pool[0] == 1 << 30
    assert cfg.profiles[0].shapes["crops"] == ((1, 1, 32, 32), (64, 1, 32, 32), (512, 1, 32, 32))
    assert ("create_network", 0) in trt.calls  # explicit batch, not strongly typed
    assert ("create_timing_cache", b"") in trt.calls
    assert Path(r.timing_cache).read_bytes() == b"T0+"
    # second call: served from the engine cache, nothing built
    n = len(trt.calls)
    r2 = build_engine(onnx_file, "c" * 64, 32, "fp16", (1, 64, 512), tmp_path, GPU, trt)
    assert r2.cached and r2.engine == r.engine and len(trt.calls) == n
    # a different precision rebuilds and reuses the timing cache written before
    r3 = build_engine(onnx_file, "c" * 64, 32, "fp32", (1, 64, 512), tmp_path, GPU, trt)
    assert not r3.cached and r3.engine != r.engine and trt.last_config.flags == []
    assert ("create_timing_cache", b"T0+") in trt.calls
    assert load_engine(r.engine, trt) == "ENGINE"


def test_trt11_build_converts_onnx_to_fp16_and_is_strongly_typed(onnx_file, tmp_path):
    import onnx

    trt = make_fake_trt("11.4.0.1", fp16_flag=False)
    r = build_engine(onnx_file, "d" * 64, 32, "fp16", Profile(1, 8, 64), tmp_path, GPU, trt)
    assert r.strategy == "fp16_onnx" and r.precision == "fp16"
    assert trt.last_config.flags == []  # no FP16 flag exists on TensorRT 11
    assert ("create_network", 1 << 1) in trt.calls  # STRONGLY_TYPED
    m = onnx.load(r.onnx_built)
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer
               if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))
    # the FP16 model still runs and agrees with FP32 to fp16 accuracy

    x = np.random.default_rng(0).standard_normal((4, 1, 32, 32)).astype(np.float32)
    a = onnx_session(onnx_file).run(["logits"], {"crops": x})[0]
    b = onnx_session(r.onnx_built).run(["logits"], {"crops": x})[0]
    assert b.dtype == np.float32 and np.max(np.abs(a - b)) < 1e-2 * max(1.0, np.abs(a).max())


def test_errors_are_clear(onnx_file, tmp_path):
    trt = make_fake_trt("10.13.0", True, parse_ok=False)
    with pytest.raises(TensorRTError, match="Unsupported operator Foo"):
        build_engine(onnx_file, "e" * 64, 32, "fp16", Profile(), tmp_path, GPU, trt)
    trt = make_fake_trt("10.13.0", True, build_ok=False)
    with pytest.raises(TensorRTError, match="build failed"):
        build_engine(onnx_file, "e" * 64, 32, "fp16", Profile(), tmp_path, GPU, trt)
    with pytest.raises(TensorRTError, match="not found"):
        build_engine(tmp_path / "none.onnx", "e" * 64, 32, trt=trt, gpu=GPU)
    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"junk")
    with pytest.raises(TensorRTError, match="deserialize"):
        load_engine(bad, make_fake_trt("10.13.0", True))


def test_missing_tensorrt_gives_clear_error(monkeypatch, onnx_file, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_trt(name, *a, **k):
        if name == "tensorrt":
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_trt)
    with pytest.raises(TensorRTError, match="not installed"):
        build_engine(onnx_file, "f" * 64, 32, gpu=GPU, cache_dir=tmp_path)
