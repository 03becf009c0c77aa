"""GenICam camera source via ``harvesters`` (optional ``camera`` extra)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from leukoflow.acquisition.sources.base import SOURCES, RawFrame, Source, SourceError

MISSING = ("the GenICam source needs the optional 'camera' extra (harvesters): "
           "pip install 'leukoflow[camera]'")


@SOURCES.register("genicam")
class GenICamSource(Source):
    """Frames from a GenICam/GenTL camera through harvesters.

    Parameters
    ----------
    cti : str, optional
        GenTL producer file (``.cti``); default ``$GENICAM_GENTL64_PATH`` entries.
    index : int
        Device index among the discovered cameras.
    """

    hardware_clock = True

    def __init__(self, cti: str | None = None, index: int = 0) -> None:
        try:
            import harvesters.core  # noqa: F401
        except ImportError as exc:
            raise SourceError(MISSING) from exc
        self.cti = cti
        self.index = int(index)
        self._h: Any = None
        self._ia: Any = None
        self._count = 0

    def open(self) -> None:
        from harvesters.core import Harvester

        self._h = Harvester()
        ctis = [self.cti] if self.cti else [
            os.path.join(d, f) for d in os.environ.get("GENICAM_GENTL64_PATH", "").split(
                os.pathsep) if d and os.path.isdir(d) for f in os.listdir(d) if f.endswith(".cti")]
        if not ctis:
            raise SourceError("no GenTL producer (.cti) given or found in GENICAM_GENTL64_PATH")
        for c in ctis:
            self._h.add_file(c)
        self._h.update()
        if len(self._h.device_info_list) <= self.index:
            raise SourceError(f"GenICam camera {self.index} not found")
        self._ia = self._h.create(self.index)
        self._ia.start()

    def close(self) -> None:
        if self._ia is not None:
            self._ia.stop()
            self._ia.destroy()
            self._ia = None
        if self._h is not None:
            self._h.reset()
            self._h = None

    def read(self, timeout_s: float = 1.0) -> RawFrame | None:
        if self._ia is None:
            self.open()
        try:
            with self._ia.fetch(timeout=timeout_s) as buf:
                comp = buf.payload.components[0]
                img = np.array(comp.data, copy=True).reshape(comp.height, comp.width)
        except Exception as exc:  # harvesters raises its own timeout type
            if "timeout" in type(exc).__name__.lower():
                return None
            raise SourceError(f"GenICam fetch failed: {exc}") from exc
        raw = RawFrame(self._count, time.monotonic(), time.monotonic_ns(), img, None)
        self._count += 1
        return raw

    @property
    def info(self) -> dict[str, Any]:
        return {"source": "genicam", "cti": self.cti, "index": self.index}
