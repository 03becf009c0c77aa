"""Camera sources behind the :data:`SOURCES` registry.

``sim`` (simulated instrument, default), ``file`` (.rtdc / TIFF / .npy / video replay),
``opencv`` (cv2.VideoCapture camera) and ``genicam`` (harvesters, optional extra). Build one
from a spec string with :func:`create_source` (``sim``, ``file:PATH``, ``camera:opencv:0``).
"""

from leukoflow.acquisition.sources import file, genicam, opencv, sim  # noqa: F401  (registration)
from leukoflow.acquisition.sources.base import (
    FRAME_REJECT_REASONS,
    SOURCES,
    EndOfStream,
    FrameClock,
    FrameValidator,
    RawFrame,
    Source,
    SourceError,
    StallMonitor,
    create_source,
    parse_source_spec,
)

__all__ = [
    "FRAME_REJECT_REASONS", "SOURCES", "EndOfStream", "FrameClock", "FrameValidator",
    "RawFrame", "Source", "SourceError", "StallMonitor", "create_source", "parse_source_spec",
]
