"""Phase models of the four leukocyte classes (one plugin per class).

Each cell is a slightly flattened ellipsoid of cytoplasm (refractive index n_c) holding a
nucleus of higher index (n_n) whose shape is class specific, plus granules and vacuoles as
Gaussian phase blobs. Phase = 2π/λ · [(n_c - n_m)·t_cell + (n_n - n_c)·t_nucleus] + blobs,
then a Gaussian optical blur. Sizes, indices, lobe counts and granularity are drawn per cell
from the :class:`LeukocyteParams` of the class, with random in-plane orientation, so that
the classes overlap realistically (size alone separates neutrophils from lymphocytes only
approximately; neutrophils and eosinophils differ mainly by granules and lobes, monocytes and
eosinophils by the cell interior).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from leukoflow.acquisition.sim.render import (
    PhaseObject,
    RenderContext,
    ellipsoid,
    finish,
    gaussian_blobs,
    grid,
    patch_size,
    points_in_ellipse,
    smooth_noise,
    splat,
)
from leukoflow.core.registry import Registry
from leukoflow.core.vocabulary import CLASS_NAMES


class ObjectModel:
    """Base class of every simulated object (leukocyte class or OOD kind).

    Subclasses set ``kind`` and ``label`` and implement :meth:`render`.
    """

    kind: str = ""
    label: int = -1

    def render(self, rng: np.random.Generator, ctx: RenderContext) -> PhaseObject:
        """Draw one object and render its phase map on the phase grid."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Parameters of the model (for metadata)."""
        return {}


#: Every object model by kind: the four classes (here) and the OOD kinds (acquisition.sim.ood).
OBJECT_MODELS: Registry[type[ObjectModel]] = Registry("simulated object model")


@dataclass(frozen=True)
class LeukocyteParams:
    """Distributions of one leukocyte class (all ranges are uniform unless noted).

    Attributes
    ----------
    diameter_um : tuple[float, float, float, float]
        Normal (mean, sd) of the cell diameter, clipped to (min, max) [µm].
    aspect : tuple[float, float]
        In-plane axis ratio b/a.
    height_ratio : tuple[float, float]
        Half-height over in-plane semi-axis (flattening of the cell).
    n_cytoplasm : tuple[float, float]
        Refractive index of the cytoplasm.
    dn_nucleus : tuple[float, float]
        Index step nucleus - cytoplasm.
    granules : tuple[float, float]
        Number of granules.
    granule_sigma_um : tuple[float, float]
        Granule radius (Gaussian sigma) [µm].
    granule_phase_rad : tuple[float, float]
        Peak phase of one granule [rad].
    texture_rad : float
        RMS of a smooth surface texture [rad].
    """

    diameter_um: tuple[float, float, float, float]
    aspect: tuple[float, float] = (0.88, 1.0)
    height_ratio: tuple[float, float] = (0.75, 0.92)
    n_cytoplasm: tuple[float, float] = (1.358, 1.368)
    dn_nucleus: tuple[float, float] = (0.010, 0.020)
    granules: tuple[float, float] = (0.0, 0.0)
    granule_sigma_um: tuple[float, float] = (0.25, 0.30)
    granule_phase_rad: tuple[float, float] = (0.02, 0.05)
    texture_rad: float = 0.04


def _u(rng: np.random.Generator, r: tuple[float, float]) -> float:
    return float(rng.uniform(r[0], r[1]))


