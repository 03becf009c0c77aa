"""End-to-end benchmark of ``leukoflow run`` beside its acquisition-only and inference rates.

Rows (all measured in this one invocation, on this machine):

* ``acquisition only``: ``leukoflow acquire --source sim`` with nobody consuming, frames/s
  and cells/s (objects produced: published + dropped + rejected);
* ``inference path``: simulated crops replayed as fast as possible through one inference
  worker into the collector (``leukoflow replay``), cells/s and latency;
* ``e2e run``: ``leukoflow run --no-explain`` on the simulated instrument, cells/s and
  latency p50/p99, with its ratio to the slower of the two stages above (its ceiling);
* ``differential`` (full mode, or ``--accuracy N``): N simulated cells (natural blood mix
  plus OOD objects) through the live pipeline; largest per-class error of the live
  differential against ground truth [percentage points] and whether accounting balanced.

``python benchmarks/bench_e2e.py [--quick] [--json]``;
``python benchmarks/bench_e2e.py --accuracy N [--data crops.rtdc] [--crops pipeline|isolated]
[--json]``; ``python benchmarks/bench_e2e.py --make-data N crops.rtdc`` (pre-generate the N
cells). ``--crops pipeline`` (default) cuts the cells with the live acquisition path from
simulated flow (``acquisition.pipeline_dataset.make_flow_sample``); ``isolated`` renders
each object alone. ``LEUKOFLOW_SIM_WORKERS`` sets the generating processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from leukoflow.acquisition.pipeline_dataset import make_flow_sample
from leukoflow.acquisition.sim import SimConfig
from leukoflow.acquisition.sim.dataset import make_crop_dataset
from leukoflow.benchmarks.common import machine, row
from leukoflow.core.rtdc import write_crop_dataset
from leukoflow.core.transport import free_tcp_port, tcp_endpoint
from leukoflow.core.vocabulary import CLASS_NAMES

CLI = [sys.executable, "-c", "from leukoflow.cli import main; main()"]


def _ports() -> list[str]:
    return ["--zmq-base-port", str(free_tcp_port()), "--metrics-base-port", str(free_tcp_port())]


def _cli_json(*args: str, timeout: float = 3600) -> dict[str, Any]:
    res = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if res.returncode != 0:
        raise RuntimeError(f"{args[0]} failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout)


def acquisition_only(duration_s: float) -> dict[str, float]:
    """Frames/s and objects/s of the acquisition service alone (no consumer)."""
    t0 = time.monotonic()
    acc = _cli_json("acquire", "--source", "sim", "--duration", str(duration_s), "--json",
                    "--crops-endpoint", tcp_endpoint(free_tcp_port()),
                    "--collector-endpoint", tcp_endpoint(free_tcp_port()),
                    "--metrics-port", str(free_tcp_port()))
    wall = time.monotonic() - t0
    return {"frames_per_s": acc["frames"] / duration_s,
            "cells_per_s": acc["cells_total"] / duration_s, "wall_s": wall}


def _blood_mix_crops(n: int, seed: int) -> dict[str, Any]:
    """``n`` simulated crops in the simulator's default blood mix (leukocytes + OOD)."""

    cfg = SimConfig(seed=seed)
    kp = cfg.kind_probabilities
    probs = dict(kp() if callable(kp) else kp)
    rng = np.random.default_rng(seed)
    kinds = list(probs)
    p = np.array([probs[k] for k in kinds], dtype=float)
    counts = rng.multinomial(n, p / p.sum())
    xs, ys, ks, feats = [], [], [], {}
    for kind, c in zip(kinds, counts, strict=True):
        if c == 0:
            continue
        if kind in CLASS_NAMES:
            d = make_crop_dataset(int(c), 0, seed=seed + len(xs), classes=[kind],
                                  ood_kinds=[])
        else:
            d = make_crop_dataset(0, int(c), seed=seed + len(xs), classes=[],
                                  ood_kinds=[kind])
        xs.append(d["x"])
        ys.append(d["y"])
        ks += list(d["kind"])
        for k, v in d["features"].items():
            feats.setdefault(k, []).append(np.asarray(v))
    order = rng.permutation(sum(len(x) for x in xs))
    x = np.concatenate(xs)[order]
    y = np.concatenate(ys)[order]
    kind = [ks[i] for i in order]
    features = {k: np.concatenate(v)[order] for k, v in feats.items()
                if sum(len(a) for a in v) == len(order)}
    return {"x": x, "y": y, "kind": kind, "features": features}


