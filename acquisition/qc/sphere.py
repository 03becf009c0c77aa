"""Fit the projection phase of a homogeneous sphere to a phase image (reference beads).

Model (thin-object projection, as qpsphere's ``projection`` model)::

    φ(y, x) = φ_bg + A · sqrt(1 − ρ²/r²)   for ρ² = (y − y0)² + (x − x0)² < r², else φ_bg

with the centre (y0, x0) and radius r in pixels, the peak phase A = 2π/λ · (n_s − n_m) · 2R
[rad] (R = r · pixel size) and a background offset φ_bg. Pixels are sampled at their
centres (index coordinates). The radius in pixels and A are what an image can tell
without knowing the scale; with a pixel size [µm], wavelength [µm] and medium index,
:meth:`SphereFit.radius_um` and :meth:`SphereFit.index` give R and n_s — and with a
*known* bead radius, :meth:`SphereFit.pixel_um_for` gives the pixel size (the QC scale).

The fit is a bounded least-squares problem (``scipy.optimize.least_squares``, trust-region
reflective) on the pixels within ``fit_radius`` radii of the first guess, started from the
phase-weighted centroid and the half-maximum area (a sphere's projection reaches half its
peak at ρ = r·√0.75).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import least_squares


@dataclass(frozen=True)
class SphereFit:
    """Result of :func:`fit_sphere_phase` (pixel units).

    Attributes
    ----------
    cy, cx : float
        Centre (row, column) [px, index coordinates].
    radius_px : float
        Sphere radius [px].
    peak_rad : float
        Phase at the centre above the background, A [rad].
    offset_rad : float
        Background phase φ_bg [rad].
    rms_rad : float
        RMS residual over the fitted pixels [rad].
    n_pixels : int
        Pixels used.
    success : bool
        The optimiser converged to a sphere inside the image.
    """

    cy: float
    cx: float
    radius_px: float
    peak_rad: float
    offset_rad: float
    rms_rad: float
    n_pixels: int
    success: bool

    def radius_um(self, pixel_um: float) -> float:
        """Radius R [µm] at pixel size ``pixel_um`` [µm]."""
        return self.radius_px * pixel_um

    def index(self, pixel_um: float, wavelength_um: float, medium_index: float) -> float:
        """Sphere refractive index n_s = n_m + A·λ / (4π·R).

        Parameters
        ----------
        pixel_um, wavelength_um : float
            Pixel size and vacuum wavelength [µm].
        medium_index : float
            Refractive index of the medium.
        """
        return medium_index + self.peak_rad * wavelength_um / (
            4.0 * math.pi * self.radius_um(pixel_um))

    def pixel_um_for(self, radius_um: float) -> float:
        """Pixel size [µm] that makes the fitted radius equal a known ``radius_um`` [µm]."""
        return radius_um / self.radius_px

    def to_dict(self) -> dict:
        """Plain dict (JSON)."""
        return asdict(self)


def sphere_model(shape: tuple[int, int], cy: float, cx: float, radius_px: float,
                 peak_rad: float, offset_rad: float = 0.0) -> np.ndarray:
    """Projection phase [rad] of a sphere on a ``shape`` grid (pixel centres)."""
    y = np.arange(shape[0], dtype=np.float64)[:, None]
    x = np.arange(shape[1], dtype=np.float64)[None, :]
    u = 1.0 - ((y - cy) ** 2 + (x - cx) ** 2) / radius_px**2
    return offset_rad + peak_rad * np.sqrt(np.clip(u, 0.0, None))


def initial_guess(phase: np.ndarray) -> tuple[float, float, float, float]:
    """(cy, cx, radius_px, peak_rad) from the centroid and the half-maximum area.

    Raises
    ------
    ValueError
        Nothing above the background (no positive phase).
    """
    ph = np.asarray(phase, dtype=np.float64)
    bg = float(np.median(np.concatenate([ph[0], ph[-1], ph[:, 0], ph[:, -1]])))
    p = ph - bg
    peak = float(np.percentile(p, 99.9))
    if not np.isfinite(peak) or peak <= 0:
        raise ValueError("no object: the phase image has nothing above its border")
    half = p > 0.5 * peak
    w = np.where(p > 0.1 * peak, p, 0.0)
    s = w.sum()
    yy, xx = np.indices(p.shape)
    cy, cx = float((w * yy).sum() / s), float((w * xx).sum() / s)
    r_half = math.sqrt(half.sum() / math.pi)
    return cy, cx, r_half / math.sqrt(0.75), peak


def fit_sphere_phase(phase: np.ndarray, guess: tuple[float, float, float, float] | None = None,
                     fit_radius: float = 1.6, mask: np.ndarray | None = None,
                     fit_offset: bool = True) -> SphereFit:
    """Least-squares fit of the sphere projection model to ``phase``.

    Parameters
    ----------
    phase : numpy.ndarray
        2D unwrapped phase [rad] holding one sphere (other objects should be masked out).
    guess : tuple, optional
        (cy, cx, radius_px, peak_rad) to start from (default: :func:`initial_guess`).
    fit_radius : float
        Fit the pixels within this many guessed radii of the guessed centre.
    mask : numpy.ndarray, optional
        Boolean; False pixels are left out (e.g. a neighbouring object).
    fit_offset : bool
        Fit a background offset (else 0 rad).

    Returns
    -------
    SphereFit
    """
    ph = np.asarray(phase, dtype=np.float64)
    if ph.ndim != 2 or min(ph.shape) < 8:
        raise ValueError(f"phase must be a 2D image of at least 8x8 px, got {ph.shape}")
    cy, cx, r, a = guess if guess is not None else initial_guess(ph)
    yy, xx = np.indices(ph.shape, dtype=np.float64)
    sel = (yy - cy) ** 2 + (xx - cx) ** 2 <= (fit_radius * r) ** 2
    sel &= np.isfinite(ph)
    if mask is not None:
        sel &= np.asarray(mask, dtype=bool)
    y, x, d = yy[sel], xx[sel], ph[sel]
    if d.size < 16:
        raise ValueError("too few pixels to fit a sphere")
    h, w = ph.shape

    def resid(p: np.ndarray) -> np.ndarray:
        py, px, pr, pa = p[:4]
        off = p[4] if fit_offset else 0.0
        u = 1.0 - ((y - py) ** 2 + (x - px) ** 2) / (pr * pr)
        return off + pa * np.sqrt(np.clip(u, 0.0, None)) - d

    x0 = [cy, cx, r, a] + ([0.0] if fit_offset else [])
    lo = [-0.5, -0.5, 1.0, 0.0] + ([-np.inf] if fit_offset else [])
    hi = [h - 0.5, w - 0.5, 2.0 * max(h, w), np.inf] + ([np.inf] if fit_offset else [])
    x0 = np.clip(x0, np.array(lo) + 1e-9, np.array(hi) - 1e-9)
    res = least_squares(resid, x0, bounds=(lo, hi), method="trf", x_scale="jac",
                        max_nfev=400)
    py, px, pr, pa = (float(v) for v in res.x[:4])
    off = float(res.x[4]) if fit_offset else 0.0
    rms = float(np.sqrt(np.mean(res.fun**2)))
    ok = bool(res.success and 0 <= py < h and 0 <= px < w and pr > 1.0 and pa > 0)
    return SphereFit(py, px, pr, pa, off, rms, int(d.size), ok)


def tilt_corrected(phase: np.ndarray, border_px: int = 5, rel_threshold: float = 0.1
                   ) -> np.ndarray:
    """``phase`` minus a plane fitted to its background border.

    The plane (offset + tilt) is fitted by least squares to the pixels of the
    ``border_px`` wide image border whose phase is below ``rel_threshold`` times the image
    maximum (so objects touching the border do not bias it), as in qpimage's masked
    border fit.

    Parameters
    ----------
    phase : numpy.ndarray
        2D phase [rad].
    border_px : int
        Border width [px].
    rel_threshold : float
        Border pixels above this fraction of the maximum phase are left out.
    """
    ph = np.asarray(phase, dtype=np.float64)
    border = np.zeros(ph.shape, dtype=bool)
    b = int(border_px)
    border[:b] = border[-b:] = True
    border[:, :b] = border[:, -b:] = True
    sel = border & (ph < rel_threshold * np.nanmax(ph)) & np.isfinite(ph)
    if sel.sum() < 3:
        raise ValueError("not enough background pixels on the border for a tilt fit")
    yy, xx = np.indices(ph.shape)
    a = np.c_[np.ones(int(sel.sum())), yy[sel], xx[sel]]
    coef, *_ = np.linalg.lstsq(a, ph[sel], rcond=None)
    return ph - (coef[0] + coef[1] * yy + coef[2] * xx)
