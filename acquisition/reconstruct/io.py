"""Load holograms from files: .npy, .npz, TIFF, PNG/BMP/JPEG, .rtdc (``qpi_oah``).

No pickle: ``.npy``/``.npz`` are read with ``allow_pickle=False``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_EXT = (".png", ".bmp", ".jpg", ".jpeg", ".gif")
TIFF_EXT = (".tif", ".tiff")
HDF_EXT = (".rtdc", ".h5", ".hdf5")
SUPPORTED = (".npy", ".npz", *TIFF_EXT, *IMAGE_EXT, *HDF_EXT)


class HologramIOError(ValueError):
    """A hologram file is missing, unreadable, or holds no usable image."""


def _validate(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype.kind not in "biuf":
        raise HologramIOError(f"{path}: unsupported data type {arr.dtype} "
                              f"(need real-valued hologram intensities)")
    if arr.ndim not in (2, 3):
        raise HologramIOError(f"{path}: expected a 2D image or a 3D stack, got shape {arr.shape}")
    if arr.size == 0 or min(arr.shape) == 0:
        raise HologramIOError(f"{path}: empty image (shape {arr.shape})")
    return arr


def _first_channel(arr: np.ndarray) -> np.ndarray:
    """RGB(A) images: keep the first channel (qpretrieve's convention for colour layouts)."""
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return arr[..., 0]
    return arr


def _load_npz(path: Path, key: str | None) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        names = list(z.files)
        if not names:
            raise HologramIOError(f"{path}: the .npz archive holds no arrays")
        if key is None:
            key = names[0]
        elif key not in names:
            raise HologramIOError(f"{path}: no array {key!r}; available: {', '.join(names)}")
        return np.asarray(z[key])


def _load_hdf(path: Path, key: str | None) -> np.ndarray:
    import h5py

    try:
        import hdf5plugin  # noqa: F401  (registers Zstd etc. for compressed .rtdc)
    except ImportError:  # pragma: no cover
        pass
    key = key or "qpi_oah"
    with h5py.File(path, "r") as h5:
        events = h5.get("events")
        if events is None or not isinstance(events, h5py.Group):
            raise HologramIOError(f"{path}: no 'events' group (not an .rtdc file?)")
        if key not in events:
            imgs = [k for k, v in events.items() if isinstance(v, h5py.Dataset) and v.ndim == 3]
            raise HologramIOError(f"{path}: no image feature {key!r}; image features: "
                                  f"{', '.join(imgs) or 'none'}")
        return np.asarray(events[key][...])


def load_hologram(path: str | Path, key: str | None = None) -> np.ndarray:
    """Read a hologram or a stack of holograms.

    Parameters
    ----------
    path : str or Path
        ``.npy``; ``.npz`` (array ``key`` or the first array); ``.tif``/``.tiff`` (pages →
        stack); ``.png``/``.bmp``/``.jpg``/``.jpeg``/``.gif`` (RGB → first channel);
        ``.rtdc``/``.h5``/``.hdf5`` (``events/<key>``, default ``qpi_oah``).
    key : str, optional
        Array name (npz) or image feature (rtdc, e.g. ``qpi_oah_bg``).

    Returns
    -------
    ndarray, shape (H, W) or (N, H, W)
        Raw intensities in the file's dtype (uint8 camera frames stay uint8).

    Raises
    ------
    HologramIOError
        Missing file, unsupported extension, corrupt content, missing key, bad shape/dtype.
    """
    p = Path(path)
    if not p.exists():
        raise HologramIOError(f"{p}: no such file")
    if not p.is_file():
        raise HologramIOError(f"{p}: not a file")
    ext = p.suffix.lower()
    if ext not in SUPPORTED:
        raise HologramIOError(f"{p}: unsupported file type {ext!r}; supported: "
                              f"{', '.join(SUPPORTED)}")
    try:
        if ext == ".npy":
            arr = np.load(p, allow_pickle=False)
        elif ext == ".npz":
            arr = _load_npz(p, key)
        elif ext in TIFF_EXT:
            import tifffile

            arr = _first_channel(np.asarray(tifffile.imread(p)))
        elif ext in IMAGE_EXT:
            import imageio.v3 as iio

            arr = _first_channel(np.asarray(iio.imread(p)))
        else:
            arr = _load_hdf(p, key)
    except HologramIOError:
        raise
    except Exception as exc:  # any parser error means a corrupt or foreign file
        raise HologramIOError(f"{p}: cannot read {ext} file ({type(exc).__name__}: {exc})") \
            from exc
    return _validate(np.asarray(arr), p)
