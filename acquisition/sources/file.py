"""File replay source: ``.rtdc`` (qpi_oah [+ qpi_oah_bg]), TIFF stacks, ``.npy``, videos."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from leukoflow.acquisition.sources.base import (
    SOURCES,
    EndOfStream,
    FrameClock,
    RawFrame,
    Source,
    SourceError,
)

VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg")
TIFF_SUFFIXES = (".tif", ".tiff")


def median_background(frames: list[np.ndarray]) -> np.ndarray:
    """Per-pixel median of frames in which cells move (removes them) [same dtype]."""
    stack = np.stack(frames)
    return np.median(stack, axis=0).astype(stack.dtype)


class _Reader:
    """Random-access frame reader over one file format."""

    n: int
    frame_rate_hz: float | None = None
    background: np.ndarray | None = None

    def get(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _RtdcReader(_Reader):
    def __init__(self, path: Path, feature: str) -> None:
        import h5py

        try:
            import hdf5plugin  # noqa: F401  (compressed .rtdc)
        except ImportError:  # pragma: no cover
            pass
        self.h5 = h5py.File(path, "r")
        ev = self.h5.get("events")
        if ev is None or feature not in ev:
            self.h5.close()
            raise SourceError(f"{path}: no events/{feature} in this .rtdc file")
        self.ds = ev[feature]
        if self.ds.ndim != 3:
            self.h5.close()
            raise SourceError(f"{path}: events/{feature} must be (N, H, W), got {self.ds.shape}")
        self.n = int(self.ds.shape[0])
        fr = self.h5.attrs.get("imaging:frame rate")
        self.frame_rate_hz = float(fr) if fr is not None else None
        bgname = f"{feature}_bg"
        if bgname in ev:
            bg = ev[bgname]
            self.background = np.asarray(bg[0] if bg.ndim == 3 else bg[...])

    def get(self, i: int) -> np.ndarray:
        return np.asarray(self.ds[i])

    def close(self) -> None:
        self.h5.close()


class _TiffReader(_Reader):
    def __init__(self, path: Path) -> None:
        import tifffile

        self.tf = tifffile.TiffFile(path)
        self.n = len(self.tf.pages)
        first = self.tf.pages[0].asarray()
        if first.ndim == 3 and self.n == 1:  # one multi-frame page/series
            self._stack = self.tf.asarray()
            self.n = self._stack.shape[0]
        else:
            self._stack = None

    def get(self, i: int) -> np.ndarray:
        if self._stack is not None:
            return np.asarray(self._stack[i])
        return self.tf.pages[i].asarray()

    def close(self) -> None:
        self.tf.close()


class _NpyReader(_Reader):
    def __init__(self, path: Path) -> None:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise SourceError(f"{path}: expected (N, H, W) frames, got {arr.shape}")
        self.arr = arr
        self.n = int(arr.shape[0])

    def get(self, i: int) -> np.ndarray:
        return np.asarray(self.arr[i])


class _VideoReader(_Reader):
    def __init__(self, path: Path) -> None:
        try:
            import cv2
        except ImportError as exc:  # pragma: no cover
            raise SourceError("video replay needs OpenCV: pip install 'leukoflow[camera]'"
                              ) from exc
        self.cv2 = cv2
        self.cap = cv2.VideoCapture(str(path))
        if not self.cap.isOpened():
            raise SourceError(f"{path}: OpenCV cannot open this video")
        self.n = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT)) or 2**62
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        self.frame_rate_hz = float(fps) if fps and fps > 0 else None
        self._pos = 0

    def get(self, i: int) -> np.ndarray:
        if i != self._pos:
            self.cap.set(self.cv2.CAP_PROP_POS_FRAMES, i)
            self._pos = i
        ok, img = self.cap.read()
        if not ok:
            raise EndOfStream
        self._pos += 1
        if img.ndim == 3:
            img = self.cv2.cvtColor(img, self.cv2.COLOR_BGR2GRAY)
        return img

    def close(self) -> None:
        self.cap.release()


@SOURCES.register("file")
class FileSource(Source):
    """Replay holograms from a file.

    Parameters
    ----------
    path : str
        ``.rtdc`` (``events/qpi_oah``, background ``events/qpi_oah_bg``), ``.tif``/``.tiff``
        stack, ``.npy`` (N, H, W) or a video OpenCV can read.
    background : str, optional
        File with the background hologram (first frame used). Without it and without a
        stored background, the per-pixel median of the first ``bg_frames`` frames is used.
    feature : str
        Image feature to read from ``.rtdc`` files.
    loop : bool
        Restart at the end instead of ending the stream.
    rate_hz : float
        Deliver frames at this rate [frames/s] like the camera did (a :class:`FrameClock`
        with a ring buffer: frames not read in time are dropped and counted); 0 = as fast
        as they are read.
    bg_frames : int
        Frames for the median background estimate.
    buffer_frames : int
        Ring-buffer capacity of the paced replay [frames].
    """

    def __init__(self, path: str, background: str | None = None, feature: str = "qpi_oah",
                 loop: bool = False, rate_hz: float = 0.0, bg_frames: int = 32,
                 buffer_frames: int = 256) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"file source: no such file {self.path}")
        self.bg_path = Path(background) if background else None
        self.feature = feature
        self.loop = loop
        self.rate_hz = float(rate_hz)
        self.bg_frames = int(bg_frames)
        self.buffer_frames = int(buffer_frames)
        self.clock = FrameClock(self.rate_hz, self.buffer_frames) if self.rate_hz > 0 else None
        self._reader: _Reader | None = None
        self._i = 0
        self._count = 0
        self._bg: np.ndarray | None = None
        self.bg_method = "none"

    def _open_reader(self, path: Path) -> _Reader:
        suf = path.suffix.lower()
        if suf == ".rtdc":
            return _RtdcReader(path, self.feature)
        if suf in TIFF_SUFFIXES:
            return _TiffReader(path)
        if suf == ".npy":
            return _NpyReader(path)
        if suf in VIDEO_SUFFIXES:
            return _VideoReader(path)
        raise SourceError(f"file source: unsupported file type {suf!r} ({path}); use .rtdc, "
                          ".tif, .npy or a video")

    def open(self) -> None:
        if self._reader is not None:
            return
        self._reader = self._open_reader(self.path)
        if self._reader.n <= 0:
            raise SourceError(f"{self.path}: no frames")
        fr = self._reader.frame_rate_hz
        self.frame_interval_s = 1.0 / fr if fr else None
        if self.bg_path is not None:
            bgr = self._open_reader(self.bg_path)
            try:
                self._bg = bgr.background if bgr.background is not None else bgr.get(0)
            finally:
                bgr.close()
            self.bg_method = f"file:{self.bg_path.name}"
        elif self._reader.background is not None:
            self._bg = self._reader.background
            self.bg_method = f"stored:{self.feature}_bg"
        else:
            k = min(self.bg_frames, self._reader.n)
            self._bg = median_background([self._reader.get(i) for i in range(k)])
            self.bg_method = f"median:{k}"
        self._i = 0
        self._count = 0

    def backlog(self, next_index: int | None = None) -> int:
        if self.clock is None:
            return 0
        return self.clock.backlog(self._count if next_index is None else next_index)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    @property
    def background(self) -> np.ndarray | None:
        if self._reader is None:
            self.open()
        return self._bg

    def read(self, timeout_s: float = 1.0) -> RawFrame | None:
        if self._reader is None:
            self.open()
        assert self._reader is not None
        if self._i >= self._reader.n:
            if not self.loop:
                raise EndOfStream
            self._i = 0
        lost = 0
        if self.clock is not None:
            idx, lost = self.clock.next(self._count, timeout_s)
            if idx is None:
                return None
            if lost:  # captured, never read: skip them in the file
                if not self.loop and self._i + lost >= self._reader.n:
                    self.clock.dropped -= lost - (self._reader.n - self._i)
                    self._count += self._reader.n - self._i
                    self._i = self._reader.n
                    raise EndOfStream
                self._i = (self._i + lost) % self._reader.n
                self._count += lost
        try:
            img = self._reader.get(self._i)
        except EndOfStream:
            if not self.loop or self._i == 0:
                raise
            self._i = 0
            img = self._reader.get(0)
        fr = self._reader.frame_rate_hz or 1.0
        if self.clock is not None:  # acquisition time: when the camera captured it
            t_acq = self.clock.capture_ns(self._count)
            backlog = self.clock.backlog(self._count + 1)
        else:
            t_acq, backlog = time.monotonic_ns(), 0
        raw = RawFrame(self._count, self._count / fr, t_acq, img, None, dropped_before=lost,
                       backlog=backlog)
        self._i += 1
        self._count += 1
        return raw

    @property
    def info(self) -> dict[str, Any]:
        return {"source": "file", "path": str(self.path), "feature": self.feature,
                "background": self.bg_method, "loop": self.loop, "rate_hz": self.rate_hz,
                "buffer_frames": self.buffer_frames if self.clock is not None else None}
