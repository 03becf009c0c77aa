"""Triton tier benchmark: the inference worker with the ``triton`` backend against the same
worker with the local ONNX Runtime backend, in one run.

LeNet5 at 64 x 64 px (the shipped ``lenet5-sim``). Both workers run in their own process,
fed over real ZeroMQ by a synthetic producer (64 crops per message), results counted by a
collector stand-in (:func:`leukoflow.benchmarks.bench_infer.service_throughput`); max_batch
256, max_delay 2 ms; the two workers run alternately (three rounds each, 40,960 cells per
round) and each keeps its best round. The Triton side is ``export --triton`` served by a
real ``tritonserver`` on this host (:mod:`leukoflow.inference.triton_server`; on a CPU
machine the server bundled in the ``nvidia-pytriton`` wheel: python backend running the
same ONNX graph with ONNX Runtime, one instance, one thread; system shared memory between
worker and server). Also measured: the raw round trip of one batch through the ``triton``
backend against the local backend's ``infer`` (no ZeroMQ, no decision), and the average
batch Triton executed.

On a GPU host (``benchmarks/gpu_check.sh``), ``LEUKOFLOW_TRITONSERVER`` names the server of
NVIDIA's image and ``LEUKOFLOW_TRITON_CONFIG`` the configuration (``gpu``, ``tensorrt``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from leukoflow.benchmarks.bench_infer import BATCH, PER_MSG, service_throughput
from leukoflow.benchmarks.common import best_time, machine, main, row
from leukoflow.benchmarks.workload_infer import synthetic_crops
from leukoflow.inference.backends import create_backend
from leukoflow.inference.triton_repo import TritonExportConfig, export_triton
from leukoflow.inference.triton_server import TritonServer, find_server
from leukoflow.models.artifact import load_artifact

MODEL = "lenet5-sim"


def raw_round_trip(art, backend, n_cells: int, batch: int = BATCH) -> float:
    """Cells/s of ``backend.infer`` on a prepared batch (the backend's ceiling)."""
    x = synthetic_crops(batch, art.input_size, seed=1)
    backend.infer(x)
    reps = max(3, n_cells // batch)
    t = best_time(lambda: [backend.infer(x) for _ in range(reps)], repeat=1)
    return batch * reps / t


def run(quick: bool = False) -> dict:
    """Worker throughput with Triton vs local ONNX Runtime (see module docstring)."""
    n_msgs = 48 if quick else 640
    rounds = 1 if quick else 3
    config_name = os.environ.get("LEUKOFLOW_TRITON_CONFIG")  # e.g. "tensorrt" on a GPU host
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        art = load_artifact(MODEL)
        repo = Path(tmp) / "repo"
        manifest = export_triton(art, repo, TritonExportConfig(max_batch=BATCH, max_delay_ms=2.0),
                                 cache_dir=Path(tmp) / "cache")
        dist = find_server()
        srv = TritonServer(repo, dist=dist, config_name=config_name)
        srv.start(timeout=300, models=(MODEL,))
        old_url = os.environ.get("LEUKOFLOW_TRITON_URL")
        os.environ["LEUKOFLOW_TRITON_URL"] = srv.grpc_url  # the worker process resolves it
        try:
            local = create_backend("onnxruntime", art, max_batch=BATCH,
                                   cache_dir=os.path.join(tmp, "cache"))
            remote = create_backend("triton", art, max_batch=BATCH)
            raw_local = raw_round_trip(art, local, n_msgs * PER_MSG)
            raw_remote = raw_round_trip(art, remote, n_msgs * PER_MSG)
            local.close()
            # alternate the two sides (A B A B ...) and keep each side's best round, so a
            # load change on a shared machine does not favour one of them
            svc_local: dict = {}
            svc_triton: dict = {}
            before = remote.statistics()["model_stats"][0]
            for r in range(rounds):
                a = service_throughput(MODEL, "onnxruntime", n_msgs, 5660 + 20 * r, tmp)
                b = service_throughput(MODEL, "triton", n_msgs, 5670 + 20 * r, tmp)
                if a["cells_per_s"] > svc_local.get("cells_per_s", -1):
                    svc_local = a
                if b["cells_per_s"] > svc_triton.get("cells_per_s", -1):
                    svc_triton = b
            after = remote.statistics()["model_stats"][0]
            remote.close()
        finally:
            if old_url is None:
                os.environ.pop("LEUKOFLOW_TRITON_URL", None)
            else:
                os.environ["LEUKOFLOW_TRITON_URL"] = old_url
            srv.stop()
        execs = int(after["execution_count"]) - int(before["execution_count"])
        cells = int(after["inference_count"]) - int(before["inference_count"])
        served = srv.config_name or "config.pbtxt"
        rows.append(row(f"worker + onnxruntime (local), {PER_MSG}/msg",
                        svc_local["cells_per_s"], "cells/s"))
        rows.append(row(f"worker + triton ({served}), {PER_MSG}/msg", svc_triton["cells_per_s"],
                        "cells/s", "worker + onnxruntime", svc_local["cells_per_s"],
                        "report (GPU tier: > 1x)"))
        rows.append(row(f"raw onnxruntime infer, batch {BATCH}", raw_local, "cells/s"))
        rows.append(row(f"raw triton round trip, batch {BATCH}", raw_remote, "cells/s",
                        "raw onnxruntime", raw_local, "report"))
        rows.append(row("triton cells per execution (worker run)",
                        cells / execs if execs else 0.0, "cells"))
    return {"machine": machine(), "model": MODEL, "rows": rows, "quick": quick,
            "rounds": rounds, "cells_per_round": n_msgs * PER_MSG,
            "triton": {"server": str(dist.binary), "kind": dist.kind, "config": served,
                       "shared_memory": True, "manifest": manifest["export"]},
            "service": {"onnxruntime": svc_local, "triton": svc_triton}}


if __name__ == "__main__":
    main(run)
