"""GPU inference ceilings of the CNNs (PyTorch fp16 + CUDA graphs, TensorRT if installed).

``python benchmarks/gpu_models.py [--quick] [--json]``

On a CUDA device: raw LeNet5 / AlexNet (shipped widths) fp16 cells/s at batch 256, 1024
and 2048, eager vs CUDA-graph replay (ratio printed), and, when ``tensorrt`` imports, an
engine built through ``leukoflow.models.tensorrt_build`` (ONNX export -> build -> cache) and run at
the same batch sizes. On a CPU-only machine the same code runs with tiny sizes in float32 (no
graphs, no TensorRT) so that it stays tested; those CPU numbers are not ceilings.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from leukoflow.core.physics import CROP_SIZE_PX
from leukoflow.models.export import export_onnx
from leukoflow.models.tensorrt_build import EngineRunner, Profile, build_engine, load_engine

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _timeit(fn, sync, iters: int) -> float:
    """Seconds per call (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def _models():
    from leukoflow.models.architectures import build_model

    return {"lenet5": build_model("lenet5"),
            "alexnet_w0.25": build_model("alexnet", width=0.25, hidden=256),
            "alexnet_w1": build_model("alexnet")}


def bench_torch(quick: bool) -> dict:
    """Eager vs CUDA-graph cells/s per model and batch size."""
    import torch

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    batches = (256, 1024, 2048) if cuda and not quick else ((256,) if cuda else (4, 8))
    iters = 50 if cuda else 2
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu",
                 "dtype": str(dtype), "models": {}}
    if cuda:
        torch.backends.cudnn.benchmark = True
    for name, model in _models().items():
        if not cuda and name == "alexnet_w1":
            continue
        model = model.to(dev, dtype).eval()
        rows = {}
        for bs in batches:
            x = torch.randn(bs, 1, CROP_SIZE_PX, CROP_SIZE_PX, device=dev, dtype=dtype)
            with torch.inference_mode():
                eager = _timeit(lambda x=x, m=model: m(x), sync, iters)
                row = {"eager_cells_s": bs / eager}
                if cuda:
                    static_x = x.clone()
                    s = torch.cuda.Stream()
                    s.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(s):
                        for _ in range(3):
                            model(static_x)
                    torch.cuda.current_stream().wait_stream(s)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        model(static_x)
                    graph = _timeit(g.replay, sync, iters)
                    row.update(graph_cells_s=bs / graph, ratio_graph_eager=eager / graph)
            rows[bs] = row
        out["models"][name] = rows
    return out


def bench_tensorrt(quick: bool) -> dict:
    """Build (through the engine cache) and run TensorRT engines; skipped without TensorRT."""
    try:
        import tensorrt as trt
        import torch
    except ImportError as exc:
        return {"skipped": f"tensorrt not importable ({exc})"}
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}

    out: dict = {"trt_version": trt.__version__, "models": {}}
    batches = (256,) if quick else (256, 1024, 2048)
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in _models().items():
            onnx = export_onnx(model.eval(), Path(tmp) / f"{name}.onnx", CROP_SIZE_PX)
            t0 = time.perf_counter()
            res = build_engine(onnx, f"bench-{name}".ljust(64, "0"), CROP_SIZE_PX, "fp16",
                               Profile(1, 1024, max(batches)), Path(tmp) / "engines")
            build_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            res2 = build_engine(onnx, f"bench-{name}".ljust(64, "0"), CROP_SIZE_PX, "fp16",
                                Profile(1, 1024, max(batches)), Path(tmp) / "engines")
            cached_s = time.perf_counter() - t0
            runner = EngineRunner(load_engine(res.engine))
            rows = {}
            ref_model = model.cuda().float().eval()
            for bs in batches:
                x = torch.randn(bs, 1, CROP_SIZE_PX, CROP_SIZE_PX, device="cuda")
                sec = _timeit(lambda x=x, r=runner: r(x), torch.cuda.synchronize, 50)
                with torch.inference_mode():
                    ref = ref_model(x)
                diff = float((runner(x)["logits"].float() - ref).abs().max())
                rows[bs] = {"cells_s": bs / sec, "max_abs_logit_diff_vs_fp32": diff}
            out["models"][name] = {"build_s": build_s, "cached_lookup_s": cached_s,
                                   "cache_hit": res2.cached, "strategy": res.strategy,
                                   "precision": res.precision, "batches": rows}
    return out


def run(quick: bool = False) -> dict:
    """Run the GPU benchmark (tiny CPU sizes when no GPU)."""
    return {"quick": quick, "torch": bench_torch(quick), "tensorrt": bench_tensorrt(quick)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    r = run(a.quick)
    if a.json:
        print(json.dumps(r, indent=2, default=str))
    else:
        t = r["torch"]
        print(f"device {t['device']} ({t['dtype']})")
        for name, rows in t["models"].items():
            for bs, row in rows.items():
                print(f"{name:14s} batch {bs:5d}: " + ", ".join(
                    f"{k} {v:,.0f}" if "cells" in k else f"{k} {v:.2f}" for k, v in row.items()))
        print("tensorrt:", json.dumps(r["tensorrt"], default=str))
