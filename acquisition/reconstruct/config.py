"""Configuration of the off-axis reconstruction (one frozen dataclass, section ``reconstruct``).

Resolve it with ``leukoflow.core.config.resolve("reconstruct", OffAxisConfig, cli_overrides)``.
Mode-dependent defaults (``None`` fields) are resolved by :meth:`OffAxisConfig.resolved`.

Default filter choice (fast mode)
---------------------------------
The fast mode crops a box of ``H/D × W/D`` Fourier bins around the sideband (``D`` =
``downsample``), i.e. ±1/(2D) cycles/px, so the output phase grid is the camera grid / D.
The default filter is qpretrieve's: a disk of 1/3 of the sideband distance. At the default
carrier (-0.25, 0.25) cycles/px that is a radius of 0.118 cycles/px = 0.94 × 1/(2D) for
D = 4, which fills the phase grid's band (the inscribed disk of the crop box) while staying
clear of the autocorrelation (DC) term, whose half-width is twice the object band (the
classic 1/3 rule). A larger radius (up to 1/(2D) = 0.125) gains < 6 % bandwidth and starts
overlapping the DC term; a smaller one wastes the grid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from leukoflow.acquisition.reconstruct.filters import FILTERS, SIZE_INTERPRETATIONS

MODES = ("fast", "compatible")
SIDEBAND_SOURCES = ("background", "hologram")
BG_FITS = ("offset", "tilt", "poly2o")


@dataclass(frozen=True)
class OffAxisConfig:
    """Parameters of the off-axis phase retrieval.

    Attributes
    ----------
    mode : {"fast", "compatible"}
        "fast" (default): float32 rfft2, Fourier crop to the phase grid, cached background
        field; "compatible": reproduces qpretrieve 0.7 numbers (float64, power-of-two padding).
    filter_name : str
        One of :data:`~leukoflow.acquisition.reconstruct.filters.FILTERS` ("disk", "smooth disk",
        "gauss", "square", "smooth square", "tukey").
    filter_size : float
        Filter size in the unit of ``filter_size_interpretation``.
    filter_size_interpretation : {"sideband distance", "frequency index", "frequency"}
        qpretrieve's units: fraction of the DC-sideband distance, Fourier bins of the
        (padded) FFT, or cycles/px.
    sideband : tuple of float or None
        Sideband (rows, cols) [cycles/camera px]; ``None`` = detect once (calibration).
    sideband_source : {"background", "hologram"} or None
        Where the sideband is detected; ``None`` = "background" in fast mode if a background
        is given, else the first hologram (qpretrieve's choice, default of compatible mode).
    refine_sideband : bool
        Fast mode: interpolate the detected sideband between FFT bins, so the filter is
        centred on the carrier whatever the frame size (compatible mode never refines).
    downsample : int
        Fast mode: output grid = camera grid / ``downsample`` (Fourier crop box).
    padding : float or None
        Compatible: qpretrieve's power-of-two factor (default 2; 0 = none, square frames
        only). Fast: 0 (default) = no padding; >= 1 = zero-pad to ``padding``× the frame,
        rounded up to a fast FFT length that is a multiple of ``downsample``.
    subtract_mean : bool
        Subtract each frame's mean before the FFT.
    scale_to_filter : float
        Compatible mode only: qpretrieve's ``scale_to_filter`` (0 = off, 1 = True).
    invert_phase : bool
        Conjugate the field (flip the phase sign).
    backend : {"numpy", "torch"}
        Array backend (:data:`~leukoflow.acquisition.reconstruct.backends.RECON_BACKENDS`).
    device : str
        Torch device ("cpu", "cuda", "cuda:0"); the numpy backend needs "cpu".
    workers : int
        SciPy FFT worker threads (1 = one core, -1 = all).
    precision : {"float32", "float64"} or None
        Real dtype of the FFT input; ``None`` = float32 (fast) / float64 (compatible).
    unwrap_seed : int
        Seed of the unwrapper's random tie-breaking (reproducible output).
    bg_fit : {"offset", "tilt", "poly2o"} or None
        Residual background fit applied by default in :meth:`Reconstructor.phase`.
    bg_border_px : int
        Border width used by the residual fit [output px].
    check_finite : bool
        Reject frames containing NaN/inf with a clear error.
    camera_pixel_um : float or None
        Camera pixel size in the object plane [µm] (metadata only: the output pixel size
        ``pixel_size_um`` = camera pixel × ``pixel_scale`` is recorded in the parameters).
    """

    mode: str = "fast"
    filter_name: str = "disk"
    filter_size: float = 1 / 3
    filter_size_interpretation: str = "sideband distance"
    sideband: tuple[float, float] | None = None
    sideband_source: str | None = None
    refine_sideband: bool = True
    downsample: int = 4
    padding: float | None = None
    subtract_mean: bool = True
    scale_to_filter: float = 0.0
    invert_phase: bool = False
    backend: str = "numpy"
    device: str = "cpu"
    workers: int = 1
    precision: str | None = None
    unwrap_seed: int = 47
    bg_fit: str | None = None
    bg_border_px: int = 5
    check_finite: bool = True
    camera_pixel_um: float | None = None

    def __post_init__(self) -> None:
        self._coerce_optionals()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.filter_name not in FILTERS:
            raise ValueError(f"unknown filter {self.filter_name!r}; "
                             f"available: {', '.join(FILTERS.names())}")
        if self.filter_size_interpretation not in SIZE_INTERPRETATIONS:
            raise ValueError(f"filter_size_interpretation must be one of "
                             f"{SIZE_INTERPRETATIONS}, got {self.filter_size_interpretation!r}")
        if not self.filter_size > 0:
            raise ValueError(f"filter_size must be > 0, got {self.filter_size}")
        if self.sideband is not None:
            sb = tuple(float(v) for v in self.sideband)
            if len(sb) != 2 or not all(-0.5 <= v < 0.5 for v in sb) or sb == (0.0, 0.0):
                raise ValueError(f"sideband must be two frequencies in [-0.5, 0.5) cycles/px, "
                                 f"not both zero; got {self.sideband!r}")
            object.__setattr__(self, "sideband", sb)
        if self.sideband_source is not None and self.sideband_source not in SIDEBAND_SOURCES:
            raise ValueError(f"sideband_source must be one of {SIDEBAND_SOURCES}, "
                             f"got {self.sideband_source!r}")
        if int(self.downsample) != self.downsample or self.downsample < 1:
            raise ValueError(f"downsample must be a positive integer, got {self.downsample}")
        object.__setattr__(self, "downsample", int(self.downsample))
        if self.padding is not None and self.padding < 0:
            raise ValueError(f"padding must be >= 0, got {self.padding}")
        if self.mode == "fast" and self.padding not in (None, 0) and self.padding < 1:
            raise ValueError(f"fast-mode padding must be 0 or >= 1, got {self.padding}")
        if self.scale_to_filter < 0:
            raise ValueError(f"scale_to_filter must be >= 0, got {self.scale_to_filter}")
        if self.precision not in (None, "float32", "float64"):
            raise ValueError(f"precision must be 'float32' or 'float64', got {self.precision!r}")
        if self.bg_fit is not None and self.bg_fit not in BG_FITS:
            raise ValueError(f"bg_fit must be one of {BG_FITS} or None, got {self.bg_fit!r}")
        if self.bg_border_px < 1:
            raise ValueError(f"bg_border_px must be >= 1, got {self.bg_border_px}")

    def _coerce_optionals(self) -> None:
        """Accept strings for optional fields (environment variables, TOML, CLI)."""

        def none_or(v):
            return None if isinstance(v, str) and v.strip().lower() in ("", "none", "null") \
                else v

        for name in ("sideband", "sideband_source", "padding", "precision", "bg_fit",
                     "camera_pixel_um"):
            object.__setattr__(self, name, none_or(getattr(self, name)))
        if isinstance(self.sideband, str):
            parts = [p for p in self.sideband.replace(";", ",").split(",") if p.strip()]
            try:
                object.__setattr__(self, "sideband", tuple(float(p) for p in parts))
            except ValueError:
                raise ValueError(f"sideband must be 'f_rows,f_cols', got {self.sideband!r}") \
                    from None
        if isinstance(self.camera_pixel_um, str):
            object.__setattr__(self, "camera_pixel_um", float(self.camera_pixel_um))
        if self.camera_pixel_um is not None and not self.camera_pixel_um > 0:
            raise ValueError(f"camera_pixel_um must be > 0, got {self.camera_pixel_um}")
        if isinstance(self.padding, str):
            try:
                object.__setattr__(self, "padding", float(self.padding))
            except ValueError:
                raise ValueError(f"padding must be a number, got {self.padding!r}") from None

    @property
    def real_dtype(self) -> str:
        """Resolved real FFT input dtype."""
        if self.precision is not None:
            return self.precision
        return "float32" if self.mode == "fast" else "float64"

    @property
    def resolved_padding(self) -> float:
        """Resolved padding (mode default when ``padding`` is None)."""
        if self.padding is not None:
            return float(self.padding)
        return 0.0 if self.mode == "fast" else 2.0

    def replace(self, **changes) -> OffAxisConfig:
        """Copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain dict of the configured (not yet resolved) values."""
        d = dataclasses.asdict(self)
        if d["sideband"] is not None:
            d["sideband"] = list(d["sideband"])
        return d
