"""GPU inference benchmark: the torch-cuda service over ZeroMQ vs the raw model ceiling.

Side by side in one run (LeNet5, 64 x 64 px crops, fp16, untrained weights from a seed —
throughput does not depend on the weights):

* raw model ceiling: CUDA-graph replay of the fp16 network on device-resident input at
  batch ``B`` (no transfers);
* raw backend: ``TorchCudaBackend.infer`` on a host array at batch ``B`` (pinned staging,
  H2D, graph replay, D2H);
* the service: ``InferWorker`` (torch-cuda, max_batch ``B``, max_delay 2 ms) in its own
  process, fed over loopback ZeroMQ by a synthetic producer process sending 1024 fp16 crops
  per message; a collector stand-in in this process counts result cells. Target >= 250,000
  cells/s.

``--device cpu`` runs the same code with the torch-cpu backend and tiny sizes (tests).
Usage: ``python benchmarks/gpu_infer.py [--device cuda|cpu] [--quick] [--json]``.
"""

from __future__ import annotations

import sys
import time

from leukoflow.benchmarks.common import machine, main, row
from leukoflow.benchmarks.workload_infer import (
    SyntheticArtifact,
    measure_service,
    synthetic_crops,
)
from leukoflow.core.physics import CROP_SIZE_PX
from leukoflow.core.transport import tcp_endpoint
from leukoflow.inference.backends import create_backend


def service(device: str, n_msgs: int, per_msg: int, max_batch: int, size: int,
            port0: int = 5650) -> dict:
    """Service throughput (cells/s) fed by a producer process over loopback TCP."""

    cfg = dict(model="synthetic", backend="torch-cuda" if device == "cuda" else "torch-cpu",
               max_batch=max_batch, max_delay_ms=2.0, precision="fp16",
               crops_endpoint=tcp_endpoint(port0), results_endpoint=tcp_endpoint(port0 + 1),
               explain_endpoint=tcp_endpoint(port0 + 2),  # nobody there: drops
               metrics_port=-1, crops_hwm=8)
    dtype = "float16" if device == "cuda" else "float32"
    return measure_service(cfg, n_msgs, per_msg, size, dtype, timeout_s=300,
                           worker_kwargs={"synthetic_size": size, "io_threads": 2},
                           producer_kwargs={"hwm": 8}, worker_stats=True)


def raw(device: str, batch: int, size: int, repeat: int) -> dict:
    """Raw model ceiling (device-resident, graph replay) and raw backend (host arrays)."""
    import torch


    torch.set_num_threads(1)
    art = SyntheticArtifact(size)
    name = "torch-cuda" if device == "cuda" else "torch-cpu"
    be = create_backend(name, art, max_batch=batch, precision="fp16")
    be.warmup()
    x = synthetic_crops(batch, size, seed=1, dtype=be.input_dtype)
    be.infer(x)
    t0 = time.perf_counter()
    for _ in range(repeat):
        be.infer(x)
    backend_rate = batch * repeat / (time.perf_counter() - t0)
    if device == "cuda":
        graph, _ = be._graph(batch)  # device-resident input: the model alone
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.cuda.stream(be.stream):
            for _ in range(repeat):
                graph.replay()
        be.stream.synchronize()
        model_rate = batch * repeat / (time.perf_counter() - t0)
    else:
        model_rate = backend_rate
    return {"model": model_rate, "backend": backend_rate}


def run(quick: bool = False, device: str | None = None) -> dict:
    """Raw ceilings and service throughput (see module docstring)."""
    if device is None:
        device = "cuda" if "--device" in sys.argv and sys.argv[
            sys.argv.index("--device") + 1] == "cuda" else "cpu"
    if device == "cuda":
        batch, per_msg, size = 2048, 1024, CROP_SIZE_PX
        n_msgs, repeat = (100 if quick else 600), (20 if quick else 200)
    else:
        batch, per_msg, size = 64, 32, CROP_SIZE_PX
        n_msgs, repeat = (6 if quick else 24), 3
    r = raw(device, batch, size, repeat)
    s = service(device, n_msgs, per_msg, batch, size)
    rows = [
        row(f"raw model {device} fp16 graph, batch {batch}", r["model"], "cells/s"),
        row(f"raw backend {device} (host I/O), batch {batch}", r["backend"], "cells/s",
            "raw model", r["model"]),
        row(f"service {device} over ZeroMQ ({per_msg}/msg)", s["cells_per_s"], "cells/s",
            "raw backend", r["backend"], ">= 250000 cells/s" if device == "cuda" else ""),
    ]
    return {"machine": machine(), "device": device, "rows": rows, "service": s,
            "batch": batch, "crops_per_message": per_msg, "crop_px": size, "quick": quick}


if __name__ == "__main__":
    main(run)
