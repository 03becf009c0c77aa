"""The explainer benchmarks run (tiny sizes, CPU) and report their fields; no timing asserts."""

from __future__ import annotations

import importlib


def _load(name: str):
    """A benchmark module, imported like the installed package does (not by file path)."""
    return importlib.import_module(f"leukoflow.benchmarks.{name}")


def test_gpu_explain_runs_on_cpu_with_tiny_sizes():
    r = _load("gpu_explain").run(quick=True)
    assert r["cells"] == 4 and r["segmentations"] == 3
    for k in ("slic_cpu_s_per_cell", "lime_without_slic_s_per_cell",
              "cpu_lime_without_slic_s_per_cell", "speedup_vs_cpu"):
        assert r[k] > 0


def test_bench_explain_module_interface():
    mod = _load("bench_explain")
    assert callable(mod.run) and callable(mod.main)
