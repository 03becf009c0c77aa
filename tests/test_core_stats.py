"""leukoflow.core.stats against independent references: closed forms, scipy, brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from leukoflow.core.stats import (
    N_BINS,
    adaptive_ece,
    bin_sums,
    clopper_pearson_interval,
    ece,
    ece_from_sums,
    em_prior_shift,
    mce,
    reliability_bins,
    reliability_from_sums,
    softmax_t,
    wilson_interval,
    z_score,
)

# ----------------------------------------------------------------------------- softmax


def test_softmax_temperature_closed_form_and_overflow():
    z = np.array([[2.0, 0.0, 0.0, 0.0], [1000.0, 0.0, 0.0, 0.0]])
    p1 = softmax_t(z, 1.0)
    p2 = softmax_t(z, 2.0)
    assert p1[0, 0] == pytest.approx(np.e**2 / (np.e**2 + 3), rel=1e-12)
    assert p2[0, 0] == pytest.approx(np.e / (np.e + 3), rel=1e-12)
    assert np.isfinite(p1).all() and p1[1, 0] == 1.0  # no overflow
    np.testing.assert_allclose(p2.sum(1), 1, rtol=1e-12)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            softmax_t(z, bad)


def test_softmax_matches_python_definition_on_any_leading_shape():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 4, (2, 5, 3))
    t = 1.7
    p = softmax_t(z, t)
    for idx in itertools.product(range(2), range(5)):
        e = [math.exp(v / t) for v in z[idx]]
        assert p[idx].tolist() == pytest.approx([v / sum(e) for v in e], rel=1e-12)
    p32 = softmax_t(z, t, np.float32)
    assert p32.dtype == np.float32 and np.allclose(p32, p, atol=1e-7)
    np.testing.assert_allclose(softmax_t(z, 1e9), 1 / 3, rtol=1e-6)


# ----------------------------------------------------------------------------- intervals


def test_z_score():
    assert z_score(0.95) == pytest.approx(1.959963984540054, abs=1e-12)
    assert z_score(0.99) == pytest.approx(2.5758293035489, abs=1e-10)
    with pytest.raises(ValueError):
        z_score(1.0)


def test_wilson_and_clopper_pearson_known_values_and_scipy():
    from scipy.stats import binomtest

    # Wilson 95 % for 5/10 and 0/10 and 10/10 (closed form, z = 1.959964)
    assert wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)
    assert wilson_interval(10, 10) == pytest.approx((0.722467, 1.0), abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0) == clopper_pearson_interval(0, 0)
    for k, n in [(5, 10), (0, 20), (37, 200), (200, 200), (1, 3)]:
        ci = binomtest(k, n).proportion_ci(0.95, method="exact")
        assert clopper_pearson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
        w = binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((w.low, w.high), abs=1e-9)
    for bad in [(3, 2), (-1, 4)]:
        with pytest.raises(ValueError):
            wilson_interval(*bad)
        with pytest.raises(ValueError):
            clopper_pearson_interval(*bad)


@pytest.mark.parametrize("k,n,conf", [(3, 17, 0.95), (40, 41, 0.9), (12, 500, 0.99)])
def test_wilson_endpoints_are_where_the_score_test_hits_z(k, n, conf):
    """Wilson = {p : |k/n - p| <= z sqrt(p (1-p) / n)}: at each endpoint equality holds."""
    z = z_score(conf)
    lo, hi = wilson_interval(k, n, conf)
    for p in (lo, hi):
        assert abs(k / n - p) == pytest.approx(z * math.sqrt(p * (1 - p) / n), rel=1e-9)
    # inside: the test does not reject; just outside: it does
    mid = (lo + hi) / 2
    assert abs(k / n - mid) < z * math.sqrt(mid * (1 - mid) / n)
    for p in (lo * 0.999, min(1.0, hi * 1.001)):
        assert abs(k / n - p) > z * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("k,n", [(1, 9), (7, 30), (29, 30)])
def test_clopper_pearson_tails_by_exact_binomial_sums(k, n):
    """Lower bound: P(X >= k | p_lo) = a/2; upper bound: P(X <= k | p_hi) = a/2."""
    def pmf(i: int, p: float) -> float:
        return math.comb(n, i) * p**i * (1 - p) ** (n - i)

    lo, hi = clopper_pearson_interval(k, n, 0.95)
    assert sum(pmf(i, lo) for i in range(k, n + 1)) == pytest.approx(0.025, rel=1e-7)
    assert sum(pmf(i, hi) for i in range(0, k + 1)) == pytest.approx(0.025, rel=1e-7)


# ----------------------------------------------------------------------------- prior shift


def _loglik(probs: np.ndarray, prior: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Sample log-likelihood of candidate priors (rows of ``prior``) up to a constant."""
    return np.log((probs / train) @ prior.T).sum(axis=0)


@pytest.mark.parametrize("train", [None, (0.7, 0.2, 0.1)])
def test_em_prior_shift_is_the_maximum_likelihood_prior_by_grid_search(train):
    """EM's fixed point maximises the likelihood of the sample over the prior simplex."""
    rng = np.random.default_rng(11)
    p = rng.dirichlet((0.6, 0.6, 0.6), 300)
    tr = np.full(3, 1 / 3) if train is None else np.asarray(train)
    est = em_prior_shift(p, None if train is None else tr)
    step = 0.0025
    a = np.arange(step, 1, step)
    g = np.array([(x, y, 1 - x - y) for x in a for y in a if 1 - x - y > step / 2])
    best = g[np.argmax(_loglik(p, g, tr))]
    assert est.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(est, best, atol=2 * step)
    assert _loglik(p, est[None], tr)[0] >= _loglik(p, best[None], tr)[0] - 1e-9


