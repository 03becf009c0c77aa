"""Prior-shift corrected differential (EM on calibrated posteriors)."""

from __future__ import annotations

import numpy as np

from leukoflow.core.stats import em_prior_shift
from leukoflow.inference.differential import Differential


def _calibrated_sample(prior: np.ndarray, n: int, sep: float, seed: int) -> tuple:
    """Cells from 1-D Gaussian class models; posteriors exact under a *uniform* prior."""
    rng = np.random.default_rng(seed)
    k = len(prior)
    y = rng.choice(k, size=n, p=prior)
    mu = sep * np.arange(k)
    x = rng.normal(mu[y], 1.0)
    loglik = -0.5 * (x[:, None] - mu[None, :]) ** 2
    p = np.exp(loglik - loglik.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), y


def test_em_recovers_skewed_prior_where_counting_is_biased() -> None:
    prior = np.array([0.60, 0.03, 0.07, 0.30])
    p, y = _calibrated_sample(prior, 20_000, sep=1.5, seed=1)  # overlapping classes
    truth = np.bincount(y, minlength=4) / len(y)
    argmax = np.bincount(p.argmax(1), minlength=4) / len(y)
    est = em_prior_shift(p)
    assert np.abs(argmax - truth).max() > 0.05          # plain counting is clearly biased
    assert np.abs(est - truth).max() < 0.02             # the estimate is within 2 pp
    assert abs(est.sum() - 1.0) < 1e-9


def test_em_is_identity_for_the_training_prior() -> None:
    p, y = _calibrated_sample(np.full(4, 0.25), 20_000, sep=2.0, seed=2)
    np.testing.assert_allclose(em_prior_shift(p), np.bincount(y) / len(y), atol=0.015)


def test_differential_estimate_interval_and_merge() -> None:
    prior = np.array([0.60, 0.03, 0.07, 0.30])
    p, y = _calibrated_sample(prior, 6_000, sep=2.0, seed=3)
    dec = np.where(p.max(1) >= 0.8, "counted", "uncertain")
    a, b = Differential(), Differential()
    a.add(p[:3000].argmax(1), dec[:3000], p[:3000])
    b.add(p[3000:].argmax(1), dec[3000:], p[3000:])
    a.merge(b)
    e = a.estimate(exact=True)
    assert e["n"] == 6000
    truth = np.bincount(y, minlength=4) / len(y)
    for i, c in enumerate(a.class_names):
        f = e["classes"][c]
        assert f["lower"] <= f["fraction"] <= f["upper"]
        assert abs(f["fraction"] - truth[i]) < 0.03
        assert f["upper"] - f["lower"] < 0.06            # ~1/sqrt(n) wide, not vacuous
    # OOD cells do not enter the estimate
    a.add([0, 0], ["ood", "ood"], np.array([[1.0, 0, 0, 0]] * 2))
    assert a.estimate(exact=True)["n"] == 6000
    assert a.snapshot()["estimate"]["n"] == 6000


def test_empty_differential_estimate() -> None:
    e = Differential().estimate()
    assert e["n"] == 0 and all(v["fraction"] is None for v in e["classes"].values())
