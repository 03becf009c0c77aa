"""Wire protocol v1: two-frame multipart ZeroMQ messages.

Frame 1 is a msgpack map (the header), frame 2 one C-contiguous array (the payload; empty
for control and heartbeat messages). Crop messages carry N crops of one frame as an
(N, H, W) float32/float16 array of phase in rad; result messages an (N, K) float32 array of
calibrated probabilities.

Decoding validates every field, size and dtype; any problem raises :class:`WireError`
with a machine-readable ``reason`` (one of :data:`REASONS`) so services count rejections by
reason and keep running. No pickle: msgpack with ``strict_map_key``, no ext types, bounded
sizes; the payload is a plain numeric buffer read with :func:`numpy.frombuffer` (zero-copy
when the frame was received with ``copy=False``).

Header keys (all kinds): ``v`` (schema version), ``kind``, ``run`` (run id), ``sender``
(sender id; a restarted sender has a new id), ``seq`` (per-sender sequence number from 0),
``t`` ({stage: monotonic ns}). See :data:`KIND_FIELDS` for the kind-specific keys.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from leukoflow.core.vocabulary import DECISIONS

SCHEMA_VERSION = 1
KINDS = ("crops", "results", "explain", "control", "heartbeat")
CONTROL_COMMANDS = ("eos", "accounting", "stop", "hello")

#: dtype allow-list per kind (little-endian only)
PAYLOAD_DTYPES: dict[str, tuple[str, ...]] = {
    "crops": ("<f4", "<f2"),
    "explain": ("<f4", "<f2"),
    "results": ("<f4",),
    "control": (),
    "heartbeat": (),
}
#: payload dimensionality per kind
PAYLOAD_NDIM = {"crops": 3, "explain": 3, "results": 2}

MAX_HEADER_BYTES = 4 * 1024 * 1024
MAX_PAYLOAD_BYTES = 512 * 1024 * 1024
MAX_CELLS = 65_536
MAX_SIDE = 4096
MAX_CLASSES = 64
MAX_STR = 256
MAX_STATS_DEPTH = 8
MAX_STATS_ITEMS = 4096

REASONS = (
    "frames",          # wrong number of frames
    "header_size",     # header larger than MAX_HEADER_BYTES
    "header_decode",   # not valid msgpack
    "header_type",     # header is not a map
    "version",         # unknown schema version
    "kind",            # unknown message kind
    "missing_field",   # required key absent
    "field_type",      # key has the wrong type
    "field_value",     # value out of range / not allowed
    "non_finite",      # NaN or inf in a header number or the payload
    "count_mismatch",  # per-cell list length differs from N
    "dtype",           # payload dtype not allowed for this kind
    "shape",           # shape invalid for this kind / too large
    "payload_size",    # payload bytes != prod(shape) * itemsize
)


class WireError(ValueError):
    """A message failed validation.

    Attributes
    ----------
    reason : str
        One of :data:`REASONS` (use it as a metric label).
    detail : str
        Human-readable explanation.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass
class Message:
    """One decoded (or to-be-encoded) wire message.

    Attributes
    ----------
    header : dict
        The msgpack header (validated on decode).
    array : numpy.ndarray or None
        The payload; read-only when decoded zero-copy.
    """

    header: dict[str, Any]
    array: np.ndarray | None = None

    @property
    def kind(self) -> str:
        """Message kind."""
        return self.header["kind"]

    @property
    def seq(self) -> int:
        """Per-sender sequence number."""
        return self.header["seq"]

    @property
    def sender(self) -> str:
        """Sender id."""
        return self.header["sender"]

    @property
    def ids(self) -> list[int]:
        """Cell ids (empty for control/heartbeat)."""
        return self.header.get("ids", [])

    @property
    def n(self) -> int:
        """Number of cells in the message."""
        return len(self.header.get("ids", ()))


def now_ns() -> int:
    """Monotonic timestamp [ns] (system-wide on one Linux host)."""
    return time.monotonic_ns()


# ----------------------------------------------------------------------------- validation

def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _req(h: Mapping, key: str) -> Any:
    if key not in h:
        raise WireError("missing_field", key)
    return h[key]


