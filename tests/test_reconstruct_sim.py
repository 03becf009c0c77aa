"""Fast-mode reconstruction of the simulated instrument (acquisition.sim) against its
band-limited ground-truth phase, at the default geometry (320×1024 → 80×256)."""

from __future__ import annotations

import numpy as np
import pytest

from leukoflow.acquisition.reconstruct import OffAxisConfig, Reconstructor
from leukoflow.acquisition.sim.flow import FlowSimulator
from leukoflow.acquisition.sim.params import SimConfig
from leukoflow.core.physics import DEFAULT_OPTICS


def test_default_reconstruction_matches_simulator_truth():

    sim = FlowSimulator(SimConfig(concentration=1.5))  # dense: cells in most frames
    rec = Reconstructor(OffAxisConfig(camera_pixel_um=DEFAULT_OPTICS.camera_pixel_um),
                        background=sim.background)
    assert rec.sideband == pytest.approx(DEFAULT_OPTICS.carrier, abs=1e-3)
    assert rec.params["pixel_size_um"] == pytest.approx(DEFAULT_OPTICS.pixel_um)
    frames = [f for f in sim.frames(40) if f.truth][:12]
    assert len(frames) >= 5
    stack = np.stack([f.hologram for f in frames])
    phase = rec.phase(stack)
    assert phase.shape == (len(frames), *DEFAULT_OPTICS.phase_shape)
    e = rec.edge_px
    inside, outside = [], []
    for ph, fr in zip(phase, frames, strict=True):
        truth = sim.true_phase(fr)
        err = (ph - truth)[e:-e, e:-e]
        cell = truth[e:-e, e:-e] > 0.1
        inside.append(err[cell])
        outside.append(err[~cell])
    inside = np.concatenate(inside)
    outside = np.concatenate(outside)
    assert inside.size > 1000
    assert float(np.sqrt(np.mean(inside**2))) < 0.03
    assert abs(float(inside.mean())) < 0.01
    assert float(np.sqrt(np.mean(outside**2))) < 0.03
