"""Soak: a long ``leukoflow run`` with every service's memory and open files sampled.

One run of the simulated instrument (two workers, the explainer, frames taken as fast as the
acquisition processes them, so the most messages per minute) for ``duration_s`` (30 min; quick:
3 min). Every ``interval_s`` the resident memory (``VmRSS``) and the open file descriptors of
each service process are read from ``/proc``. After the warm-up (the first fifth of the run)
both must stay flat: the mean of the last fifth over the mean of the first fifth after the
warm-up (the baseline) is the growth ratio (target <= 1.10 for memory; file descriptors may
not grow at all). The run's accounting at the end (nothing lost, no duplicate) is reported.

The acquisition runs as with a real camera: without scoring itself against the simulator's
ground truth (``LEUKOFLOW_ACQUIRE_SCORE_TRUTH=0``; that bookkeeping keeps a few hundred bytes
per simulated object for the run's truth report, ~1 MB/min at this rate, by design). The
samples of every service are in the JSON output (``services.<name>.series``).

Run: ``leukoflow bench soak`` (``--quick``: 3 minutes).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import json
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from leukoflow.benchmarks.common import machine, row
from leukoflow.benchmarks.faults import CLI, children
from leukoflow.core.transport import run_port_args


def proc_sample(pid: int) -> tuple[float, int] | None:
    """``(resident memory [MB], open file descriptors)`` of ``pid`` (None when gone)."""
    try:
        rss_kb = next(int(line.split()[1]) for line in
                      Path(f"/proc/{pid}/status").read_text().splitlines()
                      if line.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration, ValueError):
        return None
    return rss_kb / 1024.0, fds


def _names(kids: dict[str, int], mbase: int) -> dict[str, int]:
    out = {}
    for k, pid in kids.items():
        if k.startswith("infer-port-"):
            port = int(k.rsplit("-", 1)[1])
            k = "infer-0" if port == mbase + 1 else f"infer-{port - mbase - 10}"
        out[k] = pid
    return out


def flatness(t: np.ndarray, v: np.ndarray, warmup_frac: float = 0.2) -> dict[str, float]:
    """Baseline (first fifth after the warm-up) and end (last fifth) means, their ratio and
    the slope after the warm-up [per minute]."""
    keep = t >= t.min() + warmup_frac * (t.max() - t.min())
    t, v = t[keep], v[keep]
    if v.size < 4:
        return {"baseline": float("nan"), "end": float("nan"), "ratio": float("nan"),
                "slope_per_min": float("nan")}
    k = max(1, v.size // 5)
    base, end = float(v[:k].mean()), float(v[-k:].mean())
    slope = float(np.polyfit(t / 60.0, v, 1)[0]) if np.ptp(t) > 0 else 0.0
    return {"baseline": base, "end": end, "ratio": end / base if base else float("nan"),
            "slope_per_min": slope}


def run(quick: bool = False, duration_s: float | None = None,
        interval_s: float = 10.0) -> dict[str, Any]:
    """Soak for ``duration_s`` (default 1800 s; quick 180 s)."""
    duration_s = duration_s or (180.0 if quick else 1800.0)
    ports = run_port_args()
    m = int(ports[3])
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [*CLI, "run", "--json", "--as-fast-as-possible", "--workers", "2",
               "--duration", str(duration_s), "--out", str(run_dir), *ports]
        env = dict(os.environ, LEUKOFLOW_ACQUIRE_SCORE_TRUTH="0")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
        samples: dict[str, list[tuple[float, float, int]]] = {}
        t0 = time.monotonic()
        t_stop = float("inf")  # the source stopped: the run winds down, sampling ends
        try:
            while proc.poll() is None:
                now = time.monotonic() - t0
                kids = _names(children(proc.pid), m)
                if "source" in samples and "source" not in kids:
                    t_stop = min(t_stop, now)
                if now >= t_stop:
                    time.sleep(interval_s)
                    continue
                kids["supervisor"] = proc.pid
                for name, pid in kids.items():
                    s = proc_sample(pid)
                    if s is not None:
                        samples.setdefault(name, []).append((now, s[0], s[1]))
                time.sleep(interval_s)
            out, err = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                proc.communicate(timeout=600)
        summary = json.loads(out) if out.strip() else {}
    rows: list[dict[str, Any]] = []
    per: dict[str, Any] = {}
    for name, s in sorted(samples.items()):
        a = np.asarray(s, dtype=float)
        mem = flatness(a[:, 0], a[:, 1])
        fds = flatness(a[:, 0], a[:, 2])
        per[name] = {"rss_mb": mem, "fds": fds, "samples": len(s),
                     "series": [[round(t, 1), round(r, 2), int(f)] for t, r, f in s]}
        rows.append(row(f"{name}: resident memory after warm-up -> end", mem["end"], "MB",
                        "first fifth after warm-up", mem["baseline"], target="ratio <= 1.10"))
        rows.append(row(f"{name}: open file descriptors after warm-up -> end", fds["end"],
                        "fds", "first fifth after warm-up", fds["baseline"],
                        target="no growth"))
    acc = summary.get("accounting", {})
    rows.append(row("cells classified", sum(acc.get(k, 0) for k in
                                            ("counted", "uncertain", "ood")), "cells"))
    rows.append(row("cells lost", acc.get("lost_total", 0), "cells", target="0"))
    rows.append(row("duplicates", acc.get("duplicates", 0), "cells", target="0"))
    return {"machine": machine(), "duration_s": duration_s, "interval_s": interval_s,
            "rows": rows, "services": per, "accounting": acc,
            "returncode": proc.returncode}


if __name__ == "__main__":
    from leukoflow.benchmarks.common import main

    main(run)
