"""Dataset audit: flipped labels in a simulated dataset are found; report files are real."""

from __future__ import annotations

import json

import numpy as np
from helpers import sim_crops

from leukoflow.research.audit import (
    AuditConfig,
    flip_labels,
    precision_at_k,
    rank_suspects,
    run_audit,
)


def test_rank_and_precision_helpers():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    order, dis = rank_suspects(probs, np.array([1, 1, 0]))
    assert order[0] == 0 and dis[0] == np.float64(0.9)
    assert precision_at_k(order, np.array([0])) == 1.0
    y = np.zeros(100, np.int64)
    yn, idx = flip_labels(y, 0.05, 4, np.random.default_rng(0))
    assert len(idx) == 5 and (yn[idx] != 0).all() and (np.delete(yn, idx) == 0).all()


def test_audit_finds_flipped_labels_in_simulated_data(tmp_path):
    """5 % flipped labels; precision among the top-k (k = number flipped) must be >= 0.8."""
    x, y = sim_crops(60, seed=7)
    yn, flipped = flip_labels(y, 0.05, 4, np.random.default_rng(0))
    cfg = AuditConfig(folds=4, epochs=12, patience=4, explain_top=3, lime_samples=60, top=16)
    s = run_audit(x, yn, tmp_path, cfg, dataset="sim", truth_flipped=flipped)
    assert s["flipped"]["n"] == 12
    assert s["flipped"]["precision_at_k"] >= 0.8, s["flipped"]
    doc = json.loads((tmp_path / "audit.json").read_text())
    assert doc["config"]["model"] == "cnn+descriptors" and len(doc["suspects"]) == 16
    assert (tmp_path / "report.html").read_text().count("<tr>") >= 16
    png = (tmp_path / "suspects.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with np.load(tmp_path / "audit_arrays.npz", allow_pickle=False) as z:
        assert z["probs"].shape == (240, 4)
        top = doc["suspects"][0]["index"]
        assert f"lime_{top}" in z.files and np.isfinite(z[f"lime_{top}"]).all()


def test_audit_rejects_bad_labels(tmp_path):
    import pytest

    x = np.zeros((8, 64, 64), np.float32)
    with pytest.raises(ValueError):
        run_audit(x, np.full(8, -1), tmp_path, AuditConfig(folds=2))
    with pytest.raises(ValueError, match="samples"):
        run_audit(x, np.array([0, 0, 0, 0, 1, 1, 1, 2]), tmp_path, AuditConfig(folds=2))
