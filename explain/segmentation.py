"""Cell masks and superpixel segmentations of phase crops for LIME.

The crops are phase images in radians with the background near 0 rad. LIME switches
superpixels off (sets them to the background phase), so the superpixels should follow the
cell's structure: we run maskSLIC inside the cell mask and add the whole background as one
extra segment. Ids are contiguous, 0 = background, 1..K-1 = cell superpixels (Captum and
the lime package both require 0..K-1; a gap becomes a dead feature).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi


def border_background(x: np.ndarray, width: int = 3) -> float:
    """Median of the crop's border pixels, the background level (rad for phase crops)."""
    x = np.asarray(x, dtype=np.float64)
    b = np.concatenate([x[:width].ravel(), x[-width:].ravel(),
                        x[:, :width].ravel(), x[:, -width:].ravel()])
    return float(np.median(b))


def cell_mask(x: np.ndarray, background: float | None = None, min_contrast: float = 0.05,
              dilate_px: int = 1) -> np.ndarray:
    """Mask of the cell nearest the crop centre.

    Parameters
    ----------
    x : ndarray (H, W)
        Phase crop [rad] (or any image whose background is flat).
    background : float, optional
        Background level; default the border median.
    min_contrast : float
        Smallest |x - background| counted as cell (same unit as ``x``), also the floor of
        the Otsu threshold on the smoothed deviation.
    dilate_px : int
        Dilation of the final mask [px] (keeps the rim inside).

    Returns
    -------
    ndarray of bool (H, W)
        Filled mask of the connected component nearest the centre; a centred disc of a
        quarter of the crop width when nothing stands out (blank or noise crops).
    """
    from skimage.filters import threshold_otsu

    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D crop, got shape {x.shape}")
    h, w = x.shape
    bg = border_background(x) if background is None else background
    dev = ndi.gaussian_filter(np.abs(x - bg), 1.0)
    thr = min_contrast
    if np.ptp(dev) > 0:
        thr = max(min_contrast, float(threshold_otsu(dev)))
    m = ndi.binary_fill_holes(dev > thr)
    lab, n = ndi.label(m)
    yy, xx = np.mgrid[:h, :w]
    if n == 0:
        return np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) <= min(h, w) / 4
    if n > 1:
        # component with the most pixels weighted by closeness to the centre
        sizes = ndi.sum(np.ones_like(x), lab, index=np.arange(1, n + 1))
        cy, cx = (h - 1) / 2, (w - 1) / 2
        com = ndi.center_of_mass(np.ones_like(x), lab, index=np.arange(1, n + 1))
        dist = np.array([np.hypot(a - cy, b - cx) for a, b in com])
        score = sizes / (1.0 + dist / (0.25 * min(h, w))) ** 2
        m = lab == (int(np.argmax(score)) + 1)
    if dilate_px > 0:
        m = ndi.binary_dilation(m, iterations=dilate_px)
    return m


@dataclass(frozen=True)
class SlicParams:
    """Parameters of one multi-SLIC family (recorded with every LIME map).

    Attributes
    ----------
    n_segments : tuple of int
        Approximate superpixel counts inside the cell, one segmentation each.
    compactness : float
        SLIC compactness for the scaled input (cell deviation / its 99th percentile, so
        about 0..1): 0.1 follows phase contours, 10 gives squares.
    sigma : float
        Gaussian pre-smoothing of SLIC [px].
    min_contrast : float
        Cell-mask floor on |phase - background| [rad].
    """

    n_segments: tuple[int, ...] = (25, 50, 100)
    compactness: float = 0.1
    sigma: float = 1.0
    min_contrast: float = 0.05

    def to_dict(self) -> dict:
        """Plain dict (JSON)."""
        return asdict(self)


def slic_segments(x: np.ndarray, n_segments: int, mask: np.ndarray, *, compactness: float = 0.1,
                  sigma: float = 1.0, background: float | None = None) -> np.ndarray:
    """One maskSLIC segmentation with the background as segment 0.

    Parameters
    ----------
    x : ndarray (H, W)
        Crop [rad].
    n_segments : int
        Approximate number of superpixels inside ``mask``.
    mask : ndarray of bool (H, W)
        Cell mask.
    compactness, sigma : float
        SLIC parameters (see :class:`SlicParams`).
    background : float, optional
        Background level (default border median).

    Returns
    -------
    ndarray of int64 (H, W)
        Segment ids 0..K-1 (0 = background), contiguous.
    """
    x = np.asarray(x, dtype=np.float64)
    bg = border_background(x) if background is None else background
    return _slic_scaled(_scaled_deviation(x, mask, bg), int(n_segments), mask, compactness,
                        sigma)


def _scaled_deviation(x: np.ndarray, mask: np.ndarray, background: float) -> np.ndarray:
    """SLIC input: deviation from the background / its 99th percentile inside the mask."""
    dev = np.asarray(x, dtype=np.float64) - background
    scale = float(np.percentile(np.abs(dev[mask]), 99)) if mask.any() else 0.0
    return dev / scale if scale > 0 else dev


def _slic_scaled(img: np.ndarray, n_segments: int, mask: np.ndarray, compactness: float,
                 sigma: float) -> np.ndarray:
    """maskSLIC on the scaled crop, background 0, ids made contiguous."""
    from skimage.segmentation import slic

    if mask.sum() < 2:
        seg = mask.astype(np.int64)
    else:
        seg = slic(img, n_segments=int(n_segments), compactness=compactness, sigma=sigma,
                   start_label=1, channel_axis=None, mask=mask, enforce_connectivity=True)
    seg = np.where(mask, seg, 0)
    _, inv = np.unique(seg, return_inverse=True)  # contiguous; 0 stays first (smallest)
    return inv.reshape(seg.shape).astype(np.int64)


def multi_slic(x: np.ndarray, params: SlicParams = SlicParams(),
               background: float | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """All segmentations of one crop.

    Returns
    -------
    segs : list of ndarray of int64 (H, W)
        One id map per ``params.n_segments`` entry (0 = background).
    mask : ndarray of bool (H, W)
        The cell mask used.
    """
    bg = border_background(x) if background is None else background
    mask = cell_mask(x, bg, params.min_contrast)
    img = _scaled_deviation(x, mask, bg)  # shared by the granularities
    segs = [_slic_scaled(img, int(n), mask, params.compactness, params.sigma)
            for n in params.n_segments]
    return segs, mask
