"""Off-axis phase retrieval: :class:`Reconstructor` (fast and qpretrieve-compatible modes).

Fast mode (default), per frame::

    rfft along rows of the float32 frame -> keep the W/D box columns -> FFT along columns
    (pruned 2D FFT) -> keep the H/D box rows around the sideband (conjugate symmetry
    supplies negative column frequencies) -> × filter (DC bin zeroed = mean subtraction)
    -> ifft2 on the small box -> × 1/bg field (cached) -> complex64 field

The output grid is the camera grid / ``downsample``; output pixel (i, j) samples camera pixel
(i·sy, j·sx) with (sy, sx) = ``params["pixel_scale"]`` (exactly ``downsample`` when it divides
the frame). Without padding the FFT treats the frame as periodic: expect artefacts within
``params["edge_px"]`` output pixels of the frame edge (cells there should be skipped).

Compatible mode reproduces qpretrieve 0.7 (``OffAxisHologram`` with the NumPy FFT
interface): float64, per-slice mean subtraction, zero padding to a power-of-two square with
the data in the top-left corner, ``fftshift(fft2)``, filter centred on the sideband, integer
roll, optional ``scale_to_filter``, background processed like the hologram, and
Δφ = φ_holo − φ_bg unwrapped by scikit-image.

The sideband is detected once per calibration (from the background, or from the first
hologram) and reused; the background field is computed once and reused.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from leukoflow.acquisition.reconstruct.backends import ArrayBackend, create_backend
from leukoflow.acquisition.reconstruct.bgfit import fit_background
from leukoflow.acquisition.reconstruct.config import OffAxisConfig
from leukoflow.acquisition.reconstruct.filters import (
    get_filter,
    qpretrieve_filter_array,
    resolve_filter_radius,
)
from leukoflow.acquisition.reconstruct.sideband import find_sideband_rfft, find_sideband_shifted
from leukoflow.acquisition.reconstruct.unwrap import unwrap_phase

log = logging.getLogger(__name__)

_DEFAULT = object()


def _complex_dtype(real: str) -> str:
    return "complex64" if real == "float32" else "complex128"


@dataclass
class _FastPlan:
    pad_shape: tuple[int, int]
    box: tuple[int, int]
    out_shape: tuple[int, int]
    rows: np.ndarray  # full-spectrum row indices (mod pad rows), ifft order
    cols: np.ndarray  # full-spectrum column indices (mod pad cols), ifft order
    kind: str  # "direct", "mirror" or "mixed"
    weights: Any  # backend array (box), filter × normalisation, DC zeroed
    col_direct: Any  # backend bool array (1, box cols), only for "mixed"
    spatial_mean: bool


@dataclass
class _CompatPlan:
    n: int
    shift: tuple[int, int]
    filt: Any  # backend array (n, n)
    crad: int | None
    out_shape: tuple[int, int]
    scale: float


class Reconstructor:
    """Off-axis hologram → background-corrected complex field and phase.

    Parameters
    ----------
    config : OffAxisConfig, optional
        Parameters (defaults: fast mode, disk 1/3 sideband distance, downsample 4).
    background : array_like, shape (H, W) or (N, H, W), optional
        Background hologram without cells (a stack is averaged). Its field is computed once.
    **overrides
        Field overrides applied to ``config`` (e.g. ``mode="compatible"``).

    Notes
    -----
    Holograms are (H, W) or stacks (N, H, W) of any real dtype (uint8 camera frames are
    cast on the backend). NumPy arrays are accepted by every backend; the torch backend
    also accepts tensors, which stay on their device when ``to_numpy=False``.
    """

    def __init__(self, config: OffAxisConfig | None = None, background: Any = None,
                 **overrides: Any) -> None:
        cfg = config if config is not None else OffAxisConfig()
        if overrides:
            cfg = cfg.replace(**overrides)
        self.config = cfg
        self.be: ArrayBackend = create_backend(cfg.backend, device=cfg.device,
                                               workers=cfg.workers)
        self._real = cfg.real_dtype
        self._cplx = _complex_dtype(self._real)
        self._bg_raw: np.ndarray | None = None
        if background is not None:
            self._bg_raw = self._background_frame(background)
        if cfg.sideband is not None:
            self._source = "config"
        elif cfg.sideband_source is not None:
            self._source = cfg.sideband_source
            if self._source == "background" and self._bg_raw is None:
                raise ValueError("sideband_source='background' needs a background hologram")
        elif cfg.mode == "fast" and self._bg_raw is not None:
            self._source = "background"
        else:
            self._source = "hologram"
        self._shape: tuple[int, int] | None = None
        self._sideband: tuple[float, float] | None = None
        self._radius: float | None = None
        self._plan: _FastPlan | _CompatPlan | None = None
        self._inv_bg: Any = None  # fast: 1 / background field
        self._bg_field: Any = None  # compatible: background field
        self._bg_phase: Any = None  # compat: φ_bg
        if self._source in ("config", "background") and self._bg_raw is not None:
            self.calibrate(self._bg_raw)

    # ------------------------------------------------------------------ helpers
    def _host(self, a: Any) -> np.ndarray:
        if isinstance(a, np.ndarray):
            return a
        if type(a).__module__.startswith("torch"):
            return a.detach().cpu().numpy()
        return np.asarray(a)

    def _background_frame(self, background: Any) -> np.ndarray:
        bg = self._host(background)
        if bg.dtype.kind not in "biuf":
            raise ValueError(f"background: unsupported dtype {bg.dtype}")
        bg = bg.astype(np.float64)
        if bg.ndim == 3:
            bg = bg.mean(axis=0)
        if bg.ndim != 2:
            raise ValueError(f"background must be (H, W) or (N, H, W), got {bg.shape}")
        self._check_frame_values(bg, "background")
        return bg

    def set_background(self, background: Any, *, redetect: bool = False) -> None:
        """Replace the background hologram (new calibration) and recompute its field once.

        Parameters
        ----------
        background : array_like, shape (H, W) or (N, H, W)
            New background hologram (a stack is averaged); same frame shape as before.
        redetect : bool
            Also re-detect the sideband from the new background (otherwise the current
            sideband, filter and FFT plan are kept).
        """
        bg = self._background_frame(background)
        if self._shape is not None and bg.shape != self._shape:
            raise ValueError(f"background shape {bg.shape} does not match the calibration "
                             f"shape {self._shape}")
        self._bg_raw = bg
        if redetect and self.config.sideband is None:
            self._source = "background"
            self._plan = None
            self.calibrate(bg)
        elif self._plan is not None:
            self._set_background()
        elif self._source == "background":
            self.calibrate(bg)

    def _check_frame_values(self, a: Any, what: str) -> None:
        if not self.config.check_finite:
            return
        if isinstance(a, np.ndarray):
            if a.dtype.kind not in "biuf":
                raise ValueError(f"{what}: unsupported dtype {a.dtype} (need a real number type)")
            if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                raise ValueError(f"{what}: contains NaN or inf")
        elif self.be.is_native(a) and a.is_floating_point():
            if not bool(self.be.torch.isfinite(a).all()):
                raise ValueError(f"{what}: contains NaN or inf")

    def _frames(self, holo: Any) -> tuple[Any, bool]:
        """Validate ``holo`` and return (native (N,H,W) real array, was_2d)."""
        arr = holo if (self.be.is_native(holo) or isinstance(holo, np.ndarray)) \
            else self._host(holo)
        if arr.ndim not in (2, 3):
            raise ValueError(f"hologram must be (H, W) or (N, H, W), got shape {tuple(arr.shape)}")
        if 0 in tuple(arr.shape):
            raise ValueError(f"hologram is empty (shape {tuple(arr.shape)})")
        shape = tuple(int(s) for s in arr.shape[-2:])
        if min(shape) < 8:
            raise ValueError(f"hologram frames must be at least 8×8 px, got {shape}")
        if self._shape is not None and shape != self._shape:
            raise ValueError(f"hologram frame shape {shape} does not match the calibration "
                             f"shape {self._shape}")
        self._check_frame_values(arr, "hologram")
        was_2d = arr.ndim == 2
        x = self.be.asarray(arr, self._real)
        if was_2d:
            x = x[None]
        return x, was_2d

    # -------------------------------------------------------------- calibration
    @property
    def is_calibrated(self) -> bool:
        """True once the sideband, filter and background field are fixed."""
        return self._plan is not None

    @property
    def sideband(self) -> tuple[float, float] | None:
        """Sideband (rows, cols) [cycles/camera px] in qpretrieve's convention."""
        return self._sideband

    def calibrate(self, frame: Any) -> None:
        """Fix sideband, filter and background field using ``frame`` for detection.

        Parameters
        ----------
        frame : array_like, shape (H, W) or (N, H, W)
            Frame used for sideband detection (slice 0 of a stack) and the frame shape.
            The configured sideband, if any, takes precedence over detection.
        """
        ref = self._host(frame)
        if ref.ndim == 3:
            ref = ref[0]
        if ref.ndim != 2:
            raise ValueError(f"calibration frame must be 2D, got shape {ref.shape}")
        shape = (int(ref.shape[0]), int(ref.shape[1]))
        if self._bg_raw is not None and self._bg_raw.shape != shape:
            raise ValueError(f"hologram shape {shape} does not match the background shape "
                             f"{self._bg_raw.shape}")
        if min(shape) < 8:
            raise ValueError(f"frames must be at least 8×8 px, got {shape}")
        self._shape = shape
        if self.config.mode == "fast":
            self._calibrate_fast(ref.astype(np.float64))
        else:
            self._calibrate_compat(ref.astype(np.float64))

    def _calibrate_fast(self, ref: np.ndarray) -> None:
        cfg = self.config
        h, w = self._shape
        d = cfg.downsample
        pad = cfg.resolved_padding
        if pad == 0:
            hp, wp = h, w
            bh, bw = max(1, round(h / d)), max(1, round(w / d))
            out = (bh, bw)
        else:
            import scipy.fft

            bh = scipy.fft.next_fast_len(math.ceil(pad * h / d))
            bw = scipy.fft.next_fast_len(math.ceil(pad * w / d))
            hp, wp = bh * d, bw * d
            out = (math.ceil(h / d), math.ceil(w / d))
        if bh > hp or bw > wp:  # pragma: no cover - guarded by downsample >= 1
            raise ValueError("crop box larger than the FFT")
        if cfg.sideband is not None:
            sb = cfg.sideband
        else:
            import scipy.fft

            x = ref - ref.mean()
            if cfg.refine_sideband:  # sub-bin estimate on the unpadded frame
                sb = find_sideband_rfft(scipy.fft.rfft2(x), w, refine=True)
            else:  # qpretrieve-like: quantised to the (padded) FFT grid in use
                xpad = np.zeros((hp, wp))
                xpad[:h, :w] = x
                sb = find_sideband_rfft(scipy.fft.rfft2(xpad), wp)
        self._sideband = (float(sb[0]), float(sb[1]))
        m0, m1 = round(sb[0] * hp), round(sb[1] * wp)
        if (m0, m1) == (0, 0):
            raise ValueError(f"sideband {sb} rounds to the DC bin of a {hp}×{wp} FFT")
        r = resolve_filter_radius(cfg.filter_size, cfg.filter_size_interpretation, sb,
                                  max(hp, wp))
        self._radius = r
        filt = get_filter(cfg.filter_name)
        # centred box, then reorder to ifft order (no shifts at run time)
        rc = m0 + np.arange(bh) - bh // 2
        cc = m1 + np.arange(bw) - bw // 2
        dfy = (rc / hp - sb[0]).reshape(-1, 1)
        dfx = (cc / wp - sb[1]).reshape(1, -1)
        weights = filt.weights(dfy, dfx, r)
        self._truncated = bool(filt.support(r) > min(bh / (2 * hp), bw / (2 * wp)) + 1e-12)
        if self._truncated:
            log.warning("filter support %.4f cycles/px exceeds the crop box half-width "
                        "(%.4f, %.4f): the filter is truncated by the box (downsample=%d)",
                        filt.support(r), bh / (2 * hp), bw / (2 * wp), d)
        rows = np.fft.ifftshift(rc)
        cols = np.fft.ifftshift(cc)
        weights = np.fft.ifftshift(weights)
        spatial_mean = bool(cfg.subtract_mean and pad != 0)
        if cfg.subtract_mean and not spatial_mean:
            # mean subtraction without padding only changes the DC bin
            weights[(rows % hp == 0)[:, None] & (cols % wp == 0)[None, :]] = 0.0
        weights = weights * (bh * bw) / (hp * wp)
        colm = cols % wp
        direct = colm <= wp // 2
        if direct.all():
            kind = "direct"
        elif not direct.any():
            kind = "mirror"
        else:
            kind = "mixed"
        self._plan = _FastPlan(
            pad_shape=(hp, wp), box=(bh, bw), out_shape=out,
            rows=rows.astype(np.int64), cols=cols.astype(np.int64), kind=kind,
            weights=self.be.asarray(weights, self._real),
            col_direct=(self.be.asarray(direct.astype(np.float64), self._real)[None, None, :] > 0
                        if kind == "mixed" else None),
            spatial_mean=spatial_mean)
        self._set_background()

    def _calibrate_compat(self, ref: np.ndarray) -> None:
        cfg = self.config
        h, w = self._shape
        pad = cfg.resolved_padding
        if pad:
            order = np.ceil(np.log(pad * max(h, w)) / np.log(2))
            n = int(2**order)
        else:
            if h != w:
                raise ValueError(f"compatible mode with padding=0 needs a square frame "
                                 f"(qpretrieve's filters need a square FFT), got {h}×{w}")
            n = h
        if n < max(h, w):
            raise ValueError(f"padding {pad} gives an FFT of {n} px, smaller than the frame")
        if cfg.sideband is not None:
            sb = cfg.sideband
        else:
            x = np.zeros((n, n))
            x[:h, :w] = ref - ref.mean()
            sb = find_sideband_shifted(np.fft.fftshift(np.fft.fft2(x)))
        self._sideband = (float(sb[0]), float(sb[1]))
        r = resolve_filter_radius(cfg.filter_size, cfg.filter_size_interpretation, sb, n)
        self._radius = r
        self._truncated = False
        filt = qpretrieve_filter_array(cfg.filter_name, r, self._sideband, n)
        shift = (-int(sb[0] * n), -int(sb[1] * n))
        crad = None
        out = (h, w)
        scale = 1.0
        if cfg.scale_to_filter:
            crad = int(np.ceil(r * n * cfg.scale_to_filter))
            if pad:
                out = (int(np.ceil(h * 2 * crad / n)), int(np.ceil(w * 2 * crad / n)))
                scale = (2 * crad / n) ** 2
            else:
                out = (2 * crad, 2 * crad)
        self._plan = _CompatPlan(n=n, shift=shift, filt=self.be.asarray(filt, self._real),
                                 crad=crad, out_shape=out, scale=scale)
        self._set_background()

    def _set_background(self) -> None:
        self._inv_bg = self._bg_field = self._bg_phase = None
        if self._bg_raw is None:
            return
        bg = self._raw_field(self.be.asarray(self._bg_raw, self._real)[None])
        if self.config.mode == "fast":
            mag2 = self.be.abs(bg) ** 2
            tiny = float(np.finfo(np.float32).tiny) * 1e6
            safe = self.be.where(mag2 > tiny, mag2, self.be.asarray(np.ones(1), self._real))
            inv = self.be.conj(bg) / safe
            self._inv_bg = self.be.where(mag2 > tiny, inv, self.be.zeros((1,), self._cplx))
        else:
            self._bg_field = bg
            self._bg_phase = self.be.angle(bg)

    # ------------------------------------------------------------------- fields
    def _raw_field(self, x: Any) -> Any:
        """Sideband field of native (N, H, W) real frames (no background correction)."""
        if isinstance(self._plan, _FastPlan):
            return self._raw_field_fast(x)
        return self._raw_field_compat(x)

    def _raw_field_fast(self, x: Any) -> Any:
        p: _FastPlan = self._plan
        be = self.be
        h, w = self._shape
        hp, wp = p.pad_shape
        if p.spatial_mean:
            x = x - be.mean2d(x)
        if (hp, wp) != (h, w):
            xp = be.zeros((x.shape[0], hp, wp), self._real)
            xp[:, :h, :w] = x
            x = xp
        if p.kind == "direct":
            # pruned 2D FFT: row transforms only for the box columns
            cols = be.take(be.rfft_last(x), p.cols % wp, -1)
            box = be.take(be.fft_rows(cols), p.rows % hp, -2)
        elif p.kind == "mirror":
            cols = be.take(be.rfft_last(x), (-p.cols) % wp, -1)
            box = be.conj(be.take(be.fft_rows(cols), (-p.rows) % hp, -2))
        else:
            spec = be.rfft2(x)
            half = wp // 2
            colm = p.cols % wp
            d = be.take2d(spec, p.rows % hp, np.minimum(colm, half))
            m = be.conj(be.take2d(spec, (-p.rows) % hp, np.minimum((-p.cols) % wp, half)))
            box = be.where(p.col_direct, d, m)
        field = be.ifft2(box * p.weights)
        oh, ow = p.out_shape
        if field.shape[-2:] != (oh, ow):
            field = field[:, :oh, :ow]
        if self.config.invert_phase:
            field = be.conj(field)
        return field

    def _raw_field_compat(self, x: Any) -> Any:
        p: _CompatPlan = self._plan
        be = self.be
        h, w = self._shape
        if self.config.subtract_mean:
            x = x - be.mean2d(x)
        if p.n != h or p.n != w:
            xp = be.zeros((x.shape[0], p.n, p.n), self._real)
            xp[:, :h, :w] = x
            x = xp
        spec = be.fftshift(be.fft2(x))
        used = be.roll(spec * p.filt, p.shift)
        if p.crad is not None:
            c = p.n // 2
            used = used[:, c - p.crad:c + p.crad, c - p.crad:c + p.crad]
        field = be.ifft2(be.ifftshift(used))
        if self.config.resolved_padding:
            oh, ow = p.out_shape
            field = field[:, :oh, :ow]
            if p.crad is not None:
                field = field * p.scale
        if self.config.invert_phase:
            field = be.conj(field)
        return field

    def _prepare(self, holo: Any) -> tuple[Any, bool]:
        if self._plan is None:
            ref = holo[0] if getattr(holo, "ndim", 2) == 3 else holo
            self.calibrate(ref)
        return self._frames(holo)

    def _out(self, a: Any, was_2d: bool, to_numpy: bool, dtype: str) -> Any:
        if was_2d:
            a = a[0]
        if to_numpy:
            return np.asarray(self.be.to_numpy(a)).astype(dtype, copy=False)
        return a

    def raw_field(self, holo: Any, *, to_numpy: bool = True) -> Any:
        """Sideband field without background correction.

        Parameters
        ----------
        holo : array_like, shape (H, W) or (N, H, W)
            Hologram(s).
        to_numpy : bool
            Return a NumPy array (else a native backend array).

        Returns
        -------
        complex64 array, shape (H', W') or (N, H', W')
        """
        x, was_2d = self._prepare(holo)
        return self._out(self._raw_field(x), was_2d, to_numpy, "complex64")

    def _corrected(self, x: Any) -> Any:
        f = self._raw_field(x)
        if self._inv_bg is not None:
            return f * self._inv_bg
        if self._bg_field is not None:
            return f / self._bg_field
        return f

    def field(self, holo: Any, *, to_numpy: bool = True) -> Any:
        """Background-corrected complex field (hologram field / background field).

        Parameters
        ----------
        holo : array_like, shape (H, W) or (N, H, W)
            Hologram(s) with the calibration frame shape.
        to_numpy : bool
            Return a NumPy array (else a native backend array, e.g. a CUDA tensor).

        Returns
        -------
        complex64 array, shape (H', W') or (N, H', W')
            Without a background this is the sideband field itself.
        """
        x, was_2d = self._prepare(holo)
        return self._out(self._corrected(x), was_2d, to_numpy, "complex64")

    def wrapped_phase(self, holo: Any, *, to_numpy: bool = True) -> Any:
        """Wrapped, background-corrected phase [rad].

        Fast mode: ``angle(field)`` in (-π, π]. Compatible mode: qpretrieve's
        ``φ_holo − φ_bg`` (range (-2π, 2π)).

        Returns
        -------
        float32 array, shape (H', W') or (N, H', W')
        """
        x, was_2d = self._prepare(holo)
        if self.config.mode == "compatible" and self._bg_phase is not None:
            ph = self.be.angle(self._raw_field(x)) - self._bg_phase
        else:
            ph = self.be.angle(self._corrected(x))
        return self._out(ph, was_2d, to_numpy, "float32")

    def amplitude(self, holo: Any, *, to_numpy: bool = True) -> Any:
        """Amplitude ratio ``|field_holo| / |field_bg|`` (or ``|field|`` without background).

        Returns
        -------
        float32 array, shape (H', W') or (N, H', W')
        """
        x, was_2d = self._prepare(holo)
        return self._out(self.be.abs(self._corrected(x)), was_2d, to_numpy, "float32")

    def phase(self, holo: Any, *, unwrap: bool = True, bg_fit: Any = _DEFAULT,
              border_px: int | None = None, mask: np.ndarray | None = None) -> np.ndarray:
        """Background-corrected phase [rad] (positive inside cells by default).

        Parameters
        ----------
        holo : array_like, shape (H, W) or (N, H, W)
            Hologram(s).
        unwrap : bool
            Unwrap each frame in 2D (scikit-image). Fast mode removes the 2π offset so the
            border median lies in [-π, π); compatible mode keeps scikit-image's offset
            (qpretrieve's numbers).
        bg_fit : {None, "offset", "tilt", "poly2o"}, optional
            Residual background fit (default: ``config.bg_fit``).
        border_px : int, optional
            Border width of the fit [output px] (default: ``config.bg_border_px``).
        mask : ndarray of bool, optional
            Background mask (``True`` = background) intersected with the fit border.

        Returns
        -------
        float32 ndarray, shape (H', W') or (N, H', W')
        """
        ph = self.wrapped_phase(holo, to_numpy=True)
        if unwrap:
            rebase = "none" if self.config.mode == "compatible" else "border"
            ph = unwrap_phase(ph.astype(np.float64), rebase=rebase,
                              seed=None if self.config.mode == "compatible"
                              else self.config.unwrap_seed)
        fit = self.config.bg_fit if bg_fit is _DEFAULT else bg_fit
        if fit is not None:
            bp = self.config.bg_border_px if border_px is None else border_px
            ph = fit_background(ph, fit, border_px=bp, mask=mask).corrected
        return np.asarray(ph, dtype=np.float32)

    # ----------------------------------------------------------------- metadata
    @property
    def output_shape(self) -> tuple[int, int] | None:
        """Shape (H', W') of one output frame [px] (None before calibration)."""
        return None if self._plan is None else tuple(self._plan.out_shape)

    @property
    def pixel_scale(self) -> tuple[float, float] | None:
        """Camera pixels per output pixel (rows, cols)."""
        p = self._plan
        if p is None:
            return None
        if isinstance(p, _FastPlan):
            return (p.pad_shape[0] / p.box[0], p.pad_shape[1] / p.box[1])
        if p.crad is not None:
            return (p.n / (2 * p.crad),) * 2
        return (1.0, 1.0)

    @property
    def edge_px(self) -> int:
        """Recommended edge exclusion [output px]: 10 camera px without padding, else 0."""
        if self.config.resolved_padding or self._plan is None:
            return 0
        return int(math.ceil(10 / min(self.pixel_scale)))

    @property
    def params(self) -> dict:
        """Every resolved parameter (JSON-serialisable) for metadata."""
        cfg = self.config
        p = self._plan
        d: dict[str, Any] = {
            "software": "leukoflow.acquisition.reconstruct",
            "mode": cfg.mode,
            **self.be.describe(),
            "precision": self._real,
            "filter_name": cfg.filter_name,
            "filter_size": float(cfg.filter_size),
            "filter_size_interpretation": cfg.filter_size_interpretation,
            "filter_radius_cycles_per_px": self._radius,
            "sideband": None if self._sideband is None else list(self._sideband),
            "sideband_source": self._source,
            "padding": cfg.resolved_padding,
            "subtract_mean": cfg.subtract_mean,
            "invert_phase": cfg.invert_phase,
            "background": self._bg_raw is not None,
            "background_method": "field division" if cfg.mode == "fast" else "phase difference",
            "input_shape": None if self._shape is None else list(self._shape),
            "output_shape": None if p is None else list(p.out_shape),
            "pixel_scale": None if p is None else list(self.pixel_scale),
            "edge_px": self.edge_px,
            "camera_pixel_um": cfg.camera_pixel_um,
            "pixel_size_um": (None if p is None or cfg.camera_pixel_um is None
                              else cfg.camera_pixel_um * float(np.mean(self.pixel_scale))),
            "unwrap": "skimage.restoration.unwrap_phase",
            "unwrap_rebase": "none" if cfg.mode == "compatible" else "border",
            "unwrap_seed": None if cfg.mode == "compatible" else cfg.unwrap_seed,
            "bg_fit": cfg.bg_fit,
            "bg_border_px": cfg.bg_border_px,
        }
        if isinstance(p, _FastPlan):
            d.update(downsample=cfg.downsample, refine_sideband=cfg.refine_sideband,
                     fft_shape=list(p.pad_shape),
                     crop_box=list(p.box), filter_truncated=self._truncated,
                     sideband_bin=[int(round(self._sideband[0] * p.pad_shape[0])),
                                   int(round(self._sideband[1] * p.pad_shape[1]))])
        elif isinstance(p, _CompatPlan):
            d.update(fft_shape=[p.n, p.n], scale_to_filter=float(cfg.scale_to_filter),
                     sideband_bin=[-p.shift[0], -p.shift[1]])
        else:
            d.update(downsample=cfg.downsample if cfg.mode == "fast" else None)
        return d