def _check_str(h: Mapping, key: str, *, required: bool = True) -> None:
    if key not in h and not required:
        return
    v = _req(h, key)
    if not isinstance(v, str) or len(v) > MAX_STR:
        raise WireError("field_type", f"{key} must be a string of <= {MAX_STR} chars")


def _check_int(h: Mapping, key: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    v = _req(h, key)
    if not _is_int(v):
        raise WireError("field_type", f"{key} must be an integer")
    if not lo <= v <= hi:
        raise WireError("field_value", f"{key}={v} outside [{lo}, {hi}]")
    return v


def _check_list(h: Mapping, key: str, n: int | None, *, required: bool = True) -> list | None:
    if key not in h:
        if required:
            raise WireError("missing_field", key)
        return None
    v = h[key]
    if not isinstance(v, list):
        raise WireError("field_type", f"{key} must be a list")
    if n is not None and len(v) != n:
        raise WireError("count_mismatch", f"{key} has {len(v)} entries, expected {n}")
    return v


def _check_ints(vals: Sequence, key: str, lo: int, hi: int) -> None:
    # vectorised over the list: type() excludes bool; min/max bound the range
    if not vals:
        return
    if not all(type(x) is int for x in vals):
        raise WireError("field_type", f"{key} entries must be integers")
    if min(vals) < lo or max(vals) > hi:
        raise WireError("field_value", f"{key} entries outside [{lo}, {hi}]")


def _check_floats(vals: Sequence, key: str, lo: float = -math.inf, hi: float = math.inf) -> None:
    if not vals:
        return
    if not all(type(x) is float or type(x) is int for x in vals):
        raise WireError("field_type", f"{key} entries must be numbers")
    try:
        total = math.fsum(vals)
    except OverflowError:  # finite values whose sum overflows (e.g. 1e308 + 1e308)
        total = math.inf
    if not math.isfinite(total):  # NaN/inf anywhere (or an overflowing sum)
        if not all(math.isfinite(x) for x in vals):
            raise WireError("non_finite", f"{key} has a non-finite entry")
    if min(vals) < lo or max(vals) > hi:
        raise WireError("field_value", f"{key} entries outside [{lo}, {hi}]")


def _check_stats(v: Any, key: str, depth: int = 0, budget: list[int] | None = None) -> None:
    """Stats maps: str keys; values numbers, strings, lists of those, or nested maps."""
    budget = budget if budget is not None else [MAX_STATS_ITEMS]
    if depth > MAX_STATS_DEPTH:
        raise WireError("field_value", f"{key} nested too deeply")
    if isinstance(v, dict):
        for k, x in v.items():
            budget[0] -= 1
            if budget[0] < 0:
                raise WireError("field_value", f"{key} has too many items")
            if not isinstance(k, str) or len(k) > MAX_STR:
                raise WireError("field_type", f"{key} keys must be short strings")
            _check_stats(x, key, depth + 1, budget)
    elif isinstance(v, list):
        for x in v:
            budget[0] -= 1
            if budget[0] < 0:
                raise WireError("field_value", f"{key} has too many items")
            _check_stats(x, key, depth + 1, budget)
    elif isinstance(v, bool) or v is None:
        return
    elif isinstance(v, int):
        return
    elif isinstance(v, float):
        if not math.isfinite(v):
            raise WireError("non_finite", f"{key} has a non-finite number")
    elif isinstance(v, str):
        if len(v) > 4 * MAX_STR:
            raise WireError("field_value", f"{key} has an over-long string")
    else:
        raise WireError("field_type", f"{key} has an unsupported value type")


def _check_common(h: Any) -> str:
    if not isinstance(h, dict):
        raise WireError("header_type", "header must be a map")
    v = _req(h, "v")
    if not _is_int(v) or v != SCHEMA_VERSION:
        raise WireError("version", f"unsupported schema version {v!r}")
    kind = _req(h, "kind")
    if kind not in KINDS:
        raise WireError("kind", f"unknown kind {kind!r}")
    _check_str(h, "run")
    _check_str(h, "sender")
    _check_int(h, "seq")
    t = _req(h, "t")
    if not isinstance(t, dict) or len(t) > 64:
        raise WireError("field_type", "t must be a map of stage -> ns")
    for k, x in t.items():
        if not isinstance(k, str) or len(k) > MAX_STR:
            raise WireError("field_type", "t keys must be strings")
        if not _is_int(x) or x < 0:
            raise WireError("field_value", f"t[{k!r}] must be a non-negative integer [ns]")
    return kind


def _check_payload_meta(h: Mapping, kind: str) -> tuple[np.dtype, tuple[int, ...]]:
    dt = _req(h, "dtype")
    if dt not in PAYLOAD_DTYPES[kind]:
        raise WireError("dtype", f"dtype {dt!r} not allowed for {kind}")
    shape = _check_list(h, "shape", PAYLOAD_NDIM[kind])
    assert shape is not None
    _check_ints(shape, "shape", 0, MAX_CELLS)
    if kind in ("crops", "explain"):
        n, hh, ww = shape
        if not (1 <= hh <= MAX_SIDE and 1 <= ww <= MAX_SIDE):
            raise WireError("shape", f"crop side outside [1, {MAX_SIDE}]: {shape}")
    else:
        n, k = shape
        if not 1 <= k <= MAX_CLASSES:
            raise WireError("shape", f"class count {k} outside [1, {MAX_CLASSES}]")
    dtype = np.dtype(dt)
    if math.prod(shape) * dtype.itemsize > MAX_PAYLOAD_BYTES:
        raise WireError("shape", "payload larger than MAX_PAYLOAD_BYTES")
    return dtype, tuple(shape)


def _check_cells(h: Mapping, n: int) -> None:
    ids = _check_list(h, "ids", n)
    assert ids is not None
    _check_ints(ids, "ids", 0, 2**63 - 1)
    labels = _check_list(h, "labels", n, required=False)
    if labels is not None:
        _check_ints(labels, "labels", -1, MAX_CLASSES - 1)
    kinds = _check_list(h, "kinds", n, required=False)
    if kinds is not None and not all(isinstance(k, str) and len(k) <= MAX_STR for k in kinds):
        raise WireError("field_type", "kinds must be short strings")
    for key in ("frames", "t_acq"):
        vals = _check_list(h, key, n, required=False)
        if vals is not None:
            _check_ints(vals, key, 0, 2**63 - 1)


def _check_results_fields(h: Mapping, n: int, k: int | None) -> None:
    classes = _check_list(h, "classes", k)
    assert classes is not None
    if not 1 <= len(classes) <= MAX_CLASSES or not all(
        isinstance(c, str) and len(c) <= MAX_STR for c in classes
    ):
        raise WireError("field_type", "classes must be 1..64 short strings")
    k = len(classes)
    pred = _check_list(h, "pred", n)
    assert pred is not None
    _check_ints(pred, "pred", 0, k - 1)
    dec = _check_list(h, "decision", n)
    assert dec is not None
    if not all(isinstance(d, str) and d in DECISIONS for d in dec):
        raise WireError("field_value", f"decision entries must be one of {DECISIONS}")
    conf = _check_list(h, "conf", n)
    assert conf is not None
    _check_floats(conf, "conf", 0.0, 1.0)
    ood = _check_list(h, "ood_score", n)
    assert ood is not None
    _check_floats(ood, "ood_score")
    _check_str(h, "model")


def _check_source_fields(h: Mapping) -> None:
    """Optional fields naming the crop message a result came from (completeness check).

    ``src_sender`` (str), ``src_seq`` (its sequence number), ``src_n`` (cells in it, >= 1),
    ``src_cum`` (cells the source published before it); ``frame`` a non-negative integer.
    """
    _check_str(h, "src_sender", required=False)
    for key, lo in (("src_seq", 0), ("src_n", 1), ("src_cum", 0), ("frame", 0)):
        if key in h:
            _check_int(h, key, lo, MAX_CELLS if key == "src_n" else 2**63 - 1)


def _check_feat(h: Mapping, n: int) -> None:
    """Optional ``feat`` map: name -> list of n finite numbers (at most 256 names)."""
    feat = h.get("feat", {})
    if not isinstance(feat, dict) or len(feat) > 256:
        raise WireError("field_type", "feat must be a map of name -> list")
    for name, vals in feat.items():
        if not isinstance(name, str) or len(name) > MAX_STR:
            raise WireError("field_type", "feat names must be short strings")
        if not isinstance(vals, list) or len(vals) != n:
            raise WireError("count_mismatch", f"feat[{name!r}] must have {n} entries")
        _check_floats(vals, f"feat[{name}]")


#: ``stats`` keys with a fixed meaning (read by the collector): non-negative integer counts
STATS_COUNTS: tuple[str, ...] = (
    "cells_emitted", "emitted", "cells", "crops_seq", "crops_messages", "epoch",
    "received_cells", "received_messages", "counted", "uncertain", "ood", "pending",
    "src_seq", "src_n", "src_cum",
)
#: ``stats`` keys that are maps of reason (or child) -> non-negative integer count
STATS_COUNT_MAPS: tuple[str, ...] = (
    "cells_dropped", "cells_rejected", "rejected", "dropped", "restarts", "rejected_messages",
)
#: ``stats`` keys that are short strings
STATS_STRINGS: tuple[str, ...] = ("event", "reason", "run", "crops_sender", "src_sender")
#: ``stats.event`` values of incremental per-cell reports, which need ``reason`` and a count
CELL_EVENTS: tuple[str, ...] = ("rejected", "dropped")


def _is_count(x: Any) -> bool:
    return type(x) is int and 0 <= x <= 2**63 - 1


def _check_stats_schema(stats: Any) -> None:
    """Kind-specific ``stats`` fields (control/heartbeat): the keys the collector reads.

    ``stats`` is a map; :data:`STATS_COUNTS` are non-negative integers,
    :data:`STATS_COUNT_MAPS` maps of short strings to non-negative integers,
    :data:`STATS_STRINGS` short strings, ``ids`` a list of at most :data:`MAX_CELLS` cell
    ids, ``final`` a bool; a per-cell event (:data:`CELL_EVENTS`) names its ``reason`` and
    has ``cells`` or ``ids``. Unknown keys stay free-form (:func:`_check_stats`).
    """
    if not isinstance(stats, dict):
        raise WireError("field_type", "stats must be a map")
    for key in STATS_COUNTS:
        if key in stats and not _is_count(stats[key]):
            raise WireError("field_value", f"stats.{key} must be a non-negative integer")
    for key in STATS_COUNT_MAPS:
        if key not in stats:
            continue
        v = stats[key]
        if not isinstance(v, dict) or len(v) > MAX_STATS_ITEMS:
            raise WireError("field_type", f"stats.{key} must be a map of name -> count")
        for name, n in v.items():
            if not isinstance(name, str) or len(name) > MAX_STR or not _is_count(n):
                raise WireError("field_value",
                                f"stats.{key} entries must be name -> non-negative integer")
    for key in STATS_STRINGS:
        if key in stats and (not isinstance(stats[key], str) or len(stats[key]) > MAX_STR):
            raise WireError("field_type", f"stats.{key} must be a string of <= {MAX_STR} chars")
    if "final" in stats and not isinstance(stats["final"], bool):
        raise WireError("field_type", "stats.final must be a bool")
    if "ids" in stats:
        ids = stats["ids"]
        if not isinstance(ids, list) or len(ids) > MAX_CELLS:
            raise WireError("field_type", f"stats.ids must be a list of <= {MAX_CELLS} ids")
        _check_ints(ids, "stats.ids", 0, 2**63 - 1)
    if stats.get("event") in CELL_EVENTS:
        if "reason" not in stats:
            raise WireError("missing_field", "stats.reason")
        if "cells" not in stats and "ids" not in stats:
            raise WireError("missing_field", "stats.cells")


def validate_header(h: Any) -> str:
    """Validate a decoded header completely; return its kind.

    Raises
    ------
    WireError
        With the first problem found.
    """
    kind = _check_common(h)
    if kind in ("control", "heartbeat"):
        if kind == "control":
            cmd = _req(h, "cmd")
            if cmd not in CONTROL_COMMANDS:
                raise WireError("field_value", f"unknown control command {cmd!r}")
        stats = h.get("stats", {})
        _check_stats_schema(stats)
        _check_stats(stats, "stats")
        return kind
    _, shape = _check_payload_meta(h, kind)
    n = shape[0]
    _check_cells(h, n)
    if kind == "crops":
        _check_int(h, "frame", 0)
        if "cum" in h:  # cells this sender published before this message
            _check_int(h, "cum", 0)
        truth = _check_list(h, "truth_ids", n, required=False)
        if truth is not None:
            _check_ints(truth, "truth_ids", -1, 2**63 - 1)
        bbox = _check_list(h, "bbox", n)
        assert bbox is not None
        if not all(type(b) is list and len(b) == 4 for b in bbox):
            raise WireError("field_type", "bbox entries must be [y0, x0, h, w]")
        _check_ints([v for b in bbox for v in b], "bbox", -MAX_SIDE * 64, MAX_SIDE * 64)
        _check_feat(h, n)
    elif kind == "results":
        _check_results_fields(h, n, shape[1])
        _check_feat(h, n)  # optional: features forwarded for drift detection
        _check_source_fields(h)
    elif kind == "explain":
        _check_results_fields(h, n, None)
        probs = _check_list(h, "probs", n)
        assert probs is not None
        k = len(h["classes"])
        for row in probs:
            if not isinstance(row, list) or len(row) != k:
                raise WireError("count_mismatch", "probs rows must have one entry per class")
            _check_floats(row, "probs", 0.0, 1.0)
    return kind


# ----------------------------------------------------------------------------- encode/decode

def _ext_hook(code: int, data: bytes) -> Any:
    raise WireError("header_decode", "msgpack ext types are not allowed")


def encode(msg: Message, *, validate: bool = True) -> list[bytes | memoryview]:
    """Encode ``msg`` into the two frames to pass to ``socket.send_multipart``.

    The payload array is sent without a copy (``memoryview`` of a C-contiguous array);
    ``dtype`` and ``shape`` are filled in from the array.

    Parameters
    ----------
    msg : Message
        Header (``v`` is set to the schema version) and optional payload.
    validate : bool
        Validate the header before sending (default True: a service never emits a message
        its peers would reject).
    """
    h = dict(msg.header)
    h["v"] = SCHEMA_VERSION
    arr = msg.array
    if arr is not None:
        arr = np.ascontiguousarray(arr)
        if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not _little()):
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        h["dtype"] = arr.dtype.str
        h["shape"] = [int(s) for s in arr.shape]
        payload: bytes | memoryview = memoryview(arr.view(np.uint8).reshape(-1))
    else:
        payload = b""
    if validate:
        validate_header(h)
        if arr is not None and h["kind"] in ("crops", "explain") and not np.isfinite(arr).all():
            raise WireError("non_finite", "payload has NaN or inf")
    return [msgpack.packb(h, use_bin_type=True), payload]


