"""The acquisition's per-pixel work on batches of frames, in PyTorch (CUDA, or CPU for tests).

On a GPU host the acquisition runs reconstruction, segmentation and the measurement of every
object on the device, a batch of frames at a time; the host keeps what is sequential and
cheap per object: the quality gates, the rare splitting of touching cells, the tracker over
the per-frame object tables, and the crops of the cells it emits
(:class:`leukoflow.acquisition.pipeline.AcquisitionPipeline` with precomputed detections).

Every function here computes exactly what its NumPy counterpart computes, so the device path
gives the CPU path's cells (tests compare them on the same phase frames):

===========================  ===========================================================
here                          CPU counterpart
===========================  ===========================================================
:func:`threshold_mask`        ``ThresholdSegmenter.threshold_mask`` (:mod:`~.segment`)
:func:`components`            :func:`scipy.ndimage.label` (raster-order labels)
:func:`fill_holes`            :func:`leukoflow.acquisition.segment.fill_holes`
:func:`opening`               :func:`leukoflow.acquisition.segment.opening`
:func:`segment_batch`         :func:`leukoflow.acquisition.segment.postprocess_mask`
:func:`measure_batch`         :func:`leukoflow.acquisition.features.measure_objects`
===========================  ===========================================================

Connected components use min-label propagation with pointer jumping (labels converge in a
few dozen vectorised steps for cell-sized objects); the convex hull of each object (for its
solidity) is found exactly by testing every pair of its row-extreme pixels as a hull edge,
and Pick's theorem turns it into the pixel count the CPU path uses. The distance-map peak
test of concave objects (few) runs on the host on their masks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F  # noqa: N812

from leukoflow.acquisition.features import Detection, _count_peaks
from leukoflow.acquisition.pipeline import AcquisitionPipeline, FrameResult
from leukoflow.acquisition.reconstruct import Reconstructor
from leukoflow.acquisition.segment import Segmentation, disk
from leukoflow.core.physics import DEFAULT_OPTICS

#: Objects per chunk of the convex-hull edge test (bounds device memory).
HULL_CHUNK_ELEMENTS = 1 << 22


# ------------------------------------------------------------------ helpers
def _np_median(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-row median of ``x`` over ``valid`` entries, NumPy's definition (mean of the two
    middle values for an even count); NaN for rows without valid entries. (N, M) -> (N,)."""
    big = torch.finfo(x.dtype).max
    s, _ = torch.sort(torch.where(valid, x, torch.full_like(x, big)), dim=1)
    n = valid.sum(dim=1)
    lo = ((n - 1).clamp(min=0) // 2).unsqueeze(1)
    hi = (n // 2).clamp(max=x.shape[1] - 1).unsqueeze(1)
    med = 0.5 * (s.gather(1, lo) + s.gather(1, hi)).squeeze(1)
    return torch.where(n > 0, med, torch.full_like(med, float("nan")))


def _shift_min(rep: torch.Tensor, big: int, conn8: bool) -> torch.Tensor:
    """Minimum of each pixel and its 4- or 8-neighbours (outside = ``big``)."""
    p = F.pad(rep, (1, 1, 1, 1), value=big)
    h, w = rep.shape[-2:]
    out = rep
    offs = [(0, 1), (1, 0), (1, 2), (2, 1)]
    if conn8:
        offs += [(0, 0), (0, 2), (2, 0), (2, 2)]
    for dy, dx in offs:
        out = torch.minimum(out, p[..., dy:dy + h, dx:dx + w])
    return out


def _runs(mask: torch.Tensor) -> torch.Tensor:
    """Id of the horizontal foreground run of every pixel (-1 for the background)."""
    n, h, w = mask.shape
    start = mask.clone()
    start[:, :, 1:] &= ~mask[:, :, :-1]
    rid = torch.cumsum(start.reshape(-1).to(torch.int64), 0).view(n, h, w) - 1
    return torch.where(mask, rid, torch.full_like(rid, -1))


def _run_min(rep: torch.Tensor, runs: torch.Tensor) -> torch.Tensor:
    """Each foreground pixel takes the minimum ``rep`` of its run (``runs`` from
    :func:`_runs`, possibly transposed: columns)."""
    fg = runs >= 0
    if not bool(fg.any()):
        return rep
    r = runs[fg]
    m = torch.full((int(r.max()) + 1,), torch.iinfo(torch.int64).max, dtype=torch.int64,
                   device=rep.device).scatter_reduce(0, r, rep[fg], reduce="amin")
    out = rep.clone()
    out[fg] = m[r]
    return out


def components(mask: torch.Tensor, conn8: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Connected components of (N, H, W) boolean masks.

    Returns
    -------
    rep : torch.Tensor
        int64 (N, H, W): for foreground pixels the smallest raster index (y·W + x) of their
        component, ``H·W`` for the background.
    labels : torch.Tensor
        int32 (N, H, W): 1..n per frame in raster order of each component's first pixel
        (:func:`scipy.ndimage.label`'s numbering), 0 for the background.
    """
    n, h, w = mask.shape
    size = h * w
    idx = torch.arange(size, device=mask.device, dtype=torch.int64).view(1, h, w)
    big = size
    rep = torch.where(mask, idx.expand(n, h, w), torch.full_like(idx, big).expand(n, h, w))
    sentinel = torch.full((n, 1), big, device=mask.device, dtype=torch.int64)
    row_runs = _runs(mask)
    col_runs = _runs(mask.transpose(1, 2)).view(n, w, h).transpose(1, 2)
    while True:
        new = torch.where(mask, _shift_min(rep, big, conn8), rep)
        new = _run_min(new, row_runs)
        new = _run_min(new, col_runs)
        flat = new.reshape(n, size)
        for _ in range(2):  # pointer jumping: follow the label to its own label
            ext = torch.cat([flat, sentinel], dim=1)
            flat = torch.minimum(flat, ext.gather(1, flat))
        new = flat.view(n, h, w)
        if torch.equal(new, rep):
            break
        rep = new
    root = mask & (rep == idx)
    num = torch.cumsum(root.reshape(n, size).to(torch.int32), dim=1)
    ext = torch.cat([num, torch.zeros((n, 1), device=mask.device, dtype=torch.int32)], dim=1)
    labels = ext.gather(1, rep.reshape(n, size)).view(n, h, w)
    return rep, torch.where(mask, labels, torch.zeros_like(labels))


def threshold_mask(phase: torch.Tensor, threshold: float, polarity: str = "above",
                   offset: str = "none") -> torch.Tensor:
    """Raw foreground masks of (N, H, W) images (NaN pixels are background)."""
    t = torch.full((phase.shape[0], 1, 1), float(threshold), device=phase.device,
                   dtype=phase.dtype)
    if offset == "median":
        flat = phase.reshape(phase.shape[0], -1)
        t = t + _np_median(flat, torch.isfinite(flat)).view(-1, 1, 1)
    return phase > t if polarity == "above" else phase < t


def fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """Fill background regions not 4-connected to the frame border (per frame)."""
    n, h, w = mask.shape
    rep, _ = components(~mask, conn8=False)
    size = h * w
    border = torch.zeros((n, size + 1), dtype=torch.bool, device=mask.device)
    edge = torch.zeros((h, w), dtype=torch.bool, device=mask.device)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
    r = rep[:, edge]
    border.scatter_(1, r, torch.ones_like(r, dtype=torch.bool))
    border[:, size] = False  # the foreground's own "label"
    outside = border.gather(1, rep.reshape(n, size)).view(n, h, w)
    return ~outside


def _disk_kernel(radius: int, device: Any) -> torch.Tensor:
    return torch.from_numpy(disk(radius).astype(np.float32)).to(device).view(1, 1, *disk(
        radius).shape)


def opening(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary opening with a disk; outside counts as foreground for the erosion and as
    background for the dilation (as :func:`leukoflow.acquisition.segment.opening`)."""
    if radius <= 0:
        return mask.clone()
    k = _disk_kernel(radius, mask.device)
    total = float(k.sum())
    x = mask.to(torch.float32).unsqueeze(1)
    er = F.conv2d(F.pad(x, (radius,) * 4, value=1.0), k) > total - 0.5
    di = F.conv2d(F.pad(er.to(torch.float32), (radius,) * 4, value=0.0), k) > 0.5
    return di.squeeze(1)


def clear_border(mask: torch.Tensor, edges: str) -> torch.Tensor:
    """Remove 8-connected objects touching the given edges (``tblr``)."""
    if not edges:
        return mask.clone()
    n, h, w = mask.shape
    rep, _ = components(mask, conn8=True)
    size = h * w
    edge = torch.zeros((h, w), dtype=torch.bool, device=mask.device)
    if "t" in edges:
        edge[0, :] = True
    if "b" in edges:
        edge[-1, :] = True
    if "l" in edges:
        edge[:, 0] = True
    if "r" in edges:
        edge[:, -1] = True
    touching = torch.zeros((n, size + 1), dtype=torch.bool, device=mask.device)
    r = rep[:, edge]
    touching.scatter_(1, r, torch.ones_like(r, dtype=torch.bool))
    touching[:, size] = False
    return mask & ~touching.gather(1, rep.reshape(n, size)).view(n, h, w)


def segment_batch(phase: torch.Tensor, *, threshold: float = 0.25, polarity: str = "above",
                  offset: str = "none", clear_border_edges: str = "", fill: bool = True,
                  opening_radius: int = 2, max_small_px: int = 10
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Threshold segmentation of (N, H, W) phase frames, as the ``thresh`` segmenter.

    Order: threshold -> clear border -> fill holes -> opening -> 8-connected labels ->
    drop objects of at most ``max_small_px`` pixels (relabelled 1..n in raster order).

    Returns
    -------
    labels : torch.Tensor
        int32 (N, H, W).
    counts : torch.Tensor
        int64 (N,) objects per frame.
    """
    m = threshold_mask(phase, threshold, polarity, offset)
    m = clear_border(m, clear_border_edges)
    if fill:
        m = fill_holes(m)
    if opening_radius > 0:
        m = opening(m, opening_radius)
    n, h, w = m.shape
    rep, _ = components(m, conn8=True)
    size = h * w
    flat = rep.reshape(n, size)
    sizes = torch.zeros((n, size + 1), dtype=torch.int64, device=m.device)
    sizes.scatter_add_(1, flat, torch.ones_like(flat))
    idx = torch.arange(size, device=m.device).view(1, size)
    root = (flat == idx) & (sizes[:, :size] > max_small_px)
    num = torch.cumsum(root.to(torch.int32), dim=1)
    keep = torch.cat([torch.where(root, num, torch.zeros_like(num)),
                      torch.zeros((n, 1), dtype=torch.int32, device=m.device)], dim=1)
    labels = keep.gather(1, flat).view(n, h, w)
    return labels, root.sum(dim=1)


# ------------------------------------------------------------------ measurement
@dataclass
class ObjectTable:
    """Per-object measurements of a batch (host arrays, one row per object).

    Rows are in frame order, then label order (label = 1 + position within its frame).
    """

    frame: np.ndarray  # batch position of the object's frame
    label: np.ndarray
    cy: np.ndarray
    cx: np.ndarray
    y0: np.ndarray
    x0: np.ndarray
    y1: np.ndarray  # exclusive
    x1: np.ndarray
    area: np.ndarray
    myy: np.ndarray
    mxx: np.ndarray
    mxy: np.ndarray
    hull: np.ndarray
    focus_sum: np.ndarray
    focus_n: np.ndarray
    amp_mean: np.ndarray
    amp_std: np.ndarray
    amp_bg: np.ndarray  # per object: its frame's background amplitude

    def __len__(self) -> int:
        return len(self.label)


def _prune_chain(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor,
                 left: bool) -> torch.Tensor:
    """Drop points of a row-extreme chain that cannot be convex-hull vertices.

    ``x, y``: (G, R) the leftmost (``left``) or rightmost pixel of each row, rows in
    increasing ``y``; a point on or inside the segment between its surviving neighbours
    lies in the hull of other points of the object (with its row's other extreme), so it
    is removed; repeated until nothing changes. The chain's ends are kept.
    """
    g, r = x.shape
    v = valid.clone()
    pos = torch.arange(r, device=x.device).expand(g, r)
    while True:
        prev = torch.cummax(torch.where(v, pos, torch.full_like(pos, -1)), dim=1).values
        prev = torch.cat([torch.full((g, 1), -1, device=x.device, dtype=prev.dtype),
                          prev[:, :-1]], dim=1)
        nxt = torch.where(v, pos, torch.full_like(pos, r)).flip(1)
        nxt = torch.cummin(nxt, dim=1).values.flip(1)
        nxt = torch.cat([nxt[:, 1:], torch.full((g, 1), r, device=x.device,
                                                dtype=nxt.dtype)], dim=1)
        inner = v & (prev >= 0) & (nxt < r)
        pa, na = prev.clamp(min=0), nxt.clamp(max=r - 1)
        ax, ay = x.gather(1, pa), y.gather(1, pa)
        bx, by = x.gather(1, na), y.gather(1, na)
        cross = (bx - ax) * (y - ay) - (by - ay) * (x - ax)
        drop = inner & ((cross <= 0) if left else (cross >= 0))
        if not bool(drop.any()):
            return v
        # drop only points whose neighbours stay (no two adjacent drops in one round)
        dpos = torch.where(drop, pos, torch.full_like(pos, -2))
        prev_drop = torch.cummax(torch.cat([torch.full((g, 1), -2, device=x.device,
                                                        dtype=dpos.dtype), dpos[:, :-1]],
                                           dim=1), dim=1).values
        drop &= ~((prev_drop >= 0) & (prev_drop == prev))
        v &= ~drop


def _hull_pixels(px: torch.Tensor, py: torch.Tensor, valid: torch.Tensor,
                 area: torch.Tensor) -> torch.Tensor:
    """Pixels of the convex hull of each object's candidate points (Pick's theorem).

    ``px, py``: (G, P) integer coordinates, ``valid``: (G, P). An ordered pair (i, j) is a
    hull edge when every point lies left of or on the line i->j and collinear points lie on
    the closed segment [i, j] (so only maximal edges count). Fewer than 3 edges (collinear
    points) gives ``area`` (as the CPU path's fallback).
    """
    g, p = px.shape
    out = torch.empty(g, dtype=torch.float64, device=px.device)
    step = max(1, HULL_CHUNK_ELEMENTS // max(p * p * p, 1))
    for s in range(0, g, step):
        x = px[s:s + step].to(torch.int64)
        y = py[s:s + step].to(torch.int64)
        v = valid[s:s + step]
        xi, yi = x[:, :, None, None], y[:, :, None, None]
        xj, yj = x[:, None, :, None], y[:, None, :, None]
        xk, yk = x[:, None, None, :], y[:, None, None, :]
        cross = (xj - xi) * (yk - yi) - (yj - yi) * (xk - xi)
        dot = (xk - xi) * (xj - xi) + (yk - yi) * (yj - yi)
        len2 = (xj - xi) ** 2 + (yj - yi) ** 2
        between = (dot >= 0) & (dot <= len2)
        ok = (cross > 0) | ((cross == 0) & between)
        ok = ok | ~v[:, None, None, :]
        edge = ok.all(dim=3) & v[:, :, None] & v[:, None, :]
        edge &= ~torch.eye(x.shape[1], dtype=torch.bool, device=x.device)[None]
        xi2, yi2 = x[:, :, None], y[:, :, None]
        xj2, yj2 = x[:, None, :], y[:, None, :]
        area2 = torch.where(edge, xi2 * yj2 - xj2 * yi2, torch.zeros_like(xi2 * yj2))
        bnd = torch.where(edge, torch.gcd((xj2 - xi2).abs(), (yj2 - yi2).abs()),
                          torch.zeros_like(xi2 * yj2))
        n_edges = edge.sum(dim=(1, 2))
        pick = area2.sum(dim=(1, 2)).abs().to(torch.float64) / 2.0 \
            + bnd.sum(dim=(1, 2)).to(torch.float64) / 2.0 + 1.0
        out[s:s + step] = torch.where(n_edges >= 3, pick, area[s:s + step].to(torch.float64))
    return out


def measure_batch(labels: torch.Tensor, counts: torch.Tensor, phase: torch.Tensor,
                  amplitude: torch.Tensor | None = None) -> ObjectTable:
    """Measure every object of a batch on the device; the table comes back to the host.

    Parameters
    ----------
    labels : torch.Tensor
        int32 (N, H, W) label images from :func:`segment_batch`.
    counts : torch.Tensor
        Objects per frame (N,).
    phase : torch.Tensor
        (N, H, W) phase [rad].
    amplitude : torch.Tensor, optional
        (N, H, W) background-normalised amplitude (focus gate).
    """
    dev = labels.device
    n, h, w = labels.shape
    counts = counts.to(torch.int64)
    offsets = torch.cumsum(counts, 0) - counts
    total = int(counts.sum())
    nz = torch.nonzero(labels, as_tuple=True)
    f, yy, xx = nz
    gid = offsets[f] + labels[nz].to(torch.int64) - 1
    dd = torch.float64

    def ssum(v: torch.Tensor) -> torch.Tensor:
        return torch.zeros(total, dtype=dd, device=dev).index_add_(0, gid, v.to(dd))

    def sred(v: torch.Tensor, how: str) -> torch.Tensor:
        init = torch.full((total,), (h + w) if how == "amin" else -1, dtype=torch.int64,
                          device=dev)
        return init.scatter_reduce(0, gid, v.to(torch.int64), reduce=how)

    ones = torch.ones_like(yy, dtype=dd)
    area = ssum(ones)
    sy, sx = ssum(yy), ssum(xx)
    cy, cx = sy / area, sx / area
    syy, sxx, sxy = ssum(yy * yy), ssum(xx * xx), ssum(xx * yy)
    myy = syy / area - cy * cy + 1.0 / 12.0
    mxx = sxx / area - cx * cx + 1.0 / 12.0
    mxy = sxy / area - cx * cy
    y0, y1 = sred(yy, "amin"), sred(yy, "amax") + 1
    x0, x1 = sred(xx, "amin"), sred(xx, "amax") + 1
    # focus: |grad exp(i phase)|² on pixels with a right and a lower neighbour
    ph = phase.to(torch.float32)
    zr, zi = torch.cos(ph), torch.sin(ph)
    gy = (zr[:, 1:, :-1] - zr[:, :-1, :-1]) ** 2 + (zi[:, 1:, :-1] - zi[:, :-1, :-1]) ** 2
    gx = (zr[:, :-1, 1:] - zr[:, :-1, :-1]) ** 2 + (zi[:, :-1, 1:] - zi[:, :-1, :-1]) ** 2
    gm = F.pad(gy + gx, (0, 1, 0, 1))
    inner = ((yy < h - 1) & (xx < w - 1)).to(dd)
    focus_sum = ssum(gm[nz].to(dd) * inner)
    focus_n = ssum(inner)
    # amplitude spread relative to the frame's background amplitude (sparse grid median)
    amp_bg_f = torch.full((n,), float("nan"), dtype=dd, device=dev)
    amp_mean = torch.full((total,), float("nan"), dtype=dd, device=dev)
    amp_std = amp_mean.clone()
    if amplitude is not None:
        sub_a = amplitude[:, ::4, ::4].reshape(n, -1)
        sub_l = labels[:, ::4, ::4].reshape(n, -1)
        amp_bg_f = _np_median(sub_a.to(torch.float32), sub_l == 0).to(dd)
        a = amplitude[nz].to(dd)
        am = ssum(a) / area
        amp_mean = am
        amp_std = torch.sqrt(torch.clamp(ssum(a * a) / area - am * am, min=0.0))
    # convex hull from each row's leftmost and rightmost pixel
    key = gid * h + yy
    big = torch.iinfo(torch.int64).max
    left = torch.full((total * h,), big, dtype=torch.int64, device=dev).scatter_reduce(
        0, key, xx.to(torch.int64), reduce="amin")
    right = torch.full((total * h,), -1, dtype=torch.int64, device=dev).scatter_reduce(
        0, key, xx.to(torch.int64), reduce="amax")
    hull = area.clone()
    if total:
        left, right = left.view(total, h), right.view(total, h)
        rowv = right >= 0
        maxr = int(rowv.sum(dim=1).max())
        # compact each object's rows to the front (stable), then 2 points per row
        order = torch.argsort((~rowv).to(torch.int8), dim=1, stable=True)[:, :maxr]
        rv = rowv.gather(1, order)
        ys = order
        lx, rx = left.gather(1, order), right.gather(1, order)
        lv = _prune_chain(lx, ys, rv, left=True)
        rvv = _prune_chain(rx, ys, rv, left=False) & (rx != lx)
        px = torch.cat([lx, rx], dim=1)
        py = torch.cat([ys, ys], dim=1)
        pv = torch.cat([lv, rvv], dim=1)
        # compact the surviving points to the front: the hull test is cubic in their number
        order = torch.argsort((~pv).to(torch.int8), dim=1, stable=True)
        keep = int(pv.sum(dim=1).max())
        px, py, pv = (t.gather(1, order)[:, :keep] for t in (px, py, pv))
        px = torch.where(pv, px, torch.zeros_like(px))
        py = torch.where(pv, py, torch.zeros_like(py))
        hull = _hull_pixels(px, py, pv, area)
    frame_of = torch.repeat_interleave(torch.arange(n, device=dev), counts)
    label_of = torch.arange(total, device=dev) - offsets[frame_of] + 1
    host = {k: v.detach().cpu().numpy() for k, v in dict(
        frame=frame_of, label=label_of, cy=cy, cx=cx, y0=y0, x0=x0, y1=y1, x1=x1,
        area=area, myy=myy, mxx=mxx, mxy=mxy, hull=hull, focus_sum=focus_sum,
        focus_n=focus_n, amp_mean=amp_mean, amp_std=amp_std).items()}
    amp_bg = amp_bg_f.detach().cpu().numpy()[host["frame"]] if total else np.zeros(0)
    return ObjectTable(amp_bg=amp_bg, **host)


def detections_from_table(table: ObjectTable, rows: np.ndarray, frame_index: int,
                          shape: tuple[int, int], pixel_um: float,
                          labels_host: Any = None, neck_px: float = 2.5,
                          peak_min_distance_px: int = 4, solidity_check: float = 0.95
                          ) -> list[Detection]:
    """The :class:`Detection` objects of one frame from its rows of ``table``.

    Same values as :func:`leukoflow.acquisition.features.measure_objects`; the
    distance-map peak test of objects with a solidity below ``solidity_check`` needs that
    frame's labels on the host (``labels_host``: an (H, W) array or a callable returning
    it).
    """
    h, w = shape
    px2 = pixel_um * pixel_um
    out: list[Detection] = []
    lab_img = None
    for r in rows:
        area = int(table.area[r])
        myy, mxx, mxy = float(table.myy[r]), float(table.mxx[r]), float(table.mxy[r])
        tr, det = myy + mxx, myy * mxx - mxy * mxy
        disc = math.sqrt(max(tr * tr / 4.0 - det, 0.0))
        l1, l2 = tr / 2.0 + disc, tr / 2.0 - disc
        ecc = math.sqrt(max(1.0 - l2 / l1, 0.0)) if l1 > 0 else 0.0
        hull = float(table.hull[r])
        solidity = min(area / hull, 1.0) if hull > 0 else 1.0
        fn = float(table.focus_n[r])
        focus = float(table.focus_sum[r]) / fn / px2 if fn > 0 else 0.0
        amp_std = float("nan")
        bg = float(table.amp_bg[r])
        if np.isfinite(bg) and bg > 0 and np.isfinite(table.amp_std[r]):
            amp_std = float(table.amp_std[r]) / bg
        y0, y1, x0, x1 = (int(table.y0[r]), int(table.y1[r]), int(table.x0[r]),
                          int(table.x1[r]))
        lab = int(table.label[r])
        n_peaks = 1
        if solidity < solidity_check:
            if lab_img is None:
                lab_img = labels_host() if callable(labels_host) else labels_host
            wy0, wy1 = max(y0 - 1, 0), min(y1 + 1, h)
            wx0, wx1 = max(x0 - 1, 0), min(x1 + 1, w)
            sub = np.asarray(lab_img[wy0:wy1, wx0:wx1]) == lab
            edt = ndi.distance_transform_edt(np.pad(sub, 1))[1:-1, 1:-1]
            n_peaks = _count_peaks(edt, sub, neck_px, peak_min_distance_px)
        touch = ("t" if y0 == 0 else "") + ("b" if y1 == h else "") + \
            ("l" if x0 == 0 else "") + ("r" if x1 == w else "")
        out.append(Detection(
            label=lab, frame=frame_index, cy=float(table.cy[r]), cx=float(table.cx[r]),
            bbox=(y0, x0, y1 - y0, x1 - x0), area_px=area, area_um=area * px2,
            diameter_um=2.0 * math.sqrt(area * px2 / math.pi), eccentricity=ecc,
            solidity=solidity, n_peaks=n_peaks, focus=focus, amp_std=amp_std, touch=touch))
    return out


# ------------------------------------------------------------------ the batched pipeline
class BatchedPipeline(AcquisitionPipeline):
    """:class:`~leukoflow.acquisition.pipeline.AcquisitionPipeline` whose per-pixel work runs
    on a torch device a batch of frames at a time (:meth:`process_batch`).

    Reconstruction (torch backend of the reconstructor), phase and amplitude, segmentation
    and the measurement of every object run on ``device``; the object tables, and the phase,
    amplitude and label frames the host needs for splitting touching cells and for the crops
    of candidate instances, come back in one transfer per batch; the quality gates, splits,
    tracker and crops then run per frame exactly as on the CPU path. Single frames
    (:meth:`process`) go through the same code as a batch of one.

    Parameters
    ----------
    config, background, optics
        As :class:`~leukoflow.acquisition.pipeline.AcquisitionPipeline`.
    device : str
        Torch device ("cuda", "cuda:1", "cpu").
    """

    def __init__(self, config: Any = None, *, background: Any = None, optics: Any = None,
                 device: str = "cuda") -> None:
        self.device = torch.device(device)
        super().__init__(config, optics=optics or DEFAULT_OPTICS)
        # the empty-frame prescreen saves CPU time; on the device every frame is processed
        self.prescreen_config = self.prescreen_config.__class__(
            **{**self.prescreen_config.to_dict(), "enabled": False})
        seg = self.segmenter.params
        self._seg_kw = None
        if getattr(self.segmenter, "registry_name", "") == "thresh":
            self._seg_kw = {"threshold": seg["threshold"], "polarity": seg["polarity"],
                            "offset": seg["offset"],
                            "clear_border_edges": seg["clear_border_edges"],
                            "fill": seg["fill_holes"], "opening_radius": seg["opening_radius"],
                            "max_small_px": seg["max_small_px"]}
        self._pending: dict[int, tuple[Any, list[Detection]]] = {}
        self.batch_stats: dict[str, float] = {"batches": 0, "frames": 0, "device_s": 0.0}
        if background is not None:
            self.set_background(background)

    def _make_reconstructor(self, background: Any) -> Any:
        rc = self.config.reconstruct
        if rc.camera_pixel_um is None:
            rc = replace(rc, camera_pixel_um=self.optics.camera_pixel_um)
        rc = replace(rc, backend="torch", device=str(self.device))
        return Reconstructor(rc, background=background)

    @property
    def params(self) -> dict[str, Any]:
        d = super().params
        d["device"] = {"device": str(self.device), "batched": True,
                       "segmentation": "device" if self._seg_kw else "host"}
        return d

    # -------------------------------------------------------------- frames
    def process(self, raw: Any) -> Any:
        """One frame (a batch of one)."""
        return self.process_batch([raw])[0]

    def _detect(self, index: int, phase: np.ndarray, amplitude: np.ndarray | None) -> Any:
        pre = self._pending.pop(index, None)
        if pre is not None:
            return pre
        return super()._detect(index, phase, amplitude)

    def process_batch(self, raws: list) -> list:
        """Process frames on the device in one batch; one result per frame, in order."""
        if self.reconstructor is None:
            raise RuntimeError("no background hologram: call set_background() first")
        results: list[Any] = [None] * len(raws)
        ok: list[int] = []
        for i, raw in enumerate(raws):
            reason = self.validator.check(raw.image)
            if reason is not None:
                self.stats["frames_rejected"][reason] += 1
                results[i] = FrameResult(raw.index, {"t_acq": raw.t_acq_ns},
                                         frame_reject=reason)
            else:
                ok.append(i)
        if not ok:
            return results
        t0 = time.monotonic_ns()
        stack = np.stack([raws[i].image for i in ok])
        x = torch.from_numpy(stack)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        try:
            fld = self.reconstructor.field(x, to_numpy=False)
        except ValueError:
            for i in ok:
                self.stats["frames_rejected"]["reconstruct"] += 1
                results[i] = FrameResult(raws[i].index, {"t_acq": raws[i].t_acq_ns},
                                         frame_reject="reconstruct")
            return results
        if fld.ndim == 2:
            fld = fld[None]
        phase = torch.angle(fld).to(torch.float32)
        amp = torch.abs(fld).to(torch.float32)
        finite = torch.isfinite(phase).flatten(1).all(dim=1)
        if self._seg_kw is not None:
            labels, counts = segment_batch(phase, **self._seg_kw)
            table = measure_batch(labels, counts, phase, amp)
            labels_h = labels.cpu().numpy()
            counts_h = counts.cpu().numpy()
        phase_h = phase.cpu().numpy()
        amp_h = amp.cpu().numpy()
        finite_h = finite.cpu().numpy()
        t1 = time.monotonic_ns()
        self.stage_ns["recon"] += t1 - t0
        self.batch_stats["batches"] += 1
        self.batch_stats["frames"] += len(ok)
        self.batch_stats["device_s"] += (t1 - t0) / 1e9
        for j, i in enumerate(ok):
            raw = raws[i]
            if not finite_h[j]:
                self.stats["frames_rejected"]["non_finite"] += 1
                results[i] = FrameResult(raw.index, {"t_acq": raw.t_acq_ns},
                                         frame_reject="non_finite")
                continue
            if self._seg_kw is not None:
                rows = np.flatnonzero(table.frame == j)
                dets = detections_from_table(table, rows, raw.index, phase_h.shape[1:],
                                             self.pixel_um, labels_host=labels_h[j])
                self._pending[raw.index] = (Segmentation(labels_h[j], int(counts_h[j])), dets)
            results[i] = self.process_phase(raw.index, phase_h[j], amplitude=amp_h[j],
                                            t_acq_ns=raw.t_acq_ns, truth=raw.truth,
                                            origin=raw.origin, _t_recon=t1)
            self._pending.pop(raw.index, None)
        return results
