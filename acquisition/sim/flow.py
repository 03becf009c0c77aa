"""Microfluidic flow through the simulated instrument: frames with ground truth.

Objects arrive as a Poisson process (mean ``concentration`` objects with their centre in the
field), enter at x < 0 and cross the field along +x at the mean flow speed ±``speed_spread``
(per object), at a lateral position near the channel centre. Each object is rendered once on
its own phase-grid patch, upsampled to the camera grid (band-limited), and then only shifted
by whole camera pixels from frame to frame. A frame is a copy of a precomputed noisy
background frame with the hologram recomputed (with camera noise) only in the
neighbourhoods of the objects, so a frame costs little.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from leukoflow.acquisition.sim import beads as _beads  # noqa: F401  (registers the bead model)
from leukoflow.acquisition.sim import ood as _ood  # noqa: F401  (registers the OOD object models)
from leukoflow.acquisition.sim.cells import OBJECT_MODELS
from leukoflow.acquisition.sim.ood import propagate_object
from leukoflow.acquisition.sim.optics import Camera, Interferometer, fourier_upsample
from leukoflow.acquisition.sim.params import SimConfig
from leukoflow.acquisition.sim.render import PhaseObject, RenderContext


@dataclass(frozen=True)
class CellTruth:
    """Ground truth of one object in one frame.

    Attributes
    ----------
    cell_id : int
        Unique per run, increasing with arrival.
    kind : str
        Class name or OOD kind.
    label : int
        Class index 0..3 (leukoflow.CLASS_NAMES) or -1 for OOD objects.
    y_px, x_px : float
        Phase centroid on the phase grid [phase px] (row, col).
    diameter_um : float
        Object diameter [µm].
    fully_inside : bool
        Whole object (its extent) inside the field of view.
    defocus_um : float
        Distance from focus [µm] (0 in focus).
    speed_um_s : float
        Speed of the object along +x [µm/s].
    """

    cell_id: int
    kind: str
    label: int
    y_px: float
    x_px: float
    diameter_um: float
    fully_inside: bool
    defocus_um: float = 0.0
    speed_um_s: float = 0.0


@dataclass
class Frame:
    """One camera frame.

    Attributes
    ----------
    index : int
        Frame number from 0.
    t_s : float
        Time stamp [s] (index / frame rate).
    hologram : numpy.ndarray
        uint8 (rows, cols) off-axis hologram [counts].
    truth : list[CellTruth]
        Objects (partly) in the field of view.
    placements : list[tuple[FlowObject, int, int]]
        Objects drawn into the frame with their camera-patch origin (row, col) [camera px];
        used by :meth:`FlowSimulator.true_phase`.
    """

    index: int
    t_s: float
    hologram: np.ndarray
    truth: list[CellTruth]
    placements: list[tuple[FlowObject, int, int]] = field(default_factory=list, repr=False)


class FlowObject:
    """An object in the channel: its rendering on the camera grid and its trajectory.

    Parameters
    ----------
    cell_id : int
        Unique id.
    obj : PhaseObject
        The rendered object (phase grid).
    downsample : int
        Camera px per phase px.
    y_px : float
        Row of the phase centroid in the field [phase px].
    x_start_px : float
        Column of the phase centroid at ``t_arrival`` [phase px] (outside, x < 0).
    t_arrival : float
        Time [s] at which the object is at ``x_start_px``.
    speed_px_s : float
        Speed along +x [phase px/s].
    """

    def __init__(self, cell_id: int, obj: PhaseObject, downsample: int, y_px: float,
                 x_start_px: float, t_arrival: float, speed_px_s: float) -> None:
        self.cell_id = cell_id
        self.obj = obj
        self.d = downsample
        self.field_cam = fourier_upsample(obj.field(), downsample)
        cy, cx = obj.centroid()
        self.cy_cam, self.cx_cam = cy * downsample, cx * downsample
        self.y_px = y_px
        self.x_start_px = x_start_px
        self.t_arrival = t_arrival
        self.speed_px_s = speed_px_s
        self._truth_cam: np.ndarray | None = None

    @property
    def cam_shape(self) -> tuple[int, int]:
        """Shape of the camera-grid patch [camera px]."""
        return self.field_cam.shape  # type: ignore[return-value]

    def origin(self, t: float) -> tuple[int, int]:
        """Top-left camera pixel (row, col) of the patch at time ``t`` [s]."""
        x = self.x_start_px + self.speed_px_s * (t - self.t_arrival)
        return (int(round(self.d * self.y_px - self.cy_cam)),
                int(round(self.d * x - self.cx_cam)))

    def centre(self, y0: int, x0: int) -> tuple[float, float]:
        """Phase centroid [phase px] for a patch placed at camera pixel (y0, x0)."""
        return (y0 + self.cy_cam) / self.d, (x0 + self.cx_cam) / self.d

    @property
    def truth_cam(self) -> np.ndarray:
        """Unwrapped phase [rad] of the camera-grid field (float32), computed on demand."""
        if self._truth_cam is None:
            smooth = fourier_upsample(self.obj.phase, self.d).real
            wrapped = np.angle(self.field_cam) - smooth
            wrapped = (wrapped + np.pi) % (2 * np.pi) - np.pi
            self._truth_cam = (smooth + wrapped).astype(np.float32)
        return self._truth_cam


def render_context(cfg: SimConfig) -> RenderContext:
    """The :class:`RenderContext` of a :class:`SimConfig` (objects are rendered on the
    object-plane pixel of :attr:`SimConfig.object_optics`)."""
    probs = {c: cfg.class_fractions.get(c, 0.0) for c in cfg.class_fractions}
    o = cfg.object_optics
    return RenderContext(pixel_um=o.pixel_um, wavelength_um=o.wavelength_um,
                         medium_index=o.medium_index, smoothing_px=cfg.smoothing_px,
                         class_probs=probs, defocus_um=tuple(cfg.defocus_um),
                         size_scale=dict(cfg.size_scale), ri_scale=dict(cfg.ri_scale),
                         bead=cfg.bead)


def focus_rng(seed: int, cell_id: int) -> np.random.Generator:
    """Generator of the focus distance of object ``cell_id`` (independent of its shape)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(cell_id), 0xF0C5]))


