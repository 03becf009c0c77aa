"""Device check: the whole acquisition on the GPU in batches (issue 15).

Simulated 320×1024 holograms at 1.5 objects per field of view (pre-rendered on the host,
then fed like a camera) go through :class:`leukoflow.acquisition.batched.BatchedPipeline`:
reconstruction, phase/amplitude, segmentation and object measurement on the device a batch
at a time, gates, splits, tracker and crops on the host. It reports, side by side in one run:

* the device stages alone (frames resident on the device; reconstruct + segment + measure),
* the whole pipeline from host uint8 frames to finished crops (what one camera process can
  take), target >= 2,000 frames/s on one GPU (four 500 frames/s cameras),
* the NumPy CPU pipeline on the same frames (one core) as the baseline, and
* agreement with the CPU pipeline: the emitted cells' ground-truth ids and crops.

``--device cpu`` runs the same code on the CPU (slowly; for testing the script).

Usage: ``python benchmarks/gpu_acquire.py [--device cuda|cpu] [--frames 2048]
[--batch 256] [--density 1.5] [--json]``; exit code 1 if the agreement check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from leukoflow.acquisition.pipeline import AcquisitionPipeline
from leukoflow.acquisition.sim import SimConfig
from leukoflow.acquisition.sources import create_source
from leukoflow.benchmarks.common import machine, row


def _sync(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _frames(n: int, density: float, seed: int) -> tuple[list, np.ndarray]:
    src = create_source("sim", seed=seed, config=SimConfig(seed=seed, concentration=density))
    src.open()
    return [src.read() for _ in range(n)], src.background


def run(device: str = "cuda", frames: int = 2048, batch: int = 256, density: float = 1.5,
        seed: int = 21, check_frames: int = 512, cpu_frames: int = 512) -> dict:
    """Time the batched device pipeline against the CPU pipeline; check their cells agree."""
    import torch

    from leukoflow.acquisition.batched import BatchedPipeline, measure_batch, segment_batch

    if device == "cpu":
        torch.set_num_threads(1)
        frames, batch, check_frames, cpu_frames = (min(frames, 96), min(batch, 32),
                                                   min(check_frames, 96), min(cpu_frames, 96))
    raws, bg = _frames(frames, density, seed)
    # agreement with the CPU pipeline on the first frames
    nc = min(check_frames, frames)
    cpu = AcquisitionPipeline(background=bg)
    dev = BatchedPipeline(background=bg, device=device)
    cells_c = [c for r in raws[:nc] for c in cpu.process(r).cells] + cpu.flush(nc).cells
    cells_d = []
    for i in range(0, nc, batch):
        cells_d += [c for r in dev.process_batch(raws[i:min(i + batch, nc)]) for c in r.cells]
    cells_d += dev.flush(nc).cells
    ids_c = [c.truth_id for c in cells_c]
    ids_d = [c.truth_id for c in cells_d]
    same = len(set(ids_c) & set(ids_d))
    agree = same / max(len(set(ids_c) | set(ids_d)), 1)
    crop_err = max((float(np.abs(a.crop.phase - b.crop.phase).max())
                    for a, b in zip(cells_c, cells_d, strict=False)
                    if a.truth_id == b.truth_id), default=0.0)
    # CPU baseline (one core, NumPy, prescreen on): CPU time per frame
    base = AcquisitionPipeline(background=bg)
    ncpu = min(cpu_frames, frames)
    t0 = time.process_time()
    for r in raws[:ncpu]:
        base.process(r)
    cpu_fps = ncpu / max(time.process_time() - t0, 1e-9)
    # device stages alone, input resident on the device
    x = torch.from_numpy(np.stack([r.image for r in raws[:batch]])).to(device)
    rec = dev.reconstructor
    kw = dev._seg_kw

    def device_step() -> None:
        fld = rec.field(x, to_numpy=False)
        ph = torch.angle(fld)
        lab, cnt = segment_batch(ph, **kw)
        measure_batch(lab, cnt, ph, torch.abs(fld))

    device_step()
    _sync(torch, device)
    iters = 3 if device == "cpu" else 10
    t0 = time.perf_counter()
    for _ in range(iters):
        device_step()
    _sync(torch, device)
    dev_fps = batch * iters / (time.perf_counter() - t0)
    # the whole pipeline, host frames in, crops out (fresh pipeline, frames in order)
    full = BatchedPipeline(background=bg, device=device)
    full.process_batch(raws[:batch])  # warm-up
    full = BatchedPipeline(background=bg, device=device)
    t0 = time.perf_counter()
    n_cells = 0
    for i in range(0, frames, batch):
        n_cells += sum(len(r.cells) for r in full.process_batch(raws[i:i + batch]))
    _sync(torch, device)
    wall = time.perf_counter() - t0
    e2e_fps = frames / wall
    host_s = wall - full.batch_stats["device_s"]
    out = {
        "machine": machine(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else "",
        "density_objects_per_field": density,
        "frames": frames,
        "batch": batch,
        "device_frames_per_s": dev_fps,
        "pipeline_frames_per_s": e2e_fps,
        "pipeline_cells_per_s": n_cells / wall,
        "host_share_of_wall": host_s / wall,
        "cpu_pipeline_frames_per_s": cpu_fps,
        "agreement_cell_ids": agree,
        "cells_cpu": len(ids_c),
        "cells_device": len(ids_d),
        "max_crop_diff_rad": crop_err,
        "rows": [
            row("acquisition on device, whole pipeline", e2e_fps, "frames/s",
                "NumPy pipeline, 1 CPU core", cpu_fps, ">= 2000 frames/s at 1.5 objects/field"),
            row("acquisition device stages (recon+segment+measure)", dev_fps, "frames/s",
                "NumPy pipeline, 1 CPU core", cpu_fps),
            row("cells with the CPU pipeline's truth ids", agree, "fraction", target=">= 0.98"),
        ],
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--frames", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--density", type=float, default=1.5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    res = run(a.device, a.frames, a.batch, a.density)
    if a.json:
        print(json.dumps(res, default=float))
    else:
        for r in res["rows"]:
            ratio = "" if r["ratio"] is None else f"ratio {r['ratio']:.1f}x"
            print(f"{r['stage']:<52} {r['value']:>12.4g} {r['unit']}  {ratio}")
    return 0 if res["agreement_cell_ids"] >= 0.98 else 1


if __name__ == "__main__":
    sys.exit(main())
