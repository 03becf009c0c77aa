"""Out-of-distribution objects of the simulated instrument (one plugin per OOD kind).

Erythrocytes (biconcave discs and spherocytes), platelets, debris, doublets (two touching
leukocytes), defocused leukocytes (angular-spectrum propagation of the complex field),
digit-shaped phase objects (scikit-learn's bundled 8×8 handwritten digits, no download) and
smooth noise patterns. All are labelled -1.
"""

from __future__ import annotations

import math

import numpy as np

from leukoflow.acquisition.sim.cells import OBJECT_MODELS, ObjectModel, leukocyte_model
from leukoflow.acquisition.sim.optics import angular_spectrum
from leukoflow.acquisition.sim.render import (
    PhaseObject,
    RenderContext,
    ellipsoid,
    finish,
    grid,
    patch_size,
    smooth_noise,
    soft_window,
)
from leukoflow.core.vocabulary import CLASS_NAMES


def _obj(kind: str, phase: np.ndarray, ctx: RenderContext, diameter: float, extent: float,
         **kw) -> PhaseObject:
    return PhaseObject(kind=kind, label=-1, phase=phase, pixel_um=ctx.pixel_um,
                       diameter_um=float(diameter), extent_um=float(extent), **kw)


def _draw_class(rng: np.random.Generator, ctx: RenderContext) -> str:
    names = list(CLASS_NAMES)
    p = np.array([ctx.class_probs.get(c, 0.0) for c in names], float)
    p = p / p.sum() if p.sum() > 0 else np.full(len(names), 1.0 / len(names))
    return names[int(rng.choice(len(names), p=p))]


@OBJECT_MODELS.register("erythrocyte")
class Erythrocyte(ObjectModel):
    """Erythrocyte: biconcave disc (Evans-Fung profile, 7-8.5 µm) or spherocyte (6-7 µm)."""

    kind = "erythrocyte"
    sphered_fraction = 0.3
    dn = (0.045, 0.065)  # haemoglobin solution vs medium

    def render(self, rng, ctx):
        dn = rng.uniform(*self.dn)
        angle = rng.uniform(0, 2 * math.pi)
        if rng.uniform() < self.sphered_fraction:
            d = rng.uniform(6.0, 7.0)
            n = patch_size(d, ctx.pixel_um)
            y, x = grid(n, ctx.pixel_um, angle)
            t = ellipsoid(y, x, d / 2, d / 2 * rng.uniform(0.92, 1.0), d / 2 * 0.9)
            shape = "sphered"
        else:
            d = rng.uniform(7.0, 8.5)
            n = patch_size(d, ctx.pixel_um)
            y, x = grid(n, ctx.pixel_um, angle)
            r2 = (x**2 + (y / rng.uniform(0.9, 1.0)) ** 2) / (d / 2) ** 2
            s = d / 7.82  # Evans-Fung coefficients scaled to the drawn diameter
            t = s * np.sqrt(np.clip(1 - r2, 0, None)) * (0.81 + 7.83 * r2 - 4.39 * r2**2)
            shape = "biconcave"
        phase = finish(ctx.k0 * dn * t, ctx.smoothing_px)
        return _obj(self.kind, phase, ctx, d, d, params={"shape": shape, "dn": dn})


@OBJECT_MODELS.register("platelet")
class Platelet(ObjectModel):
    """Platelet: small flat disc, 2-3 µm, low phase."""

    kind = "platelet"

    def render(self, rng, ctx):
        d = rng.uniform(2.0, 3.0)
        n = patch_size(d, ctx.pixel_um)
        y, x = grid(n, ctx.pixel_um, rng.uniform(0, 2 * math.pi))
        t = ellipsoid(y, x, d / 2, d / 2 * rng.uniform(0.6, 1.0), rng.uniform(0.4, 0.7))
        phase = finish(ctx.k0 * rng.uniform(0.02, 0.05) * t, ctx.smoothing_px)
        return _obj(self.kind, phase, ctx, d, d)


@OBJECT_MODELS.register("debris")
class Debris(ObjectModel):
    """Debris: irregular smooth blob (thresholded smooth noise), 2-10 µm, 0.2-2.5 rad."""

    kind = "debris"

    def render(self, rng, ctx):
        d = rng.uniform(2.0, 10.0)
        n = patch_size(d, ctx.pixel_um)
        y, x = grid(n, ctx.pixel_um)
        r = np.hypot(y, x) / (d / 2)
        blob = smooth_noise(rng, n, max(1.0, 0.15 * d / ctx.pixel_um)) + 2.0 * (1 - r)
        mask = np.clip(blob, 0, None) * (r < 1)
        peak = mask.max()
        phase = mask / peak * rng.uniform(0.2, 2.5) if peak > 0 else mask
        phase = finish(phase.astype(np.float32), max(ctx.smoothing_px, 0.8))
        return _obj(self.kind, phase, ctx, d, d)


@OBJECT_MODELS.register("doublet")
class Doublet(ObjectModel):
    """Two touching leukocytes (classes from the configured mix) in one object."""

    kind = "doublet"

    def render(self, rng, ctx):
        a = leukocyte_model(_draw_class(rng, ctx)).render(rng, ctx)
        b = leukocyte_model(_draw_class(rng, ctx)).render(rng, ctx)
        ang = rng.uniform(0, 2 * math.pi)
        sep = 0.5 * (a.diameter_um + b.diameter_um) * rng.uniform(0.85, 1.0) / ctx.pixel_um
        dy, dx = sep * math.sin(ang), sep * math.cos(ang)
        n = int(max(a.shape[0], b.shape[0]) + math.ceil(max(abs(dy), abs(dx)))) + 2
        n += n % 2
        out = np.zeros((n, n), np.float32)
        for o, (oy, ox) in ((a, (-dy / 2, -dx / 2)), (b, (dy / 2, dx / 2))):
            h = o.shape[0]
            y0 = int(round(n / 2 + oy - h / 2))
            x0 = int(round(n / 2 + ox - h / 2))
            out[y0:y0 + h, x0:x0 + h] += o.phase
        extent = (sep + 0.5 * (a.diameter_um + b.diameter_um) / ctx.pixel_um) * ctx.pixel_um
        diam = math.sqrt(a.diameter_um**2 + b.diameter_um**2)
        return _obj(self.kind, out, ctx, diam, extent, params={"pair": [a.kind, b.kind]})


