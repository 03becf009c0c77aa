"""Temperature scaling and calibration metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from leukoflow.core.stats import adaptive_ece, ece, mce, softmax_t
from leukoflow.models.calibration import (
    accuracy,
    bootstrap_ci,
    brier,
    calibration_report,
    ece_if_calibrated,
    fit_temperature,
    nll,
    reliability_diagram,
)


def _synthetic(t_true: float, n: int = 6000, k: int = 4, seed: int = 0):
    """Labels drawn from softmax(z / t_true): the NLL-optimal temperature is t_true."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3.0, (n, k))
    p = softmax_t(z, t_true)
    y = np.array([rng.choice(k, p=pi) for pi in p])
    return z, y


@pytest.mark.parametrize("t_true", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_truth(t_true):
    z, y = _synthetic(t_true)
    t = fit_temperature(z, y)
    assert t == pytest.approx(t_true, rel=0.08)
    # calibrated probabilities have small ECE, accuracy unchanged
    assert ece(softmax_t(z, t), y) < 0.03
    assert accuracy(softmax_t(z, t), y) == accuracy(softmax_t(z, 1.0), y)


def test_fit_temperature_bounds_and_errors():
    z = np.array([[10.0, 0.0], [0.0, 10.0]])
    # separable: NLL -> 0 as T -> 0 (flat below ~0.3); the search stays in the bounds
    assert 0.05 <= fit_temperature(z, np.array([0, 1])) < 0.5
    assert fit_temperature(z, np.array([1, 0])) == pytest.approx(20.0, rel=1e-3)  # upper bound
    with pytest.raises(ValueError):
        fit_temperature(z, np.array([0, -1]))
    with pytest.raises(ValueError):
        fit_temperature(z, np.array([0]))


def test_ece_hand_example():
    # 4 cells: conf 0.9 (correct), 0.9 (wrong), 0.6 (correct), 0.6 (correct)
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 1, 0, 1])
    # bin (0.867, 0.933]: conf .9 acc .5 -> |.4|*2/4 ; bin (0.533, 0.6]: conf .6 acc 1 -> .4*2/4
    assert ece(p, y) == pytest.approx(0.4)
    assert mce(p, y, min_bin_count=1) == pytest.approx(0.4)
    assert accuracy(p, y) == 0.75
    assert nll(p, y) == pytest.approx(-(np.log(.9) + np.log(.1) + np.log(.6) + np.log(.6)) / 4)
    assert brier(p, y) == pytest.approx((0.02 + 1.62 + 0.32 + 0.32) / 4)


def test_ece_bin_edges_are_right_closed():
    # confidence exactly 0.6 belongs to bin (0.533, 0.6], not the next one
    p = np.array([[0.6, 0.4]] * 10)
    y = np.zeros(10, int)
    assert ece(p, y, n_bins=15) == pytest.approx(0.4)


def test_adaptive_ece_and_brier_range():
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(4), 500)
    y = rng.integers(0, 4, 500)
    assert 0 <= adaptive_ece(p, y) <= 1
    assert 0 <= brier(p, y) <= 2
    perfect = np.eye(4)[y]
    assert brier(perfect, y) == 0.0 and ece(perfect, y) == 0.0 and adaptive_ece(perfect, y) == 0


def test_bootstrap_and_report():
    z, y = _synthetic(1.0, n=800)
    p = softmax_t(z, 1.0)
    lo, hi = bootstrap_ci(accuracy, p, y, n_boot=300)
    assert lo <= accuracy(p, y) <= hi and hi - lo < 0.1
    rep = calibration_report(p, y, n_boot=100)
    assert set(rep) >= {"accuracy", "ece", "adaptive_ece", "mce", "nll", "brier"}
    for v in rep.values():
        assert len(v["ci95"]) == 2


def test_reliability_png(tmp_path):
    z, y = _synthetic(2.0, n=500)
    out = reliability_diagram(softmax_t(z, 2.0), y, tmp_path / "r.png",
                              probs_before=softmax_t(z, 1.0))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ece_floor_of_a_calibrated_model_and_detection_of_overconfidence():
    """Labels drawn from the model's own probabilities: observed ECE sits inside the
    consistency band; sharpened (overconfident) probabilities fall outside it."""

    rng = np.random.default_rng(5)
    z = rng.normal(0, 2.0, (4000, 4))
    p = softmax_t(z, 1.0)
    y = (rng.random(4000)[:, None] > np.cumsum(p, 1)).sum(1)
    floor = ece_if_calibrated(p, n_sim=200)
    assert 0.003 < floor.mean() < 0.03  # finite-n bias of binned ECE is not zero
    rep = calibration_report(p, y, n_boot=200)
    lo, hi = rep["ece_if_calibrated"]["ci95"]
    assert lo <= rep["ece"]["value"] <= hi and rep["ece_excess_p"]["value"] > 0.025
    over = calibration_report(softmax_t(z, 0.6), y, n_boot=200)
    assert over["ece"]["value"] > over["ece_if_calibrated"]["ci95"][1]
    assert over["ece_excess_p"]["value"] < 0.01
