"""The lean TensorRT backend (TensorRT + pycuda, no torch): planning logic and data path.

TensorRT and CUDA cannot run on this CPU-only machine, so two things here are FAKES:
``FakeCuda`` stands in for ``pycuda.driver`` (device memory = host byte arrays, a stream that
records what ran on it, events, primary-context push/pop bookkeeping) and ``FakeTRT`` for
``tensorrt`` (an engine whose execution context runs the same raw-crops ONNX graph with ONNX
Runtime on the "device" buffers, with the TensorRT 10 name-based I/O API). What these tests
show: buffer sizing, profile selection, buckets and padding, two-slot double buffering, the
order of operations on the dedicated stream (copy in, shape, addresses, execute, copy out,
event), balanced context push/pop, float16 outputs converted to float32, and that the outputs
equal the ONNX Runtime backend's. They do not show that a real engine builds or runs on a GPU:
``benchmarks/gpu_check.sh`` runs the pycuda and the torch path side by side on one.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from leukoflow.inference.backends import create_backend
from leukoflow.inference.backends.base import BackendUnavailable
from leukoflow.inference.backends.onnx_cpu import export_onnx
from leukoflow.inference.backends.tensorrt import (
    TensorRTBackend,
    TensorSpec,
    buffer_plan,
    check_io,
    engine_buckets,
    nbytes,
    pick_runtime,
    select_profile,
)
from leukoflow.inference.decision import rule_from_artifact
from leukoflow.models.artifact import load_artifact
from leukoflow.models.export import onnx_session
from leukoflow.models.tensorrt_build import GpuInfo, Profile, TensorRTError

F32, F16 = np.dtype(np.float32), np.dtype(np.float16)


# ----------------------------------------------------------------------------- fakes
class FakeCuda:
    """Stand-in for ``pycuda.driver`` (see module docstring)."""

    def __init__(self, devices: int = 1) -> None:
        self.memory: dict[int, bytearray] = {}
        self.next_addr = 0x1000
        self.depth = 0           # context stack depth (push - pop)
        self.max_depth = 0
        self.log: list[tuple] = []
        self.freed = 0
        cuda = self

        class Alloc:
            def __init__(self, n):
                self.addr = cuda.next_addr
                cuda.next_addr += n + 256
                cuda.memory[self.addr] = bytearray(n)

            def __int__(self):
                return self.addr

            def free(self):
                cuda.memory.pop(self.addr)
                cuda.freed += 1

        class Stream:
            count = 0

            def __init__(self):
                Stream.count += 1
                self.handle = 0xABC0 + Stream.count  # never 0 (the default stream)

        class Event:
            def record(self, stream):
                cuda.log.append(("event", stream.handle))
                self.done = True
                return self

            def synchronize(self):
                assert cuda.depth > 0, "event synchronised outside the context"

        class Ctx:
            def push(self):
                cuda.depth += 1
                cuda.max_depth = max(cuda.max_depth, cuda.depth)

            def detach(self):
                cuda.log.append(("detach",))

            @staticmethod
            def pop():
                assert cuda.depth > 0
                cuda.depth -= 1

        class Device:
            def __init__(self, i):
                self.i = i

            @staticmethod
            def count():
                return devices

            def retain_primary_context(self):
                return Ctx()

            def name(self):
                return "Fake H200"

            def get_attribute(self, a):
                return {"major": 9, "minor": 0, "sms": 132}[a]

        self.Alloc, self.Stream, self.Event, self.Device, self.Context = (
            Alloc, Stream, Event, Device, Ctx)
        self.device_attribute = types.SimpleNamespace(COMPUTE_CAPABILITY_MAJOR="major",
                                                      COMPUTE_CAPABILITY_MINOR="minor",
                                                      MULTIPROCESSOR_COUNT="sms")

    def init(self):
        pass

    def mem_alloc(self, n):
        assert self.depth > 0, "allocation outside the context"
        return self.Alloc(n)

    def pagelocked_empty(self, shape, dtype):
        return np.zeros(shape, dtype)

    def view(self, addr, dtype, shape):
        return np.frombuffer(self.memory[addr], dtype=dtype, count=int(np.prod(shape))
                             ).reshape(shape)

    def memcpy_htod_async(self, dev, host, stream):
        assert self.depth > 0
        b = np.ascontiguousarray(host).tobytes()
        self.memory[int(dev)][:len(b)] = b
        self.log.append(("htod", stream.handle, len(b)))

    def memcpy_dtoh_async(self, host, dev, stream):
        assert self.depth > 0
        src = np.frombuffer(self.memory[int(dev)], dtype=host.dtype, count=host.size)
        host[...] = src.reshape(host.shape)
        self.log.append(("dtoh", stream.handle, host.nbytes))


def make_fake_trt(onnx_file, input_size, num_classes, feature_dim, profiles, out_dtype=F32):
    """A fake ``tensorrt`` whose engine runs ``onnx_file`` with ONNX Runtime."""
    sess = onnx_session(onnx_file)
    trt = types.SimpleNamespace()
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.DataType = types.SimpleNamespace(FLOAT="f32", HALF="f16")
    names = ["crops", "logits", "features"]
    shapes = {"crops": (-1, input_size, input_size), "logits": (-1, num_classes),
              "features": (-1, -1)}
    dtypes = {"crops": "f32", "logits": "f16" if out_dtype == F16 else "f32",
              "features": "f16" if out_dtype == F16 else "f32"}

    class Context:
        def __init__(self, cuda):
            self.cuda, self.addr, self.shape, self.profile = cuda, {}, None, 0

        def set_optimization_profile_async(self, p, stream):
            self.profile = p

        def set_input_shape(self, name, shape):
            assert name == "crops"
            mn, _op, mx = profiles[self.profile]
            assert mn <= shape[0] <= mx, f"batch {shape[0]} outside the profile"
            self.shape = tuple(shape)
            self.cuda.log.append(("shape", shape[0]))
            return True

        def get_tensor_shape(self, name):
            b = self.shape[0]
            return {"crops": self.shape, "logits": (b, num_classes),
                    "features": (b, feature_dim)}[name]

        def set_tensor_address(self, name, addr):
            self.addr[name] = addr
            return True

        def execute_async_v3(self, stream):
            assert stream != 0, "execution on the default stream"
            assert self.cuda.depth > 0
            x = self.cuda.view(self.addr["crops"], F32, self.shape).copy()
            lo, fe = sess.run(None, {"crops": x})
            for name, val in (("logits", lo), ("features", fe)):
                v = val.astype(out_dtype)
                self.cuda.memory[self.addr[name]][:v.nbytes] = v.tobytes()
            self.cuda.log.append(("execute", stream, self.shape[0]))
            return True

    class Engine:
        num_io_tensors = 3
        num_optimization_profiles = len(profiles)

        def __init__(self, cuda):
            self.cuda = cuda

        def get_tensor_name(self, i):
            return names[i]

        def get_tensor_mode(self, n):
            return "in" if n == "crops" else "out"

        def get_tensor_shape(self, n):
            return shapes[n]

        def get_tensor_dtype(self, n):
            return dtypes[n]

        def get_tensor_profile_shape(self, n, p):
            return [(b, input_size, input_size) for b in profiles[p]]

        def create_execution_context(self):
            return Context(self.cuda)

    trt.Engine = Engine
    return trt


# ----------------------------------------------------------------------------- planning
def test_buffer_sizing_profiles_and_buckets():
    specs = [TensorSpec("crops", True, (-1, 64, 64), F32),
             TensorSpec("logits", False, (-1, 4), F16),
             TensorSpec("features", False, (-1, -1), F32)]
    plan = buffer_plan(specs, 256, feature_dim=91)
    assert plan == {"crops": ((256, 64, 64), F32), "logits": ((256, 4), F16),
                    "features": ((256, 91), F32)}
    assert nbytes(*plan["crops"]) == 256 * 64 * 64 * 4 and nbytes(*plan["logits"]) == 2048
    with pytest.raises(ValueError, match="feature_dim"):
        buffer_plan(specs, 8)
    # the smallest-max profile that covers the batch
    ranges = [(1, 256, 2048), (1, 8, 16), (17, 64, 128)]
    assert select_profile(ranges, 8) == 1
    assert select_profile(ranges, 100) == 2
    assert select_profile(ranges, 1000) == 0
    with pytest.raises(ValueError):
        select_profile(ranges, 4096)
    assert engine_buckets(256, 256) == (8, 16, 32, 64, 128, 256)
    assert engine_buckets(100, 2048, min_bucket=16) == (16, 32, 64, 100)
    with pytest.raises(BackendUnavailable):
        engine_buckets(512, 256)
    assert check_io(specs, 64, 4).name == "crops"
    with pytest.raises(BackendUnavailable, match="raw crops"):
        check_io([TensorSpec("crops", True, (-1, 1, 64, 64), F32), *specs[1:]], 64, 4)


def test_auto_runtime_without_a_cuda_torch_is_pycuda():
    assert pick_runtime("auto") == "pycuda"  # this machine: CPU build of torch
    assert pick_runtime("torch") == "torch"
    with pytest.raises(ValueError):
        pick_runtime("cupy")


def test_gpu_identity_through_pycuda():
    g = GpuInfo.from_pycuda(0, cuda=FakeCuda())
    assert g == GpuInfo("Fake H200", 9, 0, 132)

    class Broken(FakeCuda):
        def init(self):
            raise RuntimeError("cuInit failed: no device")

    with pytest.raises(TensorRTError, match="no CUDA device"):
        GpuInfo.from_pycuda(0, cuda=Broken())


# ----------------------------------------------------------------------------- data path
@pytest.fixture(scope="module")
def artifact():
    return load_artifact("lenet5-sim")


@pytest.fixture(scope="module")
def onnx_file(artifact, tmp_path_factory):
    return export_onnx(artifact, tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("out_dtype", [F32, F16])
def test_pycuda_path_equals_onnxruntime(artifact, onnx_file, out_dtype):
    cuda = FakeCuda()
    trt = make_fake_trt(onnx_file, 64, 4, 91, [(1, 8, 16), (1, 64, 64)], out_dtype)
    be = TensorRTBackend(artifact, max_batch=64, trt=trt, cuda=cuda,
                         engine=trt.Engine(cuda), min_bucket=8)
    ref_be = create_backend("onnxruntime", artifact, max_batch=64)
    rng = np.random.default_rng(0)
    x = (rng.normal(0, 1, (150, 64, 64)) * 2).astype(np.float32)
    x[3, 0, 0] = np.inf
    try:
        assert be.describe()["runtime"] == "pycuda" and be._rt.profile == 1
        assert be.buckets == (8, 16, 32, 64)
        # two batches in flight (the worker submits k + 1 before collecting k)
        h1 = be.host_buffer(64)
        h1[:] = x[:64]
        k1 = be.submit(h1, 64)
        h2 = be.host_buffer(32)
        assert h2.__array_interface__["data"][0] != h1.__array_interface__["data"][0]
        h2[:27] = x[64:91]
        h2[27:] = 0  # padding to the bucket
        k2 = be.submit(h2, 27)
        o1, o2 = be.collect(k1), be.collect(k2)
        rest = be.infer(x[91:])
        ref = ref_be.infer(x)
    finally:
        be.close()
        ref_be.close()
    lo = np.concatenate([o1.logits, o2.logits, rest.logits])
    fe = np.concatenate([o1.features, o2.features, rest.features])
    fi = np.concatenate([o1.finite, o2.finite, rest.finite])
    assert lo.dtype == np.float32 and lo.shape == (150, 4) and fe.shape == (150, 91)
    np.testing.assert_array_equal(fi, ref.finite)
    assert not fi[3] and fi.sum() == 149
    tol = 1e-6 if out_dtype == F32 else 2e-2
    ok = ref.finite
    np.testing.assert_allclose(lo[ok], ref.logits[ok], rtol=tol, atol=tol * 10)
    np.testing.assert_allclose(fe[ok], ref.features[ok], rtol=tol, atol=tol * 10)
    # everything ran on one dedicated stream, in order, inside balanced context pushes
    streams = {e[1] for e in cuda.log if e[0] in ("htod", "dtoh", "event")}
    assert len(streams) == 1 and 0 not in streams
    ops = [e[0] for e in cuda.log]
    assert ops[0] == "shape"  # at setup: the feature dimension is read for batch 1
    first = ops[ops.index("htod"):ops.index("htod") + 6]
    assert first == ["htod", "shape", "execute", "dtoh", "dtoh", "event"]
    assert cuda.depth == 0 and cuda.max_depth == 1
    assert cuda.freed == 3 and not cuda.memory  # device buffers released on close
    execs = [e[2] for e in cuda.log if e[0] == "execute"]
    assert execs[:2] == [64, 32] and all(b in be.buckets or b == 1 for b in execs)


def test_batch_beyond_every_profile_is_refused(artifact, onnx_file):
    cuda = FakeCuda()
    trt = make_fake_trt(onnx_file, 64, 4, 91, [(1, 8, 16)])
    with pytest.raises(ValueError, match="no optimisation profile"):
        TensorRTBackend(artifact, max_batch=64, trt=trt, cuda=cuda, engine=trt.Engine(cuda))
    assert Profile(1, 8, 16).shapes(64, channel_dim=False)[2] == (16, 64, 64)


NO_TORCH = r'''
import sys

class _Block:  # the lean GPU image has no torch (and so no captum)
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "captum", "torchvision"):
            raise ImportError(f"No module named {name!r} (blocked: lean image)")

sys.meta_path.insert(0, _Block())
import json
import numpy as np
from leukoflow.cli import app  # noqa: F401  (the CLI loads without torch)
from leukoflow.inference.worker import InferWorker  # noqa: F401
from leukoflow.inference.backends import create_backend
from leukoflow.inference.backends.tensorrt import TensorRTBackend
from leukoflow.inference.decision import rule_from_artifact
from leukoflow.models.artifact import load_artifact
from leukoflow.models.tensorrt_build import GpuInfo, TensorRTError
art = load_artifact("lenet5-sim")
be = create_backend("onnxruntime", art, max_batch=64, cache_dir=sys.argv[1])
x = np.load(sys.argv[2])
out = be.infer(x)
d = rule_from_artifact(art)(out.logits, out.features)
try:
    GpuInfo.current()
    gpu = "found"
except TensorRTError as exc:
    gpu = str(exc)
print(json.dumps({"sha": art.sha256, "decisions": d.names(), "logits": out.logits.tolist(),
                  "trt": TensorRTBackend.available(), "gpu": gpu,
                  "torch_loaded": "torch" in sys.modules}))
'''


def test_worker_path_runs_without_torch(artifact, onnx_file, tmp_path):
    """What the lean image runs (artifact, exported graph from the cache, decision rule,
    worker, CLI) imports no torch; the TensorRT backend then reports what is missing."""
    import json
    import subprocess
    import sys

    x = np.random.default_rng(4).normal(0, 1, (40, 64, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    cache = onnx_file.parent.parent  # <cache>/onnx/<file>
    res = subprocess.run([sys.executable, "-c", NO_TORCH, str(cache), str(tmp_path / "x.npy")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["torch_loaded"] is False
    assert got["sha"] == artifact.sha256  # the same network identity without torch
    ref = create_backend("onnxruntime", artifact, max_batch=64).infer(x)
    np.testing.assert_allclose(np.array(got["logits"]), ref.logits, atol=1e-6)
    assert got["decisions"] == rule_from_artifact(artifact)(ref.logits, ref.features).names()
    assert got["trt"][0] is False  # no TensorRT here, said so
    assert "no CUDA device" in got["gpu"] or "pycuda" in got["gpu"]