def _pipeline_crops(n: int, seed: int) -> dict[str, Any]:
    """``n`` traced cells as the live acquisition path emits them from the blood mix."""

    workers = max(1, int(os.environ.get("LEUKOFLOW_SIM_WORKERS", "1")))
    return make_flow_sample(n, seed=seed, workers=workers)


def make_dataset(n: int, path: Path, seed: int = 1, crops: str = "pipeline") -> Path:
    """Write ``n`` simulated blood-mix crops to ``path`` (``.rtdc``) unless it exists.

    ``crops="pipeline"`` (default): cells cut by the live acquisition path from simulated
    flow (what the worker sees in a live run); ``"isolated"``: objects rendered alone
    (``make_crop_dataset``), the older, easier check.
    """

    if crops not in ("pipeline", "isolated"):
        raise ValueError(f"crops must be 'pipeline' or 'isolated', got {crops!r}")
    if not path.exists():
        d = _pipeline_crops(n, seed) if crops == "pipeline" else _blood_mix_crops(n, seed)
        write_crop_dataset(path, d["x"], d["y"], d["kind"], d["features"])
    return path


def inference_path(n: int, workdir: Path, seed: int = 1,
                   data: Path | None = None, crops: str = "pipeline") -> dict[str, Any]:
    """Replay ``n`` simulated crops through one worker into the collector, max speed."""
    path = data or make_dataset(n, workdir / f"crops-{crops}-{n}-{seed}.rtdc", seed, crops)
    s = _cli_json("replay", str(path), "--json", "--out", str(workdir / f"replay-{n}"),
                  *_ports())
    return s


def e2e_run(duration_s: float, workdir: Path) -> dict[str, Any]:
    """``leukoflow run --no-explain --duration`` on the simulated instrument."""
    return _cli_json("run", "--json", "--no-explain", "--duration", str(duration_s),
                     "--out", str(workdir / "e2e"), *_ports())


def accuracy(n_cells: int, workdir: Path | None = None,
             data: Path | None = None, crops: str = "pipeline") -> dict[str, Any]:
    """Live differential vs ground truth on ``n_cells`` simulated cells (see module doc).

    ``data`` reuses a dataset written by :func:`make_dataset` (generation takes minutes).
    """
    workdir = workdir or Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    t0 = time.monotonic()
    s = inference_path(n_cells, workdir, seed=7, data=data, crops=crops)
    truth = s.get("truth") or {}
    errs = {k: v["error_pp"] for k, v in (truth.get("classes") or {}).items()}
    finite = [abs(v) for v in errs.values() if v is not None]
    # the probabilistic differential (sum of calibrated probabilities over counted cells)
    prob_err = {}
    full = _summary_differential(workdir, n_cells)
    if full is not None:
        pc = {k: v["probabilistic_count"] for k, v in full["classes"].items()}
        ptot = sum(pc.values())
        for k, v in (truth.get("classes") or {}).items():
            if ptot > 0 and v.get("fraction") is not None:
                prob_err[k] = 100.0 * (pc[k] / ptot - v["fraction"])
    return {"cells": n_cells, "crops": crops, "emitted": s["accounting"]["emitted"],
            "probabilistic_error_pp": prob_err,
            "balanced": s["accounting"]["balanced"], "accounting": s["accounting"],
            "error_pp": errs, "max_abs_error_pp": max(finite) if finite else None,
            "differential": s["differential"], "truth": truth,
            "cells_per_s": s["throughput"]["mean_cells_per_s"], "wall_s": time.monotonic() - t0}