def _little() -> bool:
    return np.little_endian


def _buffer(frame: Any) -> memoryview:
    if isinstance(frame, bytes | bytearray):
        return memoryview(frame)
    if isinstance(frame, memoryview):
        return frame
    buf = getattr(frame, "buffer", None)  # zmq.Frame received with copy=False
    if buf is not None:
        return memoryview(buf)
    raise WireError("frames", f"unsupported frame type {type(frame).__name__}")


def decode(frames: Sequence[Any], *, check_finite: bool = True) -> Message:
    """Decode and validate one multipart message.

    Parameters
    ----------
    frames : sequence
        Exactly two frames (bytes, memoryview or :class:`zmq.Frame`).
    check_finite : bool
        Reject crop/explain payloads that contain NaN or inf (default). Services that reject
        single cells instead pass False and use :func:`nonfinite_rows`.

    Returns
    -------
    Message
        Validated header and a read-only payload array (zero-copy from the frame).

    Raises
    ------
    WireError
        For any malformed message; nothing else escapes.
    """
    try:
        return _decode(frames, check_finite)
    except WireError:
        raise
    except Exception as exc:  # defence in depth: never let a malformed message crash
        raise WireError("header_decode", f"{type(exc).__name__}: {exc}") from exc


def _decode(frames: Sequence[Any], check_finite: bool) -> Message:
    if len(frames) != 2:
        raise WireError("frames", f"expected 2 frames, got {len(frames)}")
    hbuf = _buffer(frames[0])
    if hbuf.nbytes > MAX_HEADER_BYTES:
        raise WireError("header_size", f"{hbuf.nbytes} bytes")
    try:
        h = msgpack.unpackb(
            hbuf, raw=False, strict_map_key=True, use_list=True, ext_hook=_ext_hook,
        )
    except WireError:
        raise
    except Exception as exc:
        raise WireError("header_decode", f"{type(exc).__name__}: {exc}") from exc
    kind = validate_header(h)
    pbuf = _buffer(frames[1])
    if kind in ("control", "heartbeat"):
        if pbuf.nbytes:
            raise WireError("payload_size", f"{kind} messages carry no payload")
        return Message(h, None)
    dtype = np.dtype(h["dtype"])
    shape = tuple(h["shape"])
    expected = math.prod(shape) * dtype.itemsize
    if pbuf.nbytes != expected:
        raise WireError("payload_size", f"{pbuf.nbytes} bytes, expected {expected}")
    arr = np.frombuffer(pbuf, dtype=dtype).reshape(shape)
    arr.flags.writeable = False  # a view of the received frame: never modify in place
    if check_finite and not np.isfinite(arr).all():
        raise WireError("non_finite", "payload has NaN or inf")
    if kind == "results":
        if not np.isfinite(arr).all() or (arr < 0).any() or (arr > 1).any():
            raise WireError("field_value", "probabilities must be finite and in [0, 1]")
    return Message(h, arr)


