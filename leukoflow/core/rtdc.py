"""Reading and writing ``.rtdc`` files (HDF5 as defined by dclab) with h5py + hdf5plugin.

dclab (GPL-2.0) is only used in tests and offline tools; the service writes the format
itself. Layout:

* root attributes ``"section:key"`` (``experiment``, ``imaging``, ``setup``, ``qpi``,
  ``user``...); leukoflow's own parameters go to ``user:`` keys and, complete, as JSON into
  ``logs/leukoflow-params``;
* ``events/<feature>``: 1-D scalar features or (N, H, W) image features (``qpi_pha`` [rad],
  ``qpi_amp``, ``qpi_oah``, ``qpi_oah_bg``, ``image``, ``mask``) with the IMAGE attributes;
* ``tables/<name>``: structured arrays (e.g. simulator ground truth);
* ``logs/<name>``: text lines.

:class:`RtdcWriter` is crash-safe: the file is in SWMR mode while events are appended and
is flushed (HDF5 flush, then ``fsync``) at least every ``flush_interval_s`` and at close, so
a killed writer (or a power loss) leaves a file that, once repaired like ``h5clear -s`` does
(:func:`leukoflow.run.recorder.repair_rtdc`), holds every event counted in
:attr:`RtdcWriter.flushed_events` and lacks at most the last interval.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from leukoflow import __version__
from leukoflow.core import jsonutil
from leukoflow.core.physics import DEFAULT_OPTICS
from leukoflow.core.vocabulary import CLASS_NAMES, OOD_KINDS

IMAGE_FEATURES = ("image", "image_bg", "mask", "qpi_pha", "qpi_amp", "qpi_oah", "qpi_oah_bg")


def open_rtdc(path: str | Path) -> Any:
    """Open an ``.rtdc`` file read-only with the Zstd filter registered.

    Falls back to SWMR read mode for a file whose writer was killed while appending (its
    superblock still says "open for writing"); the data flushed before the kill is read.
    """
    import h5py
    import hdf5plugin  # noqa: F401  (registers the Zstd filter)

    try:
        return h5py.File(path, "r")
    except OSError:
        return h5py.File(path, "r", swmr=True)


def _compression() -> dict[str, Any]:
    try:
        import hdf5plugin

        return dict(hdf5plugin.Zstd(clevel=5))
    except ImportError:  # pragma: no cover - hdf5plugin is a dependency
        return {"compression": "gzip", "compression_opts": 4}


def _attr_value(value: Any) -> Any:
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int | float | str | np.integer | np.floating):
        return value
    if isinstance(value, tuple | list) and all(isinstance(v, int | float) for v in value):
        return np.asarray(value)
    return jsonutil.dumps(value)


def flatten_meta(meta: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{"qpi": {"wavelength": 530}}`` -> ``{"qpi:wavelength": 530}`` (HDF5 attrs)."""
    out = {}
    for section, items in meta.items():
        for key, value in items.items():
            out[f"{section}:{key}"] = _attr_value(value)
    return out


