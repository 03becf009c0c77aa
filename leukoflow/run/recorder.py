"""Recording of a live run into ``.rtdc`` (crops, features, predictions, ground truth).

The recorder joins the crops a run produced (seen by the collector's crop tap before the
inference workers) with their results (calibrated probabilities, decision, OOD score) by cell
id and appends one event per cell through :class:`leukoflow.core.rtdc.RtdcWriter`:

=================  ==========================================================================
feature            content
=================  ==========================================================================
``qpi_pha``        crop phase [rad], (N, 64, 64) float32
``ml_score_xxx``   calibrated probability per class (``neu``, ``eos``, ``mon``, ``lym``)
``userdef0``       ground-truth class index (0..3), -1 for OOD objects, NaN when unknown
``userdef1``       object kind code (index into ``user:kind_names``), NaN when unknown
``userdef2``       decision code (index into ``user:decision_names``: counted, uncertain, ood)
``userdef3``       predicted class index (argmax of the probabilities)
``userdef4``       OOD score (detector units, larger = more out-of-distribution)
``userdef5``       confidence (max calibrated probability)
``userdef6``       cell id (unique within the run)
``userdef7``       end-to-end latency, acquisition to collector [s]
``frame``          camera frame number of the crop
``time``           acquisition time since the first recorded cell [s]
``index``          event index (1-based, dclab convention)
QPI features       every feature of :data:`leukoflow.core.vocabulary.FEATURES` (the one
                   feature table): under its dclab name where dclab defines the quantity
                   (``area_um``, ``pos_x``, ``pos_y`` [µm], ``qpi_dm`` [pg], ``qpi_pha_int``
                   [rad], ``qpi_focus`` [µm], ``eccentr_prnc``, ``area_ratio``), else as
                   ``lf_<name>`` (``lf_diameter_um``, ``lf_focus``, ``lf_amp_std``,
                   ``lf_pha_mean``, ``lf_pha_max``); NaN where acquisition sent none
=================  ==========================================================================

dclab reads the ``lf_*`` features once they are registered (their names, labels and units
are in ``user:extra_features``)::

    for name, label in json.loads(h5.attrs["user:extra_features"]).items():
        dclab.register_temporary_feature(name, label=label)

All run and pipeline parameters go into the metadata (``params`` of the writer).

Crash safety: the writer flushes and syncs (``fsync``) at least every ``flush_interval_s`` (the
collector's ``record_flush_s``, 1 s by default) in HDF5 SWMR mode, so the data structure on
disk is consistent up to the last flush; :meth:`Recorder.stats` reports ``flushed_events``,
the events a crash cannot take back. HDF5 marks a file
opened for SWMR writing in its superblock ("file consistency flags"); after a SIGKILL these
flags stay set and ordinary readers (h5py, dclab) refuse the file until they are cleared.
:func:`repair_rtdc` does what the HDF5 tool ``h5clear -s --increment=0`` does (clear the
flags, move the end-of-allocation address up to the end of the file, recompute the
superblock's Jenkins lookup3 checksum); the collector calls it on every recording segment it
finds left over from a killed predecessor.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from leukoflow.core.rtdc import RtdcWriter, base_meta, open_rtdc
from leukoflow.core.vocabulary import (
    CLASS_NAMES,
    DECISIONS,
    FEATURES,
    FEATURES_BY_NAME,
    FEATURES_BY_STORED,
    OOD_KINDS,
    SCORE_FEATURES,
)

log = logging.getLogger(__name__)

USERDEF_FIELDS: dict[str, str] = {
    "userdef0": "label",
    "userdef1": "kind",
    "userdef2": "decision",
    "userdef3": "pred",
    "userdef4": "ood_score",
    "userdef5": "conf",
    "userdef6": "cell_id",
    "userdef7": "latency_s",
}
"""Meaning of the ``userdef`` features in a leukoflow recording (also stored in metadata)."""

#: ``lf_*`` features of a recording (dclab defines no such quantity) -> "label [unit]".
EXTRA_FEATURES: dict[str, str] = {
    f.stored: f"{f.label} [{f.unit}]" if f.unit else f.label for f in FEATURES if not f.dclab}


def acquisition_features(stored: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Recording features (dclab or ``lf_*`` names) -> the acquisition's names and units.

    The inverse of what :class:`Recorder` stores (replay publishes these); features not in
    the table (:data:`leukoflow.core.vocabulary.FEATURES`) are left out.
    """
    out: dict[str, np.ndarray] = {}
    for name, values in stored.items():
        f = FEATURES_BY_STORED.get(name)
        if f is not None:
            out[f.name] = np.asarray(f.from_stored(np.asarray(values, dtype=float)))
    return out

