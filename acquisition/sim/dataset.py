"""Labelled crop datasets from the simulated instrument (training and validation data).

Each object is rendered alone, centred on its phase centroid (rounded to a whole phase
pixel, as the live pipeline crops around a segmented centroid), with random orientation.
With ``through_hologram=True`` it goes through the same physics as a live frame: its field
is upsampled to a camera patch, mixed with the instrument's reference and background
artefacts, exposed by the camera model (shot + read noise, 8-bit) and demodulated the ideal
way against the matching background hologram, so noise and band limit match live crops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from leukoflow.acquisition.sim import ood as _ood  # noqa: F401  (registers the OOD object models)
from leukoflow.acquisition.sim.cells import OBJECT_MODELS
from leukoflow.acquisition.sim.flow import render_context
from leukoflow.acquisition.sim.optics import (
    Camera,
    Interferometer,
    demodulate_field,
    fourier_upsample,
)
from leukoflow.acquisition.sim.params import SimConfig
from leukoflow.acquisition.sim.render import PhaseObject
from leukoflow.core.physics import CROP_SIZE_PX, dry_mass_pg
from leukoflow.core.vocabulary import CLASS_NAMES, OOD_KINDS

#: Phase threshold of the feature mask [rad].
MASK_THRESHOLD_RAD = 0.25


def place(obj: PhaseObject, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Put ``obj`` on a ``size``×``size`` grid with its rounded phase centroid at size//2.

    Returns the phase [rad] on the grid (parts outside are cut) and the patch origin
    (row, col) on the grid [px].
    """
    cy, cx = obj.centroid()
    oy = size // 2 - int(round(cy))
    ox = size // 2 - int(round(cx))
    h, w = obj.shape
    a0, b0 = max(oy, 0), max(ox, 0)
    a1, b1 = min(oy + h, size), min(ox + w, size)
    ph = np.zeros((size, size), np.float32)
    ph[a0:a1, b0:b1] = obj.phase[a0 - oy:a1 - oy, b0 - ox:b1 - ox]
    return ph, (oy, ox)


def _perimeter_px(mask: np.ndarray) -> float:
    """Perimeter [px] of a binary mask from its pixel-edge crossings (Crofton: π/4 per edge).

    Unbiased for smooth outlines at random orientation; a disc of radius r gives ~2πr.
    """
    m = np.pad(mask, 1).astype(np.int8)
    crossings = np.count_nonzero(np.diff(m, axis=0)) + np.count_nonzero(np.diff(m, axis=1))
    return float(crossings) * math.pi / 4.0


def crop_features(phase: np.ndarray, mask: np.ndarray, pixel_um: float,
                  wavelength_um: float) -> dict[str, float]:
    """Phase features of one crop.

    Parameters
    ----------
    phase : numpy.ndarray
        (h, w) phase [rad].
    mask : numpy.ndarray
        bool (h, w) object mask.
    pixel_um, wavelength_um : float
        Pixel size and wavelength [µm].

    Returns
    -------
    dict
        ``area_um`` [µm²], ``deform`` (1 - circularity), ``qpi_pha_int`` [rad, summed over
        the mask], ``qpi_dm`` [pg], ``pha_mean``/``pha_max`` [rad].
    """
    n = int(mask.sum())
    if n == 0:
        return {"area_um": 0.0, "deform": 0.0, "qpi_pha_int": 0.0, "qpi_dm": 0.0,
                "pha_mean": 0.0, "pha_max": 0.0}
    area = n * pixel_um**2
    per = _perimeter_px(mask) * pixel_um
    circ = 2 * math.sqrt(math.pi * area) / per if per > 0 else 1.0
    s = float(phase[mask].sum())
    return {"area_um": area, "deform": float(np.clip(1 - circ, 0, 1)), "qpi_pha_int": s,
            "qpi_dm": dry_mass_pg(s, pixel_um, wavelength_um),
            "pha_mean": s / n, "pha_max": float(phase[mask].max())}


