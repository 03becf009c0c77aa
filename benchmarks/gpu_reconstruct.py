"""Device check: batched fast off-axis reconstruction with the torch backend.

On CUDA (default) it reconstructs batches of 1024×1024 uint8 holograms resident on the GPU
and prints frames/s (target >= 10,000 frames/s on an NVIDIA H100), plus the rate including
the host→device upload of raw uint8 frames and the download of the 256×256 phase. It first
checks the torch fields against the NumPy backend on the same frames.

``--device cpu`` runs the same code on small frames (slowly) so the script is tested
without a GPU.

Usage: ``python benchmarks/gpu_reconstruct.py [--device cuda|cpu] [--size 1024]
[--batch 8,32,64] [--iters 50] [--json]``; exit code 1 if the correctness check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from leukoflow.acquisition.reconstruct import OffAxisConfig, Reconstructor
from leukoflow.acquisition.reconstruct.synth import synthetic_hologram
from leukoflow.benchmarks.common import machine, row
from leukoflow.core.physics import DEFAULT_OPTICS


def _sync(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_batch(torch, rec, holo: np.ndarray, batch: int, iters: int, device: str) -> dict:
    """Frames/s for one batch size: device-resident input, and upload + phase download."""
    unique = holo.shape[0]
    host = np.ascontiguousarray(np.concatenate([holo] * -(-batch // unique))[:batch])
    dev_in = torch.from_numpy(host).to(device)
    for _ in range(3):  # warm-up (cuFFT plans, allocator)
        out = rec.field(dev_in, to_numpy=False)
    _sync(torch, device)
    t0 = time.perf_counter()
    for _ in range(iters):
        out = rec.field(dev_in, to_numpy=False)
    _sync(torch, device)
    fps = batch * iters / (time.perf_counter() - t0)
    del out
    pinned = torch.from_numpy(host)
    if device.startswith("cuda"):
        pinned = pinned.pin_memory()
    e2e_iters = max(1, iters // 2)
    rec.wrapped_phase(pinned.to(device, non_blocking=True), to_numpy=False).cpu()
    _sync(torch, device)
    t0 = time.perf_counter()
    for _ in range(e2e_iters):
        rec.wrapped_phase(pinned.to(device, non_blocking=True), to_numpy=False).cpu()
    _sync(torch, device)
    fps_e2e = batch * e2e_iters / (time.perf_counter() - t0)
    return {"frames_per_s": fps, "frames_per_s_e2e": fps_e2e}


def run(device: str = "cuda", size: int = 1024, batches: tuple[int, ...] = (8, 32, 64),
        iters: int = 50, unique: int = 4) -> dict:
    """Check correctness vs NumPy, then time batched reconstruction on ``device``.

    Returns
    -------
    dict
        ``frames_per_s`` (device-resident input, field kept on device), ``frames_per_s_e2e``
        (pinned uint8 upload + reconstruction + float32 phase download), correctness numbers.
    """
    import torch


    if device == "cpu":
        torch.set_num_threads(1)
    holo, bg, _ = synthetic_hologram((size, size), DEFAULT_OPTICS.carrier, n_frames=unique,
                                     seed=11)
    cfg = OffAxisConfig()
    ref_rec = Reconstructor(cfg, background=bg)
    rec = Reconstructor(cfg.replace(backend="torch", device=device), background=bg)
    ref = ref_rec.field(holo)
    got = rec.field(holo)
    scale = float(np.abs(ref).max())
    max_field_err = float(np.abs(got - ref).max() / scale)
    dphi = np.angle(got * np.conj(ref))
    max_phase_err = float(np.abs(dphi).max())
    ok = bool(max_field_err < 1e-4 and max_phase_err < 1e-3 and ref_rec.sideband == rec.sideband)

    per_batch = {}
    for b in sorted(set(batches)):
        per_batch[b] = _time_batch(torch, rec, holo, b, iters, device)
    best = max(per_batch, key=lambda b: per_batch[b]["frames_per_s"])
    fps = per_batch[best]["frames_per_s"]
    fps_e2e = per_batch[best]["frames_per_s_e2e"]
    phase_shape = rec.output_shape

    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    shp = f"{size}x{size} -> {phase_shape[0]}x{phase_shape[1]}"
    rows = [row(f"torch {shp} batch {b} resident", r["frames_per_s"],
                "frames/s", "", None, ">= 10000" if b == best else "")
            for b, r in per_batch.items()]
    rows += [row(f"torch {size}x{size} batch {b} uint8 upload + phase download",
                 r["frames_per_s_e2e"], "frames/s", f"resident batch {b}", r["frames_per_s"])
             for b, r in per_batch.items()]
    rows.append(row("torch vs numpy max phase error", max_phase_err, "rad", "", None,
                    "< 1e-3", higher_is_better=False))
    return {
        "machine": f"{machine()}; {name}", "rows": rows,
        "device": device, "device_name": name, "torch": torch.__version__,
        "frame_shape": [size, size], "output_shape": list(phase_shape), "batch": best,
        "iters": iters, "frames_per_s": fps, "frames_per_s_e2e": fps_e2e,
        "per_batch": {str(k): v for k, v in per_batch.items()},
        "target_frames_per_s": 10_000, "meets_target": bool(fps >= 10_000),
        "correct": ok, "max_rel_field_err": max_field_err, "max_phase_err_rad": max_phase_err,
        "sideband": list(rec.sideband), "params": rec.params,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--size", type=int, default=None, help="frame side [px] (1024; cpu: 128)")
    ap.add_argument("--batch", default=None,
                    help="frames per batch, comma-separated sweep (8,32,64; cpu: 4)")
    ap.add_argument("--iters", type=int, default=None, help="timed batches (50; cpu: 3)")
    ap.add_argument("--json", action="store_true", help="print JSON only")
    args = ap.parse_args()
    cpu = args.device == "cpu"
    batches = tuple(int(b) for b in (args.batch or ("4" if cpu else "8,32,64")).split(","))
    res = run(device=args.device, size=args.size or (128 if cpu else 1024), batches=batches,
              iters=args.iters or (3 if cpu else 50))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"device {res['device']} ({res['device_name']}), torch {res['torch']}")
        print(f"frames {res['frame_shape']} -> phase {res['output_shape']}, batch {res['batch']}")
        print(f"correctness vs numpy: {'OK' if res['correct'] else 'FAILED'} "
              f"(max rel field err {res['max_rel_field_err']:.2e}, max phase err "
              f"{res['max_phase_err_rad']:.2e} rad)")
        for b, r in res["per_batch"].items():
            print(f"  batch {b:>4}: {r['frames_per_s']:>10,.0f} frames/s resident, "
                  f"{r['frames_per_s_e2e']:>10,.0f} frames/s with upload+download")
        print(f"best frames/s (device-resident, batch {res['batch']}): {res['frames_per_s']:,.0f} "
              f"(target >= {res['target_frames_per_s']:,}: "
              f"{'met' if res['meets_target'] else 'not met'})")
        print(f"frames/s (uint8 upload + phase download): {res['frames_per_s_e2e']:,.0f}")
    return 0 if res["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
