"""2D phase unwrapping (per frame or per cell crop) with a defined 2π offset.

Wraps :func:`skimage.restoration.unwrap_phase` (Herráez et al. 2002, reliability-sorted
path following). Stacks are unwrapped slice by slice in 2D, never as a 3D volume.
"""

from __future__ import annotations

import math

import numpy as np

REBASES = ("none", "border", "median")
TWO_PI = 2 * math.pi


def _border(a: np.ndarray, px: int) -> np.ndarray:
    px = max(1, min(px, min(a.shape) // 2))
    m = np.zeros(a.shape, dtype=bool)
    m[:px, :] = m[-px:, :] = True
    m[:, :px] = m[:, -px:] = True
    return a[m]


def rebase_2pi(phase: np.ndarray, how: str = "border", border_px: int = 2) -> np.ndarray:
    """Subtract the multiple of 2π that puts the reference level in [-π, π).

    Parameters
    ----------
    phase : ndarray, shape (H, W)
        Unwrapped phase [rad].
    how : {"none", "border", "median"}
        Reference: the median of a ``border_px`` frame ("border", background around a cell),
        the median of the whole image ("median"), or nothing ("none").
    border_px : int
        Border width [px] for ``how="border"``.

    Returns
    -------
    ndarray
        ``phase - 2πk`` (same dtype).
    """
    if how == "none":
        return phase
    if how == "border":
        ref = float(np.median(_border(phase, border_px)))
    elif how == "median":
        ref = float(np.median(phase))
    else:
        raise ValueError(f"rebase must be one of {REBASES}, got {how!r}")
    k = math.floor((ref + math.pi) / TWO_PI)
    if k == 0:
        return phase
    return phase - phase.dtype.type(TWO_PI * k)


def unwrap_phase(phase: np.ndarray, *, rebase: str = "border", border_px: int = 2,
                 seed: int | None = 47) -> np.ndarray:
    """Unwrap a wrapped phase image or a stack of them (each slice in 2D).

    Parameters
    ----------
    phase : array_like, shape (H, W) or (N, H, W)
        Wrapped phase [rad] (values outside [-π, π) are re-wrapped implicitly by the
        algorithm, which works on wrapped differences).
    rebase : {"border", "median", "none"}
        2π offset convention (see :func:`rebase_2pi`); "none" keeps the unwrapper's own
        offset (qpretrieve/skimage numbers).
    border_px : int
        Border width for ``rebase="border"`` [px].
    seed : int or None
        Seed of the unwrapper's random tie-breaking; fixed by default for reproducibility.

    Returns
    -------
    ndarray, float32 or float64 (float64 unless the input is float32)
        Unwrapped phase [rad], same shape as the input.
    """
    from skimage.restoration import unwrap_phase as _sk_unwrap

    arr = np.asarray(phase)
    if arr.ndim not in (2, 3):
        raise ValueError(f"unwrap_phase expects (H, W) or (N, H, W), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("unwrap_phase: empty array")
    if not np.all(np.isfinite(arr)):
        raise ValueError("unwrap_phase: phase contains NaN or inf")
    out_dtype = np.float32 if arr.dtype == np.float32 else np.float64
    frames = arr[None] if arr.ndim == 2 else arr
    out = np.empty(frames.shape, dtype=out_dtype)
    for i, fr in enumerate(frames):
        fr64 = np.asarray(fr, dtype=np.float64)
        if min(fr64.shape) < 2:
            un = fr64
        else:
            un = np.asarray(_sk_unwrap(fr64, rng=seed), dtype=np.float64)
        out[i] = rebase_2pi(un, rebase, border_px)
    return out[0] if arr.ndim == 2 else out
