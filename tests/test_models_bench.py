"""The model benchmark modules run (tiny CPU sizes); numbers are not asserted (no timing tests)."""

from __future__ import annotations

import importlib


def _load(name: str):
    """A benchmark module, imported like the installed package does (not by file path)."""
    return importlib.import_module(f"leukoflow.benchmarks.{name}")


def test_gpu_models_runs_on_cpu():
    r = _load("gpu_models").run(quick=True)
    rows = r["torch"]["models"]["lenet5"]
    assert all(v["eager_cells_s"] > 0 for v in rows.values())
    assert "skipped" in r["tensorrt"] or r["tensorrt"]["models"]


def test_bench_models_vi_cost_and_inference_quick():
    b = _load("bench_models")
    v = b.bench_vi_cost(quick=True)
    assert set(v["seconds_per_batch"]) == {"deterministic_lenet5", "bayes_head_batched",
                                           "mc_dropout_looped", "full_network_sampling_batched"}
    assert v["bayes_head_logit_std_across_samples_untrained"] > 0
    inf = b.bench_inference(quick=True)
    assert inf["lenet5-sim"][64]["onnxruntime_cells_s"] > 0


def test_bench_models_descriptor_cost_quick():
    """The descriptor benchmark runs both variants side by side and reports the ratios."""
    d = _load("bench_models").bench_descriptors(quick=True)
    for k in ("onnxruntime_cells_s", "pytorch_cells_s"):
        assert d["with_descriptors"][k] > 0 and d["without"][k] > 0
        assert d[f"ratio_{k}"] == d["with_descriptors"][k] / d["without"][k]
    assert d["combined_score_cells_s"] > 0 and d["mahalanobis_score_cells_s"] > 0