class Leukocyte(ObjectModel):
    """Common body of the four classes; subclasses add the nucleus and inclusions."""

    params = LeukocyteParams(diameter_um=(10.0, 1.0, 8.0, 12.0))

    def describe(self) -> dict:
        return asdict(self.params)

    def diameter_moments(self) -> tuple[float, float]:
        """Mean and standard deviation of the diameter distribution [µm] (before clipping)."""
        return self.params.diameter_um[0], self.params.diameter_um[1]

    def draw_diameter(self, rng: np.random.Generator, p: dict) -> float:
        """Cell diameter [µm] from the clipped normal distribution (``p``: drawn params)."""
        m, s, lo, hi = self.params.diameter_um
        return float(np.clip(rng.normal(m, s), lo, hi))

    # -- hooks -------------------------------------------------------------------------
    def nucleus(self, rng: np.random.Generator, y: np.ndarray, x: np.ndarray, a: float,
                b: float, c: float, p: dict) -> np.ndarray:
        """Nucleus thickness [µm] on the grid (cell semi-axes a, b, half-height c [µm])."""
        raise NotImplementedError

    def inclusions(self, rng: np.random.Generator, n: int, ctx: RenderContext, a: float,
                   b: float, angle: float, p: dict) -> np.ndarray:
        """Extra phase [rad] of granules (and vacuoles) on the patch."""
        return self.granule_map(rng, n, ctx, a, b, angle, p)

    def granule_map(self, rng: np.random.Generator, n: int, ctx: RenderContext, a: float,
                    b: float, angle: float, p: dict, scale: float = 1.0) -> np.ndarray:
        """Gaussian granules uniformly inside 0.9 of the cell outline [rad]."""
        k = int(round(_u(rng, self.params.granules) * scale))
        p["granules"] = k
        if k <= 0:
            return np.zeros((n, n), np.float32)
        sigma = _u(rng, self.params.granule_sigma_um)
        amp = _u(rng, self.params.granule_phase_rad)
        p["granule_sigma_um"], p["granule_phase_rad"] = sigma, amp
        pos = points_in_ellipse(rng, k, 0.9 * a, 0.9 * b, angle)
        w = amp * rng.uniform(0.6, 1.4, k)
        return splat(n, ctx.pixel_um, pos, w, sigma / ctx.pixel_um)

    # -- rendering ---------------------------------------------------------------------
    def render(self, rng: np.random.Generator, ctx: RenderContext) -> PhaseObject:
        pr = self.params
        p: dict = {}
        d = self.draw_diameter(rng, p) * float(ctx.size_scale.get(self.kind, 1.0))
        ri = float(ctx.ri_scale.get(self.kind, 1.0))
        aspect = _u(rng, pr.aspect)
        a = 0.5 * d / math.sqrt(aspect)  # keep the projected area of a d-diameter disc
        b = a * aspect
        c = 0.5 * d * _u(rng, pr.height_ratio)
        angle = float(rng.uniform(0, 2 * math.pi))
        n = patch_size(2 * a, ctx.pixel_um)
        y, x = grid(n, ctx.pixel_um, angle)
        n_c = _u(rng, pr.n_cytoplasm)
        dn_n = _u(rng, pr.dn_nucleus)
        if ri != 1.0:  # scale the index contrast to the medium (and of the nucleus)
            n_c = ctx.medium_index + ri * (n_c - ctx.medium_index)
            dn_n *= ri
        p.update({"diameter_um": d, "aspect": aspect, "half_height_um": c, "angle": angle,
                  "n_cytoplasm": n_c, "n_nucleus": n_c + dn_n})
        t_cell = ellipsoid(y, x, a, b, c)
        t_nuc = np.minimum(self.nucleus(rng, y, x, a, b, c, p), t_cell)
        opd = (n_c - ctx.medium_index) * t_cell + dn_n * t_nuc
        phase = ctx.k0 * opd
        inside = (t_cell > 0).astype(np.float32)
        phase += self.inclusions(rng, n, ctx, a, b, angle, p) * inside
        if pr.texture_rad > 0:
            phase += pr.texture_rad * smooth_noise(rng, n, 1.2 / ctx.pixel_um) * inside
        phase = finish(phase, ctx.smoothing_px)
        return PhaseObject(kind=self.kind, label=self.label, phase=phase, pixel_um=ctx.pixel_um,
                           diameter_um=d, extent_um=2 * a, params=p)


def _lobes_on_arc(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, k: int,
                  arc_r: float, span: float, lobe_r: float, hc: float,
                  strand_r: float) -> np.ndarray:
    """Thickness [µm] of ``k`` ellipsoidal lobes on an arc joined by thin strands."""
    phi0 = rng.uniform(0, 2 * math.pi)
    angles = phi0 + (np.linspace(-span / 2, span / 2, k) if k > 1 else np.zeros(1))
    angles = angles + rng.normal(0, 0.12, k)
    centres = []
    out = np.zeros_like(y)
    for ang in angles:
        rr = arc_r * rng.uniform(0.85, 1.15)
        cy, cx = rr * math.sin(ang), rr * math.cos(ang)
        la = lobe_r * rng.uniform(0.85, 1.2)
        lb = lobe_r * rng.uniform(0.7, 1.0)
        out = np.maximum(out, ellipsoid(y, x, la, lb, hc * lb, cy, cx, rng.uniform(0, math.pi)))
        centres.append((cy, cx))
    for (y0, x0), (y1, x1) in zip(centres[:-1], centres[1:], strict=True):
        length = math.hypot(y1 - y0, x1 - x0)
        if length <= 0:
            continue
        theta = math.atan2(y1 - y0, x1 - x0)
        out = np.maximum(out, ellipsoid(y, x, 0.5 * length, strand_r, strand_r,
                                        0.5 * (y0 + y1), 0.5 * (x0 + x1), theta))
    return out