def nonfinite_rows(arr: np.ndarray) -> np.ndarray:
    """Boolean mask of the crops (first axis) that contain NaN or inf."""
    flat = arr.reshape(arr.shape[0], -1)
    return ~np.isfinite(flat).all(axis=1)


# ----------------------------------------------------------------------------- senders

def new_sender_id(role: str) -> str:
    """A sender id unique per process start (``role-pid-random``): restarts get a new one."""
    return f"{role}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass
class Sender:
    """Stamps outgoing headers with run id, sender id and consecutive sequence numbers.

    Parameters
    ----------
    run : str
        Run id.
    role : str
        Service role (``acquire``, ``infer``...); the sender id adds pid and a nonce.
    """

    run: str
    role: str
    sender: str = ""
    seq: int = 0

    def __post_init__(self) -> None:
        if not self.sender:
            self.sender = new_sender_id(self.role)

    def message(self, kind: str, array: np.ndarray | None = None, *,
                t: Mapping[str, int] | None = None, **fields: Any) -> Message:
        """Build the next message (consumes one sequence number)."""
        h: dict[str, Any] = {"v": SCHEMA_VERSION, "kind": kind, "run": self.run,
                             "sender": self.sender, "seq": self.seq,
                             "t": dict(t) if t else {f"{self.role}_send": now_ns()}}
        h.update(fields)
        self.seq += 1
        return Message(h, array)


