"""Wave optics of the simulated instrument: propagation, band-limited upsampling, off-axis
hologram formation, the static background, the camera, and the ideal demodulation.

Sign convention: the reference wave is ``exp(-2πi (fy·y + fx·x))`` with the configured
carrier (fy, fx) [cycles/camera px] (qpretrieve (rows, cols) order). The cross term
``conj(R)·O`` therefore sits at +carrier in ``numpy.fft`` order, which is the sideband
qpretrieve's peak search picks for the default carrier (-0.25, 0.25); demodulating it gives
cells a positive phase without ``invert_phase``.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft as sfft

from leukoflow.acquisition.sim.params import BackgroundModel, CameraModel

# --------------------------------------------------------------------------------------
# propagation and band-limited resampling


def angular_spectrum(field: np.ndarray, distance_um: float, pixel_um: float,
                     wavelength_um: float, medium_index: float) -> np.ndarray:
    """Propagate a complex field by ``distance_um`` with the angular spectrum method.

    Parameters
    ----------
    field : numpy.ndarray
        Complex (h, w) field sampled at ``pixel_um`` [µm]; should be ~1 at the borders
        (the method is periodic).
    distance_um : float
        Propagation distance [µm] (positive: downstream of the focal plane).
    pixel_um : float
        Sampling distance [µm].
    wavelength_um : float
        Vacuum wavelength [µm].
    medium_index : float
        Refractive index of the medium.

    Returns
    -------
    numpy.ndarray
        complex128 (h, w) propagated field; evanescent components are dropped and the
        plane-wave phase 2π·n·d/λ is removed (an empty field stays 1).
    """
    h, w = field.shape
    km = medium_index / wavelength_um  # [cycles/µm]
    fy = np.fft.fftfreq(h, d=pixel_um)[:, None]
    fx = np.fft.fftfreq(w, d=pixel_um)[None, :]
    arg = km**2 - fy**2 - fx**2
    prop = arg > 0
    kz = 2 * math.pi * np.sqrt(np.where(prop, arg, 0.0))
    tf = np.where(prop, np.exp(1j * (kz - 2 * math.pi * km) * distance_um), 0.0)
    return np.fft.ifft2(np.fft.fft2(field) * tf)


def fourier_upsample(a: np.ndarray, factor: int) -> np.ndarray:
    """Band-limited (Fourier zero-padding) upsampling of the last two axes by ``factor``.

    The result passes exactly through the input samples (every ``factor``-th pixel from 0)
    and has no spectral content outside the input band, so a Fourier crop of that band
    recovers the input. Pruned: the zero-padded axis transforms touch only non-zero rows.

    Parameters
    ----------
    a : numpy.ndarray
        Complex or real array (..., h, w), even h and w.
    factor : int
        Integer upsampling factor.

    Returns
    -------
    numpy.ndarray
        complex64 (..., h·factor, w·factor).
    """
    a = np.asarray(a)
    *lead, h, w = a.shape
    f = sfft.fft2(a.astype(np.complex64, copy=False), axes=(-2, -1), workers=1)
    g = np.zeros((*lead, h, w * factor), np.complex64)
    g[..., : w // 2] = f[..., : w // 2]
    g[..., w * factor - (w - w // 2):] = f[..., w // 2:]
    g = sfft.ifft(g, axis=-1, workers=1, overwrite_x=True)
    out = np.zeros((*lead, h * factor, w * factor), np.complex64)
    out[..., : h // 2, :] = g[..., : h // 2, :]
    out[..., h * factor - (h - h // 2):, :] = g[..., h // 2:, :]
    out = sfft.ifft(out, axis=-2, workers=1, overwrite_x=True)
    out *= factor * factor
    return out


# --------------------------------------------------------------------------------------
# ideal demodulation (reference for the acceptance tests and the crop dataset)


def _box_index(center: int, size: int, n: int) -> np.ndarray:
    """FFT indices of a ``size`` box centred at frequency bin ``center`` (ifft order)."""
    k = np.fft.fftfreq(size, 1.0 / size).astype(np.int64)
    return (center + k) % n


def demodulate_field(hologram: np.ndarray, carrier: tuple[float, float] = (-0.25, 0.25),
                     downsample: int = 4) -> np.ndarray:
    """Ideal off-axis demodulation of one hologram or a stack to the phase grid.

    FFT, crop the (H/D)×(W/D) box centred on the sideband at ``carrier`` [cycles/px]
    (rows, cols), inverse FFT. Output sample (m, n) is the field at camera pixel (D·m, D·n).

    Parameters
    ----------
    hologram : numpy.ndarray
        Real (..., H, W) hologram(s) [counts]; H and W multiples of ``downsample``.
    carrier : tuple of float
        Sideband position (fy, fx) [cycles/camera px]; fy·H and fx·W should be integers.
    downsample : int
        Phase-grid factor D.

    Returns
    -------
    numpy.ndarray
        complex64 (..., H/D, W/D) demodulated field (sideband amplitude units).
    """
    x = np.asarray(hologram, dtype=np.float32)
    *_, hh, ww = x.shape
    if hh % downsample or ww % downsample:
        raise ValueError(f"hologram shape {x.shape[-2:]} not a multiple of {downsample}")
    h, w = hh // downsample, ww // downsample
    sy, sx = int(round(carrier[0] * hh)), int(round(carrier[1] * ww))
    cols = _box_index(sx, w, ww)
    if 0 <= sx - w // 2 and sx + w // 2 <= ww // 2:
        spec = sfft.rfft(x, axis=-1, workers=1)[..., cols]
    else:  # negative fx: use the full transform
        spec = sfft.fft(x, axis=-1, workers=1)[..., cols]
    spec = sfft.fft(spec, axis=-2, workers=1, overwrite_x=True)
    box = spec[..., _box_index(sy, h, hh), :]
    out = sfft.ifft2(box, axes=(-2, -1), workers=1, overwrite_x=True)
    out *= (h * w) / float(hh * ww)
    return out.astype(np.complex64, copy=False)


def reference_demodulate(hologram: np.ndarray, background: np.ndarray | None = None,
                         carrier: tuple[float, float] = (-0.25, 0.25),
                         downsample: int = 4) -> np.ndarray:
    """Ideal phase retrieval: demodulate, divide by the background field, take the angle.

    Parameters
    ----------
    hologram, background : numpy.ndarray
        (..., H, W) hologram(s) and the matching background hologram [counts].
    carrier : tuple of float
        Sideband (fy, fx) [cycles/camera px].
    downsample : int
        Phase-grid factor.

    Returns
    -------
    numpy.ndarray
        float32 (..., H/D, W/D) wrapped phase [rad] in (-π, π].
    """
    f = demodulate_field(hologram, carrier, downsample)
    if background is not None:
        f = f * np.conj(demodulate_field(background, carrier, downsample))
    return np.angle(f).astype(np.float32)


# --------------------------------------------------------------------------------------
# camera


class Camera:
    """Camera model: shot noise (Gaussian approximation), read noise, rounding, clipping.

    Parameters
    ----------
    model : CameraModel
        Intensities and noise parameters.
    bit_depth : int
        Bit depth; frames are uint8 for 8 bit.
    """

    def __init__(self, model: CameraModel, bit_depth: int = 8) -> None:
        self.model = model
        self.max_count = float(2**bit_depth - 1)
        self.inv_gain = self.max_count / model.full_well_e  # counts per electron
        self.read2 = model.read_noise_counts**2
        self.step = float(2 ** max(0, bit_depth - int(getattr(model, "adc_bits", bit_depth))))

    def sigma(self, intensity: np.ndarray) -> np.ndarray:
        """Noise RMS [counts] at a noise-free ``intensity`` [counts]."""
        return np.sqrt(np.clip(intensity, 0, None) * self.inv_gain + self.read2)

    def expose(self, intensity: np.ndarray, z: np.ndarray, out: np.ndarray | None = None
               ) -> np.ndarray:
        """Noisy uint8 image from the noise-free ``intensity`` [counts] and unit normals ``z``.

        ``intensity`` (float32) is overwritten.
        """
        sig = intensity * self.inv_gain  # intensity is >= 0 (|field|²)
        sig += self.read2
        np.sqrt(sig, out=sig)
        sig *= z
        intensity += sig
        intensity += 0.5  # round half up by truncation after clipping
        np.clip(intensity, 0, self.max_count, out=intensity)
        if self.step > 1:  # fewer effective ADC bits: counts in steps of 2**(8 - adc_bits)
            np.floor(intensity / self.step, out=intensity)
            intensity *= self.step
        if out is None:
            return intensity.astype(np.uint8)
        out[...] = intensity
        return out


# --------------------------------------------------------------------------------------
# interferometer with static background


def _artefact_field(rng: np.random.Generator, shape: tuple[int, int], pixel_um: float,
                    bg: BackgroundModel) -> np.ndarray:
    """Complex (h, w) object-arm artefact field on the phase grid (dust rings, fringes)."""
    h, w = shape
    y = (np.arange(h) * pixel_um)[:, None]
    x = (np.arange(w) * pixel_um)[None, :]
    ph = np.zeros(shape)
    am = np.zeros(shape)
    for _ in range(bg.dust_rings):
        cy, cx = rng.uniform(0, h * pixel_um), rng.uniform(0, w * pixel_um)
        period = rng.uniform(*bg.ring_period_um)
        width = rng.uniform(2.0, 4.0) * period
        r = np.hypot(y - cy, x - cx)
        env = np.exp(-0.5 * (r / width) ** 2)
        ring = np.cos(2 * math.pi * r / period + rng.uniform(0, 2 * math.pi)) * env
        ph += bg.dust_phase_rad * ring
        am += bg.dust_amplitude * ring
    if bg.parasitic_fringe > 0:
        ang = rng.uniform(0, math.pi)
        period = rng.uniform(15.0, 30.0)
        am += bg.parasitic_fringe * np.cos(
            2 * math.pi * (np.cos(ang) * x + np.sin(ang) * y) / period)
    return ((1.0 + am) * np.exp(1j * ph)).astype(np.complex64)


class Interferometer:
    """Reference and object waves over the camera ROI, including the static background.

    ``I = |E_ref + E_obj·C|²`` [counts] for an object field C (1 where empty), with
    ``E_ref = a_r·A·R`` and ``E_obj = a_o·A·B``: A the illumination amplitude (gradient and
    vignetting), B the band-limited artefact field of the object arm, R the carrier.

    Parameters
    ----------
    roi_shape : tuple[int, int]
        Camera ROI (rows, cols) [px].
    carrier : tuple[float, float]
        Sideband (fy, fx) [cycles/camera px].
    downsample : int
        Camera px per phase px.
    phase_pixel_um : float
        Phase-grid pixel [µm] (artefacts are drawn on that grid, then upsampled).
    camera : CameraModel
        Beam intensities.
    background : BackgroundModel
        Illumination profile and artefact parameters.
    rng : numpy.random.Generator
        Draws the artefacts and illumination tilt direction.
    """

    def __init__(self, roi_shape: tuple[int, int], carrier: tuple[float, float],
                 downsample: int, phase_pixel_um: float, camera: CameraModel,
                 background: BackgroundModel, rng: np.random.Generator) -> None:
        hh, ww = roi_shape
        self.shape = (hh, ww)
        self.carrier = carrier
        a_r, a_o = camera.amplitudes()
        yy = np.arange(hh, dtype=np.float64)[:, None]
        xx = np.arange(ww, dtype=np.float64)[None, :]
        ref = np.exp(-2j * math.pi * (carrier[0] * yy + carrier[1] * xx))
        ty, tx = 2 * yy / hh - 1, 2 * xx / ww - 1
        ang = rng.uniform(0, 2 * math.pi)
        illum = (1.0 + background.illumination_gradient * 0.5
                 * (math.cos(ang) * tx + math.sin(ang) * ty)
                 - background.vignetting * 0.5 * (tx**2 + ty**2))
        amp = np.sqrt(illum)
        art = _artefact_field(rng, (hh // downsample, ww // downsample), phase_pixel_um,
                              background)
        bfield = fourier_upsample(art, downsample)
        self.e_ref = (a_r * amp * ref).astype(np.complex64)
        self.e_obj = (a_o * amp * bfield).astype(np.complex64)
        self.intensity0 = self.intensity(None, 0, hh, 0, ww)

    def intensity(self, c: np.ndarray | None, y0: int, y1: int, x0: int, x1: int
                  ) -> np.ndarray:
        """Noise-free intensity [counts] float32 of rows y0:y1, cols x0:x1 with object field c."""
        eo = self.e_obj[y0:y1, x0:x1]
        f = eo * c if c is not None else eo.copy()
        f += self.e_ref[y0:y1, x0:x1]
        out = f.real * f.real
        out += f.imag * f.imag
        return out
