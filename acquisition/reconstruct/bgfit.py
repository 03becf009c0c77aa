"""Residual phase-background fits (offset, tilt, 2nd-order polynomial), optionally masked.

Semantics follow qpimage's ``compute_bg``: the fit uses the pixels of a ``border_px`` frame
around the image, intersected with an optional background mask (``True`` = background);
``offset="fit"`` takes the constant from the least-squares fit. The fits are linear least
squares (the same minimum as qpimage's lmfit fits of these linear models).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROFILES = ("offset", "tilt", "poly2o")
OFFSETS = ("fit", "mean", "median", "mode")


@dataclass
class BackgroundFit:
    """Result of :func:`fit_background`.

    Attributes
    ----------
    corrected : ndarray
        ``phase - background`` [rad], float32, same shape as the input.
    background : ndarray
        Fitted background [rad], float32.
    coefficients : ndarray, shape (n_slices, n_terms)
        Model coefficients on normalised coordinates (y, x in [-0.5, 0.5] of the longer side):
        offset: [c]; tilt: [c, y, x]; poly2o: [c, y, x, y², x·y, x²].
    n_fit_px : ndarray of int, shape (n_slices,)
        Number of pixels used by each fit.
    residual_std : ndarray, shape (n_slices,)
        Standard deviation of the corrected phase over the fit pixels [rad].
    """

    corrected: np.ndarray
    background: np.ndarray
    coefficients: np.ndarray
    n_fit_px: np.ndarray
    residual_std: np.ndarray


def border_mask(shape: tuple[int, int], border_px: int) -> np.ndarray:
    """Boolean mask of a ``border_px`` wide frame around an image of ``shape`` [px]."""
    m = np.zeros(shape, dtype=bool)
    b = int(round(border_px))
    if b <= 0:
        m[:] = True
        return m
    m[:b, :] = m[-b:, :] = True
    m[:, :b] = m[:, -b:] = True
    return m


def _design(shape: tuple[int, int], profile: str) -> np.ndarray:
    h, w = shape
    s = float(max(h, w))
    y = ((np.arange(h) - h // 2) / s).reshape(-1, 1) * np.ones((1, w))
    x = ((np.arange(w) - w // 2) / s).reshape(1, -1) * np.ones((h, 1))
    cols = [np.ones((h, w))]
    if profile in ("tilt", "poly2o"):
        cols += [y, x]
    if profile == "poly2o":
        cols += [y * y, x * y, x * x]
    return np.stack([c.ravel() for c in cols], axis=1)


def _mode(values: np.ndarray) -> float:
    nbins = max(1, int(np.ceil(np.sqrt(values.size))))
    hist, edges = np.histogram(values, nbins)
    i = int(np.argmax(hist))
    return float(0.5 * (edges[i] + edges[i + 1]))


def fit_background(phase: np.ndarray, profile: str = "tilt", *, border_px: int = 5,
                   mask: np.ndarray | None = None, offset: str = "fit") -> BackgroundFit:
    """Fit and remove a smooth residual background from phase images.

    Parameters
    ----------
    phase : array_like, shape (H, W) or (N, H, W)
        Unwrapped phase [rad].
    profile : {"offset", "tilt", "poly2o"}
        Background model: constant, plane, or full 2nd-order polynomial.
    border_px : int
        Width of the border frame used for the fit [px]; 0 = use every pixel (then a mask
        is strongly advised).
    mask : array_like of bool, shape (H, W) or (N, H, W), optional
        ``True`` where the image is background; intersected with the border frame.
    offset : {"fit", "mean", "median", "mode"}
        How the constant is set: from the least-squares fit, or the mean / median /
        histogram mode of the residual over the fit pixels.

    Returns
    -------
    BackgroundFit
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    if offset not in OFFSETS:
        raise ValueError(f"offset must be one of {OFFSETS}, got {offset!r}")
    arr = np.asarray(phase, dtype=np.float64)
    if arr.ndim not in (2, 3):
        raise ValueError(f"fit_background expects (H, W) or (N, H, W), got shape {arr.shape}")
    frames = arr[None] if arr.ndim == 2 else arr
    hw = frames.shape[-2:]
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape not in (hw, frames.shape):
            raise ValueError(f"mask shape {mask.shape} does not match phase shape {arr.shape}")
    frame_sel = border_mask(hw, border_px)
    design = _design(hw, profile)
    n_terms = design.shape[1]
    bgs = np.empty(frames.shape, dtype=np.float64)
    coefs = np.zeros((frames.shape[0], n_terms))
    npx = np.zeros(frames.shape[0], dtype=np.int64)
    rstd = np.zeros(frames.shape[0])
    for i, fr in enumerate(frames):
        sel = frame_sel.copy()
        if mask is not None:
            sel &= mask if mask.ndim == 2 else mask[i]
        sel &= np.isfinite(fr)
        n = int(sel.sum())
        if n < n_terms:
            raise ValueError(f"background fit needs at least {n_terms} pixels, got {n} "
                             f"(border_px={border_px}, mask too restrictive?)")
        flat = sel.ravel()
        vals = fr.ravel()[flat]
        a = design[flat]
        coef, *_ = np.linalg.lstsq(a, vals, rcond=None)
        bg = (design @ coef).reshape(hw)
        if offset != "fit":
            resid = vals - bg.ravel()[flat]
            c = {"mean": np.mean, "median": np.median, "mode": _mode}[offset](resid)
            bg = bg + c
            coef[0] += c
        bgs[i] = bg
        coefs[i] = coef
        npx[i] = n
        rstd[i] = float(np.std(fr.ravel()[flat] - bg.ravel()[flat]))
    corrected = (frames - bgs).astype(np.float32)
    bg32 = bgs.astype(np.float32)
    if arr.ndim == 2:
        corrected, bg32 = corrected[0], bg32[0]
    return BackgroundFit(corrected=corrected, background=bg32, coefficients=coefs,
                         n_fit_px=npx, residual_std=rstd)