def test_em_prior_shift_recovers_a_known_prior_and_empty_input():
    """Cells from two Gaussian classes; exact posteriors under a uniform prior."""
    rng = np.random.default_rng(5)
    y = (rng.random(20000) < 0.15).astype(int)  # 15 % class 1
    x = rng.normal(np.where(y == 1, 1.5, -1.5), 1.0)
    l0, l1 = np.exp(-0.5 * (x + 1.5) ** 2), np.exp(-0.5 * (x - 1.5) ** 2)
    p = np.stack([l0, l1], 1) / (l0 + l1)[:, None]
    assert p.mean(0)[1] > 0.2  # the plain mean posterior is biased towards uniform
    assert em_prior_shift(p)[1] == pytest.approx(y.mean(), abs=0.01)
    assert np.isnan(em_prior_shift(np.zeros((0, 4)))).all()


# ----------------------------------------------------------------------------- calibration


def _brute_bins(conf, correct, n_bins):
    """Loop over cells and bins with explicit (lower, upper] tests (0 goes to bin 0)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    members: list[list[int]] = [[] for _ in range(n_bins)]
    for i, c in enumerate(conf):
        for b in range(n_bins):
            if edges[b] < c <= edges[b + 1] or (b == 0 and c <= edges[0]):
                members[b].append(i)
                break
    return edges, members


def _probs_with_edge_confidences(n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(k, 0.5), n)
    edges = np.linspace(0.0, 1.0, N_BINS + 1)
    # put some top-label confidences exactly on bin edges (the (lower, upper] convention)
    for i, e in zip(range(0, 40, 4), edges[8:], strict=False):
        rest = (1 - e) / (k - 1)
        p[i] = rest
        p[i, i % k] = e
    y = rng.integers(0, k, n)
    return p, y


def test_ece_mce_and_bins_against_brute_force():
    p, y = _probs_with_edge_confidences(400, 4, 1)
    conf = p.max(1)
    correct = p.argmax(1) == y
    edges, members = _brute_bins(conf.tolist(), correct.tolist(), N_BINS)
    want_ece = sum(len(m) / len(y) * abs(np.mean(correct[m]) - np.mean(conf[m]))
                   for m in members if m)
    assert ece(p, y) == pytest.approx(want_ece, abs=1e-12)
    want_mce = max(abs(np.mean(correct[m]) - np.mean(conf[m])) for m in members if len(m) >= 10)
    assert mce(p, y) == pytest.approx(want_mce, abs=1e-12)
    rel = reliability_bins(p, y)
    assert rel["count"] == [len(m) for m in members]
    for b, m in enumerate(members):
        if m:
            assert rel["confidence"][b] == pytest.approx(np.mean(conf[m]), abs=1e-12)
            assert rel["accuracy"][b] == pytest.approx(np.mean(correct[m]), abs=1e-12)
        else:
            assert rel["confidence"][b] is None and rel["accuracy"][b] is None
    assert rel["edges"] == pytest.approx(edges.tolist())


def test_adaptive_ece_against_brute_force_equal_mass_bins():
    p, y = _probs_with_edge_confidences(300, 3, 2)  # 300 = 15 bins of 20 cells
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(float)
    order = sorted(range(300), key=lambda i: (conf[i], i))
    want = sum(20 / 300 * abs(np.mean(correct[order[b * 20:(b + 1) * 20]])
                              - np.mean(conf[order[b * 20:(b + 1) * 20]])) for b in range(15))
    assert adaptive_ece(p, y) == pytest.approx(want, abs=1e-12)


def test_calibration_known_values():
    # every cell at confidence 0.9, 50 % correct -> ECE = MCE = 0.4
    p = np.tile([0.9, 0.1], (20, 1))
    y = np.array([0, 1] * 10)
    assert ece(p, y) == pytest.approx(0.4) and mce(p, y) == pytest.approx(0.4)
    perfect = np.eye(3)[[0, 1, 2, 0]]
    assert ece(perfect, [0, 1, 2, 0]) == 0.0 and adaptive_ece(perfect, [0, 1, 2, 0]) == 0.0
    assert math.isnan(mce(p[:5], y[:5]))  # no bin with 10 cells
    assert math.isnan(ece(np.zeros((0, 3)), np.zeros(0, int)))


def test_bin_sums_pool_across_recordings():
    """Adding the per-recording sums gives the ECE and bins of all cells together."""
    edges = np.linspace(0, 1, N_BINS + 1)
    parts = [_probs_with_edge_confidences(n, 4, s) for n, s in [(50, 7), (120, 8), (41, 9)]]
    sums = [bin_sums(p.max(1), p.argmax(1) == y, edges) for p, y in parts]
    pooled = [np.sum([s[i] for s in sums], axis=0) for i in range(3)]
    p_all = np.concatenate([p for p, _ in parts])
    y_all = np.concatenate([y for _, y in parts])
    assert ece_from_sums(*pooled) == pytest.approx(ece(p_all, y_all), abs=1e-12)
    got, want = reliability_from_sums(edges, *pooled), reliability_bins(p_all, y_all)
    assert got["count"] == want["count"] and sum(got["count"]) == len(y_all)
    for key in ("confidence", "accuracy"):
        assert [v is None for v in got[key]] == [v is None for v in want[key]]
        assert [v for v in got[key] if v is not None] == pytest.approx(
            [v for v in want[key] if v is not None], abs=1e-12)