class RtdcWriter:
    """Append events to an ``.rtdc`` file.

    Parameters
    ----------
    path : path-like
        Output file (overwritten).
    meta : mapping
        ``{section: {key: value}}`` metadata written as root attributes.
    params : mapping, optional
        Every pipeline parameter (nested dict), stored as JSON in ``logs/leukoflow-params``
        and flattened into ``user:`` attributes.
    flush_interval_s : float
        Maximum time between flushes while appending [s].
    swmr : bool
        Use HDF5 single-writer/multiple-reader mode (crash-safe appends, concurrent readers).
    """

    def __init__(self, path: str | Path, meta: Mapping[str, Mapping[str, Any]] | None = None,
                 *, params: Mapping[str, Any] | None = None, flush_interval_s: float = 1.0,
                 swmr: bool = True) -> None:
        import h5py

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush_interval_s = flush_interval_s
        self._swmr = swmr
        self._h5 = h5py.File(self.path, "w", libver="latest")
        self._h5.attrs.update(flatten_meta(meta or {}))
        self._h5.attrs["setup:software version"] = _software_version()
        self._pending_tables: dict[str, np.ndarray] = {}
        self._pending_attrs: dict[str, Any] = {}
        if params:
            self._h5.attrs.update(flatten_meta({"user": _flat_params(params)}))
            self._write_log(self._h5, "leukoflow-params", [jsonutil.dumps(params)])
        self._events = self._h5.require_group("events")
        self._dsets: dict[str, Any] = {}
        self.n_events = 0
        #: events on disk for sure: appended before the last completed flush + fsync
        self.flushed_events = 0
        self._last_flush = time.monotonic()
        self._closed = False

    # -- events
    def _create(self, name: str, arr: np.ndarray) -> None:
        tail = arr.shape[1:]
        itemsize = max(1, int(np.prod(tail)) * arr.dtype.itemsize)
        chunk = max(10, (1 << 20) // itemsize)
        ds = self._events.create_dataset(
            name, shape=(0, *tail), maxshape=(None, *tail), dtype=arr.dtype,
            chunks=(chunk, *tail), fletcher32=True, **_compression(),
        )
        if arr.ndim == 3:
            ds.attrs.create("CLASS", np.bytes_("IMAGE"))
            ds.attrs.create("IMAGE_VERSION", np.bytes_("1.2"))
            ds.attrs.create("IMAGE_SUBCLASS", np.bytes_("IMAGE_GRAYSCALE"))
        self._dsets[name] = ds

    def append(self, **features: np.ndarray) -> None:
        """Append one block of events; every call must give the same features.

        Parameters
        ----------
        **features : array
            Feature name -> array with the event axis first (scalars 1-D, images 3-D).
        """
        if self._closed:
            raise ValueError("writer is closed")
        arrays = {k: np.asarray(v) for k, v in features.items()}
        lengths = {len(a) for a in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"features have different event counts: {lengths}")
        n = lengths.pop()
        if not self._dsets:
            for name, arr in arrays.items():
                self._create(name, arr)
            if self._swmr:
                self._h5.swmr_mode = True
        elif set(arrays) != set(self._dsets):
            raise ValueError(
                f"feature set changed: {sorted(arrays)} vs {sorted(self._dsets)}"
            )
        if n == 0:
            return
        for name, arr in arrays.items():
            ds = self._dsets[name]
            if arr.shape[1:] != ds.shape[1:]:
                raise ValueError(f"{name}: shape {arr.shape[1:]} != {ds.shape[1:]}")
            ds.resize(self.n_events + n, axis=0)
            ds[self.n_events:] = arr.astype(ds.dtype, copy=False)
        self.n_events += n
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def flush(self) -> None:
        """Flush data and metadata to disk and ``fsync`` the file (readers see all events
        appended so far; they survive a crash of the process or the machine)."""
        for ds in self._dsets.values():
            if self._swmr and self._h5.swmr_mode:
                ds.flush()
        self._h5.flush()
        _fsync_h5(self._h5)
        self.flushed_events = self.n_events
        self._last_flush = time.monotonic()

    # -- deferred extras (written at close; SWMR forbids new objects while appending)
    def add_table(self, name: str, table: np.ndarray) -> None:
        """Store a structured array under ``tables/<name>`` (written at close)."""
        self._pending_tables[name] = np.asarray(table)

    def set_meta(self, section: str, key: str, value: Any) -> None:
        """Set one metadata attribute (written at close)."""
        self._pending_attrs[f"{section}:{key}"] = _attr_value(value)

    @staticmethod
    def _write_log(h5: Any, name: str, lines: list[str]) -> None:
        import h5py

        logs = h5.require_group("logs")
        if name in logs:
            del logs[name]
        logs.create_dataset(name, data=np.array(lines, dtype=object),
                            dtype=h5py.string_dtype())

    def close(self) -> None:
        """Finish the file: event count, deferred tables, logs and attributes."""
        import h5py

        if self._closed:
            return
        self._closed = True
        self._h5.flush()
        self._h5.close()
        with h5py.File(self.path, "a") as h5:
            h5.attrs["experiment:event count"] = self.n_events
            for key, value in self._pending_attrs.items():
                h5.attrs[key] = value
            if self._pending_tables:
                grp = h5.require_group("tables")
                for name, tab in self._pending_tables.items():
                    if name in grp:
                        del grp[name]
                    grp.create_dataset(name, data=tab, **_compression())
        fsync_path(self.path)
        self.flushed_events = self.n_events

    def __enter__(self) -> RtdcWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _fsync_h5(h5: Any) -> None:
    """``fsync`` an open h5py file (sec2 driver: its file descriptor)."""
    try:
        fd = h5.id.get_vfd_handle()
    except (AttributeError, ValueError, OSError):  # a driver without a descriptor
        return
    if isinstance(fd, int) and fd >= 0:
        os.fsync(fd)


def fsync_path(path: str | Path) -> None:
    """``fsync`` a closed file and its folder (its content and its name are on disk)."""
    p = Path(path)
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    jsonutil.fsync_folder(p.parent)


def _flat_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat_params(v, key + " "))
        else:
            out[key] = v
    return out


def _software_version() -> str:

    return f"leukoflow {__version__}"


def base_meta(optics: Any | None = None, *, sample: str = "simulated", run_index: int = 1,
              ) -> dict[str, dict[str, Any]]:
    """Standard dclab metadata sections for a leukoflow file.

    Parameters
    ----------
    optics : leukoflow.core.physics.Optics, optional
        Optical geometry (default: the simulated instrument's).
    """

    o = optics or DEFAULT_OPTICS
    t = time.gmtime()
    return {
        "experiment": {"date": time.strftime("%Y-%m-%d", t), "time": time.strftime("%H:%M:%S", t),
                       "sample": sample, "run index": run_index},
        "imaging": {"pixel size": o.pixel_um, "frame rate": o.frame_rate_hz,
                    "roi size x": o.roi_shape[1], "roi size y": o.roi_shape[0]},
        "setup": {"medium": "other", "channel width": o.phase_shape[0] * o.pixel_um,
                  "chip region": "channel", "flow rate": 0.0},
        "qpi": {"wavelength": o.wavelength_um * 1000.0, "medium index": o.medium_index,
                "pixel size raw": o.camera_pixel_um, "pixel size proc": o.pixel_um},
    }


