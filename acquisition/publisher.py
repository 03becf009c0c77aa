"""Publish cell crops (PUSH, never blocking) and acquisition accounting (to the collector).

* :class:`CropPublisher` binds a PUSH socket (default: the ``crops`` endpoint of
  :data:`leukoflow.core.transport.DEFAULT_ENDPOINTS`) with a small send high-water mark and
  sends one wire-v1 ``crops`` message per frame that finished at least one cell. Sends are
  non-blocking: when downstream is full the frame's crops are dropped and counted (reason
  ``backpressure``); the camera loop never waits.
* :class:`AccountingPublisher` connects a PUSH socket to the collector (default: the
  ``collector`` endpoint) and sends ``control`` messages: periodic ``accounting`` and a
  final ``eos``, each with the full statistics, so every cell is accounted for: emitted,
  dropped by reason, or rejected by reason.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from leukoflow.acquisition.pipeline import EmittedCell
from leukoflow.core import transport, wire
from leukoflow.core.identity import make_ids
from leukoflow.core.service import control_message, hello_message
from leukoflow.core.vocabulary import FEATURE_NAMES

DEFAULT_CROPS_ENDPOINT = transport.DEFAULT_ENDPOINTS["crops"]
DEFAULT_COLLECTOR_ENDPOINT = transport.DEFAULT_ENDPOINTS["collector"]


def build_crops_message(sender: wire.Sender, frame: int, cells: Sequence[EmittedCell],
                        t: Mapping[str, int], *, with_truth: bool, dtype: str = "<f4",
                        epoch: int = 0, cum: int | None = None) -> wire.Message:
    """Build the ``crops`` message of one frame (consumes one sequence number).

    Parameters
    ----------
    sender : leukoflow.core.wire.Sender
        Stamps run, sender and sequence number.
    frame : int
        Index of the frame in which these cells finished.
    cells : sequence of EmittedCell
        The cells (at least one).
    t : mapping
        Stage timestamps [monotonic ns] of this frame (``t_acq``, ``t_recon``,
        ``t_segment``, ..., ``t_publish``).
    with_truth : bool
        Add ``labels``, ``kinds`` and ``truth_ids`` (simulated sources).
    dtype : str
        Payload dtype (``<f4`` or ``<f2``).
    epoch : int
        Acquisition epoch of this start (:mod:`leukoflow.core.identity`): cell ids are
        ``epoch * 2**36 + cell number``, unique across restarts.
    cum : int, optional
        Cells this sender published before this message (``cum`` field: the collector sizes
        a lost message from it).
    """
    arr = np.stack([c.crop.phase for c in cells]).astype(dtype, copy=False)
    feat: dict[str, list[float]] = {}
    for name in FEATURE_NAMES:  # the feature table (units, dclab names): core.vocabulary
        vals = [float(c.crop.features.get(name, math.nan)) for c in cells]
        if all(math.isfinite(v) for v in vals):  # the wire rejects NaN: omit the feature
            feat[name] = vals
    fields: dict[str, Any] = {
        "frame": int(max(frame, 0)),
        "ids": make_ids(epoch, [int(c.cell_id) for c in cells]).tolist(),
        "bbox": [[int(v) for v in c.crop.bbox] for c in cells],
        "feat": feat,
        "frames": [int(c.frame) for c in cells],
        "t_acq": [int(c.t_acq_ns) for c in cells],
    }
    if cum is not None:
        fields["cum"] = int(cum)
    if with_truth:
        fields["labels"] = [int(c.label) for c in cells]
        fields["kinds"] = [str(c.kind) for c in cells]
        fields["truth_ids"] = [int(c.truth_id) for c in cells]
    return sender.message("crops", arr, t=dict(t), **fields)


class CropPublisher:
    """Non-blocking PUSH publisher of crop messages.

    Parameters
    ----------
    ctx : zmq.Context
        ZeroMQ context.
    run : str
        Run id.
    endpoint : str
        Bind address (loopback by default).
    sndhwm : int
        Send high-water mark [messages]; small, so backpressure shows within a few frames.
    dtype : str
        Crop payload dtype (``<f4`` or ``<f2``).
    allow_remote : bool
        Permit binding to a non-loopback address.
    epoch : int
        Acquisition epoch of this start (cell ids unique across restarts,
        :mod:`leukoflow.core.identity`).
    journal : str
        Path of a publish journal ('' = none): one JSON line per crop message *before* it
        is sent (``sender``, ``seq``, ``cum``, ``ids``, ``truth_ids``), and ``{"sender":
        ..., "unsent": seq}`` when it was then dropped (the sequence number is used again);
        an audit trail of what left acquisition (the fault suite checks every cell against
        it).
    """

    def __init__(self, ctx: Any, run: str, endpoint: str = DEFAULT_CROPS_ENDPOINT, *,
                 sndhwm: int = 16, dtype: str = "<f4", allow_remote: bool = False,
                 epoch: int = 0, journal: str = "") -> None:
        self.sender = wire.Sender(run=run, role="acquire")
        self.endpoint = endpoint
        self.dtype = dtype
        self.epoch = int(epoch)
        self._journal = open(journal, "a", buffering=1) if journal else None  # noqa: SIM115
        # IMMEDIATE: nothing queues until a worker is connected, so "nobody pulling" is a
        # counted drop rather than a silent pile-up
        self.sock = transport.make_socket(ctx, "PUSH", endpoint, bind=True, hwm=sndhwm,
                                          allow_remote=allow_remote, immediate=True,
                                          serves="crops")
        self.sent_cells = 0
        self.sent_messages = 0
        self.dropped: Counter = Counter()

    def publish(self, frame: int, cells: Sequence[EmittedCell], t: Mapping[str, int], *,
                with_truth: bool = False) -> bool:
        """Send one frame's cells; return False (and count the drop) when downstream is full.

        Parameters
        ----------
        frame : int
            Frame index.
        cells : sequence of EmittedCell
            Cells finished in this frame (nothing is sent for an empty list).
        t : mapping
            Stage timestamps [monotonic ns]; ``t_publish`` is added here.
        with_truth : bool
            Include ground truth (simulated source).
        """
        if not cells:
            return True
        stamps = dict(t)
        stamps["t_publish"] = wire.now_ns()
        msg = build_crops_message(self.sender, frame, cells, stamps, with_truth=with_truth,
                                  dtype=self.dtype, epoch=self.epoch, cum=self.sent_cells)
        self._log(msg)
        if transport.send(self.sock, msg, block=False):
            self.sent_cells += len(cells)
            self.sent_messages += 1
            return True
        # not sent: give the sequence number back, so receivers see no gap for a drop that
        # the accounting already reports (no double counting)
        self.sender.seq -= 1
        if self._journal is not None:
            self._journal.write(json.dumps({"sender": msg.header["sender"],
                                            "unsent": msg.seq}) + "\n")
        self.dropped["backpressure"] += len(cells)
        return False

    def _log(self, msg: wire.Message) -> None:
        if self._journal is None:
            return
        h = msg.header
        line = {"sender": h["sender"], "seq": h["seq"], "cum": h["cum"], "ids": h["ids"]}
        if "truth_ids" in h:
            line["truth_ids"] = h["truth_ids"]
        self._journal.write(json.dumps(line) + "\n")

    def close(self, linger_ms: int = 2000) -> None:
        """Close, giving crops already queued (counted as sent) up to ``linger_ms`` to leave.

        Without a linger the crops still in the socket's queue at stop would be discarded
        after the accounting reported them as emitted (they would show up as ``lost``);
        the bound keeps a stop from hanging when the workers are gone.
        """
        self.sock.close(linger=linger_ms)
        if self._journal is not None:
            self._journal.close()
            self._journal = None


class AccountingPublisher:
    """PUSH ``control`` messages (accounting, eos) to the collector.

    Parameters
    ----------
    ctx : zmq.Context
        ZeroMQ context.
    run : str
        Run id.
    endpoint : str
        Collector PULL address (connect).
    """

    def __init__(self, ctx: Any, run: str, endpoint: str = DEFAULT_COLLECTOR_ENDPOINT) -> None:
        self.sender = wire.Sender(run=run, role="acquire")
        self.endpoint = endpoint
        self.sock = transport.make_socket(ctx, "PUSH", endpoint, bind=False, hwm=64,
                                          immediate=True, identity="acquire")
        self.sent = 0
        self.failed = 0

    def send(self, cmd: str, stats: Mapping[str, Any], *, timeout_ms: int = 0) -> bool:
        """Send ``control`` ``cmd`` with ``stats``; wait up to ``timeout_ms`` if it is full.

        Returns False (counted in :attr:`failed`) when the collector is not reachable.
        """
        import zmq

        msg = (hello_message(self.sender, stats) if cmd == "hello"
               else control_message(self.sender, cmd, stats))
        if timeout_ms <= 0:
            ok = transport.send(self.sock, msg, block=False)
        else:
            self.sock.setsockopt(zmq.SNDTIMEO, int(timeout_ms))
            ok = transport.send(self.sock, msg, block=True)
            self.sock.setsockopt(zmq.SNDTIMEO, -1)
        if ok:
            self.sent += 1
        else:
            self.failed += 1
        return ok

    def close(self, linger_ms: int = 1000) -> None:
        """Close, giving queued messages (the EOS) up to ``linger_ms`` to leave."""
        self.sock.close(linger=linger_ms)
