"""Benchmark: batched fused multi-SLIC LIME vs Captum's Lime at equal settings (one CPU core).

Per cell: 3 SLIC segmentations x 500 perturbations, LeNet5 at 64 x 64 px (the shipped
``lenet5-sim`` artifact when it loads, else an untrained LeNet5: timing only). Captum runs
the same three segmentations with the same number of samples, the same kernel and a ridge
surrogate, once with its default ``perturbations_per_eval=1`` and once batched (128).
Target: <= 0.5 s per cell for the batched LIME. The batched LIME runs its perturbation
batches through ONNX Runtime on the CPU (``engine="auto"``); the eager-PyTorch figure is
printed too.

Usage: ``python benchmarks/bench_explain.py [--quick] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _bundle():
    import torch

    from explain.model import ModelBundle

    try:
        return ModelBundle.from_artifact("lenet5-sim"), "lenet5-sim"
    except Exception:  # noqa: BLE001  (any load problem: fall back to timing-only model)
        from models.architectures import LeNet5

        torch.manual_seed(0)
        return ModelBundle.from_module(LeNet5()), "untrained LeNet5"


def run(quick: bool = False) -> dict:
    """Time both implementations; returns seconds per cell and ratios."""
    import numpy as np
    import torch
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import Lime

    from explain.lime_batched import LimeParams, cosine_kernel, explain_many
    from explain.segmentation import multi_slic
    from explain.testing import toy_crops

    torch.set_num_threads(1)
    bundle, model_name = _bundle()
    n_cells = 2 if quick else 5
    n_samples = 100 if quick else 500
    crops, _ = toy_crops(2, seed=0)
    crops = crops[:n_cells]
    params = LimeParams(n_samples=n_samples)
    explain_many(bundle.module, crops[:1], [0], params)  # warm-up
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    explain_many(bundle.module, crops, [0] * n_cells, params, timings=timings)
    ours = (time.perf_counter() - t0) / n_cells
    import dataclasses

    p_torch = dataclasses.replace(params, engine="torch")
    t0 = time.perf_counter()
    explain_many(bundle.module, crops, [0] * n_cells, p_torch)
    ours_torch = (time.perf_counter() - t0) / n_cells

    def captum_cell(x, ppe: int) -> None:
        segs, _ = multi_slic(x, params.slic)
        for seg in segs:
            def sim(_o, _p, interp, **_kw):
                return float(cosine_kernel(interp, params.kernel_width)[0])

            def fwd(inp):
                return torch.softmax(bundle.module(inp), dim=1)[:, 0]

            Lime(fwd, interpretable_model=SkLearnRidge(alpha=1.0), similarity_func=sim).attribute(
                torch.as_tensor(x)[None, None], feature_mask=torch.as_tensor(seg)[None, None],
                baselines=0.0, n_samples=n_samples, perturbations_per_eval=ppe)

    n_cap = 1 if quick else 2
    res = {"model": model_name, "cells": n_cells, "segmentations": len(params.slic.n_segments),
           "samples_per_segmentation": n_samples, "batched_lime_s_per_cell": ours,
           "batched_breakdown_s_per_cell": {k: v / n_cells for k, v in timings.items()},
           "batched_lime_torch_engine_s_per_cell": ours_torch,
           "target_s_per_cell": 0.5, "threads": torch.get_num_threads()}
    for ppe in (1, 128):
        t0 = time.perf_counter()
        for x in crops[:n_cap]:
            captum_cell(x, ppe)
        res[f"captum_lime_ppe{ppe}_s_per_cell"] = (time.perf_counter() - t0) / n_cap
        res[f"speedup_vs_captum_ppe{ppe}"] = res[f"captum_lime_ppe{ppe}_s_per_cell"] / ours
    res["meets_target"] = bool(ours <= 0.5)
    _ = np
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    r = run(a.quick)
    if a.json:
        print(json.dumps(r, indent=1))
        return
    print(f"model {r['model']}, {r['segmentations']} segmentations x "
          f"{r['samples_per_segmentation']} samples per cell, 1 thread")
    print(f"batched LIME      {r['batched_lime_s_per_cell'] * 1e3:8.1f} ms/cell "
          f"(target <= 500 ms) {r['batched_breakdown_s_per_cell']}")
    print(f"  same, torch eager {r['batched_lime_torch_engine_s_per_cell'] * 1e3:8.1f} ms/cell")
    for ppe in (1, 128):
        print(f"captum Lime ppe={ppe:<3} {r[f'captum_lime_ppe{ppe}_s_per_cell'] * 1e3:8.1f} ms/cell"
              f"  ratio {r[f'speedup_vs_captum_ppe{ppe}']:.1f}x")


if __name__ == "__main__":
    main()
