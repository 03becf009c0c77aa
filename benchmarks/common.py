"""Helpers shared by the benchmark scripts: machine description, timing, result rows."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any


def machine() -> str:
    """One-line description of this machine (CPU model, cores, Python)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def best_time(fn: Callable[[], Any], repeat: int = 5, number: int = 1) -> float:
    """Best wall time of ``number`` calls over ``repeat`` tries [s per call]."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def row(stage: str, value: float, unit: str, baseline: str = "",
        baseline_value: float | None = None, target: str = "",
        higher_is_better: bool = True) -> dict:
    """A result row; ``ratio`` is value/baseline (or baseline/value for times; None where
    the divisor is 0, e.g. no wrong report against a baseline with some)."""
    ratio = None
    if baseline_value and (higher_is_better or value):
        ratio = value / baseline_value if higher_is_better else baseline_value / value
    return {"stage": stage, "value": value, "unit": unit, "baseline": baseline,
            "baseline_value": baseline_value, "ratio": ratio, "target": target}


def main(run: Callable[..., dict]) -> None:
    """Command-line entry for a benchmark module: ``[--quick] [--json]``."""
    quick = "--quick" in sys.argv
    res = run(quick=quick)
    if "--json" in sys.argv:
        print(json.dumps(res, indent=2, default=str))
        return
    print(res.get("machine", ""))
    for r in res.get("rows", []):
        ratio = f"  ratio {r['ratio']:.2f}x" if r.get("ratio") else ""
        base = (f"  vs {r['baseline']} {r['baseline_value']:.4g}"
                if r.get("baseline_value") is not None else "")
        print(f"{r['stage']:<40} {r['value']:>12.4g} {r['unit']:<10}{base}{ratio}"
              f"  target {r.get('target', '')}")
