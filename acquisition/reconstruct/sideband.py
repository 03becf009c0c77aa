"""Off-axis sideband detection.

Both searches follow qpretrieve 0.7's ``find_peak_cosine`` heuristic: the sideband is the
maximum of the spectrum magnitude |FT| in the half plane of negative row frequencies, after
excluding a band of ``max(ceil(n/42), 5)`` rows around the zero row frequency and ±3 bins
around both frequency axes. The result is quantised to the FFT grid (1/n cycles/px).
"""

from __future__ import annotations

import math

import numpy as np


def find_sideband_shifted(ft_shifted: np.ndarray) -> tuple[float, float]:
    """Sideband of an fftshifted 2D spectrum, qpretrieve's ``find_peak_cosine`` semantics.

    Parameters
    ----------
    ft_shifted : ndarray, shape (n0, n1)
        ``fftshift(fft2(hologram))`` (complex or magnitude).

    Returns
    -------
    tuple of float
        Sideband (rows, cols) [cycles/px], row frequency negative.
    """
    mag = np.abs(np.asarray(ft_shifted))
    if mag.ndim != 2:
        raise ValueError(f"expected a 2D spectrum, got shape {mag.shape}")
    n0, n1 = mag.shape
    c0, c1 = n0 // 2, n1 // 2
    minlo = max(int(math.ceil(n0 / 42)), 5)
    mag = mag.copy()
    mag[c0 - minlo:] = 0
    mag[c0 - 3:c0 + 3, :] = 0
    mag[:, c1 - 3:c1 + 3] = 0
    i0, i1 = np.unravel_index(int(np.argmax(mag)), mag.shape)
    f0 = np.fft.fftshift(np.fft.fftfreq(n0))[i0]
    f1 = np.fft.fftshift(np.fft.fftfreq(n1))[i1]
    return float(f0), float(f1)


def _interp_offset(m_lo: float, m_0: float, m_hi: float) -> float:
    """Sub-bin offset of a spectral peak from its two neighbours (rectangular window).

    For a pure complex exponential seen through a rectangular window the magnitudes follow a
    sinc; the ratio of the larger neighbour to the peak gives the offset exactly:
    δ = ±|X(k±1)| / (|X(k)| + |X(k±1)|), |δ| <= 0.5 bin.
    """
    if m_hi >= m_lo:
        den = m_0 + m_hi
        return 0.0 if den <= 0 else float(m_hi / den)
    den = m_0 + m_lo
    return 0.0 if den <= 0 else -float(m_lo / den)


def find_sideband_rfft(rft: np.ndarray, n1: int, refine: bool = False) -> tuple[float, float]:
    """Sideband from an unshifted real-input spectrum (``rfft2``), in qpretrieve's convention.

    The half spectrum holds non-negative column frequencies only; the conjugate lobe of the
    sideband is mirrored to the negative-row-frequency half plane that qpretrieve searches.

    Parameters
    ----------
    rft : ndarray, shape (n0, n1 // 2 + 1)
        ``rfft2`` of the (mean-free) hologram.
    n1 : int
        Number of columns of the transformed (padded) frame [px].
    refine : bool
        Interpolate the peak position between bins (two-point sinc interpolation along
        each axis), so the sideband estimate does not depend on the FFT grid. Exact for a
        pure fringe pattern in an unpadded frame; do not refine zero-padded spectra.

    Returns
    -------
    tuple of float
        Sideband (rows, cols) [cycles/px], row frequency negative.
    """
    full = np.abs(np.asarray(rft)).astype(np.float64)
    mag = full.copy()
    if mag.ndim != 2 or mag.shape[1] != n1 // 2 + 1:
        raise ValueError(f"expected an rfft2 spectrum of {n1} columns, got shape {mag.shape}")
    n0 = mag.shape[0]
    k0 = np.fft.fftfreq(n0) * n0  # integer row bins, unshifted order
    minlo = max(int(math.ceil(n0 / 42)), 5)
    # qpretrieve keeps rows with bin <= -(minlo + 1) on the negative side; with conjugate
    # symmetry both lobes are searched at |bin| > minlo, and |col bin| >= 3.
    mag[np.abs(k0) <= minlo, :] = 0
    mag[:, :3] = 0
    i0, i1 = np.unravel_index(int(np.argmax(mag)), mag.shape)
    b0, b1 = float(k0[i0]), float(i1)
    if refine:
        b0 += _interp_offset(full[(i0 - 1) % n0, i1], full[i0, i1], full[(i0 + 1) % n0, i1])
        if 0 < i1 < full.shape[1] - 1:
            b1 += _interp_offset(full[i0, i1 - 1], full[i0, i1], full[i0, i1 + 1])
    if b0 > 0:  # conjugate lobe: the qpretrieve sideband is at (-b0, -b1)
        b0, b1 = -b0, -b1
    return b0 / n0, b1 / n1
