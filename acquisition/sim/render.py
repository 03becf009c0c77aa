"""Small rendering helpers for phase maps on the phase grid.

Everything here works in µm on a square patch whose centre is pixel ``n // 2``; phase maps
are float32 [rad]. The object models in :mod:`leukoflow.acquisition.sim.cells` and
:mod:`leukoflow.acquisition.sim.ood` build on these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import scipy.fft as sfft
from scipy import ndimage

from leukoflow.core.physics import PIXEL_UM, WAVELENGTH_UM
from leukoflow.core.vocabulary import CLASS_NAMES


@dataclass(frozen=True)
class RenderContext:
    """What an object model needs to know about the instrument.

    Attributes
    ----------
    pixel_um : float
        Phase-grid pixel size [µm].
    wavelength_um : float
        Vacuum wavelength [µm].
    medium_index : float
        Refractive index of the medium.
    smoothing_px : float
        Gaussian optical blur of every phase map [px].
    class_probs : dict[str, float]
        Leukocyte class mix used by composite objects (doublets, defocused cells).
    defocus_um : tuple[float, float]
        Range of |defocus| [µm] for defocused cells.
    size_scale : dict[str, float]
        Factor on the drawn diameter per leukocyte class (missing = 1).
    ri_scale : dict[str, float]
        Factor on the refractive-index contrast per leukocyte class (missing = 1).
    bead : object or None
        :class:`leukoflow.acquisition.sim.params.BeadModel` of the reference beads.
    """

    pixel_um: float = PIXEL_UM
    wavelength_um: float = WAVELENGTH_UM
    medium_index: float = 1.335
    smoothing_px: float = 0.6
    class_probs: dict[str, float] = field(
        default_factory=lambda: {c: 1.0 / len(CLASS_NAMES) for c in CLASS_NAMES})
    defocus_um: tuple[float, float] = (4.0, 15.0)
    size_scale: dict[str, float] = field(default_factory=dict)
    ri_scale: dict[str, float] = field(default_factory=dict)
    bead: object | None = None

    @property
    def k0(self) -> float:
        """Vacuum wavenumber 2π/λ [rad/µm]."""
        return 2.0 * math.pi / self.wavelength_um


@dataclass
class PhaseObject:
    """One rendered object (cell, OOD object) on its own patch of the phase grid.

    Attributes
    ----------
    kind : str
        Class name (leukoflow.CLASS_NAMES) or OOD kind (leukoflow.OOD_KINDS).
    label : int
        Class index 0..3, or -1 for OOD objects.
    phase : numpy.ndarray
        float32 (h, w) phase [rad] (unwrapped), ~0 at the patch border.
    pixel_um : float
        Pixel size [µm].
    diameter_um : float
        Equivalent (or drawn) diameter of the object [µm].
    extent_um : float
        Diameter of the smallest centred disc that holds the object [µm].
    amplitude : numpy.ndarray or None
        float32 (h, w) field amplitude (None: pure phase object, amplitude 1).
    defocus_um : float
        Axial distance from focus [µm] (0 in focus).
    params : dict
        Drawn morphology parameters (for provenance and debugging).
    """

    kind: str
    label: int
    phase: np.ndarray
    pixel_um: float
    diameter_um: float
    extent_um: float
    amplitude: np.ndarray | None = None
    defocus_um: float = 0.0
    params: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """Patch shape [px]."""
        return self.phase.shape  # type: ignore[return-value]

    def field(self) -> np.ndarray:
        """Complex64 field amplitude·exp(i·phase) on the patch."""
        f = np.exp(1j * self.phase.astype(np.float64))
        if self.amplitude is not None:
            f = f * self.amplitude
        return f.astype(np.complex64)

    def centroid(self) -> tuple[float, float]:
        """Phase-weighted centroid (row, col) of the positive phase [px, patch coordinates]."""
        return phase_centroid(self.phase)


@lru_cache(maxsize=512)
def _kernel(sigma_px: float) -> np.ndarray:
    r = max(1, int(math.ceil(4.0 * sigma_px)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_px) ** 2)
    return (k / k.sum()).astype(np.float32)


def gauss_blur(a: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of a 2-D patch with an empty border (float32 out).

    Narrow kernels (sigma < 1.5 px) are applied in real space (truncated at 4 sigma, zero
    padding, no ringing); wider ones by FFT (periodic, equal to zero padding on patches
    with an empty border). ``sigma_px`` [px].
    """
    a = np.asarray(a, dtype=np.float32)
    if sigma_px <= 0:
        return a.copy()
    if sigma_px < 1.5:
        k = _kernel(round(float(sigma_px), 3))
        out = ndimage.correlate1d(a, k, axis=0, mode="constant")
        return ndimage.correlate1d(out, k, axis=1, mode="constant")
    h, w = a.shape
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(w).astype(np.float32)[None, :]
    tf = np.exp(np.float32(-2.0 * math.pi**2 * sigma_px**2) * (fy * fy + fx * fx))
    return sfft.irfft2(sfft.rfft2(a, workers=1) * tf, s=(h, w), workers=1).astype(np.float32)


