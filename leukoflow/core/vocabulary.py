"""The instrument's vocabulary: class, OOD-kind and decision names, the per-cell feature
table (one source for each).

Every stage and the application import these names from here; nothing restates them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CLASS_NAMES: tuple[str, ...] = ("neutrophil", "eosinophil", "monocyte", "lymphocyte")
"""Leukocyte class names in model output order (same order as the PBC real-data set)."""

SCORE_FEATURES: tuple[str, ...] = ("ml_score_neu", "ml_score_eos", "ml_score_mon", "ml_score_lym")
"""dclab feature names carrying the calibrated class probabilities, in CLASS_NAMES order."""

OOD_KINDS: tuple[str, ...] = (
    "erythrocyte", "platelet", "debris", "doublet", "defocus", "digit", "noise",
)
"""Out-of-distribution object kinds produced by the simulated instrument."""

DECISIONS: tuple[str, ...] = ("counted", "uncertain", "ood")
"""Per-cell decisions of the worker, in the order used by metrics and recordings."""


@dataclass(frozen=True)
class Feature:
    """One per-cell feature of the acquisition and where a recording keeps it.

    Attributes
    ----------
    name : str
        Name in the ``feat`` map of wire ``crops`` messages (acquisition's name).
    unit : str
        Unit of the acquisition's value (``""``: dimensionless).
    label : str
        Human-readable description (shown by ``leukoflow info`` and registered with dclab
        for the features dclab does not define).
    dclab : str
        dclab feature name of the same quantity (``""``: dclab defines none; the recording
        keeps the values under :attr:`stored` = ``lf_<name>``, see :data:`EXTRA_PREFIX`).
    convert : str
        ``identity`` (same quantity and unit as dclab's) or ``reciprocal`` (dclab's
        feature is 1 / the acquisition's, e.g. ``area_ratio`` = 1 / ``solidity``).
    """

    name: str
    unit: str
    label: str
    dclab: str = ""
    convert: str = "identity"

    @property
    def stored(self) -> str:
        """Feature name in ``.rtdc`` recordings (dclab's, else ``lf_<name>``)."""
        return self.dclab or EXTRA_PREFIX + self.name

    def to_stored(self, values: Any) -> Any:
        """Acquisition values -> values as stored (same for ``identity``)."""
        return _CONVERT[self.convert](values)

    def from_stored(self, values: Any) -> Any:
        """Stored values -> acquisition values (both conversions are their own inverse)."""
        return _CONVERT[self.convert](values)


def _reciprocal(v: Any) -> Any:
    if isinstance(v, int | float):
        return 1.0 / v if v else math.inf
    return 1.0 / v  # a float array: elementwise (no numpy import here: the CLI's --help)


_CONVERT: dict[str, Callable[[Any], Any]] = {"identity": lambda v: v, "reciprocal": _reciprocal}

#: Prefix of the recording features dclab does not define (``lf_pha_max``, ...). dclab skips
#: unknown features; ``dclab.register_temporary_feature(name, label)`` before opening the
#: file makes them readable (names and labels: ``user:extra_features`` of the file).
EXTRA_PREFIX = "lf_"

#: Every per-cell feature the acquisition publishes, in publishing order: the one table the
#: acquisition (``leukoflow.acquisition.features``/``publisher``), the recorder and replay
#: read. dclab names were checked against ``dclab.dfn.scalar_feature_names`` and
#: ``dclab.dfn.get_feature_label`` (dclab 0.73): a dclab name is used only where dclab's
#: quantity and unit are the acquisition's.
FEATURES: tuple[Feature, ...] = (
    Feature("area_um", "µm²", "Area of the cell mask", "area_um"),
    Feature("diameter_um", "µm", "Equivalent-circle diameter 2·sqrt(area/π)"),
    Feature("eccentricity", "", "Eccentricity of the mask's second-moment ellipse",
            "eccentr_prnc"),
    Feature("solidity", "", "Mask area / convex-hull area (recorded as area_ratio = 1/solidity)",
            "area_ratio", "reciprocal"),
    Feature("focus", "rad²/µm²", "Sharpness: mean squared phase gradient inside the mask"),
    Feature("amp_std", "", "Amplitude std inside the mask / background amplitude"),
    Feature("pos_x", "µm", "Phase-weighted centroid along the channel axis", "pos_x"),
    Feature("pos_y", "µm", "Phase-weighted centroid across the channel", "pos_y"),
    Feature("dm_pg", "pg", "Dry mass", "qpi_dm"),
    Feature("pha_mean", "rad", "Mean phase inside the mask"),
    Feature("pha_max", "rad", "Maximum phase inside the mask"),
    Feature("pha_int", "rad", "Integrated phase (sum over the mask's pixels)", "qpi_pha_int"),
    Feature("refocus_um", "µm", "Focus distance: propagation that brings the cell into focus "
            "(transport of intensity)", "qpi_focus"),
)
"""The acquisition's per-cell features (see :class:`Feature`)."""

FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
"""Acquisition feature names in publishing order."""

FEATURES_BY_NAME: dict[str, Feature] = {f.name: f for f in FEATURES}
"""Acquisition name -> :class:`Feature`."""

FEATURES_BY_STORED: dict[str, Feature] = {f.stored: f for f in FEATURES}
"""Recording feature name (dclab's or ``lf_<name>``) -> :class:`Feature`."""
