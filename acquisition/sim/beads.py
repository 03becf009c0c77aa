"""Reference beads for quality control: homogeneous spheres of known diameter and index.

The phase of a homogeneous sphere of radius R and index n_b in a medium n_m, in the
projection (thin-object) approximation, is

    φ(ρ) = 2π/λ · (n_b − n_m) · 2·sqrt(R² − ρ²)   for ρ < R, else 0,

with ρ the distance from the centre in the object plane. The simulator renders it on the
phase grid (then the optical blur of every object), so a QC run measures the same
instrument path as the cells: hologram, reconstruction, segmentation, crops.
:mod:`leukoflow.acquisition.qc` fits this model back to recover R and n_b.
"""

from __future__ import annotations

import math

import numpy as np

from leukoflow.acquisition.sim.cells import OBJECT_MODELS, ObjectModel
from leukoflow.acquisition.sim.params import BeadModel
from leukoflow.acquisition.sim.render import PhaseObject, RenderContext, finish, grid, patch_size


def sphere_phase(y_um: np.ndarray, x_um: np.ndarray, radius_um: float, index: float,
                 medium_index: float, wavelength_um: float) -> np.ndarray:
    """Projection phase [rad] of a homogeneous sphere centred at (0, 0).

    Parameters
    ----------
    y_um, x_um : numpy.ndarray
        Coordinates in the object plane [µm].
    radius_um : float
        Sphere radius [µm].
    index, medium_index : float
        Refractive indices of the sphere and the medium.
    wavelength_um : float
        Vacuum wavelength [µm].
    """
    t = 2.0 * np.sqrt(np.clip(radius_um**2 - y_um**2 - x_um**2, 0.0, None))
    return (2.0 * math.pi / wavelength_um * (index - medium_index) * t).astype(np.float32)


@OBJECT_MODELS.register("bead")
class Bead(ObjectModel):
    """A reference bead (:class:`leukoflow.acquisition.sim.params.BeadModel` from the render
    context; defaults when the context has none)."""

    kind = "bead"
    label = -1

    def render(self, rng: np.random.Generator, ctx: RenderContext) -> PhaseObject:
        b = ctx.bead if isinstance(ctx.bead, BeadModel) else BeadModel()
        d = b.diameter_um * (1.0 + b.diameter_cv * float(np.clip(rng.normal(), -3, 3)))
        n_b = b.index + b.index_sd * float(np.clip(rng.normal(), -3, 3))
        n = patch_size(d, ctx.pixel_um)
        y, x = grid(n, ctx.pixel_um)
        phase = sphere_phase(y, x, 0.5 * d, n_b, ctx.medium_index, ctx.wavelength_um)
        phase = finish(phase, ctx.smoothing_px)
        return PhaseObject(kind=self.kind, label=self.label, phase=phase,
                           pixel_um=ctx.pixel_um, diameter_um=float(d), extent_um=float(d),
                           params={"diameter_um": float(d), "index": float(n_b)})