def phase_centroid(phase: np.ndarray) -> tuple[float, float]:
    """Centroid (row, col) [px] of ``max(phase, 0)``; the array centre if all <= 0."""
    w = np.clip(phase, 0.0, None).astype(np.float64)
    s = w.sum()
    if s <= 0:
        return (phase.shape[0] / 2.0, phase.shape[1] / 2.0)
    ys = np.arange(phase.shape[0], dtype=np.float64)
    xs = np.arange(phase.shape[1], dtype=np.float64)
    return float(w.sum(1) @ ys / s), float(w.sum(0) @ xs / s)


def patch_size(extent_um: float, pixel_um: float, margin_px: int = 4) -> int:
    """Even patch side [px] for an object of diameter ``extent_um`` [µm] plus a margin."""
    n = int(math.ceil(extent_um / pixel_um)) + 2 * margin_px
    return n + (n % 2)


def grid(n: int, pixel_um: float, angle: float = 0.0,
         offset: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """Rotated coordinates (y, x) [µm] of an ``n``×``n`` patch centred at pixel n//2.

    Parameters
    ----------
    n : int
        Patch side [px].
    pixel_um : float
        Pixel size [µm].
    angle : float
        Rotation of the object frame [rad].
    offset : tuple of float
        Object centre relative to the patch centre [µm].
    """
    c = np.arange(n, dtype=np.float32) - n // 2
    y = (c[:, None] * pixel_um - offset[0]).astype(np.float32)
    x = (c[None, :] * pixel_um - offset[1]).astype(np.float32)
    ca, sa = math.cos(angle), math.sin(angle)
    return (-sa * x + ca * y), (ca * x + sa * y)


def ellipsoid(y: np.ndarray, x: np.ndarray, a: float, b: float, c: float,
              cy: float = 0.0, cx: float = 0.0, theta: float = 0.0) -> np.ndarray:
    """Thickness [µm] of an ellipsoid with in-plane semi-axes a (x), b (y), half-height c.

    Centre (cy, cx) [µm] and in-plane rotation ``theta`` [rad] in the coordinates given.
    """
    dy, dx = y - cy, x - cx
    if theta:
        ct, st = math.cos(theta), math.sin(theta)
        dx, dy = ct * dx + st * dy, -st * dx + ct * dy
    r2 = (dx / a) ** 2 + (dy / b) ** 2
    return (2.0 * c) * np.sqrt(np.clip(1.0 - r2, 0.0, None))


def splat(n: int, pixel_um: float, pos_um: np.ndarray, weights: np.ndarray,
          sigma_px: float) -> np.ndarray:
    """Sum of Gaussian blobs: bilinear deposit of ``weights`` at ``pos_um`` then blur.

    Parameters
    ----------
    n : int
        Patch side [px].
    pixel_um : float
        Pixel size [µm].
    pos_um : numpy.ndarray
        (k, 2) blob centres (y, x) [µm] relative to the patch centre.
    weights : numpy.ndarray
        (k,) peak heights [rad] of the blobs.
    sigma_px : float
        Blob standard deviation [px].

    Returns
    -------
    numpy.ndarray
        float32 (n, n) map whose blobs reach ``weights`` at their peaks.
    """
    if len(pos_um) == 0:
        return np.zeros((n, n), np.float32)
    p = np.clip(pos_um / pixel_um + n // 2, 0, n - 1.001)
    i0 = np.floor(p).astype(np.int64)
    f = p - i0
    fy, fx = f[:, 0], f[:, 1]
    base = i0[:, 0] * n + i0[:, 1]
    idx = np.concatenate([base, base + 1, base + n, base + n + 1])
    wts = np.concatenate([weights * (1 - fy) * (1 - fx), weights * (1 - fy) * fx,
                          weights * fy * (1 - fx), weights * fy * fx])
    out = np.bincount(idx, wts, minlength=n * n).reshape(n, n)
    # a unit delta blurred by a Gaussian of sigma s peaks at 1/(2π s²)
    return gauss_blur(out, sigma_px) * np.float32(2 * math.pi * sigma_px**2)


def gaussian_blobs(n: int, pixel_um: float, pos_um: np.ndarray, weights: np.ndarray,
                   sigma_um: np.ndarray) -> np.ndarray:
    """Sum of a few Gaussian blobs evaluated analytically (float32 (n, n)).

    Parameters
    ----------
    n : int
        Patch side [px].
    pixel_um : float
        Pixel size [µm].
    pos_um : numpy.ndarray
        (k, 2) centres (y, x) [µm] relative to the patch centre.
    weights : numpy.ndarray
        (k,) peak heights [rad].
    sigma_um : numpy.ndarray
        (k,) standard deviations [µm].
    """
    c = (np.arange(n, dtype=np.float32) - n // 2) * pixel_um
    out = np.zeros((n, n), np.float32)
    for (py, px), w, s in zip(pos_um, weights, sigma_um, strict=True):
        gy = np.exp(-0.5 * ((c - py) / s) ** 2)
        gx = np.exp(-0.5 * ((c - px) / s) ** 2)
        out += np.float32(w) * np.outer(gy, gx).astype(np.float32)
    return out


def points_in_ellipse(rng: np.random.Generator, k: int, a: float, b: float,
                      theta: float = 0.0) -> np.ndarray:
    """``k`` uniform random points (y, x) [µm] inside an ellipse (semi-axes a along x, b)."""
    r = np.sqrt(rng.uniform(0, 1, k))
    t = rng.uniform(0, 2 * math.pi, k)
    x, y = a * r * np.cos(t), b * r * np.sin(t)
    ct, st = math.cos(theta), math.sin(theta)
    return np.stack([st * x + ct * y, ct * x - st * y], axis=1)


def smooth_noise(rng: np.random.Generator, n: int, sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-RMS Gaussian-filtered white noise (n, n) [float32]."""
    z = gauss_blur(rng.standard_normal((n, n), dtype=np.float32), sigma_px)
    s = z.std()
    return (z / s if s > 0 else z).astype(np.float32)


def soft_window(n: int, margin_px: int) -> np.ndarray:
    """Separable raised-cosine window: 1 inside, falling to 0 over ``margin_px`` at borders."""
    w = np.ones(n, np.float32)
    if margin_px > 0:
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0, math.pi, margin_px + 2)[1:-1])
        w[:margin_px] = ramp
        w[-margin_px:] = ramp[::-1]
    return w[:, None] * w[None, :]


def finish(phase: np.ndarray, smoothing_px: float) -> np.ndarray:
    """Apply the optical blur (Gaussian, ``smoothing_px`` [px]) and return float32.

    The patch border must be empty (objects are rendered with a margin), so the periodic
    FFT blur equals a zero-padded one.
    """
    if smoothing_px > 0:
        return gauss_blur(phase, smoothing_px)
    return np.ascontiguousarray(phase, dtype=np.float32)
