"""OpenCV camera source (``camera:opencv:INDEX`` or a device path / stream URL)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from leukoflow.acquisition.sources.base import SOURCES, RawFrame, Source, SourceError


@SOURCES.register("opencv")
class OpenCVSource(Source):
    """Frames from :class:`cv2.VideoCapture` (converted to grey).

    Parameters
    ----------
    device : str
        Camera index (``"0"``) or a device path / URL understood by OpenCV.
    background : str, optional
        ``.npy`` file with the background hologram. Without it the service estimates one
        from the first frames.
    """

    hardware_clock = True

    def __init__(self, device: str = "0", background: str | None = None) -> None:
        self.device = device
        self.bg_path = background
        self._cap: Any = None
        self._count = 0
        self._bg: np.ndarray | None = None

    def open(self) -> None:
        try:
            import cv2
        except ImportError as exc:
            raise SourceError("the OpenCV camera source needs the 'camera' extra: "
                              "pip install 'leukoflow[camera]'") from exc
        self._cv2 = cv2
        dev: Any = int(self.device) if str(self.device).isdigit() else self.device
        self._cap = cv2.VideoCapture(dev)
        if not self._cap.isOpened():
            raise SourceError(f"OpenCV cannot open camera {self.device!r}")
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        self.frame_interval_s = 1.0 / fps if fps and fps > 0 else None
        if self.bg_path:
            self._bg = np.load(self.bg_path, allow_pickle=False)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    @property
    def background(self) -> np.ndarray | None:
        return self._bg

    def read(self, timeout_s: float = 1.0) -> RawFrame | None:
        if self._cap is None:
            self.open()
        ok, img = self._cap.read()
        if not ok or img is None:
            time.sleep(min(timeout_s, 0.01))
            return None  # counted by the stall monitor
        if img.ndim == 3:
            img = self._cv2.cvtColor(img, self._cv2.COLOR_BGR2GRAY)
        raw = RawFrame(self._count, time.monotonic(), time.monotonic_ns(), img, None)
        self._count += 1
        return raw

    @property
    def info(self) -> dict[str, Any]:
        return {"source": "opencv", "device": self.device}
