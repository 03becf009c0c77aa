"""Parameters of the simulated QPI flow instrument (one dataclass, recorded with the data).

The optical geometry comes from :class:`leukoflow.core.physics.Optics`; everything else that
shapes the simulated data (class mix, OOD mix, flow, camera, background artefacts) lives in
:class:`SimConfig`. ``SimConfig.to_dict()`` gives a JSON-safe dict for ``pipeline:``
metadata, so every run and dataset records the parameters it was made with.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from leukoflow.core.jsonutil import json_safe
from leukoflow.core.physics import DEFAULT_OPTICS, Optics
from leukoflow.core.vocabulary import CLASS_NAMES, OOD_KINDS

#: Leukocyte mix of normal human blood (fractions of all leukocytes), CLASS_NAMES keys.
DEFAULT_CLASS_FRACTIONS: dict[str, float] = {
    "neutrophil": 0.60, "eosinophil": 0.03, "monocyte": 0.07, "lymphocyte": 0.30,
}

#: OOD object fractions (of all objects); kinds not named are 0.
DEFAULT_OOD_FRACTIONS: dict[str, float] = {
    "erythrocyte": 0.02, "platelet": 0.01, "debris": 0.01, "doublet": 0.0,
    "defocus": 0.0, "digit": 0.0, "noise": 0.0,
}


@dataclass(frozen=True)
class CameraModel:
    """Camera and interferometer intensity parameters.

    Attributes
    ----------
    mean_counts : float
        Mean background intensity [counts] (reference + object beam, no fringes).
    fringe_visibility : float
        Fringe contrast 2·a_r·a_o / (a_r² + a_o²) of the background hologram (0..1).
    full_well_e : float
        Electrons at full scale (2**bit_depth - 1 counts); sets the shot noise [e-].
    read_noise_counts : float
        Gaussian read noise [counts RMS].
    noise_bank : int
        Number of precomputed noise frames cycled by the fast simulator.
    adc_bits : int
        Effective ADC resolution [bit], 4..8: frames stay uint8 (``Optics.bit_depth`` = 8)
        but counts are quantised to multiples of ``2**(8 - adc_bits)`` (an aged or
        mis-set camera loses the low bits).
    """

    mean_counts: float = 100.0
    fringe_visibility: float = 0.8
    full_well_e: float = 10_000.0
    read_noise_counts: float = 0.5
    noise_bank: int = 16
    adc_bits: int = 8

    def amplitudes(self) -> tuple[float, float]:
        """Reference and object beam amplitudes (a_r, a_o) [sqrt(counts)]."""
        s = self.mean_counts
        p = self.fringe_visibility * s  # 2 a_r a_o
        plus = math.sqrt(s + p)  # a_r + a_o
        minus = math.sqrt(max(s - p, 0.0))  # a_r - a_o
        return 0.5 * (plus + minus), 0.5 * (plus - minus)


@dataclass(frozen=True)
class BackgroundModel:
    """Static background of the instrument (identical in every frame and the background).

    Attributes
    ----------
    illumination_gradient : float
        Relative intensity change across the field (linear tilt, 0..1).
    vignetting : float
        Relative intensity drop towards the corners (quadratic, 0..1).
    dust_rings : int
        Number of dust ring patterns in the object arm.
    dust_phase_rad : float
        Peak phase of one dust ring pattern [rad].
    dust_amplitude : float
        Peak relative amplitude modulation of one dust ring pattern.
    ring_period_um : tuple[float, float]
        Range of the ring period [µm]; >= 4 µm keeps the artefacts well inside the
        sideband box so a background division removes them.
    parasitic_fringe : float
        Relative amplitude of a weak parasitic straight-fringe pattern (stray reflection).
    """

    illumination_gradient: float = 0.10
    vignetting: float = 0.05
    dust_rings: int = 4
    dust_phase_rad: float = 0.15
    dust_amplitude: float = 0.03
    ring_period_um: tuple[float, float] = (4.0, 8.0)
    parasitic_fringe: float = 0.02


@dataclass(frozen=True)
class BeadModel:
    """Reference beads of the QC sample: homogeneous spheres of known size and index.

    The defaults describe polyacrylamide microgel beads as used to calibrate QPI and
    deformability cytometers (diameter certified to ~1-2 %, index ~1.37 at 530 nm): their
    phase (~3 rad at the centre) is in the range of the cells, so the live reconstruction,
    segmentation and unwrapping treat them like cells.

    Attributes
    ----------
    diameter_um : float
        Mean (certified) bead diameter [µm].
    diameter_cv : float
        Coefficient of variation of the diameter (normal, clipped to ±3 sd).
    index : float
        Refractive index of the bead material at the simulated wavelength.
    index_sd : float
        Standard deviation of the index between beads.
    """

    diameter_um: float = 8.0
    diameter_cv: float = 0.015
    index: float = 1.370
    index_sd: float = 0.0005


@dataclass
class SimConfig:
    """All parameters of the simulated instrument.

    Attributes
    ----------
    seed : int
        Master seed; the same seed gives the same bytes.
    optics : leukoflow.core.physics.Optics
        Optical geometry (wavelength [µm], medium index, pixel sizes, ROI, carrier
        [cycles/px], frame rate [1/s], mean flow speed [µm/s], bit depth).
    class_fractions : dict[str, float]
        Leukocyte class mix (CLASS_NAMES keys), normalised internally.
    ood_fractions : dict[str, float]
        Fraction of all objects per OOD kind (OOD_KINDS keys); the rest are leukocytes.
    concentration : float
        Mean number of objects whose centre lies inside the field of view (sample
        dilution). The default 0.03 keeps optical coincidences below 0.3 % of cells, as
        flow cytometers dilute samples to keep coincidence at a few per cent or below:
        object centres along the channel are a Poisson process of line density
        λ = c / L (L = 87 µm field length at the default optics). A cell is optically
        inseparable when another object's projection overlaps it in every frame in which
        it is fully in view; with the ±10 % speed spread that happens when a neighbour's
        centre falls in an effective window w ≈ 9 µm, so p = 1 − exp(−λ·w) (measured on
        the simulator with the acquisition pipeline: 15 % of cells at c = 1.5, 3.1 % at
        0.3, 0.9 % at 0.1, i.e. w = 8–10 µm). At c = 0.03, p = 1 − exp(−0.03 · 9 / 87) =
        0.31 %, and 1 − exp(−c) = 3.0 % of the frames that show an object show a second
        one. Throughput is the arrival rate c · v / L: 0.03 × 10,000 / 87 = 3.4 objects/s
        (12,400 per hour) at 10 mm/s; the former default 1.5 gave 172 objects/s but lost
        15 % of the cells to coincidences (rejected and counted as doublets).
    speed_spread : float
        Per-object speed is uniform in mean·[1 - s, 1 + s].
    lateral_sd_um : float
        Standard deviation of the lateral (row) position around the channel centre [µm].
    defocus_um : tuple[float, float]
        Range of |defocus| of ``defocus`` objects [µm] (sign random).
    smoothing_px : float
        Gaussian optical blur applied to every phase map on the phase grid [px].
    camera : CameraModel
        Camera and beam intensities.
    background : BackgroundModel
        Static illumination profile and artefacts.
    magnification : float
        True magnification of the optics relative to the nominal one in ``optics`` (1 =
        as designed). Objects are rendered on pixels of ``optics.pixel_um / magnification``
        [µm] while the acquisition still assumes ``optics.pixel_um``: a changed objective,
        tube lens or camera adapter. Reference-particle QC measures it.
    focus_offset_um : float
        Mean distance of every object from the focal plane [µm] (a focus drift of the
        instrument; 0 = in focus). Each object's field is propagated by a distance drawn
        from N(focus_offset_um, focus_sd_um) (angular spectrum).
    focus_sd_um : float
        Spread of the per-object focus distance [µm] (channel depth).
    size_scale : dict[str, float]
        Factor on the drawn diameter per leukocyte class (CLASS_NAMES keys; missing = 1):
        e.g. an osmolarity change of the sample swells or shrinks the cells.
    ri_scale : dict[str, float]
        Factor on the refractive-index contrast (n - n_medium and n_nucleus - n_cyto) per
        leukocyte class (missing = 1).
    bead_fraction : float
        Fraction of all objects that are reference beads (kind ``bead``, label -1): the QC
        sample. Taken from the leukocyte share.
    bead : BeadModel
        The reference beads.
    """

    seed: int = 0
    optics: Optics = DEFAULT_OPTICS
    class_fractions: dict[str, float] = field(
        default_factory=lambda: dict(DEFAULT_CLASS_FRACTIONS))
    ood_fractions: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_OOD_FRACTIONS))
    concentration: float = 0.03
    speed_spread: float = 0.10
    lateral_sd_um: float = 2.5
    defocus_um: tuple[float, float] = (4.0, 15.0)
    smoothing_px: float = 0.6
    camera: CameraModel = field(default_factory=CameraModel)
    background: BackgroundModel = field(default_factory=BackgroundModel)
    magnification: float = 1.0
    focus_offset_um: float = 0.0
    focus_sd_um: float = 0.0
    size_scale: dict[str, float] = field(default_factory=dict)
    ri_scale: dict[str, float] = field(default_factory=dict)
    bead_fraction: float = 0.0
    bead: BeadModel = field(default_factory=BeadModel)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` for inconsistent parameters."""
        unknown = set(self.class_fractions) - set(CLASS_NAMES)
        if unknown:
            raise ValueError(f"unknown classes in class_fractions: {sorted(unknown)}")
        unknown = set(self.ood_fractions) - set(OOD_KINDS)
        if unknown:
            raise ValueError(f"unknown OOD kinds in ood_fractions: {sorted(unknown)}")
        if any(v < 0 for v in self.class_fractions.values()) or sum(
                self.class_fractions.values()) <= 0:
            raise ValueError("class_fractions must be >= 0 with a positive sum")
        ood = sum(self.ood_fractions.values())
        if any(v < 0 for v in self.ood_fractions.values()) or ood > 1.0:
            raise ValueError("ood_fractions must be >= 0 and sum to <= 1")
        if not self.concentration > 0:
            raise ValueError("concentration must be > 0")
        if not 0 <= self.speed_spread < 1:
            raise ValueError("speed_spread must be in [0, 1)")
        roi = self.optics.roi_shape
        d = self.optics.downsample
        if roi[0] % d or roi[1] % d or roi[0] < 16 * d or roi[1] < 16 * d:
            raise ValueError(f"roi_shape {roi} must be multiples of downsample {d}, >= 16*{d}")
        fy, fx = self.optics.carrier
        if not (0.1 <= abs(fy) <= 0.4 and 0.1 <= abs(fx) <= 0.4):
            raise ValueError("carrier components must lie in 0.1..0.4 cycles/px")
        if self.optics.bit_depth not in (8,):
            raise ValueError("only 8-bit cameras are simulated (uint8 frames)")
        if not 0 < self.camera.fringe_visibility <= 1:
            raise ValueError("fringe_visibility must be in (0, 1]")
        if not 4 <= int(self.camera.adc_bits) <= self.optics.bit_depth:
            raise ValueError(f"camera.adc_bits must be in 4..{self.optics.bit_depth}")
        if self.camera.read_noise_counts < 0 or not self.camera.full_well_e > 0 or \
                not self.camera.mean_counts > 0:
            raise ValueError("camera: read_noise_counts >= 0, full_well_e > 0 and "
                             "mean_counts > 0 required")
        if not 0.5 <= self.magnification <= 2.0:
            raise ValueError("magnification must be in 0.5..2 (relative to the nominal optics)")
        if self.focus_sd_um < 0 or abs(self.focus_offset_um) > 50:
            raise ValueError("focus_sd_um must be >= 0 and |focus_offset_um| <= 50 µm")
        for name, scales in (("size_scale", self.size_scale), ("ri_scale", self.ri_scale)):
            unknown = set(scales) - set(CLASS_NAMES)
            if unknown:
                raise ValueError(f"unknown classes in {name}: {sorted(unknown)}")
            if any(not 0.5 <= float(v) <= 2.0 for v in scales.values()):
                raise ValueError(f"{name} factors must be in 0.5..2")
        if not 0 <= self.bead_fraction <= 1 or self.bead_fraction + ood > 1.0 + 1e-12:
            raise ValueError("bead_fraction must be in [0, 1] and bead_fraction + OOD "
                             "fractions <= 1")
        b = self.bead
        if not (1.0 <= b.diameter_um <= 40.0 and 0 <= b.diameter_cv < 0.2
                and self.optics.medium_index < b.index < 1.7 and b.index_sd >= 0):
            raise ValueError("bead: diameter 1..40 µm, cv in [0, 0.2), medium index < index "
                             "< 1.7, index_sd >= 0")

    @property
    def leukocyte_fraction(self) -> float:
        """Fraction of objects that are leukocytes."""
        return max(0.0, 1.0 - sum(self.ood_fractions.values()) - self.bead_fraction)

    @property
    def object_optics(self) -> Optics:
        """Optics as the objects see them: ``optics`` with the camera pixel divided by the
        true :attr:`magnification` (identical to ``optics`` at magnification 1)."""
        if self.magnification == 1.0:
            return self.optics
        return dataclasses.replace(
            self.optics, camera_pixel_um=self.optics.camera_pixel_um / self.magnification)

    def kind_probabilities(self) -> dict[str, float]:
        """Probability of each object kind (classes, OOD kinds, then ``bead`` when
        :attr:`bead_fraction` > 0), summing to 1."""
        tot = sum(self.class_fractions.values())
        probs = {c: self.leukocyte_fraction * self.class_fractions.get(c, 0.0) / tot
                 for c in CLASS_NAMES}
        probs.update({k: float(self.ood_fractions.get(k, 0.0)) for k in OOD_KINDS})
        if self.bead_fraction > 0:
            probs["bead"] = float(self.bead_fraction)
        return probs

    def replace(self, **changes: Any) -> SimConfig:
        """Copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe nested dict of every parameter (for metadata)."""
        d = dataclasses.asdict(self)
        d["optics"] = self.optics.to_dict()
        return json_safe(d, strict=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SimConfig:
        """Inverse of :meth:`to_dict` (unknown keys raise ``TypeError``)."""
        d = dict(d)
        if "optics" in d and isinstance(d["optics"], dict):
            o = dict(d["optics"])
            for k in ("roi_shape", "carrier"):
                if k in o:
                    o[k] = tuple(o[k])
            d["optics"] = Optics(**o)
        if "camera" in d and isinstance(d["camera"], dict):
            d["camera"] = CameraModel(**d["camera"])
        if "background" in d and isinstance(d["background"], dict):
            b = dict(d["background"])
            if "ring_period_um" in b:
                b["ring_period_um"] = tuple(b["ring_period_um"])
            d["background"] = BackgroundModel(**b)
        if "bead" in d and isinstance(d["bead"], dict):
            d["bead"] = BeadModel(**d["bead"])
        if "defocus_um" in d:
            d["defocus_um"] = tuple(d["defocus_um"])
        return cls(**d)
