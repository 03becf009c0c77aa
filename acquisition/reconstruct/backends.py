"""Array backends for the reconstruction (registry ``RECON_BACKENDS``).

The reconstruction is written once against the small :class:`ArrayBackend` interface; the
backends swap the array module: NumPy/SciPy (multi-threaded ``scipy.fft`` with ``workers``)
and PyTorch (``torch.fft`` on CUDA or CPU, batched frames, arrays stay on the device).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from leukoflow.core.registry import Registry

#: Registry of reconstruction array backends.
RECON_BACKENDS: Registry[type[ArrayBackend]] = Registry("reconstruction backend")


class ArrayBackend(ABC):
    """Minimal array API used by :class:`~leukoflow.acquisition.reconstruct.offaxis.Reconstructor`.

    All FFTs act on the last two axes. Arrays may carry leading batch axes.
    """

    registry_name: str = ""
    #: device description recorded in the parameters
    device: str = "cpu"

    @abstractmethod
    def asarray(self, a: Any, dtype: str) -> Any:
        """Convert ``a`` (NumPy array or native array) to a native array of ``dtype``
        ("float32", "float64", "complex64", "complex128")."""

    @abstractmethod
    def to_numpy(self, a: Any) -> np.ndarray:
        """Copy a native array to a NumPy array (host memory)."""

    @abstractmethod
    def is_native(self, a: Any) -> bool:
        """True if ``a`` is already an array of this backend."""

    @abstractmethod
    def rfft2(self, a: Any) -> Any:
        """Real-input 2D FFT over the last two axes."""

    @abstractmethod
    def rfft_last(self, a: Any) -> Any:
        """Real-input 1D FFT over the last axis."""

    @abstractmethod
    def fft_rows(self, a: Any) -> Any:
        """Complex 1D FFT over the second-to-last axis (along each column)."""

    @abstractmethod
    def take(self, a: Any, idx: np.ndarray, axis: int) -> Any:
        """Gather ``idx`` (integer vector) along ``axis`` (-1 or -2)."""

    @abstractmethod
    def fft2(self, a: Any) -> Any:
        """Complex 2D FFT over the last two axes."""

    @abstractmethod
    def ifft2(self, a: Any) -> Any:
        """Inverse complex 2D FFT over the last two axes (1/n normalised)."""

    @abstractmethod
    def fftshift(self, a: Any) -> Any:
        """``fftshift`` over the last two axes."""

    @abstractmethod
    def ifftshift(self, a: Any) -> Any:
        """``ifftshift`` over the last two axes."""

    @abstractmethod
    def roll(self, a: Any, shift: tuple[int, int]) -> Any:
        """Circular shift of the last two axes by ``shift`` (rows, cols)."""

    @abstractmethod
    def take2d(self, a: Any, rows: np.ndarray, cols: np.ndarray) -> Any:
        """Gather ``a[..., rows[:, None], cols[None, :]]`` (integer index vectors)."""

    @abstractmethod
    def zeros(self, shape: tuple[int, ...], dtype: str) -> Any:
        """New zero-filled array."""

    @abstractmethod
    def mean2d(self, a: Any) -> Any:
        """Mean over the last two axes, keeping them as size-1 axes."""

    @abstractmethod
    def angle(self, a: Any) -> Any:
        """Argument of a complex array [rad]."""

    @abstractmethod
    def abs(self, a: Any) -> Any:
        """Magnitude."""

    @abstractmethod
    def conj(self, a: Any) -> Any:
        """Complex conjugate."""

    @abstractmethod
    def where(self, cond: Any, a: Any, b: Any) -> Any:
        """Elementwise select."""

    def describe(self) -> dict:
        """Parameters of this backend for metadata."""
        return {"backend": self.registry_name, "device": self.device}


_NP_DTYPES = {"float32": np.float32, "float64": np.float64,
              "complex64": np.complex64, "complex128": np.complex128}


@RECON_BACKENDS.register("numpy")
class NumpyBackend(ArrayBackend):
    """NumPy arrays with ``scipy.fft`` (pocketfft) using ``workers`` threads.

    Parameters
    ----------
    workers : int
        FFT worker threads (1 = single core; -1 = all cores).
    device : str
        Must be "cpu".
    """

    def __init__(self, workers: int = 1, device: str = "cpu") -> None:
        import scipy.fft

        if device != "cpu":
            raise ValueError(f"the numpy backend runs on the CPU only, not {device!r}")
        self._fft = scipy.fft
        self.workers = int(workers)
        self.device = "cpu"

    def asarray(self, a, dtype):
        if not isinstance(a, np.ndarray) and type(a).__module__.startswith("torch"):
            a = a.detach().cpu().numpy()
        return np.asarray(a, dtype=_NP_DTYPES[dtype])

    def to_numpy(self, a):
        return np.asarray(a)

    def is_native(self, a):
        return isinstance(a, np.ndarray)

    def rfft2(self, a):
        return self._fft.rfft2(a, axes=(-2, -1), workers=self.workers)

    def rfft_last(self, a):
        return self._fft.rfft(a, axis=-1, workers=self.workers)

    def fft_rows(self, a):
        return self._fft.fft(a, axis=-2, workers=self.workers, overwrite_x=True)

    def take(self, a, idx, axis):
        return np.take(a, idx, axis=axis)

    def fft2(self, a):
        return self._fft.fft2(a, axes=(-2, -1), workers=self.workers)

    def ifft2(self, a):
        return self._fft.ifft2(a, axes=(-2, -1), workers=self.workers)

    def fftshift(self, a):
        return np.fft.fftshift(a, axes=(-2, -1))

    def ifftshift(self, a):
        return np.fft.ifftshift(a, axes=(-2, -1))

    def roll(self, a, shift):
        return np.roll(a, shift, axis=(-2, -1))

    def take2d(self, a, rows, cols):
        return np.take(np.take(a, rows, axis=-2), cols, axis=-1)

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype=_NP_DTYPES[dtype])

    def mean2d(self, a):
        return a.mean(axis=(-2, -1), keepdims=True)

    def angle(self, a):
        return np.angle(a)

    def abs(self, a):
        return np.abs(a)

    def conj(self, a):
        return np.conj(a)

    def where(self, cond, a, b):
        return np.where(cond, a, b)

    def describe(self):
        return {"backend": "numpy", "device": "cpu", "workers": self.workers}


@RECON_BACKENDS.register("torch")
class TorchBackend(ArrayBackend):
    """PyTorch tensors with ``torch.fft`` (CUDA or CPU); batches stay on the device.

    Parameters
    ----------
    device : str
        Torch device, e.g. "cuda", "cuda:0" or "cpu".
    workers : int
        Unused (torch manages its own threads); accepted for a uniform signature.
    """

    def __init__(self, device: str = "cpu", workers: int = 1) -> None:
        import torch

        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("torch backend: CUDA requested but not available "
                               "(use device='cpu' or the numpy backend)")
        self.torch = torch
        self.dev = dev
        self.device = str(dev)
        self._dtypes = {"float32": torch.float32, "float64": torch.float64,
                        "complex64": torch.complex64, "complex128": torch.complex128}
        self._index_cache: dict[tuple, Any] = {}

    def asarray(self, a, dtype):
        t = self.torch
        dt = self._dtypes[dtype]
        if isinstance(a, t.Tensor):
            return a.to(device=self.dev, dtype=dt)
        arr = np.asarray(a)
        if arr.dtype == np.uint16:  # torch has no uint16 arithmetic on all versions
            arr = arr.astype(np.int32)
        src = t.from_numpy(np.ascontiguousarray(arr)).to(self.dev)  # upload raw dtype
        return src.to(dtype=dt)

    def to_numpy(self, a):
        return a.detach().cpu().numpy()

    def is_native(self, a):
        return isinstance(a, self.torch.Tensor)

    def rfft2(self, a):
        return self.torch.fft.rfft2(a, dim=(-2, -1))

    def rfft_last(self, a):
        return self.torch.fft.rfft(a, dim=-1)

    def fft_rows(self, a):
        return self.torch.fft.fft(a, dim=-2)

    def take(self, a, idx, axis):
        return self.torch.index_select(a, axis, self._index(idx))

    def fft2(self, a):
        return self.torch.fft.fft2(a, dim=(-2, -1))

    def ifft2(self, a):
        return self.torch.fft.ifft2(a, dim=(-2, -1))

    def fftshift(self, a):
        return self.torch.fft.fftshift(a, dim=(-2, -1))

    def ifftshift(self, a):
        return self.torch.fft.ifftshift(a, dim=(-2, -1))

    def roll(self, a, shift):
        return self.torch.roll(a, shifts=tuple(int(s) for s in shift), dims=(-2, -1))

    def _index(self, idx: np.ndarray):
        key = (idx.tobytes(), idx.size)
        got = self._index_cache.get(key)
        if got is None:
            got = self.torch.as_tensor(np.asarray(idx, dtype=np.int64), device=self.dev)
            self._index_cache[key] = got
        return got

    def take2d(self, a, rows, cols):
        t = self.torch
        return t.index_select(t.index_select(a, -2, self._index(rows)), -1, self._index(cols))

    def zeros(self, shape, dtype):
        return self.torch.zeros(shape, dtype=self._dtypes[dtype], device=self.dev)

    def mean2d(self, a):
        return a.mean(dim=(-2, -1), keepdim=True)

    def angle(self, a):
        return self.torch.angle(a)

    def abs(self, a):
        return self.torch.abs(a)

    def conj(self, a):
        return self.torch.conj(a).resolve_conj()

    def where(self, cond, a, b):
        return self.torch.where(cond, a, b)


def create_backend(name: str, *, device: str = "cpu", workers: int = 1) -> ArrayBackend:
    """Instantiate the backend ``name`` (see :data:`RECON_BACKENDS`)."""
    return RECON_BACKENDS.create(name, device=device, workers=workers)
