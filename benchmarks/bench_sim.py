"""Benchmark of the simulated instrument (one core).

* frames/s of :class:`leukoflow.acquisition.sim.FlowSimulator` at the default ROI (patch updates
  over precomputed background and noise banks) beside a naive full-frame baseline (render the
  whole phase-grid field, upsample the full frame, form the full hologram, draw fresh noise,
  quantise) on the same objects, and their ratio;
* crops/s of :func:`acquisition.sim.make_crop_dataset` through the hologram path and as
  noise-free ground truth.

Usage: ``python benchmarks/bench_sim.py [--quick] [--json]``.
"""

from __future__ import annotations

import os

from leukoflow.acquisition.sim import FlowSimulator, SimConfig, make_crop_dataset
from leukoflow.acquisition.sim.optics import fourier_upsample
from leukoflow.core.physics import CROP_SIZE_PX

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def _naive_frame(sim, frame, rng: np.random.Generator) -> np.ndarray:
    """Full-frame hologram of ``frame``'s objects without any reuse (baseline)."""

    hp, wp = sim.phase_shape
    d = sim.d
    field = np.ones((hp, wp), np.complex64)
    for fo, y0, x0 in frame.placements:
        f = fo.obj.field()
        m0, n0 = int(round(y0 / d)), int(round(x0 / d))
        h, w = f.shape
        a0, b0, a1, b1 = max(m0, 0), max(n0, 0), min(m0 + h, hp), min(n0 + w, wp)
        if a0 < a1 and b0 < b1:
            field[a0:a1, b0:b1] *= f[a0 - m0:a1 - m0, b0 - n0:b1 - n0]
    up = fourier_upsample(field, d)
    hh, ww = sim.shape
    inten = sim.interf.intensity(up, 0, hh, 0, ww)
    z = rng.standard_normal((hh, ww), dtype=np.float32)
    return sim.camera.expose(inten, z)


def _rate(fn, n: int) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn(n)
    return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)


def run(quick: bool = False) -> dict:
    """Run the benchmark; returns the measured numbers (also printed by ``main``)."""

    n_frames = 200 if quick else 1500
    n_naive = 20 if quick else 100
    n_crops = 25 if quick else 250
    sim = FlowSimulator(SimConfig(seed=0))
    frames = list(sim.frames(20))  # warm-up

    fps_wall, fps_cpu = _rate(lambda n: [None for _ in sim.frames(n)], n_frames)
    frames = list(sim.frames(n_naive))
    rng = np.random.default_rng(0)
    it = iter(frames)
    naive_wall, naive_cpu = _rate(lambda n: [_naive_frame(sim, next(it), rng)
                                             for _ in range(n)], n_naive)
    make_crop_dataset(2, 0, seed=1)  # warm-up (imports, caches)
    crops_wall, crops_cpu = _rate(lambda n: make_crop_dataset(n // 4, 0, seed=2), n_crops * 4)
    gt_wall, gt_cpu = _rate(lambda n: make_crop_dataset(n // 4, 0, seed=2,
                                                         through_hologram=False), n_crops * 4)
    return {
        "frame_shape": list(sim.shape),
        "phase_shape": list(sim.phase_shape),
        "frames": n_frames,
        "frames_per_s": fps_wall,
        "frames_per_s_cpu": fps_cpu,
        "naive_frames_per_s": naive_wall,
        "naive_frames_per_s_cpu": naive_cpu,
        "speedup_vs_naive": fps_wall / naive_wall,
        "target_frames_per_s": 500.0,
        "crops_per_s": crops_wall,
        "crops_per_s_cpu": crops_cpu,
        "crops_per_s_ground_truth": gt_wall,
        "crops_per_s_ground_truth_cpu": gt_cpu,
        "crop_shape": [CROP_SIZE_PX, CROP_SIZE_PX],
        "threads": 1,
        "quick": quick,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args()
    res = run(quick=args.quick)
    if args.json:
        print(json.dumps(res, sort_keys=True))
        return
    h, w = res["frame_shape"]
    print(f"simulator {h}x{w} uint8 frames: {res['frames_per_s']:.0f} frames/s "
          f"(cpu {res['frames_per_s_cpu']:.0f}); naive full-frame "
          f"{res['naive_frames_per_s']:.0f} frames/s (cpu {res['naive_frames_per_s_cpu']:.0f}); "
          f"ratio {res['speedup_vs_naive']:.1f}x; target {res['target_frames_per_s']:.0f}")
    print(f"crop dataset 64x64 through hologram: {res['crops_per_s']:.0f} crops/s "
          f"(cpu {res['crops_per_s_cpu']:.0f}); ground truth only "
          f"{res['crops_per_s_ground_truth']:.0f} crops/s "
          f"(cpu {res['crops_per_s_ground_truth_cpu']:.0f})")


if __name__ == "__main__":
    main()