def _summary_differential(workdir: Path, n: int) -> dict[str, Any] | None:
    """The collector's full differential snapshot of the replay run of ``n`` cells."""
    p = workdir / f"replay-{n}" / "summary.json"
    return json.loads(p.read_text())["differential"] if p.exists() else None


def run(quick: bool = False, accuracy_cells: int | None = None) -> dict[str, Any]:
    """Run the benchmark; ``quick`` uses short runs (about a minute)."""
    duration = 8.0 if quick else 30.0
    n_inf = 400 if quick else 3000
    work = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    acq = acquisition_only(duration)
    inf = inference_path(n_inf, work)
    e2e = e2e_run(duration, work)
    inf_rate = inf["throughput"]["mean_cells_per_s"]
    # same basis as "acquisition only": cells produced per second of source run time
    e2e_rate = e2e["accounting"]["emitted"] / duration
    ceiling = min(acq["cells_per_s"], inf_rate)
    rows = [
        row("acquisition only (sim)", acq["frames_per_s"], "frames/s"),
        row("acquisition only (sim)", acq["cells_per_s"], "cells/s"),
        row("inference path (replay -> worker -> collector)", inf_rate, "cells/s"),
        row("e2e run (sim -> acquire -> infer -> collector)", e2e_rate, "cells/s",
            "min(acquisition, inference)", ceiling),
        row("e2e classified while results flowed", e2e["throughput"]["mean_cells_per_s"],
            "cells/s"),
        row("e2e latency p50", (e2e["latency"].get("run_p50_s") or float("nan")) * 1e3, "ms"),
        row("e2e latency p99", (e2e["latency"].get("run_p99_s") or float("nan")) * 1e3, "ms"),
        row("inference-path latency p50",
            (inf["latency"].get("run_p50_s") or float("nan")) * 1e3, "ms"),
    ]
    out: dict[str, Any] = {
        "machine": machine(), "quick": quick, "rows": rows,
        "e2e": {"accounting": e2e["accounting"], "decisions": e2e["decisions"],
                "duration_s": duration},
        "inference_path": {"cells": n_inf, "accounting": inf["accounting"]},
    }
    n_acc = accuracy_cells if accuracy_cells is not None else (None if quick else 10_000)
    if n_acc:
        a = accuracy(n_acc, work)
        out["accuracy"] = a
        if a["max_abs_error_pp"] is not None:
            out["rows"].append(row(f"differential max |error| on {n_acc} cells",
                                   a["max_abs_error_pp"], "pp", target="<= 2 pp",
                                   higher_is_better=False))
    return out


if __name__ == "__main__":
    kind = sys.argv[sys.argv.index("--crops") + 1] if "--crops" in sys.argv else "pipeline"
    if "--make-data" in sys.argv:  # --make-data N PATH [--crops pipeline|isolated]
        i = sys.argv.index("--make-data")
        print(make_dataset(int(sys.argv[i + 1]), Path(sys.argv[i + 2]), seed=7, crops=kind))
    elif "--accuracy" in sys.argv:  # --accuracy N [--data PATH] [--crops ...]
        n = int(sys.argv[sys.argv.index("--accuracy") + 1])
        data = Path(sys.argv[sys.argv.index("--data") + 1]) if "--data" in sys.argv else None
        res = accuracy(n, data=data, crops=kind)
        print(json.dumps(res, indent=1, default=str) if "--json" in sys.argv else
              f"{n} cells: max |error| {res['max_abs_error_pp']} pp, balanced "
              f"{res['balanced']}, errors {res['error_pp']}, {res['cells_per_s']:.0f} cells/s")
    else:
        from common import main

        main(run)
