"""Fourier-domain sideband filters (registry ``FILTERS``).

Every filter is a weight array over spatial frequencies, centred on the off-axis sideband.
Radii are in cycles per camera pixel (the unit of :func:`numpy.fft.fftfreq`); the conversion
from the user-facing size units (qpretrieve's "sideband distance", "frequency index",
"frequency") lives in :func:`resolve_filter_radius`.

Two constructions are provided:

* :meth:`FourierFilter.weights` evaluates the filter on an arbitrary regular grid of
  frequency offsets from the filter centre (used by the fast mode on its Fourier-crop box,
  rows and columns may have different spacings for non-square frames);
* :func:`qpretrieve_filter_array` reproduces the qpretrieve 0.7 construction on the full,
  square, fftshifted grid bit for bit in semantics (used by the compatible mode), including
  its conventions for the smoothed filters (Gaussian centred on the grid's zero frequency,
  ``scipy.signal.convolve(..., mode="same")``) and the Tukey window placed at the integer
  sideband bin.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
from scipy import signal

from leukoflow.core.registry import Registry

#: Registry of Fourier filters by qpretrieve name.
FILTERS: Registry[type[FourierFilter]] = Registry("Fourier filter")

#: Units accepted for ``filter_size`` (qpretrieve's ``filter_size_interpretation``).
SIZE_INTERPRETATIONS = ("sideband distance", "frequency index", "frequency")


class FourierFilter(ABC):
    """Base class of a sideband filter.

    Subclasses define :meth:`weights` on a grid of frequency offsets and
    :meth:`support` (half-width of the region where the filter is non-negligible).
    """

    registry_name: str = ""
    #: True if the filter is a 0/1 mask (support is exact).
    binary: bool = False

    @abstractmethod
    def weights(self, dfy: np.ndarray, dfx: np.ndarray, radius: float) -> np.ndarray:
        """Filter weights on a regular grid of frequency offsets.

        Parameters
        ----------
        dfy : ndarray, shape (n, 1)
            Row-frequency offsets from the filter centre [cycles/px], ascending, regular.
        dfx : ndarray, shape (1, m)
            Column-frequency offsets from the filter centre [cycles/px], ascending, regular.
        radius : float
            Filter radius (half-width for square filters) [cycles/px].

        Returns
        -------
        ndarray, shape (n, m), float64
            Weights in [0, 1], maximum 1 (unless the grid misses the support).
        """

    def support(self, radius: float) -> float:
        """Half-width of the filter support [cycles/px] (beyond it weights are ~0)."""
        return radius


def _spacing(d: np.ndarray) -> float:
    d = np.ravel(d)
    return float(d[1] - d[0]) if d.size > 1 else 1.0


def _gauss_kernel(dy: float, dx: float, sigma: float, separable_square: bool) -> np.ndarray:
    """Odd-sized, exactly centred Gaussian kernel sampled with spacings ``dy``, ``dx``."""
    ny = max(1, math.ceil(4 * sigma / dy))
    nx = max(1, math.ceil(4 * sigma / dx))
    ky = (np.arange(-ny, ny + 1) * dy).reshape(-1, 1)
    kx = (np.arange(-nx, nx + 1) * dx).reshape(1, -1)
    tau = 2 * sigma**2
    if separable_square:
        return np.exp(-(ky**2) / tau) * np.exp(-(kx**2) / tau)
    return np.exp(-(ky**2 + kx**2) / tau)


def _smooth(base: np.ndarray, dfy: np.ndarray, dfx: np.ndarray, sigma: float,
            square: bool) -> np.ndarray:
    kern = _gauss_kernel(_spacing(dfy), _spacing(dfx), sigma, square)
    out = signal.fftconvolve(base.astype(np.float64), kern, mode="same")
    out = np.clip(out, 0, None)
    peak = out.max()
    return out / peak if peak > 0 else out


@FILTERS.register("disk")
class DiskFilter(FourierFilter):
    """Binary disk of radius ``r``."""

    binary = True

    def weights(self, dfy, dfx, radius):
        return ((dfy**2 + dfx**2) <= radius**2).astype(np.float64)


@FILTERS.register("smooth disk")
class SmoothDiskFilter(FourierFilter):
    """Disk of radius ``r`` convolved with a radial Gaussian (σ = r/5), peak normalised."""

    def weights(self, dfy, dfx, radius):
        disk = (dfy**2 + dfx**2) <= radius**2
        return _smooth(disk, dfy, dfx, radius / 5, square=False)

    def support(self, radius):
        return radius * 1.6


@FILTERS.register("gauss")
class GaussFilter(FourierFilter):
    """Radial Gaussian with σ = 0.6 r."""

    def weights(self, dfy, dfx, radius):
        tau = 2 * (0.6 * radius) ** 2
        return np.exp(-(dfy**2 + dfx**2) / tau)

    def support(self, radius):
        return radius * 2.0


@FILTERS.register("square")
class SquareFilter(FourierFilter):
    """Binary square of half-width ``r``."""

    binary = True

    def weights(self, dfy, dfx, radius):
        return ((np.abs(dfy) <= radius) & (np.abs(dfx) <= radius)).astype(np.float64)


@FILTERS.register("smooth square")
class SmoothSquareFilter(FourierFilter):
    """Square of half-width ``r`` convolved with a separable Gaussian (σ = r/5)."""

    def weights(self, dfy, dfx, radius):
        sq = (np.abs(dfy) <= radius) & (np.abs(dfx) <= radius)
        return _smooth(sq, dfy, dfx, radius / 5, square=True)

    def support(self, radius):
        return radius * 1.6


@FILTERS.register("tukey")
class TukeyFilter(FourierFilter):
    """Separable Tukey window of half-width ``r`` with taper fraction α = 0.1."""

    alpha = 0.1

    def _tukey1d(self, d: np.ndarray, radius: float) -> np.ndarray:
        a = np.abs(d)
        flat = radius * (1 - self.alpha)
        w = np.where(a <= flat, 1.0, 0.0)
        taper = (a > flat) & (a <= radius)
        w = np.where(taper, 0.5 * (1 + np.cos(np.pi * (a - flat) / (self.alpha * radius))), w)
        return w

    def weights(self, dfy, dfx, radius):
        return self._tukey1d(dfy, radius) * self._tukey1d(dfx, radius)


def get_filter(name: str) -> FourierFilter:
    """Instantiate the filter registered as ``name`` (clear error listing the choices)."""
    return FILTERS.create(name)


def resolve_filter_radius(size: float, interpretation: str, sideband: tuple[float, float],
                          fft_side: int) -> float:
    """Convert a user filter size to a radius in cycles/px (qpretrieve 0.7 semantics).

    Parameters
    ----------
    size : float
        Filter size in the unit named by ``interpretation``.
    interpretation : {"sideband distance", "frequency index", "frequency"}
        "sideband distance": fraction (0, 1) of the DC-to-sideband distance;
        "frequency index": Fourier bins of the (padded) FFT of side ``fft_side``;
        "frequency": cycles/px directly.
    sideband : tuple of float
        Sideband position (rows, cols) [cycles/px].
    fft_side : int
        FFT side length used for "frequency index" [px]. In qpretrieve this is the padded
        side; the fast mode passes its largest FFT side.

    Returns
    -------
    float
        Radius [cycles/px].
    """
    if interpretation == "sideband distance":
        if not 0 < size < 1:
            raise ValueError(f"filter size for 'sideband distance' must be in (0, 1), got {size}")
        return float(np.sqrt(np.sum(np.asarray(sideband, dtype=np.float64) ** 2)) * size)
    if interpretation == "frequency index":
        if not 0 < size < fft_side / 2:
            raise ValueError(f"filter size for 'frequency index' must be in (0, {fft_side / 2}),"
                             f" got {size}")
        return float(size / fft_side)
    if interpretation == "frequency":
        if not 0 < size < 0.5:
            raise ValueError(f"filter size for 'frequency' must be in (0, 0.5) cycles/px, "
                             f"got {size}")
        return float(size)
    raise ValueError(f"unknown filter size interpretation {interpretation!r}; "
                     f"choose one of {', '.join(SIZE_INTERPRETATIONS)}")


def qpretrieve_filter_array(name: str, radius: float, sideband: tuple[float, float],
                            n: int) -> np.ndarray:
    """Filter on the full fftshifted ``n``×``n`` grid exactly as qpretrieve 0.7 builds it.

    Parameters
    ----------
    name : str
        Filter name (see :data:`FILTERS`).
    radius : float
        Radius [cycles/px].
    sideband : tuple of float
        Filter centre (rows, cols) [cycles/px].
    n : int
        FFT side [px].

    Returns
    -------
    ndarray, shape (n, n), float64
    """
    if name not in FILTERS:
        FILTERS.get(name)  # raises with the list of choices
    if not 0 < radius < n / 2:
        raise ValueError(f"filter radius {radius} out of range for a {n}² FFT")
    f = np.fft.fftshift(np.fft.fftfreq(n))
    fr = f.reshape(-1, 1)
    fc = f.reshape(1, -1)
    dr = sideband[0] - fr
    dc = sideband[1] - fc
    if name == "disk":
        return ((dr**2 + dc**2) <= radius**2).astype(np.float64)
    if name == "smooth disk":
        tau = 2 * (radius / 5) ** 2
        disk = (dr**2 + dc**2) <= radius**2
        arr = signal.convolve(np.exp(-(fr**2 + fc**2) / tau), disk, mode="same")
        return arr / arr.max()
    if name == "gauss":
        tau = 2 * (0.6 * radius) ** 2
        arr = np.exp(-(dr**2 + dc**2) / tau)
        return arr / arr.max()
    if name == "square":
        return ((np.abs(dr) <= radius) & (np.abs(dc) <= radius)).astype(np.float64)
    if name == "smooth square":
        tau = 2 * (radius / 5) ** 2
        sq = (np.abs(dr) <= radius) & (np.abs(dc) <= radius)
        arr = signal.convolve(sq, np.exp(-(fr**2) / tau) * np.exp(-(fc**2) / tau), mode="same")
        return arr / arr.max()
    if name == "tukey":
        size = int(n * radius) * 2
        win = signal.windows.tukey(size, alpha=0.1)
        base = np.zeros((n, n))
        lo, hi = (n - size) // 2, (n + size) // 2
        base[lo:hi, lo:hi] = win.reshape(-1, 1) * win.reshape(1, -1)
        return np.roll(base, (int(sideband[0] * n), int(sideband[1] * n)), axis=(0, 1))
    raise ValueError(f"filter {name!r} has no qpretrieve construction")  # pragma: no cover