@OBJECT_MODELS.register("defocus")
class Defocused(ObjectModel):
    """A leukocyte out of focus: its field propagated by ±|d|, d in ctx.defocus_um [µm]."""

    kind = "defocus"

    def render(self, rng, ctx):
        cell = leukocyte_model(_draw_class(rng, ctx)).render(rng, ctx)
        dist = rng.uniform(*ctx.defocus_um) * (1 if rng.uniform() < 0.5 else -1)
        out = propagate_object(cell, dist, ctx)
        return _obj(self.kind, out.phase, ctx, cell.diameter_um, out.extent_um,
                    amplitude=out.amplitude, defocus_um=float(dist),
                    params={"cell": cell.kind})


def propagate_object(obj: PhaseObject, dist_um: float, ctx: RenderContext) -> PhaseObject:
    """The object seen ``dist_um`` [µm] out of focus (angular-spectrum propagation).

    The patch is padded by the spread of the field (0.35·|d| plus 6 px), propagated,
    faded to the empty field at the border, and unwrapped (scikit-image); the returned
    object keeps ``kind``, ``label``, ``diameter_um`` and ``params`` and gets the amplitude
    and ``defocus_um``. Used for the ``defocus`` OOD kind and for a focus offset of the
    whole instrument (``SimConfig.focus_offset_um``).
    """
    from skimage.restoration import unwrap_phase

    margin = int(math.ceil(0.35 * abs(dist_um) / ctx.pixel_um)) + 6
    ph = np.pad(obj.phase, margin)
    field0 = np.exp(1j * ph.astype(np.float64))
    if obj.amplitude is not None:
        field0 = field0 * np.pad(obj.amplitude, margin, constant_values=1.0)
    n = ph.shape[0]
    f = angular_spectrum(field0, dist_um, ctx.pixel_um, ctx.wavelength_um, ctx.medium_index)
    win = soft_window(n, margin // 2)
    f = 1.0 + (f - 1.0) * win  # the spread field fades to the empty field at the border
    phase = unwrap_phase(np.angle(f).astype(np.float64))
    border = np.concatenate([phase[0], phase[-1], phase[:, 0], phase[:, -1]])
    phase -= 2 * math.pi * np.round(np.median(border) / (2 * math.pi))
    return PhaseObject(kind=obj.kind, label=obj.label, phase=phase.astype(np.float32),
                       pixel_um=ctx.pixel_um, diameter_um=obj.diameter_um,
                       extent_um=obj.diameter_um + 2 * 0.35 * abs(dist_um),
                       amplitude=np.abs(f).astype(np.float32),
                       defocus_um=float(obj.defocus_um + dist_um), params=dict(obj.params))


_DIGITS: np.ndarray | None = None


def _digits() -> np.ndarray:
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

        _DIGITS = load_digits().images.astype(np.float32) / 16.0
    return _DIGITS


@OBJECT_MODELS.register("digit")
class Digit(ObjectModel):
    """Handwritten digit (scikit-learn 8×8 digits) as a smooth phase object, 9-14 µm."""

    kind = "digit"

    def render(self, rng, ctx):
        from scipy import ndimage

        imgs = _digits()
        idx = int(rng.integers(len(imgs)))
        size = rng.uniform(9.0, 14.0)
        n = patch_size(size * 1.42, ctx.pixel_um)
        zoom = size / ctx.pixel_um / 8.0
        up = ndimage.zoom(imgs[idx], zoom, order=3)
        up = ndimage.rotate(np.clip(up, 0, None), rng.uniform(0, 360), reshape=True, order=1)
        out = np.zeros((n, n), np.float32)
        h, w = min(up.shape[0], n), min(up.shape[1], n)
        y0, x0 = (n - h) // 2, (n - w) // 2
        out[y0:y0 + h, x0:x0 + w] = up[:h, :w]
        phase = finish(out * rng.uniform(1.0, 4.0), max(ctx.smoothing_px, 0.8))
        phase = np.clip(phase, 0, None)
        return _obj(self.kind, phase, ctx, size, size * 1.42, params={"digit_index": idx})


@OBJECT_MODELS.register("noise")
class NoisePattern(ObjectModel):
    """Smooth random phase pattern inside a soft disc, 8-16 µm, up to a few rad."""

    kind = "noise"

    def render(self, rng, ctx):
        d = rng.uniform(8.0, 16.0)
        n = patch_size(d, ctx.pixel_um)
        y, x = grid(n, ctx.pixel_um)
        r = np.hypot(y, x) / (d / 2)
        env = np.clip(1.0 - r**4, 0, None)
        z = smooth_noise(rng, n, rng.uniform(0.8, 3.0))
        phase = (rng.uniform(0.3, 1.5) * z + rng.uniform(0.0, 2.0)) * env
        phase = finish(phase.astype(np.float32), max(ctx.smoothing_px, 0.8))
        return _obj(self.kind, phase, ctx, d, d)
