"""Base class of the inference backends.

A backend runs the network of a model artifact on raw phase crops ``(N, H, W)`` in rad and
returns, per cell, the class logits, the penultimate features (for feature-based OOD
detectors) and whether the crop was finite. Normalisation ``(x - mean) / std`` happens
inside the backend (on the device for GPUs), so every backend sees exactly the same input.

Execution is split into :meth:`Backend.submit` and :meth:`Backend.collect` so a backend
can compute batch *k* while the worker post-processes batch *k - 1* (GPU backends by
nature; CPU backends with ``pipeline=True`` run :meth:`Backend.compute` in one extra
thread, since ONNX Runtime and PyTorch release the GIL). At most ``max_in_flight`` batches
may be in flight; the worker always collects the oldest before submitting more.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from leukoflow.core.registry import Registry

BACKENDS: Registry = Registry("inference backend")
"""Name -> :class:`Backend` subclass (each backend module registers itself)."""


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (missing package, no GPU, no engine)."""


@dataclass
class BackendOutput:
    """Per-cell outputs of one batch (only the ``n`` valid rows, float32 host arrays).

    Attributes
    ----------
    logits : ndarray (n, K) float32
    features : ndarray (n, D) float32
    finite : ndarray (n,) bool
        False for crops that contained NaN or inf (their outputs are meaningless).
    ood_score : ndarray (n,) float32 or None
        OOD score computed by the backend itself (GPU), else None (scored on the host).
    """

    logits: np.ndarray
    features: np.ndarray
    finite: np.ndarray
    ood_score: np.ndarray | None = None


def pow2_buckets(max_batch: int, smallest: int = 1) -> tuple[int, ...]:
    """Powers of two from ``smallest`` up to (and including) ``max_batch`` [cells]."""
    out = []
    b = max(1, smallest)
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(int(max_batch))
    return tuple(out)


def finite_rows(x: np.ndarray) -> np.ndarray:
    """True per crop (first axis) when every pixel is finite."""
    return np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)


class Backend:
    """Runs one model artifact on batches of crops.

    Parameters
    ----------
    artifact : models.artifact.Artifact
        The loaded model.
    max_batch : int
        Largest batch the backend must accept [cells].

    Attributes
    ----------
    name : str
        Registry name.
    precision : str
        ``"fp32"`` or ``"fp16"``.
    pipeline : bool
        CPU backends: compute in a background thread, overlapping the worker's own work.
    buckets : tuple of int or None
        Batch sizes the backend executes (the batcher pads to them); None = any size.
    input_dtype : numpy.dtype
        dtype of the staging buffer from :meth:`host_buffer`.
    """

    name: ClassVar[str] = "base"
    device_kind: ClassVar[str] = "cpu"
    precision: str = "fp32"
    buckets: tuple[int, ...] | None = None
    input_dtype: np.dtype = np.dtype(np.float32)
    #: batches that may be submitted before the oldest is collected (staging buffers)
    max_in_flight: int = 1

    def __init__(self, artifact: Any, max_batch: int = 256, pipeline: bool = False) -> None:
        self.artifact = artifact
        self.max_batch = int(max_batch)
        self.input_size = int(artifact.input_size)
        self.num_classes = len(artifact.class_names)
        self.pipeline = bool(pipeline)
        self._staging: list[np.ndarray | None] = [None, None]
        self._slot = 0
        self._pool: ThreadPoolExecutor | None = None
        if self.pipeline:
            # one compute thread: the network runs (GIL released) while the worker thread
            # decides, encodes and receives; two staging buffers alternate
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-compute")
            self.max_in_flight = 2

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """``(True, "")`` when the backend can run here, else ``(False, why)``."""
        return True, ""

    # -- execution ---------------------------------------------------------------------
    def host_buffer(self, rows: int) -> np.ndarray:
        """Writable staging buffer ``(rows, H, W)`` for the next :meth:`submit`."""
        buf = self._staging[self._slot]
        if buf is None or buf.shape[0] < rows:
            s = self.input_size
            buf = np.empty((max(rows, self.max_batch), s, s), self.input_dtype)
            self._staging[self._slot] = buf
        return buf[:rows]

    def compute(self, x: np.ndarray, n: int) -> BackendOutput:
        """Run the network synchronously on ``x[:n]`` (CPU backends implement this)."""
        raise NotImplementedError

    def submit(self, x: np.ndarray, n: int) -> Any:
        """Start one batch; ``x`` is ``(bucket, H, W)``, its first ``n`` rows are real."""
        if self._pool is None:
            return self.compute(x, n)
        self._slot ^= 1  # the next host_buffer must not overwrite this batch's input
        return self._pool.submit(self.compute, x, n)

    def collect(self, handle: Any) -> BackendOutput:
        """Wait for a submitted batch and return its ``n`` valid rows."""
        if isinstance(handle, Future):
            return handle.result()
        return handle

    def infer(self, x: np.ndarray) -> BackendOutput:
        """Synchronous convenience: run all rows of ``x`` (``(N, H, W)``, rad)."""
        x = np.asarray(x)
        out = []
        for i in range(0, x.shape[0], self.max_batch):
            chunk = x[i:i + self.max_batch]
            n = chunk.shape[0]
            b = self.bucket_for(n)
            buf = self.host_buffer(b)
            buf[:n] = chunk
            if b > n:
                buf[n:b] = 0
            out.append(self.collect(self.submit(buf, n)))
        if not out:
            k, d = self.num_classes, self.feature_dim
            return BackendOutput(np.zeros((0, k), np.float32), np.zeros((0, d), np.float32),
                                 np.zeros(0, bool))
        res = BackendOutput(*(np.concatenate(a) for a in zip(
            *((o.logits, o.features, o.finite) for o in out), strict=True)))
        if all(o.ood_score is not None for o in out):
            res.ood_score = np.concatenate([o.ood_score for o in out])
        return res

    def bucket_for(self, n: int) -> int:
        """Execution size for ``n`` cells."""
        if not self.buckets:
            return n
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"{n} cells exceed the largest bucket {self.buckets[-1]}")

    def warmup(self, sizes: Sequence[int] | None = None) -> None:
        """Run every bucket (or ``sizes``) once so the first real batch is not slow."""
        sizes = sizes or self.buckets or sorted({1, min(8, self.max_batch), self.max_batch})
        for b in sizes:
            buf = self.host_buffer(b)
            buf[:] = 0
            self.collect(self.submit(buf, b))

    @property
    def feature_dim(self) -> int:
        """Length D of the feature vector."""
        return int(getattr(self, "_feature_dim", 0))

    def describe(self) -> dict[str, Any]:
        """Parameters recorded with the results."""
        return {"backend": self.name, "precision": self.precision,
                "max_batch": self.max_batch, "pipeline": self.max_in_flight > 1,
                "buckets": list(self.buckets) if self.buckets else None,
                "model_sha256": getattr(self.artifact, "sha256", None)}

    def close(self) -> None:
        """Release resources."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
