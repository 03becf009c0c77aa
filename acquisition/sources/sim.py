"""Simulated instrument source (default): wraps :class:`leukoflow.acquisition.sim.FlowSimulator`."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from leukoflow.acquisition.sim import FlowSimulator, SimConfig
from leukoflow.acquisition.sim.profiles import ProfileError, apply_profiles, parse_profiles
from leukoflow.acquisition.sources.base import (
    SOURCES,
    EndOfStream,
    RawFrame,
    Source,
    SourceError,
)


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
        Pace frames at this rate [frames/s] like a camera would; 0 = as fast as possible.
    config : acquisition.sim.SimConfig, optional
        Full simulator configuration (``seed`` is applied on top).
    concentration : float, optional
        Objects per field of view (sample dilution), applied on top of ``config``; the
        default keeps coincidences rare (see :class:`leukoflow.acquisition.sim.SimConfig`).
    profile : str, optional
        Instrument/sample profiles applied on top of ``config`` (names or TOML paths,
        comma separated; :mod:`leukoflow.acquisition.sim.profiles`), before
        ``concentration``.
    """

    has_truth = True

    def __init__(self, seed: int = 0, n_frames: int | None = None, rate_hz: float = 0.0,
                 config: Any = None, concentration: float | None = None,
                 profile: str | None = None) -> None:

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
        self.frame_interval_s = 1.0 / float(cfg.optics.frame_rate_hz)
        self._it: Any = None
        self._t0 = 0.0
        self._count = 0

    def open(self) -> None:
        n = self.n_frames if self.n_frames is not None else 2**62
        self._it = iter(self.sim.frames(n))
        self._t0 = time.monotonic()
        self._count = 0

    @property
    def background(self) -> np.ndarray:
        return self.sim.background

    def read(self, timeout_s: float = 1.0) -> RawFrame | None:
        if self._it is None:
            self.open()
        if not self._pace(self._t0, self._count, self.rate_hz, timeout_s):
            return None
        try:
            fr = next(self._it)
        except StopIteration:
            raise EndOfStream from None
        self._count += 1
        return RawFrame(int(fr.index), float(fr.t_s), time.monotonic_ns(), fr.hologram,
                        list(fr.truth), origin=fr)

    def true_phase(self, frame: Any) -> np.ndarray:
        """Ground-truth phase [rad] of a simulator frame on the phase grid."""
        return self.sim.true_phase(frame)

    @property
    def info(self) -> dict[str, Any]:
        d = {"source": "sim", "n_frames": self.n_frames, "rate_hz": self.rate_hz,
             "profiles": parse_profiles(self.profile) or ["default"]}
        try:
            d["sim"] = self.config.to_dict()
        except AttributeError:  # pragma: no cover
            d["sim"] = {"seed": getattr(self.config, "seed", None)}
        return d
