"""Threshold segmentation of phase (or brightfield) frames with dcnum-compatible morphology.

The mask post-processing reproduces dcnum's ``thresh`` segmenter exactly (checked against
the stored masks of ``dcnum-thresh-segmentation``): threshold -> label (8-connectivity) ->
clear border -> fill holes -> opening with a disk -> label (8-connectivity) -> drop objects
of ``<= max_small_px`` pixels. Erosion treats the outside of the image as foreground and
dilation as background (OpenCV's default border semantics), so objects near the frame edge
are not eroded by the edge itself.

Segmenters live in the :data:`SEGMENTERS` registry; each returns a :class:`Segmentation`
(label image + object count) and reports every parameter in :attr:`Segmenter.params`.

:func:`split_touching` cuts a blob of two *touching* cells along its neck (watershed on the
distance map from its two maxima) when that is unambiguous; the acquisition pipeline applies
it to the blobs the doublet gate flags, and counts why a split was refused.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from leukoflow.acquisition.features import _convex_pixels
from leukoflow.core.registry import Registry

#: 8-connectivity structuring element (3×3 ones).
STRUCT8 = np.ones((3, 3), dtype=bool)
#: 4-connectivity structuring element (cross).
STRUCT4 = ndi.generate_binary_structure(2, 1)

SEGMENTERS: Registry = Registry("segmenter")

_EDGES = {"t", "b", "l", "r"}


# ----------------------------------------------------------------------------- primitives

@functools.cache
def disk(radius: int) -> np.ndarray:
    """Disk footprint of ``radius`` [px] (same as ``skimage.morphology.disk``).

    Parameters
    ----------
    radius : int
        Radius [px]; 0 gives a single pixel.

    Returns
    -------
    numpy.ndarray
        Boolean (2r+1, 2r+1) footprint (read-only, cached).
    """
    if radius < 0:
        raise ValueError(f"disk radius must be >= 0, got {radius}")
    r = np.arange(-radius, radius + 1)
    fp = (r[:, None] ** 2 + r[None, :] ** 2) <= radius**2
    fp.setflags(write=False)
    return fp


def label8(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label connected foreground components with 8-connectivity.

    Parameters
    ----------
    mask : numpy.ndarray
        2D boolean mask.

    Returns
    -------
    labels : numpy.ndarray
        int32 label image (0 = background, 1..n objects in raster order).
    n : int
        Number of objects.
    """
    labels, n = ndi.label(mask, structure=STRUCT8, output=np.int32)
    return labels, int(n)


def clear_border(mask: np.ndarray, edges: str = "tblr") -> np.ndarray:
    """Remove 8-connected objects that touch the given image edges.

    Parameters
    ----------
    mask : numpy.ndarray
        2D boolean mask.
    edges : str
        Which edges clear objects: any of ``t`` (row 0), ``b`` (last row), ``l`` (column 0),
        ``r`` (last column). ``""`` keeps everything.

    Returns
    -------
    numpy.ndarray
        New boolean mask without the objects touching those edges.
    """
    bad = set(edges) - _EDGES
    if bad:
        raise ValueError(f"unknown edge codes {sorted(bad)}; use a subset of 'tblr'")
    mask = np.asarray(mask, dtype=bool)
    if not edges:
        return mask.copy()
    strips = []
    if "t" in edges:
        strips.append(mask[0, :])
    if "b" in edges:
        strips.append(mask[-1, :])
    if "l" in edges:
        strips.append(mask[:, 0])
    if "r" in edges:
        strips.append(mask[:, -1])
    if not any(s.any() for s in strips):
        return mask.copy()
    labels, _ = label8(mask)
    lab_strips = []
    if "t" in edges:
        lab_strips.append(labels[0, :])
    if "b" in edges:
        lab_strips.append(labels[-1, :])
    if "l" in edges:
        lab_strips.append(labels[:, 0])
    if "r" in edges:
        lab_strips.append(labels[:, -1])
    touching = np.unique(np.concatenate(lab_strips))
    touching = touching[touching > 0]
    return mask & ~np.isin(labels, touching)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions not 4-connected to the image border.

    Equivalent to :func:`scipy.ndimage.binary_fill_holes` and to dcnum's flood fill from
    the corner, but one labelling pass instead of iterated dilations.

    Parameters
    ----------
    mask : numpy.ndarray
        2D boolean mask.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    bg_labels, n = ndi.label(~mask, structure=STRUCT4, output=np.int32)
    if n == 0:
        return mask.copy()
    outside = np.zeros(n + 1, dtype=bool)
    for strip in (bg_labels[0, :], bg_labels[-1, :], bg_labels[:, 0], bg_labels[:, -1]):
        outside[strip] = True
    outside[0] = False  # label 0 is the foreground itself
    return ~outside[bg_labels]