@OBJECT_MODELS.register("neutrophil")
class Neutrophil(Leukocyte):
    """Neutrophil: ~10-12 µm, segmented nucleus of 3-5 lobes (some 2), fine granules."""

    kind = "neutrophil"
    label = CLASS_NAMES.index("neutrophil")
    params = LeukocyteParams(
        diameter_um=(11.0, 0.75, 9.0, 13.5), n_cytoplasm=(1.356, 1.366),
        dn_nucleus=(0.014, 0.024), granules=(120, 300), granule_sigma_um=(0.22, 0.38),
        granule_phase_rad=(0.02, 0.09))
    lobe_counts = (2, 3, 4, 5)
    lobe_probs = (0.12, 0.45, 0.31, 0.12)

    def nucleus(self, rng, y, x, a, b, c, p):
        r = 0.5 * (a + b)
        k = int(rng.choice(self.lobe_counts, p=self.lobe_probs))
        p["lobes"] = k
        span = math.radians(rng.uniform(60, 80) * (k - 1))
        return _lobes_on_arc(rng, y, x, k, rng.uniform(0.38, 0.52) * r, span,
                             rng.uniform(0.21, 0.28) * r, 0.85, 0.07 * r)


@OBJECT_MODELS.register("eosinophil")
class Eosinophil(Leukocyte):
    """Eosinophil: ~10-13 µm, bilobed nucleus, coarse refractile granules."""

    kind = "eosinophil"
    label = CLASS_NAMES.index("eosinophil")
    params = LeukocyteParams(
        diameter_um=(11.8, 0.8, 9.5, 14.5), n_cytoplasm=(1.358, 1.368),
        dn_nucleus=(0.012, 0.022), granules=(70, 160), granule_sigma_um=(0.32, 0.55),
        granule_phase_rad=(0.05, 0.20))
    degranulated = 0.15

    def nucleus(self, rng, y, x, a, b, c, p):
        r = 0.5 * (a + b)
        k = 3 if rng.uniform() < 0.12 else 2
        p["lobes"] = k
        span = math.radians(rng.uniform(140, 190) if k == 2 else rng.uniform(170, 230))
        return _lobes_on_arc(rng, y, x, k, rng.uniform(0.36, 0.48) * r, span,
                             rng.uniform(0.27, 0.35) * r, 0.85, 0.07 * r)

    def inclusions(self, rng, n, ctx, a, b, angle, p):
        scale = 0.35 if rng.uniform() < self.degranulated else 1.0
        p["degranulated"] = scale < 1
        return self.granule_map(rng, n, ctx, a, b, angle, p, scale)


@OBJECT_MODELS.register("monocyte")
class Monocyte(Leukocyte):
    """Monocyte: ~12-16 µm, kidney-shaped nucleus, vacuoles, faint fine granularity."""

    kind = "monocyte"
    label = CLASS_NAMES.index("monocyte")
    params = LeukocyteParams(
        diameter_um=(14.0, 1.1, 11.5, 17.0), n_cytoplasm=(1.356, 1.366),
        dn_nucleus=(0.012, 0.022), granules=(40, 140), granule_sigma_um=(0.22, 0.30),
        granule_phase_rad=(0.01, 0.035))
    vacuoles_mean = 3.0
    indented_fraction = 0.75
    vacuole_sigma_um = (0.35, 0.8)
    vacuole_phase_rad = (0.12, 0.45)

    def nucleus(self, rng, y, x, a, b, c, p):
        r = 0.5 * (a + b)
        na, nb = rng.uniform(0.50, 0.62) * r, rng.uniform(0.36, 0.46) * r
        th = rng.uniform(0, math.pi)
        off = rng.uniform(0.0, 0.22) * r
        oa = rng.uniform(0, 2 * math.pi)
        cy, cx = off * math.sin(oa), off * math.cos(oa)
        t = ellipsoid(y, x, na, nb, 0.8 * nb, cy, cx, th)
        # kidney: a soft disc bites into one long side of the nucleus (most monocytes)
        ir = rng.uniform(0.22, 0.36) * r if rng.uniform() < self.indented_fraction else 1e-3
        dy, dx = math.cos(th), -math.sin(th)  # minor-axis direction
        by, bx = cy + dy * nb * 1.05, cx + dx * nb * 1.05
        d2 = ((y - by) ** 2 + (x - bx) ** 2) / ir**2
        bite = np.clip(1.0 - d2, 0.0, 1.0) ** 0.5
        p["nucleus_axes_um"], p["indent_um"] = (na, nb), ir
        return t * (1.0 - bite)

    def inclusions(self, rng, n, ctx, a, b, angle, p):
        g = self.granule_map(rng, n, ctx, a, b, angle, p)
        k = int(rng.poisson(self.vacuoles_mean))
        p["vacuoles"] = k
        if k:
            pos = points_in_ellipse(rng, k, 0.75 * a, 0.75 * b, angle)
            sig = rng.uniform(*self.vacuole_sigma_um, k)
            amp = rng.uniform(*self.vacuole_phase_rad, k)
            g = g - gaussian_blobs(n, ctx.pixel_um, pos, amp, sig)
        return g