def object_rng(seed: int, cell_id: int) -> np.random.Generator:
    """Generator that renders object ``cell_id`` of a run with master ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(cell_id), 0x5EED]))


class FlowSimulator:
    """Simulated off-axis QPI flow instrument.

    Parameters
    ----------
    cfg : SimConfig
        All parameters (recorded by :meth:`metadata`).

    Attributes
    ----------
    background : numpy.ndarray
        uint8 (rows, cols) background hologram (same static artefacts, no objects, own noise).
    shape, phase_shape : tuple[int, int]
        Camera frame and phase-grid shapes [px].
    rate_hz : float
        Mean object arrival rate [1/s] (concentration × speed / field length).
    counts : dict[str, int]
        Objects generated so far, by kind.
    interf : Interferometer
        Reference/object beams and static background (noise-free intensity ``intensity0``).
    camera : Camera
        Camera noise model.
    """

    def __init__(self, cfg: SimConfig | None = None) -> None:
        self.cfg = cfg = cfg or SimConfig()
        # objects live on the object-plane pixel (nominal pixel / true magnification)
        self.optics = o = cfg.object_optics
        self.d = o.downsample
        self.shape = tuple(o.roi_shape)
        self.phase_shape = o.phase_shape
        ss = np.random.SeedSequence([int(cfg.seed), 0xF10])
        s_bg, s_noise, s_arr, s_frame = ss.spawn(4)
        self.ctx = render_context(cfg)
        self.interf = Interferometer(self.shape, tuple(o.carrier), self.d, o.pixel_um,
                                     cfg.camera, cfg.background, np.random.default_rng(s_bg))
        self.camera = Camera(cfg.camera, o.bit_depth)
        nrng = np.random.default_rng(s_noise)
        k = max(1, int(cfg.camera.noise_bank))
        self._z = nrng.standard_normal((k, *self.shape), dtype=np.float32)
        self._bank = np.empty((k, *self.shape), np.uint8)
        for i in range(k):
            self.camera.expose(self.interf.intensity0.copy(), self._z[i], out=self._bank[i])
        self.background = self.camera.expose(
            self.interf.intensity0.copy(), nrng.standard_normal(self.shape, dtype=np.float32))
        self._arr_rng = np.random.default_rng(s_arr)
        self._frame_rng = np.random.default_rng(s_frame)
        probs = cfg.kind_probabilities()
        self._kinds = [k for k, p in probs.items() if p > 0]
        self._kind_p = np.array([probs[k] for k in self._kinds], float)
        self._kind_p /= self._kind_p.sum()
        self._models = {k: OBJECT_MODELS.get(k)() for k in self._kinds}
        self.field_um = self.phase_shape[1] * o.pixel_um
        self.mean_speed_px_s = o.flow_speed_um_s / o.pixel_um
        self.rate_hz = cfg.concentration * o.flow_speed_um_s / self.field_um
        self._active: list[FlowObject] = []
        self._next_id = 0
        self._index = 0
        # warm start: the first frame already shows the steady state
        t_cross = (self.field_um + 80.0) / (o.flow_speed_um_s * (1 - cfg.speed_spread))
        self._t_next = -t_cross + self._arr_rng.exponential(1.0 / self.rate_hz)
        self.counts: dict[str, int] = dict.fromkeys(probs, 0)

    # ---------------------------------------------------------------------------------
    def _arrive(self, t: float) -> None:
        cfg = self.cfg
        rng = self._arr_rng
        while self._t_next <= t:
            kind = self._kinds[int(rng.choice(len(self._kinds), p=self._kind_p))]
            speed = self.mean_speed_px_s * rng.uniform(1 - cfg.speed_spread,
                                                       1 + cfg.speed_spread)
            lateral = rng.normal(0.0, cfg.lateral_sd_um) / self.optics.pixel_um
            cid = self._next_id
            self._next_id += 1
            obj = self._models[kind].render(object_rng(cfg.seed, cid), self.ctx)
            if cfg.focus_offset_um or cfg.focus_sd_um:
                dz = cfg.focus_offset_um + cfg.focus_sd_um * focus_rng(cfg.seed, cid).normal()
                if dz:
                    obj = propagate_object(obj, float(dz), self.ctx)
            r_px = 0.5 * obj.extent_um / self.optics.pixel_um
            hp = self.phase_shape[0]
            lim = max(0.0, hp / 2 - r_px - 1)
            y = hp / 2 + float(np.clip(lateral, -lim, lim))
            x_start = -0.5 * obj.shape[1] - 1.0
            self._active.append(FlowObject(cid, obj, self.d, y, x_start, self._t_next, speed))
            self.counts[kind] += 1
            self._t_next += rng.exponential(1.0 / self.rate_hz)

    def _truth(self, fo: FlowObject, y0: int, x0: int) -> CellTruth | None:
        cy, cx = fo.centre(y0, x0)
        r = 0.5 * fo.obj.extent_um / self.optics.pixel_um
        hp, wp = self.phase_shape
        if cx + r < 0 or cx - r >= wp:
            return None
        inside = (cx - r >= 0) and (cx + r <= wp) and (cy - r >= 0) and (cy + r <= hp)
        return CellTruth(cell_id=fo.cell_id, kind=fo.obj.kind, label=fo.obj.label,
                         y_px=float(cy), x_px=float(cx), diameter_um=float(fo.obj.diameter_um),
                         fully_inside=bool(inside), defocus_um=float(fo.obj.defocus_um),
                         speed_um_s=float(fo.speed_px_s * self.optics.pixel_um))

    def _render(self, holo: np.ndarray, z: np.ndarray,
                placed: list[tuple[FlowObject, int, int]]) -> None:
        hh, ww = self.shape
        boxes = []
        for fo, y0, x0 in placed:
            h, w = fo.cam_shape
            boxes.append([max(y0, 0), min(y0 + h, hh), max(x0, 0), min(x0 + w, ww),
                          [(fo, y0, x0)]])
        boxes = [b for b in boxes if b[0] < b[1] and b[2] < b[3]]
        # merge overlapping boxes (objects that overlap must share one field product)
        merged = True
        while merged:
            merged = False
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    a, b = boxes[i], boxes[j]
                    if a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]:
                        boxes[i] = [min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]),
                                    max(a[3], b[3]), a[4] + b[4]]
                        del boxes[j]
                        merged = True
                        break
                if merged:
                    break
        for y0, y1, x0, x1, members in boxes:
            if len(members) == 1:
                fo, py, px = members[0]
                c = fo.field_cam[y0 - py:y1 - py, x0 - px:x1 - px]
            else:
                c = np.ones((y1 - y0, x1 - x0), np.complex64)
                for fo, py, px in members:
                    h, w = fo.cam_shape
                    sy0, sy1 = max(py, y0), min(py + h, y1)
                    sx0, sx1 = max(px, x0), min(px + w, x1)
                    c[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] *= \
                        fo.field_cam[sy0 - py:sy1 - py, sx0 - px:sx1 - px]
            inten = self.interf.intensity(c, y0, y1, x0, x1)
            self.camera.expose(inten, z[y0:y1, x0:x1], out=holo[y0:y1, x0:x1])

    def next_frame(self, render: bool = True) -> Frame:
        """Simulate the next frame.

        With ``render=False`` the flow advances and the ground truth is returned without a
        hologram (``hologram`` is None): a frame the camera captured but nobody read (it
        was dropped); the random streams advance as if it had been rendered.
        """
        i = self._index
        self._index += 1
        t = i / self.cfg.optics.frame_rate_hz
        self._arrive(t)
        ww = self.shape[1]
        placed: list[tuple[FlowObject, int, int]] = []
        keep: list[FlowObject] = []
        for fo in self._active:
            y0, x0 = fo.origin(t)
            if x0 >= ww:
                continue  # left the field for good
            keep.append(fo)
            if x0 + fo.cam_shape[1] > 0:
                placed.append((fo, y0, x0))
        self._active = keep
        k = int(self._frame_rng.integers(len(self._bank)))
        holo = None
        if render:
            holo = self._bank[k].copy()
            self._render(holo, self._z[k], placed)
        truth = [tr for fo, y0, x0 in placed if (tr := self._truth(fo, y0, x0)) is not None]
        return Frame(index=i, t_s=t, hologram=holo, truth=truth, placements=placed)

    def skip_empty(self, max_frames: int = 1_000_000) -> int:
        """Advance past frames in which no object overlaps the field, without rendering them.

        Used by accuracy runs at low concentration (the frames skipped hold only the static
        background and camera noise); the next :meth:`next_frame` is the first frame with
        an object in view. The noise frames drawn afterwards differ from an unskipped run.

        Parameters
        ----------
        max_frames : int
            Skip at most this many frames.

        Returns
        -------
        int
            Number of frames skipped.
        """
        ww = self.shape[1]
        skipped = 0
        while skipped < max_frames:
            t = self._index / self.cfg.optics.frame_rate_hz
            self._arrive(t)
            keep: list[FlowObject] = []
            seen = False
            for fo in self._active:
                y0, x0 = fo.origin(t)
                if x0 >= ww:
                    continue
                keep.append(fo)
                seen = seen or x0 + fo.cam_shape[1] > 0
            self._active = keep
            if seen:
                break
            self._index += 1
            skipped += 1
        return skipped

    def frames(self, n: int) -> Iterator[Frame]:
        """Yield the next ``n`` frames."""
        if n < 0:
            raise ValueError("n must be >= 0")
        for _ in range(int(n)):
            yield self.next_frame()

    def true_phase(self, frame: Frame) -> np.ndarray:
        """Ground-truth phase [rad] float32 (phase grid) of ``frame`` (sum over objects)."""
        hp, wp = self.phase_shape
        d = self.d
        out = np.zeros((hp, wp), np.float32)
        for fo, y0, x0 in frame.placements:
            tc = fo.truth_cam
            oy, ox = (-y0) % d, (-x0) % d
            sub = tc[oy::d, ox::d]
            m0, n0 = (y0 + oy) // d, (x0 + ox) // d
            a0, b0 = max(m0, 0), max(n0, 0)
            a1, b1 = min(m0 + sub.shape[0], hp), min(n0 + sub.shape[1], wp)
            if a0 < a1 and b0 < b1:
                out[a0:a1, b0:b1] += sub[a0 - m0:a1 - m0, b0 - n0:b1 - n0]
        return out

    @property
    def config(self) -> SimConfig:
        """The simulator's parameters."""
        return self.cfg

    def metadata(self) -> dict:
        """Parameters of this simulator (JSON-safe)."""
        return {"config": self.cfg.to_dict(), "rate_hz": self.rate_hz,
                "models": {k: m.describe() for k, m in self._models.items()}}
