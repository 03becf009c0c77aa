"""OOD detectors, conformal thresholds and the evaluation metrics."""

from __future__ import annotations

import numpy as np
import pytest

from leukoflow.models.ood import DETECTORS, auroc, conformal_threshold, fpr_at_tpr, ood_report


def _data(seed=0, n=600, d=16, k=4, shift=4.0):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3, (k, d))
    y = rng.integers(0, k, n)
    f = means[y] + rng.normal(0, 1, (n, d))
    w = rng.normal(0, 1, (d, k))
    z = f @ w
    f_ood = rng.normal(0, 1, (300, d)) + shift * rng.normal(0, 1, d)
    return f, y, z, f_ood, f_ood @ w


def test_registry_has_required_detectors():
    assert {"msp", "energy", "mahalanobis", "knn", "rmds", "mutual_info"} <= set(DETECTORS)


@pytest.mark.parametrize("name", ["mahalanobis", "rmds", "knn"])
def test_feature_detectors_separate_shifted_cluster(name):
    f, y, z, fo, zo = _data()
    det = DETECTORS.create(name).fit(z[:400], f[:400], y[:400])
    s_val = det.score(z[400:], f[400:])
    det.fit_threshold(s_val)
    s_ood = det.score(zo, fo)
    assert auroc(s_val, s_ood) > 0.95
    # round trip through to_dict/from_dict gives the same scores
    d = det.to_dict()
    det2 = DETECTORS.get(name).from_dict(d)
    np.testing.assert_allclose(det2.score(zo, fo), s_ood, rtol=1e-5, atol=1e-5)
    assert det2.threshold == det.threshold


def test_msp_and_energy_values():
    z = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    msp = DETECTORS.create("msp", temperature=2.0)
    e = np.exp(1.0)
    np.testing.assert_allclose(msp.score(z, None), [-e / (e + 2), -1 / 3])
    en = DETECTORS.create("energy")
    np.testing.assert_allclose(en.score(z, None), [-np.log(np.exp(2) + 2), -np.log(3)])
    # the fit context sets MSP's temperature
    msp.fit(z, np.zeros((2, 1)), temperature=1.5)
    assert msp.params["temperature"] == 1.5


def test_conformal_threshold_coverage():
    from scipy.stats import norm

    rng = np.random.default_rng(0)
    # exact coverage P(new <= tau) = Phi(tau) for N(0, 1) scores; expected 191/201 = 0.9502
    cover = [norm.cdf(conformal_threshold(rng.normal(size=200), 0.05)) for _ in range(2000)]
    assert np.mean(cover) >= 0.95 - 3 * 0.0153 / np.sqrt(2000)  # marginal guarantee, 3 SE
    s = np.arange(1, 101, dtype=float)
    assert conformal_threshold(s, 0.05) == 96.0  # ceil(101 * 0.95) = 96th smallest
    with pytest.raises(ValueError):
        conformal_threshold(np.array([np.nan]))


def test_auroc_matches_sklearn_and_fpr_convention():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 300), rng.normal(1, 1, 200)
    ref = roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[a, b])
    assert auroc(a, b) == pytest.approx(ref)
    assert auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5  # ties count 1/2
    ids = np.arange(100, dtype=float)  # 95 % of ID accepted below 94
    assert fpr_at_tpr(ids, np.array([10.0, 94.0, 95.0, 200.0])) == 0.5
    rep = ood_report(a, b, threshold=1.0)
    assert {"auroc", "fpr95", "id_pass_rate", "ood_flag_rate"} <= set(rep)


def test_mutual_information_detector_matches_model():
    import torch

    from leukoflow.models.architectures import LeNet5VI, predictive_uncertainty

    torch.manual_seed(0)
    m = LeNet5VI(n_samples=6).eval()
    with torch.no_grad():
        m.fc2.weight_rho.fill_(-1.0)
        x = torch.randn(5, 1, 64, 64)
        z, f = m.forward_with_features(x)
        mi_ref = predictive_uncertainty(m.mc_logits(x))["mutual_info"].numpy()
    det = DETECTORS.create("mutual_info").fit(z.numpy(), f.numpy(), model=m)
    np.testing.assert_allclose(det.score(z.numpy(), f.numpy()), mi_ref, rtol=1e-3, atol=1e-6)
    det2 = DETECTORS.get("mutual_info").from_dict(det.to_dict())
    np.testing.assert_allclose(det2.score(z.numpy(), f.numpy()), mi_ref, rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="variational"):
        DETECTORS.create("mutual_info").fit(z.numpy(), f.numpy())


def test_from_dict_missing_arrays():
    with pytest.raises(KeyError, match="bank"):
        DETECTORS.get("knn").from_dict({"params": {}, "threshold": 1.0, "arrays": {}})
