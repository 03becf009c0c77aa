"""The explainer benchmarks run (tiny sizes, CPU) and report their fields; no timing asserts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_explain_runs_on_cpu_with_tiny_sizes():
    r = _load("gpu_explain").run(quick=True)
    assert r["cells"] == 4 and r["segmentations"] == 3
    for k in ("slic_cpu_s_per_cell", "lime_without_slic_s_per_cell",
              "cpu_lime_without_slic_s_per_cell", "speedup_vs_cpu"):
        assert r[k] > 0


def test_bench_explain_module_interface():
    mod = _load("bench_explain")
    assert callable(mod.run) and callable(mod.main)
