"""Feature-space detectors: Mahalanobis, relative Mahalanobis (RMDS) and KNN.

All work on the penultimate features ``(N, D)`` of the network. Covariances use Ledoit-Wolf
shrinkage (well conditioned even when D is close to the sample count).
"""

from __future__ import annotations

import numpy as np

from leukoflow.models.ood.base import DETECTORS, OODDetector


def _shrunk_precision(centered: np.ndarray) -> np.ndarray:
    """Precision matrix of centred data with Ledoit-Wolf shrinkage (float64)."""
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf(assume_centered=True).fit(centered)
    return np.linalg.inv(lw.covariance_ + 1e-9 * np.eye(centered.shape[1]))


def _class_stats(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if labels is None:
        raise ValueError("class-conditional detector needs labels")
    classes = np.unique(labels[labels >= 0])
    if classes.size == 0:
        raise ValueError("no in-distribution labels (>= 0) to fit on")
    k = int(classes.max()) + 1
    means = np.zeros((k, features.shape[1]))
    for c in classes:
        means[c] = features[labels == c].mean(0)
    keep = labels >= 0
    centered = features[keep] - means[labels[keep]]
    return means, _shrunk_precision(centered)


def _min_mahalanobis(f: np.ndarray, means: np.ndarray, prec: np.ndarray) -> np.ndarray:
    """(N, K) squared Mahalanobis distances to each class mean."""
    d = f[:, None, :] - means[None]
    return np.einsum("nkd,de,nke->nk", d, prec, d, optimize=True)


@DETECTORS.register("mahalanobis")
class Mahalanobis(OODDetector):
    """Minimum class-conditional Mahalanobis distance, shared covariance (Lee et al. 2018).

    Score = min_k (f - mu_k)^T Sigma^-1 (f - mu_k) (squared distance, unitless).
    """

    uses_features = True

    def _fit(self, logits, features, labels, **_) -> None:
        means, prec = _class_stats(features, labels)
        self.arrays = {"means": means.astype(np.float32), "precision": prec.astype(np.float32)}

    def required_arrays(self) -> tuple[str, ...]:
        return ("means", "precision")

    def _score(self, logits, features) -> np.ndarray:
        f = np.asarray(features, np.float64)
        return _min_mahalanobis(f, self.arrays["means"].astype(np.float64),
                                self.arrays["precision"].astype(np.float64)).min(1)


@DETECTORS.register("rmds")
class RelativeMahalanobis(OODDetector):
    """Relative Mahalanobis distance (Ren et al. 2021, arXiv:2106.09022).

    Score = min_k [MD_k(f) - MD_0(f)] where MD_0 uses one Gaussian fitted to all ID
    features (it removes the directions that are uninformative for the classes).
    """

    uses_features = True

    def _fit(self, logits, features, labels, **_) -> None:
        means, prec = _class_stats(features, labels)
        keep = labels >= 0
        mu0 = features[keep].mean(0)
        prec0 = _shrunk_precision(features[keep] - mu0)
        self.arrays = {"means": means.astype(np.float32), "precision": prec.astype(np.float32),
                       "mean0": mu0.astype(np.float32), "precision0": prec0.astype(np.float32)}

    def required_arrays(self) -> tuple[str, ...]:
        return ("means", "precision", "mean0", "precision0")

    def _score(self, logits, features) -> np.ndarray:
        f = np.asarray(features, np.float64)
        a = {k: v.astype(np.float64) for k, v in self.arrays.items()}
        md = _min_mahalanobis(f, a["means"], a["precision"])
        d0 = f - a["mean0"]
        md0 = np.einsum("nd,de,ne->n", d0, a["precision0"], d0, optimize=True)
        return (md - md0[:, None]).min(1)


@DETECTORS.register("knn")
class KNN(OODDetector):
    """Distance to the k-th nearest ID training feature, L2-normalised (Sun et al. 2022).

    Parameters
    ----------
    k : int
        Neighbour rank (50, the paper default).
    bank_size : int
        At most this many training features are kept (random subset, fixed ``seed``), which
        bounds the artifact size (bank_size x D float32) and the scoring cost.
    seed : int
        Seed of the subset draw.
    """

    uses_features = True

    def __init__(self, k: int = 50, bank_size: int = 2000, seed: int = 0, **params) -> None:
        super().__init__(k=int(k), bank_size=int(bank_size), seed=int(seed), **params)

    @staticmethod
    def _normalise(f: np.ndarray) -> np.ndarray:
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)

    def _fit(self, logits, features, labels, **_) -> None:
        f = features if labels is None else features[np.asarray(labels) >= 0]
        n = f.shape[0]
        if n <= self.params["k"]:
            raise ValueError(f"KNN needs more than k={self.params['k']} ID samples, got {n}")
        if n > self.params["bank_size"]:
            rng = np.random.default_rng(self.params["seed"])
            f = f[np.sort(rng.choice(n, self.params["bank_size"], replace=False))]
        self.arrays = {"bank": self._normalise(f).astype(np.float32)}

    def required_arrays(self) -> tuple[str, ...]:
        return ("bank",)

    def _score(self, logits, features) -> np.ndarray:
        q = self._normalise(np.asarray(features, np.float32))
        bank = self.arrays["bank"].astype(np.float32)
        # squared distance of unit vectors: 2 - 2 cos
        d2 = np.maximum(2.0 - 2.0 * (q @ bank.T), 0.0)
        k = min(self.params["k"], bank.shape[0]) - 1
        return np.sqrt(np.partition(d2, k, axis=1)[:, k]).astype(np.float64)