# ----------------------------------------------------------------------------- crop datasets

def write_crop_dataset(path: str | Path, x: np.ndarray, y: np.ndarray,
                       kind: list[str] | None = None,
                       features: Mapping[str, np.ndarray] | None = None,
                       meta: Mapping[str, Mapping[str, Any]] | None = None,
                       params: Mapping[str, Any] | None = None) -> Path:
    """Write a labeled crop dataset (``qpi_pha`` + labels + features) as ``.rtdc``.

    Parameters
    ----------
    x : array (N, H, W)
        Phase crops [rad].
    y : array (N,)
        Class index per :data:`leukoflow.CLASS_NAMES` (-1 for OOD objects).
    kind : list of str, optional
        Object kind per crop (class name or OOD kind); defaults to the class names.
    features : mapping, optional
        Extra scalar features (dclab names, e.g. ``area_um``, ``qpi_dm``).
    """

    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if x.ndim != 3 or len(y) != len(x):
        raise ValueError("x must be (N, H, W) and y (N,)")
    if kind is None:
        kind = [CLASS_NAMES[i] if i >= 0 else "ood" for i in y]
    kind_names = list(CLASS_NAMES) + [k for k in OOD_KINDS] + sorted(
        set(kind) - set(CLASS_NAMES) - set(OOD_KINDS))
    codes = np.array([kind_names.index(k) for k in kind], dtype=np.float64)
    m = {k: dict(v) for k, v in (meta or base_meta()).items()}
    m.setdefault("user", {})
    m["user"]["class_names"] = json.dumps(list(CLASS_NAMES))
    m["user"]["kind_names"] = json.dumps(kind_names)
    feats = {"qpi_pha": x, "userdef0": y.astype(np.float64), "userdef1": codes,
             "index": np.arange(1, len(x) + 1, dtype=np.float64)}
    for k, v in (features or {}).items():
        feats[k] = np.asarray(v, dtype=np.float64)
    with RtdcWriter(path, m, params=params, swmr=False) as w:
        w.append(**feats)
    return Path(path)


def read_crop_dataset(path: str | Path, split: str | None = None) -> dict[str, Any]:
    """Read a labeled crop dataset from ``.rtdc`` (leukoflow layout) or ``.npz``.

    Parameters
    ----------
    path : path-like
        ``.rtdc`` written by :func:`write_crop_dataset` (or a recording with labels), or an
        ``.npz`` with ``x``/``y`` arrays or the PBC layout (``x_train``, ``y_train``, ...).
    split : str, optional
        For split ``.npz`` files: ``train``, ``val``, ``test`` or ``ood``.

    Returns
    -------
    dict
        ``x`` float32 (N, H, W), ``y`` int64 (N,), ``kind`` list[str], ``features`` dict,
        ``meta`` dict.
    """

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"dataset not found: {p}")
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            keys = set(z.files)
            if {"x", "y"} <= keys:
                x, y = z["x"], z["y"]
                kind = [str(k) for k in z["kind"]] if "kind" in keys else None
            else:
                split = split or "train"
                if split == "ood":
                    x = z["x_ood"]
                    y = np.full(len(x), -1, dtype=np.int64)
                    kind = [str(k) for k in z["ood_kind"]]
                else:
                    x, y = z[f"x_{split}"], z[f"y_{split}"]
                    kind = None
            names = ([str(c) for c in z["class_names"]] if "class_names" in keys
                     else list(CLASS_NAMES))
        x = np.asarray(x)
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / 255.0
        y = np.asarray(y, dtype=np.int64)
        if kind is None:
            kind = [names[i] if i >= 0 else "ood" for i in y]
        return {"x": x.astype(np.float32), "y": y, "kind": kind, "features": {},
                "meta": {"source": str(p), "split": split, "class_names": names}}
    try:
        with open_rtdc(p) as h5:
            ev = h5["events"]
            if "qpi_pha" not in ev:
                raise ValueError(f"{p} has no qpi_pha crops")
            x = ev["qpi_pha"][:].astype(np.float32)
            y = ev["userdef0"][:].astype(np.int64) if "userdef0" in ev else np.full(len(x), -1)
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in h5.attrs.items()}
            kind_names = json.loads(attrs.get("user:kind_names", "[]"))
            if "userdef1" in ev and kind_names:
                kind = [kind_names[int(c)] for c in ev["userdef1"][:]]
            else:
                kind = [CLASS_NAMES[i] if 0 <= i < len(CLASS_NAMES) else "ood" for i in y]
            features = {k: ev[k][:] for k in ev if ev[k].ndim == 1
                        and k not in ("userdef0", "userdef1")}
    except OSError as exc:
        raise ValueError(f"cannot read {p}: {exc}") from exc
    return {"x": x, "y": y, "kind": kind, "features": features, "meta": attrs}
