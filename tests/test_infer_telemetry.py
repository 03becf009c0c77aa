"""Vectorised histogram updates equal prometheus_client's own observe; config resolution."""

from __future__ import annotations

import numpy as np
import prometheus_client as pc
import pytest

from leukoflow.core.config import ConfigError, resolve
from leukoflow.core.metrics import LATENCY_BUCKETS
from leukoflow.inference.telemetry import InferMetrics, observe_many
from leukoflow.inference.worker import InferConfig


def _samples(reg):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in reg.collect() for s in fam.samples if not s.name.endswith("_created")}


def test_observe_many_equals_observe_one_by_one():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.exponential(0.01, 500), list(LATENCY_BUCKETS), [np.nan, 7.0]])
    weights = rng.integers(1, 4, values.size)
    r1, r2 = pc.CollectorRegistry(), pc.CollectorRegistry()
    h1 = pc.Histogram("lat_seconds", "x", buckets=LATENCY_BUCKETS, registry=r1)
    h2 = pc.Histogram("lat_seconds", "x", buckets=LATENCY_BUCKETS, registry=r2)
    for v, w in zip(values, weights, strict=True):
        if np.isfinite(v):
            for _ in range(w):
                h1.observe(float(v))
    observe_many(h2, values, weights)
    s1, s2 = _samples(r1), _samples(r2)
    assert s1.keys() == s2.keys()
    for k in s1:
        assert s2[k] == pytest.approx(s1[k], rel=1e-9), k


def test_infer_metrics_lists_every_family():
    m = InferMetrics(class_names=("a", "b"))
    m.decisions(np.array([0, 1, 1]), np.array([0, 0, 2], np.uint8), np.array([0.9, 0.8, 0.5]),
                np.array([-1.0, -0.5, 2.0]))
    text = m.m.exposition().decode()
    for fam in InferMetrics.FAMILIES:
        base = fam[:-len("_total")] if fam.endswith("_total") else fam
        assert f"# TYPE {base}" in text, fam
    assert 'leukoflow_cells_classified_total{class="b"} 1.0' in text
    assert 'leukoflow_decisions_total{decision="ood"} 1.0' in text


def test_infer_config_layers():
    cfg = resolve("infer", InferConfig, {"max_batch": 64, "backend": None},
                  toml={"infer": {"max_batch": 32, "max_delay_ms": 5}},
                  env={"LEUKOFLOW_INFER_MAX_DELAY_MS": "1.5", "LEUKOFLOW_INFER_BACKEND":
                       "onnxruntime"})
    assert (cfg.max_batch, cfg.max_delay_ms, cfg.backend) == (64, 1.5, "onnxruntime")
    assert cfg.crops_endpoint.startswith("tcp://127.0.0.1:")  # loopback by default
    with pytest.raises(ConfigError):
        resolve("infer", InferConfig, toml={"infer": {"max_btch": 1}}, env={})
