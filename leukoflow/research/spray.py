"""Spectral relevance analysis (SpRAy, Lapuschkin et al. 2019) re-implemented with scipy.

Recipe (CoRelAy defaults, re-implemented; no GPL code): per class, (1) pool each relevance
map (sum-pooling of |R|), normalise it to sum 1 and flatten; (2) Euclidean distances;
(3) binary k-nearest-neighbour affinity, symmetrised ``(A + A^T) / 2``; (4) symmetric
normalised Laplacian ``L = I - D^-1/2 A D^-1/2`` and its smallest eigenpairs; (5) number of
clusters from the largest eigengap among small k (von Luxburg 2007); (6) k-means on the
row-normalised leading eigenvectors; (7) a 2-D spectral embedding for display.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import eigh
from scipy.spatial.distance import pdist, squareform


@dataclass
class SprayResult:
    """Clustering of one set of maps.

    Attributes
    ----------
    labels : ndarray int (n,)
        Cluster per map.
    n_clusters : int
        Number of clusters chosen by the eigengap.
    eigenvalues : ndarray
        Smallest Laplacian eigenvalues (ascending).
    embedding : ndarray (n, 2)
        Spectral embedding (2nd and 3rd eigenvectors, row-scaled) for plots.
    """

    labels: np.ndarray
    n_clusters: int
    eigenvalues: np.ndarray
    embedding: np.ndarray


def pool_maps(maps: np.ndarray, pool: int = 4) -> np.ndarray:
    """Sum-pool |maps| (n, H, W) by ``pool`` px, normalise each to sum 1, flatten (n, D)."""
    m = np.abs(np.asarray(maps, np.float64))
    n, h, w = m.shape
    h2, w2 = h // pool, w // pool
    m = m[:, : h2 * pool, : w2 * pool].reshape(n, h2, pool, w2, pool).sum(axis=(2, 4))
    s = m.reshape(n, -1).sum(1, keepdims=True)
    return m.reshape(n, -1) / np.where(s > 0, s, 1.0)


def knn_affinity(x: np.ndarray, k: int = 10) -> np.ndarray:
    """Binary symmetrised kNN affinity ``(A + A^T) / 2`` from Euclidean distances."""
    d = squareform(pdist(x))
    n = len(x)
    k = max(1, min(k, n - 1))
    np.fill_diagonal(d, np.inf)
    nn_idx = np.argsort(d, axis=1)[:, :k]
    a = np.zeros((n, n))
    a[np.repeat(np.arange(n), k), nn_idx.ravel()] = 1.0
    return (a + a.T) / 2


def eigengap_k(eigenvalues: np.ndarray, k_min: int = 2, k_max: int = 8) -> int:
    """Number of clusters k maximising ``lambda_k - lambda_{k-1}`` (0-based ascending)."""
    ev = np.asarray(eigenvalues)
    k_max = min(k_max, len(ev) - 1)
    if k_max < k_min:
        return 1
    gaps = [ev[k] - ev[k - 1] for k in range(k_min, k_max + 1)]
    return int(k_min + int(np.argmax(gaps)))


def spray(maps: np.ndarray, k_nn: int = 10, pool: int = 4, n_eig: int = 32,
          k_range: tuple[int, int] = (2, 8), seed: int = 0) -> SprayResult:
    """Cluster relevance maps (n, H, W) with SpRAy (see module docstring)."""
    from sklearn.cluster import KMeans

    x = pool_maps(maps, pool)
    n = len(x)
    if n < 4:
        return SprayResult(np.zeros(n, np.int64), 1, np.zeros(0), np.zeros((n, 2)))
    a = knn_affinity(x, k_nn)
    deg = a.sum(1)
    dinv = 1.0 / np.sqrt(np.where(deg > 0, deg, 1.0))
    lap = np.eye(n) - dinv[:, None] * a * dinv[None, :]
    m = min(n_eig, n)
    ev, vec = eigh(lap, subset_by_index=[0, m - 1])
    k = eigengap_k(ev, k_range[0], k_range[1])
    u = vec[:, :k]
    u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(u)
    emb = vec[:, 1:3] if m >= 3 else np.zeros((n, 2))
    return SprayResult(labels.astype(np.int64), k, ev, emb)
