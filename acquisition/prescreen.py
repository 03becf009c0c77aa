"""Empty-frame prescreen: skip reconstruction and segmentation of frames that hold no object.

At the working densities most camera frames hold no object (at 0.3 objects per field of view
about three frames in four). A phase object shifts the hologram's fringes where it lies, so
the raw frame differs from the background hologram there by up to the fringe amplitude,
while elsewhere only camera noise differs. :class:`EmptyFramePrescreen` compares the frame
with the background on a sparse lattice of camera pixels, in blocks:

* the lattice strides (rows, cols) are chosen at calibration from the off-axis carrier so
  that the samples of every block see the fringe at evenly spread phases (first and second
  harmonic of the carrier phase average out over a block): a phase step then raises the
  block's mean squared difference by ``B²·(1 − cos φ)`` (``B`` the fringe amplitude)
  whatever the fringe phase at the object;
* per block the variance of (frame − background) is computed (the block mean is removed,
  so slow illumination changes do not count);
* a frame holds an object when a block's variance exceeds ``factor`` × the frame's median
  block variance (the camera-noise floor, measured on every frame) plus ``floor``.

A frame is skipped only when no block is above the threshold; the caller also processes
every frame while a track is open, so the prescreen only has to see each object once, when
it enters. Skipping must not lose cells: every ``audit_every``-th skipped frame is
processed in full anyway and a frame in which the full pipeline finds an object is counted
as a miss (``audit_missed``; exported and alerted on).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PrescreenConfig:
    """Parameters of the empty-frame prescreen.

    Attributes
    ----------
    enabled : bool
        Skip frames the prescreen finds empty.
    factor : float
        A block holds an object when its variance of (frame − background) exceeds
        ``factor`` × the median block variance of the frame (camera noise) [1].
    floor : float
        Added to the threshold [counts²] (quantisation of nearly noise-free cameras).
    block : int
        Block side [lattice samples].
    audit_every : int
        Process every n-th skipped frame in full anyway and count the frames in which the
        full pipeline finds an object (0 = no audit).
    max_stride : int
        Largest lattice stride tried [camera px].
    """

    enabled: bool = True
    factor: float = 4.0
    floor: float = 1.0
    block: int = 8
    audit_every: int = 64
    max_stride: int = 4

    def to_dict(self) -> dict:
        """Plain dict (for metadata)."""
        return asdict(self)


def carrier_spread(carrier: tuple[float, float], stride: tuple[int, int],
                   block: int) -> float:
    """How unevenly a block of lattice samples sees the fringe phase (0 = evenly).

    The largest modulus of the mean of ``exp(i·k·θ)`` (k = 1, 2) over the ``block``² samples
    of a block with strides ``stride`` [camera px], θ the carrier phase 2π(fy·y + fx·x) for
    ``carrier`` = (fy, fx) [cycles/camera px].
    """
    fy, fx = carrier
    sy, sx = stride
    yy, xx = np.meshgrid(np.arange(block) * sy, np.arange(block) * sx, indexing="ij")
    theta = 2 * np.pi * (fy * yy + fx * xx)
    return float(max(abs(np.exp(1j * k * theta).mean()) for k in (1, 2)))


def choose_stride(carrier: tuple[float, float], block: int, max_stride: int = 4,
                  max_spread: float = 0.2) -> tuple[int, int]:
    """Sparsest lattice (largest stride product) whose blocks see evenly spread phases.

    Falls back to (1, 1) (every pixel) when no stride up to ``max_stride`` qualifies.
    """
    best = (1, 1)
    for sy in range(1, max_stride + 1):
        for sx in range(1, max_stride + 1):
            if sy * sx <= best[0] * best[1]:
                continue
            if carrier_spread(carrier, (sy, sx), block) <= max_spread:
                best = (sy, sx)
    return best


class EmptyFramePrescreen:
    """Decide cheaply whether a raw hologram frame can hold an object.

    Parameters
    ----------
    config : PrescreenConfig
        Parameters.
    background : numpy.ndarray
        Background hologram (rows, cols) [counts].
    carrier : tuple[float, float]
        Off-axis carrier (rows, cols) [cycles/camera px] (the detected sideband).

    Attributes
    ----------
    stride : tuple[int, int]
        Lattice strides (rows, cols) [camera px].
    stats : collections.Counter
        ``checked``, ``empty``, ``objects``, ``audited``, ``audit_missed``.
    """

    def __init__(self, config: PrescreenConfig, background: np.ndarray,
                 carrier: tuple[float, float]) -> None:
        self.config = c = config
        bg = np.asarray(background, dtype=np.float32)
        if bg.ndim != 2:
            raise ValueError(f"background must be 2-D, got shape {bg.shape}")
        self.shape = bg.shape
        self.carrier = (float(carrier[0]), float(carrier[1]))
        self.stride = choose_stride(self.carrier, c.block, c.max_stride)
        sy, sx = self.stride
        b = c.block
        ny = (bg.shape[0] // sy) // b
        nx = (bg.shape[1] // sx) // b
        if ny < 1 or nx < 1:
            raise ValueError(f"frame {bg.shape} too small for blocks of {b} samples at "
                             f"stride {self.stride}")
        self._rows = slice(0, ny * b * sy, sy)
        self._cols = slice(0, nx * b * sx, sx)
        self._grid = (ny, b, nx, b)
        self._bg = np.ascontiguousarray(bg[self._rows, self._cols])
        self.stats: Counter = Counter(dict.fromkeys(
            ("checked", "empty", "objects", "audited", "audit_missed"), 0))
        self.last_threshold = 0.0
        self.last_max = 0.0

    @property
    def params(self) -> dict[str, Any]:
        """Every parameter (recorded with the data)."""
        return {**self.config.to_dict(), "stride": list(self.stride),
                "carrier": list(self.carrier),
                "spread": carrier_spread(self.carrier, self.stride, self.config.block)}

    def _block_sum(self, d: np.ndarray) -> np.ndarray:
        ny, b, nx, _ = self._grid
        return d.reshape(ny, b, nx * b).sum(axis=1).reshape(ny, nx, b).sum(axis=2)

    def block_variance(self, image: np.ndarray) -> np.ndarray:
        """Variance of (frame − background) per block [counts²], shape (ny, nx)."""
        d = np.subtract(image[self._rows, self._cols], self._bg, dtype=np.float32)
        n = float(self.config.block ** 2)
        m = self._block_sum(d) / n
        np.square(d, out=d)
        return self._block_sum(d) / n - m * m

    def has_object(self, image: np.ndarray) -> bool:
        """True when some block of ``image`` differs from the background beyond noise."""
        v = self.block_variance(image).ravel()
        k = v.size // 2
        med = float(np.partition(v, k)[k])
        thr = self.config.factor * med + self.config.floor
        vmax = float(v.max())
        self.last_threshold, self.last_max = thr, vmax
        self.stats["checked"] += 1
        hit = vmax > thr
        self.stats["objects" if hit else "empty"] += 1
        return hit

    def audit_due(self) -> bool:
        """True when the current empty frame is to be processed in full (audit)."""
        n = self.config.audit_every
        return n > 0 and self.stats["empty"] % n == 0

    def audit(self, found_object: bool) -> None:
        """Record the outcome of an audited frame."""
        self.stats["audited"] += 1
        if found_object:
            self.stats["audit_missed"] += 1
