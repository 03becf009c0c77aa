"""Physical descriptors of a phase crop, computed next to the network (no learned weights).

A CNN trained on four leukocyte classes has no reason to encode quantities that never
separate those classes, such as the mean refractive index of a cell. A spherocyte
(homogeneous haemoglobin sphere, 6-7 µm, Δn ≈ 0.05) and a small lymphocyte (≈ 8 µm,
Δn ≈ 0.03 with a denser nucleus) give nearly the same learned features, so feature-space
OOD detectors miss it, although quantitative phase measures the difference directly. This
module computes a handful of such quantities from the crop itself, inside the model graph
(so ONNX, TensorRT and the CUDA backend carry them without extra code), and
:class:`leukoflow.models.architectures.PhaseCNN` appends them to the ``features`` output. They feed
the ``descriptors`` and ``combined`` OOD detectors (``leukoflow.models.ood.descriptor_based``); the
classifier never sees them.

Descriptors (columns, in this order; ``A`` = object area, ``V`` = integrated phase over the
object, ``φ_max`` = peak phase, ``r_eq = sqrt(A / π)``):

===================== ============================================= ==========================
name                  definition                                    unit inside the log
===================== ============================================= ==========================
log_area              ln A                                          µm²
log_phase_volume      ln V                                          rad·µm²
log_peak              ln φ_max                                      rad
log_density           ln V - 1.5 ln A                               rad/µm
log_peak_per_diameter ln φ_max - 0.5 ln A                           rad/µm
centre_to_peak        mean φ within 0.3 r_eq of the centroid / φ_max  1
rim_to_peak           mean φ within 0.5-0.8 r_eq / φ_max              1
===================== ============================================= ==========================

For a homogeneous sphere of diameter ``d`` and refractive-index increment ``Δn`` at wave
number ``k0 = 2π/λ``: ``V = k0 Δn π d³ / 6`` and ``A = π d² / 4``, so
``exp(log_density) = 4 k0 Δn / (3 sqrt(π)) ≈ 0.752 k0 Δn``: a dry-mass density (mean
refractive index) estimate that needs no model of the cell (:func:`density_to_delta_n`).

The object is the set of pixels above ``max(threshold_rad, rel_threshold · φ_max)`` (with a
linear ramp of width ``edge_rad``: a soft mask); its phase-weighted centroid centres the
radial bands (also soft-edged). Empty or flat crops give finite values
(clamped at ``eps``), never NaN.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

NAMES: tuple[str, ...] = ("log_area", "log_phase_volume", "log_peak", "log_density",
                          "log_peak_per_diameter", "centre_to_peak", "rim_to_peak")
"""Descriptor names, in column order."""

#: exp(log_density) / (k0 Δn) for a homogeneous sphere: 4 / (3 sqrt(pi)).
SPHERE_DENSITY_FACTOR = 4.0 / (3.0 * math.sqrt(math.pi))


@dataclass(frozen=True)
class DescriptorConfig:
    """Declarative parameters of :class:`PhaseDescriptors` (recorded in the artifact card).

    Parameters
    ----------
    threshold_rad : float
        Absolute object threshold [rad].
    rel_threshold : float
        Relative object threshold, fraction of the crop's peak phase.
    centre_radius : float
        Radius of the centre disc, in units of the equivalent radius ``r_eq``.
    rim_band : tuple of float
        Inner and outer radius of the rim band, in units of ``r_eq``.
    edge_rad : float
        Width of the linear ramp of the object mask around the threshold [rad].
    edge_r : float
        Width of the linear ramps of the centre disc and rim band, in units of ``r_eq``.
        Soft edges make every descriptor a continuous function of the crop, so a pixel
        near a boundary cannot flip it (ONNX Runtime, TensorRT and PyTorch agree to
        float rounding, and a one-pixel shift moves a descriptor by a little).
    eps : float
        Floor of areas [µm²], phase volumes [rad·µm²] and peak phases [rad] before logs.
    """

    threshold_rad: float = 0.15
    rel_threshold: float = 0.1
    centre_radius: float = 0.3
    rim_band: tuple[float, float] = (0.5, 0.8)
    edge_rad: float = 0.05
    edge_r: float = 0.1
    eps: float = 1e-3

    def __post_init__(self) -> None:
        lo, hi = (float(v) for v in self.rim_band)
        object.__setattr__(self, "rim_band", (lo, hi))
        if not (self.threshold_rad >= 0 and 0 <= self.rel_threshold < 1
                and self.centre_radius > 0 and 0 <= lo < hi and self.eps > 0
                and self.edge_rad > 0 and self.edge_r > 0):
            raise ValueError(f"invalid descriptor parameters: {self}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able parameters."""
        d = asdict(self)
        d["rim_band"] = list(self.rim_band)
        return d


