"""Camera-source base class, frame record, source-spec parsing and frame health checks."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from leukoflow.core.physics import DEFAULT_OPTICS
from leukoflow.core.registry import Registry

SOURCES: Registry = Registry("camera source")

#: Reasons a frame is rejected before reconstruction.
FRAME_REJECT_REASONS: tuple[str, ...] = (
    "wrong_size", "wrong_dtype", "non_finite", "all_zero", "saturated", "constant",
)


class SourceError(RuntimeError):
    """A source cannot be opened or read (clear message for the operator)."""


class EndOfStream(Exception):  # noqa: N818 (a signal, not an error)
    """The source has no more frames."""


@dataclass
class RawFrame:
    """One camera frame as delivered by a source.

    Attributes
    ----------
    index : int
        Frame counter of the source (gaps mean dropped frames).
    t_s : float
        Source timestamp [s] (camera clock or simulated time).
    t_acq_ns : int
        Monotonic receive time [ns] (``time.monotonic_ns``).
    image : numpy.ndarray
        The raw hologram (rows × cols), usually uint8.
    truth : list or None
        Ground truth of simulated frames (``leukoflow.acquisition.sim`` ``CellTruth`` objects).
    origin : object, optional
        The source's own frame object (the simulator's ``Frame``, for ``true_phase``).
    dropped_before : int
        Frames the source itself dropped just before this one (its ring buffer overflowed
        because they were not read in time: :class:`FrameClock`); the frame-index gap they
        leave is explained, not a camera dropout.
    backlog : int
        Frames already captured and waiting behind this one when it was read (paced
        sources; 0 when unknown).
    """

    index: int
    t_s: float
    t_acq_ns: int
    image: np.ndarray
    truth: list | None = None
    origin: Any = None
    dropped_before: int = 0
    backlog: int = 0


class Source:
    """Base class of camera sources.

    Subclasses implement :meth:`read` (and usually :meth:`open`/:meth:`close`). A source
    that knows its background hologram exposes it as :attr:`background`; simulated
    sources set :attr:`has_truth`.
    """

    registry_name: str = "base"
    has_truth: bool = False
    #: nominal frame interval [s] (None = unknown; stall detection then uses its default)
    frame_interval_s: float | None = None
    #: camera clock of a paced source (None = frames as fast as they can be read)
    clock: FrameClock | None = None
    #: a real camera: frames arrive on its own clock and the ones not read in time are
    #: lost in the camera or driver (they show as gaps in the frame index)
    hardware_clock: bool = False

    @property
    def nominal_rate_hz(self) -> float:
        """The camera's frame rate [frames/s]: the pace of a paced source, else the
        camera's own rate (0 when unknown)."""
        if self.clock is not None:
            return float(self.clock.rate_hz)
        return 1.0 / self.frame_interval_s if self.frame_interval_s else 0.0

    @property
    def paced(self) -> bool:
        """True when frames arrive on the camera's clock (a real camera, or a replayed or
        simulated one paced by a :class:`FrameClock`), so that frames not taken in time
        are lost."""
        return self.clock is not None or self.hardware_clock

    def pace(self, rate_hz: float = 0.0, buffer_frames: int = 256) -> None:
        """Deliver frames in real time from now on, as the camera would.

        A :class:`FrameClock` (started by the next :meth:`read`) captures frames at
        ``rate_hz`` [frames/s] (0 = the source's nominal frame rate, or the default
        camera's :data:`leukoflow.core.physics.DEFAULT_OPTICS` rate when the source does
        not know one) into a ring buffer of ``buffer_frames``; frames not read in time
        are dropped and counted. Real cameras are paced by their own clock already.
        """
        if self.hardware_clock:
            return
        rate = float(rate_hz) or (1.0 / self.frame_interval_s if self.frame_interval_s
                                  else DEFAULT_OPTICS.frame_rate_hz)
        self.clock = FrameClock(rate, buffer_frames)

    @property
    def frames_dropped(self) -> int:
        """Frames this source dropped itself (ring-buffer overrun) so far."""
        return self.clock.dropped if self.clock is not None else 0

    def backlog(self, next_index: int | None = None) -> int:
        """Frames captured but not yet read [frames] (0 for unpaced sources)."""
        return 0

    def open(self) -> None:  # noqa: B027 (optional hook)
        """Acquire the device / file."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release the device / file."""

    @property
    def background(self) -> np.ndarray | None:
        """Background hologram (no cells), if the source has one."""
        return None

    def read(self, timeout_s: float = 1.0) -> RawFrame | None:
        """Next frame, or None when none arrived within ``timeout_s``.

        Raises
        ------
        EndOfStream
            When a finite source is exhausted.
        SourceError
            When the device failed irrecoverably.
        """
        raise NotImplementedError

    @property
    def info(self) -> dict[str, Any]:
        """Parameters of this source (recorded with the data)."""
        return {"source": self.registry_name}

    def __enter__(self) -> Source:
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def parse_source_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Parse ``sim[:SEED[:CONCENTRATION[:PROFILE]]]``, ``file:PATH``, ``camera:opencv:0`` or
    ``camera:genicam[:CTI]``.

    Returns
    -------
    name : str
        Registry name of the source.
    kwargs : dict
        Constructor keyword arguments.
    """
    if not spec:
        raise SourceError("empty source spec; use sim, file:PATH or camera:opencv:INDEX")
    kind, _, rest = spec.partition(":")
    if kind == "sim":  # sim[:SEED[:CONCENTRATION[:PROFILE[,PROFILE...]]]]
        seed, _, rest2 = rest.partition(":")
        conc, _, profile = rest2.partition(":")
        try:
            kw: dict[str, Any] = {"seed": int(seed)} if seed else {}
            if conc:
                kw["concentration"] = float(conc)
        except ValueError:
            raise SourceError(f"bad simulator spec {spec!r}; use sim[:SEED[:CONCENTRATION"
                              "[:PROFILE]]] (objects per field of view; profiles: "
                              "leukoflow simulate profiles)") from None
        if profile:
            kw["profile"] = profile
        return "sim", kw
    if kind == "file":
        if not rest:
            raise SourceError("file source needs a path: file:PATH")
        return "file", {"path": rest}
    if kind == "camera":
        backend, _, dev = rest.partition(":")
        if backend == "opencv":
            return "opencv", {"device": dev or "0"}
        if backend == "genicam":
            return "genicam", ({"cti": dev} if dev else {})
        raise SourceError(f"unknown camera backend {backend!r}; use camera:opencv:INDEX or "
                          "camera:genicam[:CTI_FILE]")
    raise SourceError(f"unknown source spec {spec!r}; use sim, file:PATH or camera:...")


def create_source(spec: str, **overrides: Any) -> Source:
    """Instantiate the source named by ``spec`` (see :func:`parse_source_spec`).

    ``overrides`` are merged into the parsed arguments when the source accepts them (e.g.
    ``seed`` for the simulator).
    """
    name, kwargs = parse_source_spec(spec)
    cls = SOURCES.get(name)
    import inspect

    params = inspect.signature(cls).parameters
    for k, v in overrides.items():
        if v is not None and k in params and k not in kwargs:
            kwargs[k] = v
    return cls(**kwargs)


@dataclass
class FrameClock:
    """The frame clock and ring buffer of a camera, for sources that deliver stored or
    simulated frames as a camera would.

    A camera captures frame *k* at ``t0 + k / rate_hz`` whether or not anybody reads it,
    into a ring buffer of ``buffer_frames`` frames; a frame still unread when the buffer
    wraps around is overwritten (lost). :meth:`next` gives the reader the oldest frame
    still in the buffer and says how many were lost before it, so a reader that cannot
    keep up loses frames exactly like a real acquisition, and they are counted.

    Parameters
    ----------
    rate_hz : float
        Frame rate [frames/s] (> 0).
    buffer_frames : int
        Ring-buffer capacity [frames] (>= 1).

    Attributes
    ----------
    t0_ns : int or None
        Capture time of frame 0 [monotonic ns]; set by :meth:`start` (or the first
        :meth:`next`).
    dropped : int
        Frames lost to buffer overruns so far.
    """

    rate_hz: float
    buffer_frames: int = 256
    t0_ns: int | None = None
    dropped: int = 0

    def __post_init__(self) -> None:
        if not self.rate_hz > 0:
            raise ValueError(f"frame rate must be > 0 frames/s, got {self.rate_hz}")
        if int(self.buffer_frames) < 1:
            raise ValueError(f"ring buffer needs >= 1 frame, got {self.buffer_frames}")
        self.buffer_frames = int(self.buffer_frames)

    def start(self, now_ns: int | None = None) -> None:
        """Start capturing: frame 0 is captured at ``now_ns`` [monotonic ns]."""
        self.t0_ns = time.monotonic_ns() if now_ns is None else int(now_ns)
        self.dropped = 0

    def capture_ns(self, index: int) -> int:
        """Capture time of frame ``index`` [monotonic ns]."""
        if self.t0_ns is None:
            self.start()
        return self.t0_ns + round(index * 1e9 / self.rate_hz)

    def captured(self, now_ns: int | None = None) -> int:
        """Number of frames captured by ``now_ns`` (frames ``0 .. n-1``)."""
        if self.t0_ns is None:
            self.start()
        now = time.monotonic_ns() if now_ns is None else now_ns
        if now < self.t0_ns:
            return 0
        return int((now - self.t0_ns) * self.rate_hz // 1_000_000_000) + 1

    def backlog(self, next_index: int, now_ns: int | None = None) -> int:
        """Frames captured and not yet read when ``next_index`` is the next to read."""
        return max(0, self.captured(now_ns) - next_index)

    def next(self, index: int, timeout_s: float) -> tuple[int | None, int]:
        """Wait for frame ``index`` (the next one the reader wants).

        Returns
        -------
        index : int or None
            The frame to deliver: ``index``, or a later one when the frames before it were
            overwritten; None when no frame is captured within ``timeout_s`` [s].
        dropped : int
            Frames lost just before it (overwritten in the ring buffer).
        """
        now = time.monotonic_ns()
        n = self.captured(now)
        if n <= index:
            wait = (self.capture_ns(index) - now) / 1e9
            if wait > timeout_s:
                time.sleep(max(timeout_s, 0.0))
                return None, 0
            if wait > 0:
                time.sleep(wait)
            return index, 0
        oldest = max(index, n - self.buffer_frames)
        lost = oldest - index
        self.dropped += lost
        return oldest, lost


@dataclass
class FrameValidator:
    """Reject frames that cannot be reconstructed, counting each reason.

    Parameters
    ----------
    shape : tuple[int, int]
        Expected frame shape (rows, cols) [px].
    saturated_fraction : float
        Reject when more than this fraction of pixels sit at the maximum value.
    max_value : float
        Saturation level (255 for 8-bit cameras).
    """

    shape: tuple[int, int] = (320, 1024)
    saturated_fraction: float = 0.05
    max_value: float = 255.0
    counts: Counter = field(default_factory=Counter)

    def check(self, image: Any) -> str | None:
        """Reason the frame is unusable, or None (counted either way)."""
        reason = self._reason(image)
        self.counts[reason or "accepted"] += 1
        return reason

    def _reason(self, image: Any) -> str | None:
        if not isinstance(image, np.ndarray) or image.ndim != 2:
            return "wrong_size"
        if tuple(image.shape) != tuple(self.shape):
            return "wrong_size"
        if image.dtype.kind not in "uif":
            return "wrong_dtype"
        if image.dtype.kind == "f" and not np.isfinite(image).all():
            return "non_finite"
        hi = image.max()
        if hi == 0:
            return "all_zero"
        if hi >= self.max_value and (
                np.count_nonzero(image >= self.max_value) > self.saturated_fraction * image.size):
            return "saturated"
        if image.min() == hi:
            return "constant"
        return None


@dataclass
class StallMonitor:
    """Detect camera stalls (no frame for too long) and dropouts (frame-index jumps).

    Parameters
    ----------
    frame_interval_s : float
        Nominal frame interval [s].
    stall_intervals : float
        A stall is declared after this many frame intervals without a frame (at least
        ``min_stall_s``).
    min_stall_s : float
        Lower bound of the stall timeout [s] (scheduling jitter on a busy host).
    """

    frame_interval_s: float = 0.002
    stall_intervals: float = 50.0
    min_stall_s: float = 0.5
    stalls: int = 0
    dropouts: int = 0
    frames_missing: int = 0
    _last_index: int | None = None
    _last_t: float = field(default_factory=time.monotonic)
    _stalled: bool = False

    @property
    def timeout_s(self) -> float:
        """Seconds without a frame that count as a stall."""
        return max(self.frame_interval_s * self.stall_intervals, self.min_stall_s)

    def frame(self, index: int, now: float | None = None, explained: int = 0) -> int:
        """Record a frame; return how many frames the camera skipped just before it.

        ``explained`` frames of the index gap were dropped by the source itself (counted
        there, :attr:`RawFrame.dropped_before`), not by the camera.
        """
        now = time.monotonic() if now is None else now
        self._last_t = now
        self._stalled = False
        missing = 0
        if self._last_index is not None:
            gap = index - self._last_index - 1 - max(int(explained), 0)
            if gap > 0:
                missing = gap
                self.dropouts += 1
                self.frames_missing += gap
        self._last_index = index
        return missing

    def idle(self, now: float | None = None) -> bool:
        """Call when no frame arrived; return True once per stall when it begins."""
        now = time.monotonic() if now is None else now
        if not self._stalled and now - self._last_t > self.timeout_s:
            self._stalled = True
            self.stalls += 1
            return True
        return False

    def age_s(self, now: float | None = None) -> float:
        """Age of the newest frame [s]."""
        now = time.monotonic() if now is None else now
        return now - self._last_t
