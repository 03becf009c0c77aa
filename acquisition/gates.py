"""Quality gates: reject detections that cannot give a good single-cell crop.

Each gate sets :attr:`Detection.reason` to one of :data:`REJECT_REASONS`; the first failing
gate (in that order) wins. Counting happens per *cell* in the tracker (a cell is rejected
when none of its instances passed), and per detection in :class:`GateCounter`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from leukoflow.acquisition.features import Detection

#: Rejection reasons, in evaluation order.
REJECT_REASONS: tuple[str, ...] = (
    "too_small", "too_large", "channel_border", "doublet", "out_of_focus",
)


@dataclass(frozen=True)
class GateConfig:
    """Thresholds of the quality gates.

    Attributes
    ----------
    min_area_um : float
        Smallest accepted mask area [µm²] (platelets, debris below). 7 µm² ≈ 3 µm disc.
    max_area_um : float
        Largest accepted mask area [µm²] (a 20 µm disc is 314 µm²).
    reject_channel_border : bool
        Reject objects touching the top or bottom edge (the channel walls).
    min_solidity : float
        Smallest accepted area / convex-hull area (doublets are concave).
    max_peaks : int
        Largest accepted number of separated phase maxima (2 = doublet).
    max_eccentricity : float
        Largest accepted eccentricity (two touching cells are elongated).
    max_amp_std : float
        Largest accepted relative amplitude std inside the mask (defocus fringes);
        ignored when no amplitude is available. In-focus simulated cells give ~0.01, cells
        4–15 µm out of focus 0.11–0.23, so 0.06 separates them (raise it to pass defocused
        objects on to the OOD detector instead).
    min_focus : float
        Smallest accepted mean squared phase gradient [rad²/µm²]; 0 disables it.
    """

    min_area_um: float = 7.0
    max_area_um: float = 320.0
    reject_channel_border: bool = True
    min_solidity: float = 0.85
    max_peaks: int = 1
    max_eccentricity: float = 0.92
    max_amp_std: float = 0.06
    min_focus: float = 0.0

    def to_dict(self) -> dict:
        """Plain dict (for metadata)."""
        return asdict(self)


class QualityGates:
    """Apply :class:`GateConfig` to detections.

    Parameters
    ----------
    config : GateConfig
        Thresholds.
    """

    def __init__(self, config: GateConfig | None = None) -> None:
        self.config = config or GateConfig()

    def reason(self, det: Detection) -> str | None:
        """First failing gate for ``det`` (None = accepted)."""
        c = self.config
        if det.area_um < c.min_area_um:
            return "too_small"
        if det.area_um > c.max_area_um:
            return "too_large"
        if c.reject_channel_border and det.touches_channel_wall:
            return "channel_border"
        # shape and focus tests are meaningless for objects cut by the entry/exit edge
        if not det.touches_flow_edge and (
            det.solidity < c.min_solidity
            or det.n_peaks > c.max_peaks
            or det.eccentricity > c.max_eccentricity
        ):
            return "doublet"
        if det.touches_flow_edge:
            return None  # focus metrics ring at the frame edge; the tracker skips it anyway
        if np.isfinite(det.amp_std) and det.amp_std > c.max_amp_std:
            return "out_of_focus"
        if c.min_focus > 0 and det.focus < c.min_focus:
            return "out_of_focus"
        return None

    def apply(self, dets: Iterable[Detection]) -> list[Detection]:
        """Set ``reason`` on every detection in place; return them as a list."""
        out = list(dets)
        for d in out:
            d.reason = self.reason(d)
        return out


class GateCounter(Counter):
    """Counts of gate outcomes per detection (``accepted`` or a reason)."""

    def add(self, dets: Iterable[Detection]) -> None:
        """Count the outcome of each detection."""
        for d in dets:
            self[d.reason or "accepted"] += 1