class _HologramPath:
    """Camera-patch hologram formation and ideal demodulation for isolated objects.

    The canvas hologram is a precomputed noisy background window (several windows of the
    instrument background, several noise realisations each); only the object's
    neighbourhood is recomputed with fresh camera noise, as in the flow simulator.
    """

    n_windows = 16
    n_noise = 4

    def __init__(self, cfg: SimConfig, canvas: int, seed: int) -> None:
        o = cfg.optics
        self.d = o.downsample
        self.canvas = canvas
        self.carrier = tuple(o.carrier)
        cc = canvas * self.d
        self.cc = cc
        shape = (max(o.roi_shape[0], cc), max(o.roi_shape[1], cc))
        ss = np.random.SeedSequence([int(seed), 0xDA7A])
        s_bg, s_noise, s_win = ss.spawn(3)
        self.interf = Interferometer(shape, self.carrier, self.d, o.pixel_um, cfg.camera,
                                     cfg.background, np.random.default_rng(s_bg))
        self.camera = Camera(cfg.camera, o.bit_depth)
        nrng = np.random.default_rng(s_noise)
        bg = self.camera.expose(self.interf.intensity0.copy(),
                                nrng.standard_normal(shape, dtype=np.float32))
        self.z = nrng.standard_normal((2, *shape), dtype=np.float32)
        wrng = np.random.default_rng(s_win)
        self.windows = [(int(wrng.integers(0, shape[0] - cc + 1) // self.d * self.d),
                         int(wrng.integers(0, shape[1] - cc + 1) // self.d * self.d))
                        for _ in range(self.n_windows)]
        self.bg_field = [np.conj(demodulate_field(bg[y:y + cc, x:x + cc], self.carrier, self.d))
                         for y, x in self.windows]
        i0 = self.interf.intensity0
        self.bank = np.empty((self.n_windows, self.n_noise, cc, cc), np.uint8)
        for w, (y, x) in enumerate(self.windows):
            for k in range(self.n_noise):
                z = nrng.standard_normal((cc, cc), dtype=np.float32)
                self.camera.expose(i0[y:y + cc, x:x + cc].copy(), z, out=self.bank[w, k])

    def measure(self, objs: list[PhaseObject], offsets: list[tuple[int, int]],
                rngs: list[np.random.Generator]) -> np.ndarray:
        """Demodulated fields (B, canvas, canvas) divided by the background field.

        ``offsets`` are the patch origins (row, col) of the objects on the canvas [phase px];
        ``rngs`` draw the background window and camera noise of each object.
        """
        d, cc, n = self.d, self.cc, self.canvas
        holo = np.empty((len(objs), cc, cc), np.uint8)
        wins = []
        for i, (obj, (oy, ox)) in enumerate(zip(objs, offsets, strict=True)):
            rng = rngs[i]
            w = int(rng.integers(self.n_windows))
            wins.append(w)
            holo[i] = self.bank[w, int(rng.integers(self.n_noise))]
            h, wd = obj.shape
            a0, b0, a1, b1 = max(oy, 0), max(ox, 0), min(oy + h, n), min(ox + wd, n)
            f = obj.field()[a0 - oy:a1 - oy, b0 - ox:b1 - ox]
            if f.shape[0] % 2 or f.shape[1] % 2:  # upsampling needs even sides
                f = f[: f.shape[0] // 2 * 2, : f.shape[1] // 2 * 2]
                a1, b1 = a0 + f.shape[0], b0 + f.shape[1]
            up = fourier_upsample(f, d)
            y0, x0 = self.windows[w]
            ys, xs = slice(a0 * d, a1 * d), slice(b0 * d, b1 * d)
            inten = self.interf.intensity(up, y0 + a0 * d, y0 + a1 * d, x0 + b0 * d,
                                          x0 + b1 * d)
            k = int(rng.integers(len(self.z)))
            zy = int(rng.integers(0, self.z.shape[1] - inten.shape[0] + 1))
            zx = int(rng.integers(0, self.z.shape[2] - inten.shape[1] + 1))
            z = self.z[k, zy:zy + inten.shape[0], zx:zx + inten.shape[1]]
            self.camera.expose(inten, z, out=holo[i, ys, xs])
        dem = demodulate_field(holo, self.carrier, self.d)
        for i in range(len(objs)):
            dem[i] *= self.bg_field[wins[i]]
        return dem


FEATURE_NAMES = ("area_um", "deform", "qpi_pha_int", "qpi_dm", "pha_mean", "pha_max",
                 "diameter_um", "defocus_um")


@dataclass(frozen=True)
class _Job:
    cfg: SimConfig
    kinds: list[str]
    seed: int
    crop: int
    canvas_pad: int
    through_hologram: bool
    batch: int


def _run_range(job: _Job, rng_range: tuple[int, int]
               ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Crops ``rng_range[0]:rng_range[1]`` of a job (batches start at multiples of batch)."""
    lo, hi = rng_range
    cfg, seed, kinds = job.cfg, job.seed, job.kinds
    ctx = render_context(cfg)
    o = cfg.optics
    canvas = job.crop + 2 * job.canvas_pad
    models = {k: OBJECT_MODELS.get(k)() for k in set(kinds[lo:hi])}
    path = _HologramPath(cfg, canvas, seed) if job.through_hologram and hi > lo else None
    m = hi - lo
    x = np.zeros((m, job.crop, job.crop), np.float32)
    y = np.zeros(m, np.int64)
    feats = {f: np.zeros(m, np.float64) for f in FEATURE_NAMES}
    sl = slice(job.canvas_pad, job.canvas_pad + job.crop)
    for b0 in range(lo, hi, job.batch):
        idx = range(b0, min(b0 + job.batch, hi))
        truth = np.zeros((len(idx), canvas, canvas), np.float32)
        objs, offsets = [], []
        for j, i in enumerate(idx):
            obj = models[kinds[i]].render(
                np.random.default_rng(np.random.SeedSequence([seed, i, 0x0B7])), ctx)
            truth[j], off = place(obj, canvas)
            objs.append(obj)
            offsets.append(off)
        if path is not None:
            meas = path.measure(objs, offsets, [np.random.default_rng(
                np.random.SeedSequence([seed, i, 0x401])) for i in idx])
            wrapped = np.angle(meas) - truth
            phase = truth + ((wrapped + np.pi) % (2 * np.pi) - np.pi)  # ideal unwrapping
        else:
            phase = truth
        for j, i in enumerate(idx):
            r = i - lo
            x[r] = phase[j, sl, sl]
            y[r] = objs[j].label
            mask = truth[j, sl, sl] > MASK_THRESHOLD_RAD
            for k, v in crop_features(x[r], mask, o.pixel_um, o.wavelength_um).items():
                feats[k][r] = v
            feats["diameter_um"][r] = objs[j].diameter_um
            feats["defocus_um"][r] = objs[j].defocus_um
    return x, y, feats


def resolve_kinds(classes: Sequence[str] | None, ood_kinds: Sequence[str] | None
                  ) -> tuple[list[str], list[str]]:
    """Validated class and OOD-kind lists (None = all of CLASS_NAMES / OOD_KINDS)."""
    classes = list(CLASS_NAMES if classes is None else classes)
    ood_kinds = list(OOD_KINDS if ood_kinds is None else ood_kinds)
    for k in classes:
        if k not in CLASS_NAMES:
            raise ValueError(f"unknown class {k!r}")
    for k in ood_kinds:
        if k not in OOD_KINDS:
            raise ValueError(f"unknown OOD kind {k!r}")
    return classes, ood_kinds


def make_crop_dataset(n_per_class: int, ood_per_kind: int = 0, seed: int = 0,
                      crop: int = CROP_SIZE_PX,
                      through_hologram: bool = True, cfg: SimConfig | None = None,
                      classes: Sequence[str] | None = None,
                      ood_kinds: Sequence[str] | None = None, shuffle: bool = True,
                      canvas_pad: int = 0, batch: int = 64, workers: int = 1) -> dict:
    """Labelled phase crops of isolated simulated objects.

    Parameters
    ----------
    n_per_class : int
        Crops per leukocyte class.
    ood_per_kind : int
        Crops per OOD kind.
    seed : int
        Seed; the same arguments give the same arrays.
    crop : int
        Crop side [phase px] (even).
    through_hologram : bool
        Form and demodulate a hologram with camera noise (True, matches live crops) or
        return the noise-free ground-truth phase (False).
    cfg : SimConfig, optional
        Instrument parameters (optics, camera, background, smoothing, defocus range).
    classes, ood_kinds : sequence of str, optional
        Subsets of CLASS_NAMES / OOD_KINDS (default: all).
    shuffle : bool
        Random order (else grouped by kind).
    canvas_pad : int
        Extra phase px on each side of the crop that also go through the hologram (so the
        crop border behaves like a crop cut from a large frame).
    batch : int
        Objects per vectorised batch (does not change the result).
    workers : int
        Processes (spawned; call from under ``if __name__ == "__main__":``) sharing the
        work; the result is identical for any value.

    Returns
    -------
    dict
        ``x`` float32 (N, crop, crop) [rad], ``y`` int64 (N,) (-1 for OOD), ``kind``
        list[str], ``features`` dict of float64 (N,) arrays (area_um, deform, qpi_pha_int,
        qpi_dm, pha_mean, pha_max, diameter_um, defocus_um), ``meta`` dict (all parameters).
    """
    if n_per_class < 0 or ood_per_kind < 0:
        raise ValueError("n_per_class and ood_per_kind must be >= 0")
    if crop < 16 or crop % 2:
        raise ValueError("crop must be an even number >= 16")
    cfg = cfg or SimConfig(seed=seed)
    classes, ood_kinds = resolve_kinds(classes, ood_kinds)
    kinds = [c for c in classes for _ in range(n_per_class)]
    kinds += [k for k in ood_kinds for _ in range(ood_per_kind)]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC209]))
    if shuffle:
        kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    n = len(kinds)
    job = _Job(cfg=cfg, kinds=kinds, seed=int(seed), crop=crop, canvas_pad=canvas_pad,
               through_hologram=through_hologram, batch=batch)
    if workers > 1 and n > 2 * batch:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        step = max(batch, -(-n // (workers * batch)) * batch)
        ranges = [(a, min(a + step, n)) for a in range(0, n, step)]
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            parts = list(ex.map(_run_range, [job] * len(ranges), ranges))
    else:
        parts = [_run_range(job, (0, n))]
    x = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, crop, crop),
                                                                     np.float32)
    y = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    feats = {k: np.concatenate([p[2][k] for p in parts]) for k in FEATURE_NAMES}
    models = {k: OBJECT_MODELS.get(k)() for k in set(kinds)}
    o = cfg.optics
    meta = {
        "generator": "acquisition.sim.make_crop_dataset",
        "seed": int(seed), "n_per_class": int(n_per_class), "ood_per_kind": int(ood_per_kind),
        "crop": int(crop), "through_hologram": bool(through_hologram),
        "canvas_pad": int(canvas_pad), "classes": classes,
        "ood_kinds": ood_kinds,
        "class_names": list(CLASS_NAMES), "kind_names": list(CLASS_NAMES) + list(OOD_KINDS),
        "pixel_um": o.pixel_um, "wavelength_um": o.wavelength_um,
        "medium_index": o.medium_index, "mask_threshold_rad": MASK_THRESHOLD_RAD,
        "feature_mask": "ground-truth phase > mask_threshold_rad; phase features from x",
        "centring": "rounded phase centroid at crop//2", "sim": cfg.to_dict(),
        "models": {k: m.describe() for k, m in sorted(models.items())},
    }
    return {"x": x, "y": y, "kind": kinds, "features": feats, "meta": meta}
