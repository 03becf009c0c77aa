"""Inference benchmark (CPU): the service against its raw backend, ONNX Runtime vs PyTorch.

Side by side in one run, LeNet5 at 64 x 64 px (the shipped ``lenet5-sim`` artifact when
present, else an untrained LeNet5 with the same shapes):

* raw backend throughput at batch 256 (``backend.infer`` on a prepared array, one thread)
  for ``torch-cpu`` and ``onnxruntime`` — the ceiling; and the same followed by the
  artifact's decision rule (its OOD detector can cost a sizeable share: KNN for
  ``lenet5-sim``), which the service must also run;
* the inference service (``InferWorker`` in its own process, same backend, max_batch 256,
  max_delay 2 ms) fed over real ZeroMQ (loopback TCP) by a synthetic producer process
  sending 64 crops per message, results counted by a collector stand-in in this process.

Ratios: service / raw for each backend (target >= 0.8) and ONNX Runtime / PyTorch (raw).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from leukoflow.benchmarks.common import best_time, machine, main, row
from leukoflow.benchmarks.workload_infer import (
    make_test_artifact,
    measure_service,
    synthetic_crops,
)
from leukoflow.core.physics import CROP_SIZE_PX
from leukoflow.core.transport import tcp_endpoint
from leukoflow.inference.backends import create_backend
from leukoflow.inference.decision import rule_from_artifact
from leukoflow.models.artifact import list_artifacts, load_artifact

BATCH = 256
PER_MSG = 64


def _artifact_path(tmp: str) -> str:

    if "lenet5-sim" in list_artifacts():
        return "lenet5-sim"

    return str(make_test_artifact(Path(tmp) / "lenet5-bench", input_size=CROP_SIZE_PX).path)


def service_throughput(model: str, backend: str, n_msgs: int, port0: int, tmp: str,
                       per_msg: int = PER_MSG, max_batch: int = BATCH,
                       dtype: str = "float32", size: int = CROP_SIZE_PX, precision: str = "fp16",
                       extra: dict | None = None) -> dict:
    """Cells/s of the service fed by a producer process (see module docstring)."""

    cfg = dict(model=model, backend=backend, max_batch=max_batch, max_delay_ms=2.0,
               crops_endpoint=tcp_endpoint(port0), results_endpoint=tcp_endpoint(port0 + 1),
               explain_endpoint="", metrics_port=-1, cache_dir=os.path.join(tmp, "cache"),
               precision=precision, crops_hwm=16, **(extra or {}))
    return measure_service(cfg, n_msgs, per_msg, size, dtype, timeout_s=600)


def raw_throughput(model: str, backend: str, tmp: str, batch: int = BATCH,
                   n_cells: int = 4096) -> dict:
    """Sustained cells/s of ``backend.infer`` on prepared batches (about ``n_cells``), alone
    and followed by the artifact's decision rule (temperature, OOD detector, thresholds).

    The mean over as many cells as a service run, not a best-of, so that both sides of the
    ratio see the same (possibly shared) machine."""
    import torch
    from threadpoolctl import threadpool_limits


    torch.set_num_threads(1)
    threadpool_limits(limits=1)  # the worker's budget: one thread for network and detector
    art = load_artifact(model)
    be = create_backend(backend, art, max_batch=batch, cache_dir=os.path.join(tmp, "cache"))
    rule = rule_from_artifact(art)
    x = synthetic_crops(batch, be.input_size, seed=1)
    be.infer(x)
    reps = max(3, n_cells // batch)
    t_be = best_time(lambda: [be.infer(x) for _ in range(reps)], repeat=1)

    def with_rule() -> None:
        for _ in range(reps):
            o = be.infer(x)
            rule(o.logits, o.features)

    t_rule = best_time(with_rule, repeat=1)
    return {"backend": batch * reps / t_be, "backend+decision": batch * reps / t_rule}


def run(quick: bool = False) -> dict:
    """Raw vs service throughput for torch-cpu and onnxruntime (see module docstring)."""
    n_msgs = 48 if quick else 320
    rows = []
    detail = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = _artifact_path(tmp)
        raw = {}
        for i, b in enumerate(("torch-cpu", "onnxruntime")):
            raw[b] = raw_throughput(model, b, tmp, n_cells=n_msgs * PER_MSG)
            svc = service_throughput(model, b, n_msgs, 5620 + 10 * i, tmp)
            detail[b] = {"service": svc, "raw": raw[b]}
            rows.append(row(f"raw {b} batch {BATCH}", raw[b]["backend"], "cells/s"))
            rows.append(row(f"raw {b} + decision rule", raw[b]["backend+decision"], "cells/s",
                            f"raw {b}", raw[b]["backend"]))
            rows.append(row(f"service {b} over ZeroMQ ({PER_MSG}/msg)", svc["cells_per_s"],
                            "cells/s", f"raw {b}", raw[b]["backend"], ">= 0.8x raw"))
            rows.append(row(f"service {b} vs raw + decision", svc["cells_per_s"], "cells/s",
                            f"raw {b} + decision", raw[b]["backend+decision"],
                            "service overhead"))
        rows.append(row("raw onnxruntime vs torch-cpu", raw["onnxruntime"]["backend"],
                        "cells/s", "raw torch-cpu", raw["torch-cpu"]["backend"], "> 1x"))
    return {"machine": machine(), "model": model if "/" not in model else "untrained lenet5",
            "rows": rows, "service": detail, "quick": quick}


if __name__ == "__main__":
    main(run)