#: counters saturate here (int64): sequence numbers are untrusted input
_SATURATE = 2**63 - 1


@dataclass
class GapTracker:
    """Detect lost, duplicated and reordered messages per sender from sequence numbers.

    Attributes
    ----------
    expected : dict
        Next expected sequence number per sender id.
    gaps : int
        Messages missing (sum of sequence jumps).
    duplicates : int
        Messages with a sequence number already passed (duplicate or reordered).
    restarts : int
        New sender ids seen after the first one of the same role (a restarted process).
    late_start : int
        Messages before the first one seen of each sender (not gaps: a receiver that started
        late, or one of several sharing a stream, never owned them).
    """

    expected: dict[str, int] = field(default_factory=dict)
    gaps: int = 0
    duplicates: int = 0
    restarts: int = 0
    late_start: int = 0
    _roles: set[str] = field(default_factory=set)

    def observe(self, sender: str, seq: int) -> int:
        """Record one message; return how many messages were missing just before it."""
        exp = self.expected.get(sender)
        if exp is None:
            role = sender.split("-", 1)[0]
            if role in self._roles:
                self.restarts += 1
            self._roles.add(role)
            # a sender first seen at seq > 0: this receiver joined late (or shares the
            # sender's stream with others): it never owned those messages, so they are not
            # gaps; the collector's per-source completeness check decides what was lost
            self.late_start = min(self.late_start + seq, _SATURATE)
            missing = 0
        elif seq >= exp:
            missing = seq - exp
        else:
            self.duplicates += 1
            return 0
        self.gaps = min(self.gaps + missing, _SATURATE)  # a forged seq cannot overflow it
        self.expected[sender] = seq + 1
        return missing
