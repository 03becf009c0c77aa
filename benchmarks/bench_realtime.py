"""Real-time benchmark: ``leukoflow run`` with the camera paced at its frame rate, per density.

For each sample density (objects per field of view; default 0.03, 0.3, 0.5, 1.5, 3.0) the
pipeline runs for a fixed time as a user runs it (acquisition paced at 500 frames/s, one
inference worker, the explainer, the collector; real processes and sockets) and the run's
own accounting gives, side by side:

* frames/s taken after the warm-up vs the camera's nominal rate (the baseline: ratio 1.0
  means the acquisition kept up), frames dropped at the source and the cells estimated in
  them, acquisition CPU time per frame (independent of how busy the machine is);
* cells classified per second and counted cells per second, the time a 10,000-cell
  differential takes at that rate;
* the one-crop-per-cell yield of fully crossing cells scored live against the simulator's
  truth (dropped frames included), coincidence losses per cell kind, phase RMSE;
* the largest error of the reported differential against the truth [percentage points]
  with the run's 95 % interval half-width beside it (at a few hundred cells the error is
  mostly sampling), latency p50/p99 measured from the frame's capture time;
* the machine's load average before and after each run (the machine may be shared).

``python benchmarks/bench_realtime.py [--quick] [--json] [--duration S] [--densities a,b]``
(``leukoflow bench realtime``). Quick: 20 s at 0.3 and 1.5 objects per field.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from leukoflow.benchmarks.common import machine, row
from leukoflow.core.transport import free_tcp_port

CLI = [sys.executable, "-c", "from leukoflow.cli import main; main()"]
#: Densities of the trade-off table [objects per field of view] (issue 15, plus the live default).
DENSITIES: tuple[float, ...] = (0.03, 0.3, 0.5, 1.5, 3.0)
#: Density of the side-by-side baseline run (the demo density of issue 15).
BASELINE_DENSITY = 0.3
#: Cells of the differential the time is computed for.
TARGET_CELLS = 10_000


def _port_block(n: int) -> int:
    """A base port with ``n`` consecutive free ports after it (best effort)."""
    import socket

    for _ in range(50):
        base = free_tcp_port()
        if base + n >= 65535:
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no block of free ports")


def one_run(density: float, duration_s: float, seed: int = 7, explain: bool = True,
            extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> dict[str, Any]:
    """One paced ``leukoflow run`` at ``density``; its summary figures (``env``: extra
    environment, e.g. a ``LEUKOFLOW_ACQUIRE_PIPELINE_*`` setting)."""
    out = Path(tempfile.mkdtemp(prefix=f"bench_realtime_{density:g}_"))
    load0 = os.getloadavg()
    args = [*CLI, "run", "--source", f"sim:{seed}:{density:g}", "--duration", str(duration_s),
            "--json", "--no-live", "--out", str(out / "run"),
            "--zmq-base-port", str(_port_block(5)),
            "--metrics-base-port", str(_port_block(12)), *extra]
    if not explain:
        args.append("--no-explain")
    try:
        res = subprocess.run(args, capture_output=True, text=True,
                             timeout=duration_s + 600,
                             env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        if res.returncode != 0:
            raise RuntimeError(f"leukoflow run at {density} failed: {res.stderr[-2000:]}")
        s = json.loads(res.stdout)
        full = json.loads((out / "run" / "summary.json").read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    load1 = os.getloadavg()
    acq = [st for snd, st in (full.get("senders") or {}).items() if snd.startswith("acquire")]
    truth_acq = (acq[-1].get("truth") if acq else None) or {}
    cam = s.get("camera") or {}
    thr = s.get("throughput") or {}
    lat = s.get("latency") or {}
    span = float(thr.get("span_s") or 0.0) or float(duration_s)
    counted = int((s.get("decisions") or {}).get("counted", 0))
    classified = int(thr.get("classified", 0))
    truth = (s.get("truth") or {}).get("classes") or {}
    errs = [abs(c["error_pp"]) for c in truth.values() if c.get("error_pp") is not None]
    halfw = [50.0 * (d["upper"] - d["lower"]) for d in (s.get("differential") or {}).values()
             if d.get("fraction") is not None]
    counted_per_s = counted / span if span > 0 else 0.0
    fc = truth_acq.get("full_crossing_cells") or {}
    return {
        "density": density,
        "duration_s": duration_s,
        "load_before": load0,
        "load_after": load1,
        "nominal_hz": cam.get("nominal_hz"),
        "steady_hz": cam.get("steady_hz"),
        "frames_dropped": cam.get("frames_dropped_total", 0),
        "frames_dropped_fraction": cam.get("frames_dropped_fraction", 0.0),
        "cells_in_dropped_frames": cam.get("cells_in_dropped_frames_estimate", 0.0),
        "cpu_ms_per_frame": cam.get("cpu_ms_per_frame"),
        "source_cpu_ms_per_frame": cam.get("source_cpu_ms_per_frame"),
        "classified": classified,
        "counted": counted,
        "cells_per_s_classified": classified / span if span > 0 else 0.0,
        "counted_per_s": counted_per_s,
        "minutes_to_10k_counted": (TARGET_CELLS / counted_per_s / 60.0) if counted_per_s
        else None,
        "yield_full_crossing_cells": fc.get("yield_exactly_one"),
        "full_crossing_cells": fc.get("n"),
        "loss_by_kind": truth_acq.get("loss_by_kind"),
        "duplicates": truth_acq.get("duplicates"),
        "phase_rmse_rad": truth_acq.get("phase_rmse_rad"),
        "max_error_pp": max(errs) if errs else None,
        "max_interval_halfwidth_pp": max(halfw) if halfw else None,
        "latency_p50_s": lat.get("run_p50_s"),
        "latency_p99_s": lat.get("run_p99_s"),
        "balanced": (s.get("accounting") or {}).get("balanced"),
    }


def run(quick: bool = False, duration_s: float | None = None,
        densities: tuple[float, ...] | None = None, seed: int = 7,
        default_density: float | None = None) -> dict[str, Any]:
    """Run the paced pipeline at each density; rows with the camera rate as baseline."""
    dens = densities or ((0.3, 1.5) if quick else DENSITIES)
    dur = duration_s or (20.0 if quick else 90.0)
    runs = [one_run(c, dur, seed=seed) for c in dens]
    # baseline: the same pipeline without the empty-frame prescreen (every frame reconstructed)
    base_c = BASELINE_DENSITY
    base = one_run(base_c, dur, seed=seed,
                   env={"LEUKOFLOW_ACQUIRE_PIPELINE_PRESCREEN_ENABLED": "false"})
    base["baseline"] = "prescreen off"
    with_ps = next((r for r in runs if r["density"] == base_c), None)
    if with_ps is None:
        with_ps = one_run(base_c, dur, seed=seed)
        runs.append(with_ps)
    rows = [row(f"acquisition CPU per frame, prescreen (c={base_c:g})",
                with_ps["cpu_ms_per_frame"] or float("nan"), "ms",
                "every frame reconstructed", base["cpu_ms_per_frame"], "",
                higher_is_better=False),
            row(f"frames/s taken, prescreen (c={base_c:g})", with_ps["steady_hz"] or 0.0,
                "frames/s", "every frame reconstructed", base["steady_hz"] or None,
                "500 frames/s")]
    for r in runs:
        tag = f" (c={r['density']:g})"
        nominal = r["nominal_hz"] or 500.0
        rows += [
            row("frames/s taken after warm-up" + tag, r["steady_hz"] or 0.0, "frames/s",
                "camera (nominal)", nominal, ">= 0.99 x nominal"),
            row("frames dropped" + tag, r["frames_dropped_fraction"], "fraction",
                target="0 when keeping up"),
            row("acquisition CPU per frame" + tag, r["cpu_ms_per_frame"] or float("nan"),
                "ms", target="< 2 ms (one core at 500 frames/s)"),
            row("cells classified" + tag, r["cells_per_s_classified"], "cells/s"),
            row("time to 10,000 counted cells" + tag,
                r["minutes_to_10k_counted"] or float("nan"), "min", target="<= 5 min"),
            row("one crop per fully crossing cell (live)" + tag,
                r["yield_full_crossing_cells"] or float("nan"), "fraction",
                target=">= 0.995"),
            row("largest differential error" + tag, r["max_error_pp"] or float("nan"), "pp",
                target="<= 2 pp at 10,000 cells"),
            row("latency p99 from capture" + tag, r["latency_p99_s"] or float("nan"), "s"),
        ]
    return {"machine": machine(), "cpus": os.cpu_count(), "runs": runs, "baseline": base,
            "rows": rows, "target_cells": TARGET_CELLS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--duration", type=float, default=None)
    ap.add_argument("--densities", default=None, help="comma-separated objects per field")
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args(argv)
    dens = tuple(float(x) for x in a.densities.split(",")) if a.densities else None
    res = run(quick=a.quick, duration_s=a.duration, densities=dens, seed=a.seed)
    if a.json:
        print(json.dumps(res, default=float))
        return 0
    print(res["machine"])
    hdr = ("objects/field", "load", "frames/s (of 500)", "dropped", "CPU ms/frame (camera)",
           "cells/s", "min to 10k", "one-crop yield", "max err pp (±CI)", "p50/p99 ms")
    print(" | ".join(hdr))
    for r in [*res["runs"], res["baseline"]]:
        def f(v: Any, fmt: str) -> str:
            return "–" if v is None else format(v, fmt)
        print(" | ".join([
            f"{r['density']:g}" + (f" ({r['baseline']})" if r.get("baseline") else ""),
            f"{r['load_before'][0]:.1f}-{r['load_after'][0]:.1f}",
            f(r["steady_hz"], ".0f"), f(r["frames_dropped_fraction"], ".1%"),
            f"{f(r['cpu_ms_per_frame'], '.2f')} ({f(r['source_cpu_ms_per_frame'], '.2f')})",
            f(r["cells_per_s_classified"], ".1f"),
            f(r["minutes_to_10k_counted"], ".1f"), f(r["yield_full_crossing_cells"], ".4f"),
            f"{f(r['max_error_pp'], '.1f')} (±{f(r['max_interval_halfwidth_pp'], '.1f')})",
            f"{f(r['latency_p50_s'] and 1e3 * r['latency_p50_s'], '.0f')}/"
            f"{f(r['latency_p99_s'] and 1e3 * r['latency_p99_s'], '.0f')}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