def _offsets(fp: np.ndarray) -> list[tuple[int, int]]:
    r = fp.shape[0] // 2
    return [(int(dy) - r, int(dx) - r) for dy, dx in zip(*np.nonzero(fp), strict=True)]


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion with a disk; outside the image counts as foreground (OpenCV border)."""
    r = int(radius)
    h, w = mask.shape
    p = np.pad(mask, r, constant_values=True)
    out = np.ones((h, w), dtype=bool)
    for dy, dx in _offsets(disk(r)):
        out &= p[r + dy: r + dy + h, r + dx: r + dx + w]
    return out


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation with a disk; outside the image counts as background."""
    r = int(radius)
    h, w = mask.shape
    p = np.pad(mask, r, constant_values=False)
    out = np.zeros((h, w), dtype=bool)
    for dy, dx in _offsets(disk(r)):
        out |= p[r + dy: r + dy + h, r + dx: r + dx + w]
    return out


def opening(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary opening (erosion, then dilation) with a disk of ``radius`` [px].

    Outside the image counts as foreground for the erosion and as background for the
    dilation (OpenCV's default border handling), so the frame edge erodes nothing. The disk
    is symmetric, so shifted-view AND/OR over its offsets is exact and much faster than
    :mod:`scipy.ndimage` for small radii.

    Parameters
    ----------
    mask : numpy.ndarray
        2D boolean mask.
    radius : int
        Disk radius [px]; 0 returns a copy.
    """
    mask = np.asarray(mask, dtype=bool)
    if radius <= 0:
        return mask.copy()
    return dilate(erode(mask, radius), radius)


def remove_small(labels: np.ndarray, max_small_px: int) -> tuple[np.ndarray, int]:
    """Drop objects of ``<= max_small_px`` pixels and relabel 1..n in raster order.

    Parameters
    ----------
    labels : numpy.ndarray
        int label image.
    max_small_px : int
        Largest object size [px] that is removed (dcnum/skimage ``max_size``).

    Returns
    -------
    labels : numpy.ndarray
        int32 label image, consecutive labels.
    n : int
        Number of remaining objects.
    """
    n_in = int(labels.max()) if labels.size else 0
    if n_in == 0:
        return labels.astype(np.int32, copy=False), 0
    sizes = np.bincount(labels.ravel(), minlength=n_in + 1)
    keep = sizes > max_small_px
    keep[0] = False
    lut = np.zeros(n_in + 1, dtype=np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[labels], int(keep.sum())


def postprocess_mask(
    mask: np.ndarray,
    *,
    clear_border_edges: str = "tblr",
    fill: bool = True,
    opening_radius: int = 2,
    max_small_px: int = 10,
) -> tuple[np.ndarray, int]:
    """dcnum-compatible mask post-processing; returns (labels, n).

    Order: clear border -> fill holes -> opening -> 8-connected labels -> drop small objects.

    Parameters
    ----------
    mask : numpy.ndarray
        Raw threshold mask (2D boolean).
    clear_border_edges : str
        Edges whose touching objects are removed (see :func:`clear_border`).
    fill : bool
        Fill holes.
    opening_radius : int
        Disk radius of the opening [px] (dcnum's ``closing_disk``; 0 = off).
    max_small_px : int
        Objects with at most this many pixels are removed.
    """
    m = clear_border(mask, clear_border_edges)
    # work on the bounding box of the foreground plus a background margin: each window edge
    # is either an image edge or has >= margin background pixels, so hole filling (outside
    # parts reach the image border), erosion and dilation give the full-frame result
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return np.zeros(m.shape, np.int32), 0
    cols = np.flatnonzero(m.any(axis=0))
    margin = max(opening_radius, 0) + 2
    y0, y1 = max(rows[0] - margin, 0), min(rows[-1] + 1 + margin, m.shape[0])
    x0, x1 = max(cols[0] - margin, 0), min(cols[-1] + 1 + margin, m.shape[1])
    w = m[y0:y1, x0:x1]
    if fill:
        w = fill_holes(w)
    if opening_radius > 0:
        w = opening(w, opening_radius)
    lab_w, _ = label8(w)
    lab_w, n = remove_small(lab_w, max_small_px)
    labels = np.zeros(m.shape, np.int32)
    labels[y0:y1, x0:x1] = lab_w
    return labels, n


# ----------------------------------------------------------------------------- segmenters

@dataclass
class Segmentation:
    """Result of segmenting one frame.

    Attributes
    ----------
    labels : numpy.ndarray
        int32 label image (0 = background), same shape as the input.
    n : int
        Number of objects (labels 1..n).
    """

    labels: np.ndarray
    n: int


class Segmenter:
    """Base class: turn a (background-corrected) image into labelled objects."""

    registry_name: str = "base"

    @property
    def params(self) -> dict[str, Any]:
        """Every parameter of this segmenter (recorded with the data it produces)."""
        raise NotImplementedError

    @property
    def ppid(self) -> str:
        """Compact pipeline identifier, e.g. ``thresh:t=0.3^p=above:c=lr^f=1^o=2^s=10``."""
        p = self.params
        kv = "^".join(f"{k}={v}" for k, v in p.items())
        return f"{self.registry_name}:{kv}"

    def segment(self, image: np.ndarray) -> Segmentation:
        """Segment ``image``; see subclasses for the expected units."""
        raise NotImplementedError


@SEGMENTERS.register("thresh")
class ThresholdSegmenter(Segmenter):
    """Global threshold on a background-corrected image, then dcnum morphology.

    Parameters
    ----------
    threshold : float
        Threshold in the image's units (rad for phase frames; grey levels for brightfield).
    polarity : {"above", "below"}
        Foreground is ``image > threshold`` (phase: cells retard the wave, positive phase)
        or ``image < threshold`` (brightfield: cells are darker, dcnum uses ``< -6``).
    offset : {"none", "median"}
        Residual background offset removed before thresholding: ``median`` subtracts the
        frame median (cells cover a small fraction of the frame).
    clear_border_edges : str
        Edges whose touching objects are removed (``"tblr"`` = dcnum; ``""`` keeps objects
        at the edges so that features and the tracker can flag them instead).
    fill_holes : bool
        Fill holes (also closes rings left by phase wraps inside thick cells).
    opening_radius : int
        Disk radius of the opening [px].
    max_small_px : int
        Objects of at most this many pixels are dropped.
    """

    def __init__(
        self,
        threshold: float = 0.25,
        polarity: str = "above",
        offset: str = "none",
        clear_border_edges: str = "",
        fill_holes: bool = True,
        opening_radius: int = 2,
        max_small_px: int = 10,
    ) -> None:
        if polarity not in ("above", "below"):
            raise ValueError(f"polarity must be 'above' or 'below', got {polarity!r}")
        if offset not in ("none", "median"):
            raise ValueError(f"offset must be 'none' or 'median', got {offset!r}")
        bad = set(clear_border_edges) - _EDGES
        if bad:
            raise ValueError(f"unknown edge codes {sorted(bad)}; use a subset of 'tblr'")
        if opening_radius < 0 or max_small_px < 0:
            raise ValueError("opening_radius and max_small_px must be >= 0")
        if not np.isfinite(threshold):
            raise ValueError("threshold must be finite")
        self.threshold = float(threshold)
        self.polarity = polarity
        self.offset = offset
        self.clear_border_edges = clear_border_edges
        self.fill_holes = bool(fill_holes)
        self.opening_radius = int(opening_radius)
        self.max_small_px = int(max_small_px)

    @property
    def params(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "polarity": self.polarity,
            "offset": self.offset,
            "clear_border_edges": self.clear_border_edges,
            "fill_holes": self.fill_holes,
            "opening_radius": self.opening_radius,
            "max_small_px": self.max_small_px,
        }

    def threshold_mask(self, image: np.ndarray) -> np.ndarray:
        """Raw foreground mask before morphology."""
        img = np.asarray(image)
        if img.ndim != 2:
            raise ValueError(f"expected a 2D image, got shape {img.shape}")
        t = self.threshold
        if self.offset == "median":
            t = t + float(np.median(img))
        if self.polarity == "above":
            return img > t
        return img < t

    def segment(self, image: np.ndarray) -> Segmentation:
        """Segment a 2D image (NaN pixels count as background)."""
        mask = self.threshold_mask(image)
        labels, n = postprocess_mask(
            mask,
            clear_border_edges=self.clear_border_edges,
            fill=self.fill_holes,
            opening_radius=self.opening_radius,
            max_small_px=self.max_small_px,
        )
        return Segmentation(labels, n)


@dataclass(frozen=True)
class SegmentConfig:
    """The segmenter of the acquisition pipeline: its registry name and every parameter.

    The parameters are those of the ``thresh`` segmenter (:class:`ThresholdSegmenter`,
    same names and defaults); :meth:`create` passes all of them to the plugin, so none is
    kept by hand. A segmenter with other parameters brings its own config dataclass.

    Attributes
    ----------
    name : str
        Registry name (:data:`SEGMENTERS`).
    threshold : float
        Phase threshold [rad].
    polarity : {"above", "below"}
        Foreground above (phase) or below (brightfield) the threshold.
    offset : {"none", "median"}
        Residual background offset removed before thresholding.
    clear_border_edges : str
        Edges that clear touching objects (default none: the tracker and gates handle edge
        objects so that they are counted).
    fill_holes : bool
        Fill holes.
    opening_radius : int
        Opening disk radius [phase px].
    max_small_px : int
        Objects of at most this many pixels are dropped [px].
    """

    name: str = "thresh"
    threshold: float = 0.25
    polarity: str = "above"
    offset: str = "none"
    clear_border_edges: str = ""
    fill_holes: bool = True
    opening_radius: int = 2
    max_small_px: int = 10

    def create(self) -> Segmenter:
        """The configured segmenter."""
        params = {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}
        return SEGMENTERS.create(self.name, **params)


def dcnum_thresh_segmenter(thresh: float = -6.0) -> ThresholdSegmenter:
    """The dcnum default brightfield segmenter ``thresh:t=-6:cle=1^f=1^clo=2``.

    Apply it to ``image - (image_bg + bg_off)`` (grey levels).
    """
    return ThresholdSegmenter(threshold=thresh, polarity="below", offset="none",
                              clear_border_edges="tblr", fill_holes=True, opening_radius=2,
                              max_small_px=10)


# ----------------------------------------------------------------------------- blob splitting

#: Outcomes of :func:`split_touching` (``split`` = two parts; the others keep the object
#: whole, so the doublet gate rejects and counts it).
SPLIT_OUTCOMES: tuple[str, ...] = (
    "split", "split_peaks", "split_neck", "split_part_size", "split_part_shape",
    "split_cut_phase",
)


@dataclass(frozen=True)
class SplitConfig:
    """When a merged blob is split into two cells (only where the split is unambiguous).

    Two cells that touch (their projections do not overlap) merge into one blob at the
    segmentation threshold because the optical blur joins their rims. The blob's distance
    map then has two maxima separated by a neck; a watershed on it from those two maxima
    cuts along the neck. Cells whose projections *overlap* share pixels whose phase is the
    sum of both: no cut can give either cell alone, so those blobs stay whole.

    Attributes
    ----------
    enabled : bool
        Split at all.
    neck_px : float
        Dip [px] of the distance map between the two maxima required to seed two parts.
    min_distance_px : int
        Minimum distance [px] between the two seeds.
    max_neck_ratio : float
        Largest cut length / equivalent diameter of the smaller part. Two discs of
        diameter D whose centres are d apart overlap in a chord of length
        D·sqrt(1 - (d/D)²): 0.6 allows a rim overlap of at most 20 % of the diameter at
        the threshold level, i.e. touching cells with blurred rims.
    min_part_px : int
        Smallest part [px] (7 µm² at 0.34 µm = 61 px, the ``too_small`` gate).
    min_part_solidity : float
        Smallest part solidity (each part must look like one convex cell).
    max_cut_phase_rad : float
        Largest phase [rad] on the cut (median over the cut pixels; a wrapped, negative
        median is refused too): touching rims carry little phase, an overlap carries the
        sum of two cells and is refused. On simulated pairs the cut read 0.3–0.6 rad when
        the projections (thresholded at 0.25 rad) did not overlap, 0.6–0.85 rad for an
        overlap of 1–4 px and >= 1.0 rad from 7 px on.
    """

    enabled: bool = True
    neck_px: float = 2.5
    min_distance_px: int = 4
    max_neck_ratio: float = 0.6
    min_part_px: int = 61
    min_part_solidity: float = 0.85
    max_cut_phase_rad: float = 0.9

    def to_dict(self) -> dict:
        """Plain dict (for metadata)."""
        return dataclasses.asdict(self)


def _seeds(edt: np.ndarray, mask: np.ndarray, neck_px: float, min_distance: int
           ) -> list[tuple[int, int]]:
    """Maxima of ``edt`` inside ``mask`` separated by a dip of at least ``neck_px``."""
    size = 2 * min_distance + 1
    peaks = (edt == ndi.maximum_filter(edt, size=size)) & mask & (edt > neck_px)
    ys, xs = np.nonzero(peaks)
    order = np.argsort(edt[ys, xs])[::-1][:8]
    kept: list[tuple[int, int]] = []
    for i in order:
        y, x = int(ys[i]), int(xs[i])
        ok = True
        for ky, kx in kept:
            n = max(abs(ky - y), abs(kx - x)) + 1
            ly = np.linspace(y, ky, n).round().astype(int)
            lx = np.linspace(x, kx, n).round().astype(int)
            if min(edt[y, x], edt[ky, kx]) - float(edt[ly, lx].min()) < neck_px:
                ok = False
                break
        if ok:
            kept.append((y, x))
    return kept


def split_touching(mask: np.ndarray, phase: np.ndarray | None = None,
                   config: SplitConfig | None = None) -> tuple[np.ndarray | None, str]:
    """Split one blob of two touching cells along its neck, if unambiguous.

    Parameters
    ----------
    mask : numpy.ndarray
        Boolean mask of one object (a window around it; other objects must be absent).
    phase : numpy.ndarray, optional
        Phase [rad] on the same window (wrapped or unwrapped) for the cut-phase test.
    config : SplitConfig, optional
        Criteria.

    Returns
    -------
    parts : numpy.ndarray or None
        int32 labels (1, 2 = the two parts, 0 = background) when split, else None.
    outcome : str
        One of :data:`SPLIT_OUTCOMES` (``split`` when split, else why not).
    """
    from skimage.segmentation import watershed


    c = config or SplitConfig()
    m = np.asarray(mask, dtype=bool)
    edt = ndi.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
    seeds = _seeds(edt, m, c.neck_px, c.min_distance_px)
    if len(seeds) != 2:
        return None, "split_peaks"
    markers = np.zeros(m.shape, np.int32)
    for k, (y, x) in enumerate(seeds, start=1):
        markers[y, x] = k
    parts = watershed(-edt, markers, mask=m).astype(np.int32)
    a1, a2 = int((parts == 1).sum()), int((parts == 2).sum())
    if min(a1, a2) < c.min_part_px or a1 + a2 != int(m.sum()):
        return None, "split_part_size"
    # cut: pixels of part 1 with a 4-neighbour in part 2 (and vice versa)
    p1, p2 = parts == 1, parts == 2
    cut = np.zeros_like(m)
    cut[:-1] |= p1[:-1] & p2[1:]
    cut[1:] |= p2[1:] & p1[:-1]
    cut[1:] |= p1[1:] & p2[:-1]
    cut[:-1] |= p2[:-1] & p1[1:]
    cut[:, :-1] |= p1[:, :-1] & p2[:, 1:]
    cut[:, 1:] |= p2[:, 1:] & p1[:, :-1]
    cut[:, 1:] |= p1[:, 1:] & p2[:, :-1]
    cut[:, :-1] |= p2[:, :-1] & p1[:, 1:]
    n_cut = int(cut.sum())
    neck = 0.5 * n_cut  # both sides of the cut are marked
    d_small = 2.0 * np.sqrt(min(a1, a2) / np.pi)
    if neck > c.max_neck_ratio * d_small:
        return None, "split_neck"
    for p, a in ((p1, a1), (p2, a2)):
        if a / max(_convex_pixels(p), 1.0) < c.min_part_solidity:
            return None, "split_part_shape"
    if phase is not None and n_cut:
        # wrapped phase: an overlap's summed phase beyond pi reads negative here
        v = float(np.median(np.asarray(phase)[cut]))
        if not 0.0 < v <= c.max_cut_phase_rad:
            return None, "split_cut_phase"
    return parts, "split"
