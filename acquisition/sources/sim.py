"""Simulated instrument source (default): wraps :class:`leukoflow.acquisition.sim.FlowSimulator`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from leukoflow.acquisition.sim import FlowSimulator, SimConfig
from leukoflow.acquisition.sim.profiles import ProfileError, apply_profiles, parse_profiles
from leukoflow.acquisition.sources.base import (
    SOURCES,
    EndOfStream,
    FrameClock,
    RawFrame,
    Source,
    SourceError,
)

#: Default sample density of a live run on the simulated instrument [objects per field of
#: view], used by the acquisition service when the source spec names none (``sim``,
#: ``sim:SEED``). Chosen for time to result (docs/realtime.md, measured with
#: ``leukoflow bench realtime``): at 500 frames/s it gives ~50 classified cells/s, a
#: 10,000-cell differential in about 4 minutes, while coincident cells (touching in every
#: frame, lost or rejected) stay near 5 % and bias the differential by at most ~0.5
#: percentage points (small cells hidden behind larger ones). The simulator's own default
#: (:class:`leukoflow.acquisition.sim.SimConfig`, 0.03, a dilute reference sample) stays
#: what datasets and tests use.
LIVE_CONCENTRATION = 0.5


@SOURCES.register("sim")
class SimSource(Source):
    """Frames from the simulated flow instrument, with ground truth.

    Parameters
    ----------
    seed : int
        Simulator seed (same seed, same frames).
    n_frames : int or None
        Stop after this many frames (None = endless).
    rate_hz : float
        Deliver frames at this rate [frames/s] like a camera would (a :class:`FrameClock`
        with a ring buffer: frames not read in time are dropped and counted); 0 = as fast
        as they are read (simulated time then runs slower than real time, nothing is lost).
    buffer_frames : int
        Ring-buffer capacity of the paced camera [frames].
    config : acquisition.sim.SimConfig, optional
        Full simulator configuration (``seed`` is applied on top).
    concentration : float, optional
        Objects per field of view (sample dilution), applied on top of ``config``; the
        default keeps coincidences rare (see :class:`leukoflow.acquisition.sim.SimConfig`).
    profile : str, optional
        Instrument/sample profiles applied on top of ``config`` (names or TOML paths,
        comma separated; :mod:`leukoflow.acquisition.sim.profiles`), before
        ``concentration``.

    Attributes
    ----------
    on_drop : callable or None
        Called with the simulator ``Frame`` (ground truth, no hologram) of every frame
        the paced camera dropped (scoring what the dropped frames held).
    """

    has_truth = True

    def __init__(self, seed: int = 0, n_frames: int | None = None, rate_hz: float = 0.0,
                 config: Any = None, concentration: float | None = None,
                 profile: str | None = None, buffer_frames: int = 256) -> None:

        cfg = config if config is not None else SimConfig(seed=seed)
        if config is not None and getattr(cfg, "seed", seed) != seed:
            cfg = cfg.replace(seed=seed)
        if profile:
            try:
                cfg = apply_profiles(cfg, profile)
            except ProfileError as exc:
                raise SourceError(str(exc)) from None
        self.profile = profile or ""
        if concentration is not None:
            cfg = cfg.replace(concentration=float(concentration))
        self.sim = FlowSimulator(cfg)
        self.config = cfg
        self.n_frames = n_frames
        self.rate_hz = float(rate_hz)
        self.buffer_frames = int(buffer_frames)
        self.frame_interval_s = 1.0 / float(cfg.optics.frame_rate_hz)
        self.clock = FrameClock(self.rate_hz, self.buffer_frames) if self.rate_hz > 0 else None
        self.on_drop: Callable[[Any], None] | None = None
        self._open = False
        self._next = 0

    def open(self) -> None:
        self._open = True
        self._next = 0

    def backlog(self, next_index: int | None = None) -> int:
        if self.clock is None:
            return 0
        return self.clock.backlog(self._next if next_index is None else next_index)

    @property
    def background(self) -> np.ndarray:
        return self.sim.background

    def read(self, timeout_s: float = 1.0) -> RawFrame | None:
        if not self._open:
            self.open()
        if self.n_frames is not None and self._next >= self.n_frames:
            raise EndOfStream
        lost = 0
        if self.clock is not None:
            idx, lost = self.clock.next(self._next, timeout_s)
            if idx is None:
                return None
            if self.n_frames is not None and lost > self.n_frames - self._next:
                self.clock.dropped -= lost - (self.n_frames - self._next)  # past the end
                lost = self.n_frames - self._next
            for _ in range(lost):  # captured, never read: advance the flow, no rendering
                fr = self.sim.next_frame(render=False)
                if self.on_drop is not None:
                    self.on_drop(fr)
            self._next += lost
            if self.n_frames is not None and self._next >= self.n_frames:
                raise EndOfStream
        fr = self.sim.next_frame()
        self._next = int(fr.index) + 1
        if self.clock is not None:  # acquisition time: when the camera captured it
            t_acq = self.clock.capture_ns(int(fr.index))
            backlog = self.clock.backlog(self._next)
        else:
            t_acq, backlog = time.monotonic_ns(), 0
        return RawFrame(int(fr.index), float(fr.t_s), t_acq, fr.hologram, list(fr.truth),
                        origin=fr, dropped_before=lost, backlog=backlog)

    def true_phase(self, frame: Any) -> np.ndarray:
        """Ground-truth phase [rad] of a simulator frame on the phase grid."""
        return self.sim.true_phase(frame)

    @property
    def info(self) -> dict[str, Any]:
        d = {"source": "sim", "n_frames": self.n_frames, "rate_hz": self.rate_hz,
             "buffer_frames": self.buffer_frames if self.clock is not None else None,
             "profiles": parse_profiles(self.profile) or ["default"]}
        try:
            d["sim"] = self.config.to_dict()
        except AttributeError:  # pragma: no cover
            d["sim"] = {"seed": getattr(self.config, "seed", None)}
        return d
