"""Simulated off-axis QPI flow instrument: the default camera source and training-data generator.

Physics (defaults from :class:`leukoflow.core.physics.Optics`, see docs/CONTRACTS.md):

* objects are phase maps on the phase grid (0.34 µm, 80×256 frame):
  phase = 2π/λ·[(n_cyto - n_medium)·t_cell + (n_nucleus - n_cyto)·t_nucleus] + granules,
  λ = 0.530 µm, n_medium = 1.335 (:mod:`.cells`, :mod:`.ood`; registry ``OBJECT_MODELS``);
* the complex field is upsampled to the camera grid (0.085 µm) by Fourier zero-padding, so it
  is exactly band-limited to the (H/4)×(W/4) sideband box; the ideal demodulation
  (:func:`reference_demodulate`) returns the ground truth (:meth:`FlowSimulator.true_phase`)
  up to camera noise (~0.01 rad RMS at the defaults);
* hologram I = |E_ref + E_obj·C|² with E_ref = a_r·A·exp(-2πi(fy·y + fx·x)), carrier
  (fy, fx) = (-0.25, 0.25) cycles/px, illumination A (gradient, vignetting) and object-arm
  artefacts B (dust rings, parasitic fringe) in E_obj = a_o·A·B; cells get a positive phase in
  qpretrieve's default processing; camera: shot noise, read noise, 8-bit rounding
  (:mod:`.optics`);
* flow: Poisson arrivals, +x at 10 mm/s ±10 % per object, 500 frames/s, lateral spread around
  the channel centre (:mod:`.flow`); crop datasets through the same hologram path
  (:mod:`.dataset`); ``.rtdc`` output (:mod:`.writers`).

Public API::

    from leukoflow.acquisition.sim import SimConfig, FlowSimulator, make_crop_dataset
    sim = FlowSimulator(SimConfig(seed=0))
    for fr in sim.frames(10):
        phase = sim.true_phase(fr)
"""

from leukoflow.acquisition.sim.cells import OBJECT_MODELS, LeukocyteParams, ObjectModel
from leukoflow.acquisition.sim.dataset import make_crop_dataset
from leukoflow.acquisition.sim.flow import CellTruth, FlowSimulator, Frame
from leukoflow.acquisition.sim.optics import (
    angular_spectrum,
    demodulate_field,
    fourier_upsample,
    reference_demodulate,
)
from leukoflow.acquisition.sim.params import BackgroundModel, CameraModel, SimConfig
from leukoflow.acquisition.sim.render import PhaseObject, RenderContext

__all__ = [
    "OBJECT_MODELS", "BackgroundModel", "CameraModel", "CellTruth", "FlowSimulator", "Frame",
    "LeukocyteParams", "ObjectModel", "PhaseObject", "RenderContext", "SimConfig",
    "angular_spectrum", "demodulate_field", "fourier_upsample", "make_crop_dataset",
    "reference_demodulate",
]

