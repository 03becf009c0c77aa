"""Synthetic off-axis holograms with known phase (tests, benchmarks, device checks).

Not a physical simulator (that is :mod:`leukoflow.acquisition.sim`): smooth, band-limited phase
objects on a tilted carrier, with a weak static aberration shared by the background,
an illumination gradient, shot-like noise and 8-bit quantisation.
"""

from __future__ import annotations

import numpy as np


def smooth_cell_phase(shape: tuple[int, int], centres: list[tuple[float, float]],
                      radius_px: float, peak_rad: float) -> np.ndarray:
    """Sum of smooth dome-shaped phase objects [rad] (super-Gaussian, order 4).

    Parameters
    ----------
    shape : tuple of int
        Frame shape (H, W) [px].
    centres : list of (y, x)
        Object centres [px].
    radius_px : float
        Object radius (1/e point of the profile) [px].
    peak_rad : float
        Peak phase of each object [rad].
    """
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    out = np.zeros(shape)
    for cy, cx in centres:
        r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / radius_px**2
        out += peak_rad * np.exp(-(r2**2))
    return out


def synthetic_hologram(shape: tuple[int, int] = (320, 1024),
                       carrier: tuple[float, float] = (-0.25, 0.25), *,
                       phase: np.ndarray | None = None, n_frames: int = 1,
                       noise: float = 0.01, seed: int = 0,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make uint8 holograms of a known phase and a matching background hologram.

    Parameters
    ----------
    shape : tuple of int
        Frame shape (H, W) [px].
    carrier : tuple of float
        Sideband (rows, cols) [cycles/px] in qpretrieve's convention: demodulating this
        sideband returns ``+phase``.
    phase : ndarray, shape (H, W) or (N, H, W), optional
        Object phase [rad]; default: a few smooth cells of 2.5 rad.
    n_frames : int
        Number of frames when ``phase`` is not given (cells shifted along x per frame).
    noise : float
        Relative intensity noise (std, fraction of the mean).
    seed : int
        Random seed.

    Returns
    -------
    holo : uint8 ndarray, (H, W) or (N, H, W)
    bg : uint8 ndarray, (H, W)
    phase : float64 ndarray, like ``holo``
        The object phase [rad] (ground truth).
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    if phase is None:
        r = min(h, w) / 10
        frames = []
        for i in range(n_frames):
            cx = [w * 0.3 + 7.0 * i, w * 0.65 + 7.0 * i]
            cy = [h * 0.5, h * 0.45]
            frames.append(smooth_cell_phase(shape, list(zip(cy, cx, strict=True)), r, 2.5))
        phase = np.stack(frames) if n_frames > 1 else frames[0]
    phase = np.asarray(phase, dtype=np.float64)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    aberr = 0.8 * ((xx - w / 2) / w) ** 2 + 0.5 * ((yy - h / 2) / h) * ((xx - w / 2) / w)
    illum = 1.0 + 0.15 * (xx / w) - 0.1 * (yy / h)
    carrier_phase = 2 * np.pi * (carrier[0] * yy + carrier[1] * xx)

    def make(ph: np.ndarray) -> np.ndarray:
        amp_obj = 1.0 - 0.05 * (ph > 0.2)
        intensity = illum * (1.0 + amp_obj**2 + 2 * amp_obj * np.cos(carrier_phase + aberr + ph))
        intensity *= 1.0 + noise * rng.standard_normal(intensity.shape)
        return np.clip(np.round(intensity * 60.0), 0, 255).astype(np.uint8)

    bg = make(np.zeros(shape))
    holo = np.stack([make(p) for p in phase]) if phase.ndim == 3 else make(phase)
    return holo, bg, phase