_SB_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_M32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------- crash repair

def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle`` (the checksum HDF5 uses for metadata).

    Parameters
    ----------
    data : bytes
        Bytes to hash.
    initval : int
        Initial value (HDF5 uses 0).

    Returns
    ------- int 32-bit checksum.
    """
    n = len(data)
    a = b = c = (0xDEADBEEF + n + initval) & _M32
    i = 0
    while n > 12:
        a = (a + int.from_bytes(data[i:i + 4], "little")) & _M32
        b = (b + int.from_bytes(data[i + 4:i + 8], "little")) & _M32
        c = (c + int.from_bytes(data[i + 8:i + 12], "little")) & _M32
        a = (a - c) & _M32
        a ^= _rot(c, 4)
        c = (c + b) & _M32
        b = (b - a) & _M32
        b ^= _rot(a, 6)
        a = (a + c) & _M32
        c = (c - b) & _M32
        c ^= _rot(b, 8)
        b = (b + a) & _M32
        a = (a - c) & _M32
        a ^= _rot(c, 16)
        c = (c + b) & _M32
        b = (b - a) & _M32
        b ^= _rot(a, 19)
        a = (a + c) & _M32
        c = (c - b) & _M32
        c ^= _rot(b, 4)
        b = (b + a) & _M32
        n -= 12
        i += 12
    if n == 0:
        return c
    tail = data[i:] + b"\0" * (12 - n)
    a = (a + int.from_bytes(tail[0:4], "little")) & _M32
    b = (b + int.from_bytes(tail[4:8], "little")) & _M32
    c = (c + int.from_bytes(tail[8:12], "little")) & _M32
    c ^= b
    c = (c - _rot(b, 14)) & _M32
    a ^= c
    a = (a - _rot(c, 11)) & _M32
    b ^= a
    b = (b - _rot(a, 25)) & _M32
    c ^= b
    c = (c - _rot(b, 16)) & _M32
    a ^= c
    a = (a - _rot(c, 4)) & _M32
    b ^= a
    b = (b - _rot(a, 14)) & _M32
    c ^= b
    c = (c - _rot(b, 24)) & _M32
    return c


def repair_rtdc(path: str | Path) -> bool:
    """Make a recording a killed SWMR writer left behind readable: ``h5clear -s --increment=0``.

    Only the superblock (version 2 or 3, at offset 0) and, rarely, the file length change:

    * the file-consistency flags are cleared (``h5clear -s``);
    * the end-of-allocation address (EOA) becomes ``max(EOA, EOF)`` (``--increment=0``): a
      SWMR writer does not rewrite the superblock when it flushes, so the stored EOA lags
      behind data that flushed metadata already points to; ``h5clear -s`` alone leaves it
      and the library then cuts the file to the stale EOA, losing flushed events
      (tests/test_durability.py shows it);
    * a file shorter than its EOA is extended with zeros to it;
    * the superblock checksum (Jenkins lookup3) is recomputed.

    The result is byte-identical to ``h5clear -s --increment=0`` on the same file
    (tests/test_durability.py compares them). Call it only when no process has the file open
    for writing.

    Parameters
    ----------
    path : path-like
        ``.rtdc``/HDF5 file.

    Returns
    -------
    bool
        True when flags were set and have been cleared; False when nothing was needed.

    Raises
    ------
    ValueError
        When the file is not HDF5 or its superblock checksum is wrong.
    """
    p = Path(path)
    with open(p, "r+b") as fh:
        head = fh.read(64)
        if head[:8] != _SB_SIGNATURE:
            raise ValueError(f"{p}: no HDF5 superblock at offset 0")
        version, size_offsets = head[8], head[9]
        if version < 2:
            return False  # version 0/1 superblocks have no consistency flags
        size = 12 + 4 * size_offsets
        stored = int.from_bytes(head[size:size + 4], "little")
        if lookup3(head[:size]) != stored:
            raise ValueError(f"{p}: superblock checksum mismatch (not repairable here)")
        if head[11] == 0:
            return False
        # base address, extension address, end-of-file (EOA) address, root object header
        o = size_offsets
        base = int.from_bytes(head[12:12 + o], "little")
        eoa = int.from_bytes(head[12 + 2 * o:12 + 3 * o], "little")
        eof = os.fstat(fh.fileno()).st_size
        new_eoa = max(eoa, eof - base)
        new = bytearray(head[:size])
        new[11] = 0
        new[12 + 2 * o:12 + 3 * o] = new_eoa.to_bytes(o, "little")
        fh.seek(0)
        fh.write(bytes(new) + lookup3(bytes(new)).to_bytes(4, "little"))
        fh.flush()
        if eof < base + new_eoa:  # a short file: zeros up to the EOA
            fh.truncate(base + new_eoa)
        os.fsync(fh.fileno())
    log.warning("repaired %s (writer was killed): consistency flags cleared, end of "
                "allocation %d -> %d bytes (file %d bytes)", p, eoa, new_eoa, eof)
    return True


def count_events(path: str | Path) -> int:
    """Number of events readable in ``path`` (repairing it first if needed); -1 if unreadable."""
    import h5py
    import hdf5plugin  # noqa: F401 (registers the Zstd filter the recordings use)

    try:
        repair_rtdc(path)
        with h5py.File(path, "r") as h5:
            ev = h5.get("events")
            if ev is None or not len(ev):
                return 0
            return int(min(ev[k].shape[0] for k in ev))
    except (OSError, ValueError, KeyError) as exc:
        log.error("recording %s is not readable: %s", path, exc)
        return -1


# ----------------------------------------------------------------------------- recorder

def _no_empty(params: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters with empty values spelled ``"none"`` (dclab warns on empty metadata)."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            out[k] = _no_empty(v)
        elif v is None or (isinstance(v, str | list | tuple | dict) and len(v) == 0):
            out[k] = "none"
        else:
            out[k] = v
    return out


def _nan(n: int) -> np.ndarray:
    return np.full(n, np.nan, dtype=np.float64)


class Recorder:
    """Join crops with their results and append them to an ``.rtdc`` recording.

    Parameters
    ----------
    path : path-like
        Output ``.rtdc`` file (overwritten).
    meta : mapping, optional
        dclab metadata ``{section: {key: value}}`` (default :func:`leukoflow.core.rtdc.base_meta`).
    params : mapping, optional
        Every run and pipeline parameter (stored in the file).
    classes : sequence of str
        Class names in probability-column order.
    flush_interval_s : float
        Longest time between flushes to disk [s] (crash window).
    max_pending : int
        Crops waiting for their results at most [cells]; the oldest are evicted beyond
        (counted as ``overflow``).
    """

    def __init__(self, path: str | Path, meta: Mapping[str, Mapping[str, Any]] | None = None,
                 params: Mapping[str, Any] | None = None,
                 classes: Sequence[str] = CLASS_NAMES, flush_interval_s: float = 1.0,
                 max_pending: int = 20_000) -> None:

        self.path = Path(path)
        self.classes = tuple(classes)
        if len(self.classes) != len(SCORE_FEATURES):
            raise ValueError(f"recording supports {len(SCORE_FEATURES)} classes, "
                             f"got {len(self.classes)}")
        self.kind_names = list(CLASS_NAMES) + list(OOD_KINDS)
        m = {k: dict(v) for k, v in (meta or base_meta()).items()}
        m.setdefault("user", {})
        m["user"]["class_names"] = json.dumps(list(self.classes))
        m["user"]["kind_names"] = json.dumps(self.kind_names)
        m["user"]["decision_names"] = json.dumps(list(DECISIONS))
        m["user"]["userdef"] = json.dumps(USERDEF_FIELDS)
        m["user"]["extra_features"] = json.dumps(EXTRA_FEATURES)
        m["user"]["recording"] = "leukoflow live run"
        self.flush_interval_s = float(flush_interval_s)
        self.max_pending = int(max_pending)
        self._writer = RtdcWriter(self.path, m, params=_no_empty(params or {}),
                                  flush_interval_s=self.flush_interval_s, swmr=True)
        self._pending: OrderedDict[int, tuple] = OrderedDict()
        #: feat names sent by acquisition that the feature table does not know (not stored)
        self.unknown_features: set[str] = set()
        self._t0_ns: int | None = None
        self._buf: list[dict[str, np.ndarray]] = []
        self._last_flush = time.monotonic()
        self.events = 0
        self.missing_crop = 0
        self.overflow = 0
        self.closed = False

    # -- input ---------------------------------------------------------------------------
    def add_crops(self, header: Mapping[str, Any], crops: np.ndarray) -> None:
        """Keep the crops of one wire ``crops`` message until their results arrive.

        Parameters
        ----------
        header : mapping
            Validated crops header (``ids``, ``frame``, ``feat``, optional ``labels``,
            ``kinds``, ``t_acq``, ``frames``).
        crops : ndarray (N, H, W)
            Phase crops [rad].
        """
        ids = header["ids"]
        feat = header.get("feat", {}) or {}
        unknown = set(feat) - set(FEATURES_BY_NAME) - self.unknown_features
        if unknown:
            log.warning("recording skips features not in the feature table: %s",
                        ", ".join(sorted(unknown)))
            self.unknown_features |= unknown
        labels = header.get("labels")
        kinds = header.get("kinds")
        frames = header.get("frames")
        t_acq = header.get("t_acq")
        t_msg = min(header.get("t", {}).values(), default=0)
        data = np.array(crops, dtype=np.float32, copy=True)
        for i, cid in enumerate(ids):
            row = tuple(float(feat[f.name][i]) if f.name in feat else math.nan
                        for f in FEATURES)
            self._pending[int(cid)] = (
                data[i],
                row,
                int(labels[i]) if labels is not None else None,
                kinds[i] if kinds is not None else None,
                int(frames[i]) if frames is not None else int(header.get("frame", 0)),
                int(t_acq[i]) if t_acq is not None else int(t_msg),
            )
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)
            self.overflow += 1

    def add_results(self, header: Mapping[str, Any], probs: np.ndarray,
                    latency_s: Sequence[float] | None = None,
                    mask: Sequence[bool] | None = None) -> int:
        """Append the cells of a ``results`` message whose crops were seen.

        Parameters
        ----------
        header : mapping
            Validated results header (``ids``, ``pred``, ``decision``, ``conf``,
            ``ood_score``, optional ``labels``).
        probs : ndarray (N, K)
            Calibrated probabilities.
        latency_s : sequence of float, optional
            End-to-end latency per cell [s].
        mask : sequence of bool, optional
            Cells to record (e.g. excluding duplicates); all by default.

        Returns
        -------
        int
            Events queued for writing.
        """
        ids = header["ids"]
        rows = []
        for i, cid in enumerate(ids):
            if mask is not None and not mask[i]:
                continue
            item = self._pending.pop(int(cid), None)
            if item is None:
                self.missing_crop += 1
                continue
            rows.append((i, item))
        if not rows:
            self.maybe_flush()
            return 0
        idx = np.array([i for i, _ in rows], dtype=np.int64)
        items = [it for _, it in rows]
        n = len(rows)
        p = np.asarray(probs, dtype=np.float32)[idx]
        dec = np.array([DECISIONS.index(header["decision"][i]) for i in idx], dtype=float)
        res_labels = header.get("labels")
        labels = _nan(n)
        kinds = _nan(n)
        for j, (i, it) in enumerate(rows):
            lab = it[2] if it[2] is not None else (
                res_labels[i] if res_labels is not None else None)
            if lab is not None:
                labels[j] = lab
            if it[3] is not None and it[3] in self.kind_names:
                kinds[j] = self.kind_names.index(it[3])
            elif lab is not None and 0 <= lab < len(CLASS_NAMES):
                kinds[j] = lab
        t_acq = np.array([it[5] for it in items], dtype=np.int64)
        if self._t0_ns is None:
            self._t0_ns = int(t_acq.min())
        block: dict[str, np.ndarray] = {
            "qpi_pha": np.stack([it[0] for it in items]),
            "userdef0": labels,
            "userdef1": kinds,
            "userdef2": dec,
            "userdef3": np.array([header["pred"][i] for i in idx], dtype=float),
            "userdef4": np.array([header["ood_score"][i] for i in idx], dtype=float),
            "userdef5": np.array([header["conf"][i] for i in idx], dtype=float),
            "userdef6": np.array([ids[i] for i in idx], dtype=float),
            "userdef7": (np.asarray(latency_s, dtype=float)[idx] if latency_s is not None
                         else _nan(n)),
            "frame": np.array([it[4] for it in items], dtype=float),
            "time": (t_acq - self._t0_ns) / 1e9,
        }
        for k, name in enumerate(SCORE_FEATURES):
            block[name] = p[:, k].astype(float)
        for k, f in enumerate(FEATURES):  # every table feature, NaN where none was sent
            block[f.stored] = f.to_stored(np.array([it[1][k] for it in items], dtype=float))
        self._buf.append(block)
        self.maybe_flush()
        return n

    # -- output --------------------------------------------------------------------------
    def maybe_flush(self) -> None:
        """Flush when the last flush is ``flush_interval_s`` old (the crash window)."""
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def flush(self) -> None:
        """Write buffered events and flush the file to disk."""
        if self.closed:
            return
        if self._buf:
            keys = self._buf[0].keys()
            block = {k: np.concatenate([b[k] for b in self._buf]) for k in keys}
            n = len(block["qpi_pha"])
            block["index"] = np.arange(self.events + 1, self.events + n + 1, dtype=float)
            self._writer.append(**block)
            self.events += n
            self._buf.clear()
        if self.events:
            self._writer.flush()
        self._last_flush = time.monotonic()

    def stats(self) -> dict[str, Any]:
        """Recording statistics (events written, crops without results, evictions)."""
        return {"path": str(self.path), "events": self.events + sum(
            len(b["qpi_pha"]) for b in self._buf),
            "flushed_events": self._writer.flushed_events, "missing_crop": self.missing_crop,
            "overflow": self.overflow, "pending": len(self._pending)}

    def close(self, extra_meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write everything, store ``extra_meta`` (``user:`` keys) and close the file.

        Crops still waiting for results are not written (counted as ``unmatched``).
        """
        if self.closed:
            return self.stats()
        self.flush()
        unmatched = len(self._pending)
        self._pending.clear()
        for key, value in (extra_meta or {}).items():
            self._writer.set_meta("user", key, value)
        self._writer.set_meta("user", "unmatched_crops", unmatched)
        self._writer.close()
        self.closed = True
        out = self.stats()
        out["unmatched"] = unmatched
        return out