@OBJECT_MODELS.register("lymphocyte")
class Lymphocyte(Leukocyte):
    """Lymphocyte: ~7-9 µm, large round nucleus, thin cytoplasm rim, few granules."""

    kind = "lymphocyte"
    label = CLASS_NAMES.index("lymphocyte")
    params = LeukocyteParams(
        diameter_um=(8.0, 0.7, 6.5, 11.0), aspect=(0.9, 1.0), n_cytoplasm=(1.356, 1.366),
        dn_nucleus=(0.014, 0.024), granules=(0, 0), granule_sigma_um=(0.3, 0.4),
        granule_phase_rad=(0.05, 0.12))
    granular_fraction = 0.10  # large granular lymphocytes
    large_fraction = 0.12  # large (reactive) lymphocytes: bigger, more cytoplasm
    large_diameter_um = (10.0, 0.7, 8.5, 12.0)

    def diameter_moments(self) -> tuple[float, float]:
        m1, s1 = self.params.diameter_um[:2]
        m2, s2 = self.large_diameter_um[:2]
        f = self.large_fraction
        mean = (1 - f) * m1 + f * m2
        var = (1 - f) * (s1**2 + (m1 - mean) ** 2) + f * (s2**2 + (m2 - mean) ** 2)
        return mean, math.sqrt(var)

    def draw_diameter(self, rng, p):
        large = bool(rng.uniform() < self.large_fraction)
        m, s, lo, hi = self.large_diameter_um if large else self.params.diameter_um
        p["large"] = large
        return float(np.clip(rng.normal(m, s), lo, hi))

    def nucleus(self, rng, y, x, a, b, c, p):
        r = 0.5 * (a + b)
        large = p.get("large", False)
        nr = rng.uniform(0.60, 0.76) * r if large else rng.uniform(0.72, 0.88) * r
        off = rng.uniform(0.0, 0.2 if large else 0.12) * r
        oa = rng.uniform(0, 2 * math.pi)
        p["nucleus_ratio"] = nr / r
        return ellipsoid(y, x, nr, nr * rng.uniform(0.9, 1.0), 0.9 * nr,
                         off * math.sin(oa), off * math.cos(oa), rng.uniform(0, math.pi))

    def inclusions(self, rng, n, ctx, a, b, angle, p):
        if rng.uniform() >= self.granular_fraction:
            p["granules"] = 0
            return np.zeros((n, n), np.float32)
        k = int(rng.integers(5, 16))
        p["granules"] = k
        pos = points_in_ellipse(rng, k, 0.9 * a, 0.9 * b, angle)
        return splat(n, ctx.pixel_um, pos, np.full(k, _u(rng, self.params.granule_phase_rad)),
                     _u(rng, self.params.granule_sigma_um) / ctx.pixel_um)


def leukocyte_model(kind: str) -> Leukocyte:
    """Instance of the leukocyte model for class ``kind`` (a CLASS_NAMES entry)."""
    if kind not in CLASS_NAMES:
        raise ValueError(f"not a leukocyte class: {kind!r}; choose from {CLASS_NAMES}")
    return OBJECT_MODELS.get(kind)()  # type: ignore[return-value]
