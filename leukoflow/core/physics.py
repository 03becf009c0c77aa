"""Physical constants and the default optical geometry of the simulated instrument.

The one source of the wavelength, the pixel sizes and the crop size: everything else reads
:data:`DEFAULT_OPTICS` (or :data:`CROP_SIZE_PX`, :data:`PIXEL_UM`, :data:`WAVELENGTH_UM`).

All lengths in µm, frequencies in cycles per camera pixel. See docs/CONTRACTS.md for the
reasoning behind each default; change them with reason and keep that table true.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

#: Refraction increment of protein used for dry mass [µm³/pg] (Barer 1952; 0.18-0.19).
ALPHA_UM3_PER_PG: float = 0.18


@dataclass(frozen=True)
class Optics:
    """Optical geometry of an off-axis QPI flow instrument.

    Attributes
    ----------
    wavelength_um : float
        Illumination wavelength [µm].
    medium_index : float
        Refractive index of the suspension medium.
    camera_pixel_um : float
        Camera pixel size in the object plane [µm].
    roi_shape : tuple[int, int]
        Camera region of interest (rows across the channel, columns along the flow) [px].
    carrier : tuple[float, float]
        Off-axis sideband position (rows, cols) [cycles/camera px], qpretrieve order.
    downsample : int
        Phase-grid downsampling factor of the fast reconstruction (Fourier crop).
    crop_size : int
        Side of the square cell crops on the phase grid [px].
    frame_rate_hz : float
        Camera frame rate [frames/s].
    flow_speed_um_s : float
        Mean cell speed along +x [µm/s].
    bit_depth : int
        Camera bit depth [bit].
    """

    wavelength_um: float = 0.530
    medium_index: float = 1.335
    camera_pixel_um: float = 0.085
    roi_shape: tuple[int, int] = (320, 1024)
    carrier: tuple[float, float] = (-0.25, 0.25)
    downsample: int = 4
    crop_size: int = 64
    frame_rate_hz: float = 500.0
    flow_speed_um_s: float = 10_000.0
    bit_depth: int = 8

    @property
    def pixel_um(self) -> float:
        """Pixel size of the reconstructed phase grid [µm]."""
        return self.camera_pixel_um * self.downsample

    @property
    def phase_shape(self) -> tuple[int, int]:
        """Shape of the reconstructed phase frame [px]."""
        return (self.roi_shape[0] // self.downsample, self.roi_shape[1] // self.downsample)

    @property
    def displacement_px_per_frame(self) -> float:
        """Mean cell displacement between frames on the phase grid [px]."""
        return self.flow_speed_um_s / self.frame_rate_hz / self.pixel_um

    def to_dict(self) -> dict:
        """Plain dict of all parameters (for metadata)."""
        return asdict(self)


DEFAULT_OPTICS = Optics()
"""The instrument's optics: the one source of wavelength, pixel sizes and crop size."""

#: Side of the square cell crops the acquisition cuts and the models take [px].
CROP_SIZE_PX: int = DEFAULT_OPTICS.crop_size
#: Pixel size of the reconstructed phase grid (the crops' pixel) [µm].
PIXEL_UM: float = DEFAULT_OPTICS.pixel_um
#: Illumination wavelength [µm].
WAVELENGTH_UM: float = DEFAULT_OPTICS.wavelength_um


class CropSizeError(ValueError):
    """The acquisition's crop size differs from the model's input size."""


def check_crop_size(crop_px: int, model_px: int, model: str = "the model") -> None:
    """Refuse crops the model cannot take (instead of rejecting every cell as ``shape``).

    Parameters
    ----------
    crop_px : int
        Side of the crops the acquisition cuts [px] (``[acquire_pipeline.crop] size``).
    model_px : int
        Side of the model's input [px] (its card's ``input_size``).
    model : str
        The model, for the message.

    Raises
    ------
    CropSizeError
        When the sizes differ, with both sizes and how to fix it.
    """
    if int(crop_px) != int(model_px):
        raise CropSizeError(
            f"the acquisition cuts {int(crop_px)} px crops but {model} takes {int(model_px)} px:"
            f" every cell would be rejected as 'shape'. Set [acquire_pipeline.crop] size ="
            f" {int(model_px)} (LEUKOFLOW_ACQUIRE_PIPELINE_CROP_SIZE) or use a model trained on"
            f" {int(crop_px)} px crops.")


def dry_mass_pg(phase_sum_rad: float, pixel_um: float,
                wavelength_um: float = WAVELENGTH_UM) -> float:
    """Dry mass [pg] from the summed phase [rad] over a cell on pixels of ``pixel_um`` [µm]."""
    return wavelength_um / (2.0 * math.pi * ALPHA_UM3_PER_PG) * phase_sum_rad * pixel_um**2