def read_recording(path: str | Path) -> dict[str, Any]:
    """Read a leukoflow recording (also while it is written, or after its writer died).

    Returns
    -------
    dict
        ``qpi_pha`` (N, H, W) float32 [rad] (absent when the file has no crops), ``probs``
        (N, K), ``label`` int (-1 OOD, -2 unknown), ``kind`` list[str], ``decision``
        list[str], ``pred``, ``ood_score``, ``conf``, ``cell_id`` int64, ``frame``, ``time``
        [s], ``latency_s``, ``features`` (other scalars), ``meta`` (root attributes),
        ``classes``.
    """

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"recording not found: {p}")
    # still being written, or its writer was killed: open_rtdc falls back to a SWMR reader
    with open_rtdc(p) as h5:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in h5.attrs.items()}
        ev = h5["events"]
        n = min((ev[k].shape[0] for k in ev), default=0)
        get = {k: ev[k][:n] for k in ev if ev[k].ndim == 1}
        crops = ev["qpi_pha"][:n].astype(np.float32) if "qpi_pha" in ev else None
    classes = json.loads(attrs.get("user:class_names", json.dumps(list(CLASS_NAMES))))
    kind_names = json.loads(attrs.get("user:kind_names", "[]"))
    out: dict[str, Any] = {"meta": attrs, "classes": classes, "n": n}
    if crops is not None:
        out["qpi_pha"] = crops
    if all(s in get for s in SCORE_FEATURES):
        out["probs"] = np.stack([get[s] for s in SCORE_FEATURES], axis=1).astype(np.float32)
    lab = get.get("userdef0", _nan(n))
    out["label"] = np.where(np.isnan(lab), -2, lab).astype(np.int64)
    kc = get.get("userdef1", _nan(n))
    out["kind"] = [kind_names[int(c)] if np.isfinite(c) and int(c) < len(kind_names) else ""
                   for c in kc]
    if "userdef2" in get:
        out["decision"] = [DECISIONS[int(d)] for d in get["userdef2"]]
    for key, name, dtype in (("userdef3", "pred", np.int64), ("userdef4", "ood_score", float),
                             ("userdef5", "conf", float), ("userdef6", "cell_id", np.int64),
                             ("userdef7", "latency_s", float), ("frame", "frame", np.int64),
                             ("time", "time", float)):
        if key in get:
            out[name] = get[key].astype(dtype)
    out["features"] = {k: v for k, v in get.items()
                       if not k.startswith(("userdef", "ml_score")) and k not in ("index",)}
    return out