class PhaseDescriptors(nn.Module):
    """``(N, 1, H, W)`` normalised crops -> ``(N, 7)`` float32 descriptors (:data:`NAMES`).

    Parameters
    ----------
    in_size : int
        Crop side length [px].
    mean, std : float
        Input normalisation of the model (``x_norm = (phase_rad - mean) / std``).
    pixel_um : float
        Pixel size in the object plane [µm].
    config : DescriptorConfig, optional
        Thresholds and radial bands.
    """

    def __init__(self, in_size: int, mean: float, std: float, pixel_um: float,
                 config: DescriptorConfig | None = None) -> None:
        super().__init__()
        if not (std > 0 and pixel_um > 0 and in_size > 0):
            raise ValueError("std, pixel_um and in_size must be positive")
        self.config = config or DescriptorConfig()
        self.mean, self.std, self.pixel_um = float(mean), float(std), float(pixel_um)
        n = int(in_size)
        # pixel coordinates in units of the crop half-width, in [-1, 1]: with means instead
        # of sums below every intermediate stays O(phase), so FP16 engines cannot overflow
        idx = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2) / (n / 2)
        self.half_width = n / 2
        self.n_pixels = n * n
        # not persistent: the weights file of a model does not change when descriptors are on
        self.register_buffer("yy", idx[:, None].expand(n, n).clone(), persistent=False)
        self.register_buffer("xx", idx[None, :].expand(n, n).clone(), persistent=False)

    @property
    def n_out(self) -> int:
        """Number of descriptors (7)."""
        return len(NAMES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Descriptors of normalised crops ``x`` ``(N, 1, H, W)``, float32 ``(N, 7)``."""
        c = self.config
        p = x[:, 0].float() * self.std + self.mean                       # rad
        peak = p.amax(dim=(1, 2)).clamp_min(c.eps)
        thr = (peak * c.rel_threshold).clamp_min(c.threshold_rad)
        m = ((p - thr[:, None, None]) / c.edge_rad + 0.5).clamp(0.0, 1.0)
        w = p * m
        frac = m.mean(dim=(1, 2))                                        # object share of crop
        mean_w = w.mean(dim=(1, 2)).clamp_min(c.eps / (self.n_pixels * self.pixel_um ** 2))
        cy = (w * self.yy).mean(dim=(1, 2)) / mean_w
        cx = (w * self.xx).mean(dim=(1, 2)) / mean_w
        # equivalent radius in half-width units: pi r^2 = frac * (2 * half_width)^2 px^2
        r_eq = torch.sqrt(frac.clamp_min(1.0 / self.n_pixels) * 4.0 / math.pi)
        r = torch.sqrt((self.yy - cy[:, None, None]) ** 2
                       + (self.xx - cx[:, None, None]) ** 2) / r_eq[:, None, None]
        e = c.edge_r
        centre = ((c.centre_radius - r) / e + 0.5).clamp(0.0, 1.0)
        rim = (((r - c.rim_band[0]) / e + 0.5).clamp(0.0, 1.0)
               * ((c.rim_band[1] - r) / e + 0.5).clamp(0.0, 1.0))
        phi_c = (p * centre).mean(dim=(1, 2)) / centre.mean(dim=(1, 2)).clamp_min(
            1.0 / self.n_pixels)
        phi_r = (p * rim).mean(dim=(1, 2)) / rim.mean(dim=(1, 2)).clamp_min(1.0 / self.n_pixels)
        crop_um2 = self.n_pixels * self.pixel_um ** 2
        log_a = torch.log((frac * crop_um2).clamp_min(c.eps))
        log_v = torch.log(mean_w * crop_um2)
        log_peak = torch.log(peak)
        return torch.stack([log_a, log_v, log_peak, log_v - 1.5 * log_a,
                            log_peak - 0.5 * log_a, phi_c / peak, phi_r / peak], dim=1)

    def extra_repr(self) -> str:
        return (f"mean={self.mean:.4g}, std={self.std:.4g}, pixel_um={self.pixel_um:.4g}, "
                f"{self.config}")


def density_to_delta_n(log_density: float, wavelength_um: float) -> float:
    """Mean refractive-index increment Δn of a homogeneous sphere from ``log_density``.

    Parameters
    ----------
    log_density : float
        The ``log_density`` descriptor, ln(rad/µm).
    wavelength_um : float
        Illumination wavelength in the medium's reference [µm] (``k0 = 2π/λ``).
    """
    k0 = 2.0 * math.pi / float(wavelength_um)
    return math.exp(float(log_density)) / (SPHERE_DENSITY_FACTOR * k0)


def describe(x_rad: Any, pixel_um: float, config: DescriptorConfig | None = None) -> Any:
    """Descriptors of phase crops in rad, ``(N, H, W)`` -> numpy ``(N, 7)`` (CPU, float32)."""
    import numpy as np

    x = np.asarray(x_rad, dtype=np.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[1] != x.shape[2]:
        raise ValueError(f"expected square (N, H, W) crops, got {x.shape}")
    mod = PhaseDescriptors(x.shape[-1], 0.0, 1.0, pixel_um, config)
    with torch.no_grad():
        return mod(torch.from_numpy(x)[:, None]).numpy()
