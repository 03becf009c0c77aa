"""Off-axis phase retrieval (fast and qpretrieve-compatible modes).

Public API::

    from leukoflow.acquisition.reconstruct import (OffAxisConfig, Reconstructor, unwrap_phase,
                                         fit_background, load_hologram, RECON_BACKENDS,
                                         FILTERS)
    rec = Reconstructor(OffAxisConfig(), background=bg)
    phase = rec.phase(holo)            # float32 rad, unwrapped, background-corrected
    rec.params                         # every resolved parameter (for metadata)
"""

from leukoflow.acquisition.reconstruct.backends import RECON_BACKENDS, ArrayBackend
from leukoflow.acquisition.reconstruct.bgfit import BackgroundFit, fit_background
from leukoflow.acquisition.reconstruct.config import OffAxisConfig
from leukoflow.acquisition.reconstruct.filters import FILTERS, FourierFilter, resolve_filter_radius
from leukoflow.acquisition.reconstruct.io import HologramIOError, load_hologram
from leukoflow.acquisition.reconstruct.offaxis import Reconstructor
from leukoflow.acquisition.reconstruct.sideband import find_sideband_rfft, find_sideband_shifted
from leukoflow.acquisition.reconstruct.unwrap import rebase_2pi, unwrap_phase

__all__ = [
    "ArrayBackend",
    "BackgroundFit",
    "FILTERS",
    "FourierFilter",
    "HologramIOError",
    "OffAxisConfig",
    "RECON_BACKENDS",
    "Reconstructor",
    "fit_background",
    "find_sideband_rfft",
    "find_sideband_shifted",
    "load_hologram",
    "rebase_2pi",
    "resolve_filter_radius",
    "unwrap_phase",
]
