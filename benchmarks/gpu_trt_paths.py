"""GPU check: the TensorRT backend's two runtimes side by side (pycuda alone vs torch CUDA).

Same engine (raw-crops graph of the shipped ``lenet5-sim``, fp16, profile 1..max batch), same
host arrays, in one run:

* ``pycuda``: device buffers, page-locked host buffers, stream and events through pycuda (the
  lean GPU image: no torch);
* ``torch``: the same through torch CUDA tensors and a ``torch.cuda.Stream``.

Rows: cells/s of ``backend.infer`` (H2D + engine + D2H + finite check) per batch size for each
runtime, ratio pycuda / torch; the largest |logit| difference between the runtimes and
against ONNX Runtime on the CPU. Without TensorRT, or without either runtime, the missing side
is reported as skipped (``benchmarks/gpu_check.sh`` prints the table).
Usage: ``python benchmarks/gpu_trt_paths.py [--quick] [--json]``.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np

from leukoflow.benchmarks.common import machine, main, row
from leukoflow.benchmarks.workload_infer import synthetic_crops
from leukoflow.inference.backends import create_backend
from leukoflow.inference.backends.base import BackendUnavailable
from leukoflow.models.artifact import load_artifact

MODEL = "lenet5-sim"


def _throughput(be, x: np.ndarray, reps: int) -> float:
    be.infer(x)
    t0 = time.perf_counter()
    for _ in range(reps):
        be.infer(x)
    return x.shape[0] * reps / (time.perf_counter() - t0)


def run(quick: bool = False) -> dict:
    """Both runtimes on one engine (see module docstring)."""
    art = load_artifact(MODEL)
    batches = (256,) if quick else (256, 1024, 2048)
    reps = 20 if quick else 100
    out: dict = {"machine": machine(), "model": MODEL, "rows": [], "runtimes": {}}
    ref_be = create_backend("onnxruntime", art, max_batch=max(batches))
    x_check = synthetic_crops(256, art.input_size, seed=3)
    ref = ref_be.infer(x_check).logits
    ref_be.close()
    logits = {}
    speed: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rt in ("pycuda", "torch"):
            try:
                be = create_backend("tensorrt", art, max_batch=max(batches), precision="fp16",
                                    runtime=rt, cache_dir=tmp)
            except (BackendUnavailable, ImportError, RuntimeError) as exc:
                out["runtimes"][rt] = {"skipped": str(exc)}
                continue
            try:
                logits[rt] = be.infer(x_check).logits
                speed[rt] = {b: _throughput(be, synthetic_crops(b, art.input_size, seed=b),
                                            reps) for b in batches}
                out["runtimes"][rt] = {"describe": be.describe(), "cells_per_s": speed[rt],
                                       "max_abs_logit_diff_vs_onnxruntime":
                                       float(np.abs(logits[rt] - ref).max())}
            finally:
                be.close()
    for b in batches:
        if "torch" in speed:
            out["rows"].append(row(f"tensorrt torch runtime, batch {b}", speed["torch"][b],
                                   "cells/s"))
        if "pycuda" in speed:
            base = speed.get("torch", {}).get(b)
            out["rows"].append(row(f"tensorrt pycuda runtime, batch {b}", speed["pycuda"][b],
                                   "cells/s", "torch runtime" if base else "", base,
                                   ">= 0.95x torch"))
    if len(logits) == 2:
        out["max_abs_logit_diff_pycuda_vs_torch"] = float(
            np.abs(logits["pycuda"] - logits["torch"]).max())
    return out


if __name__ == "__main__":
    main(run)
