"""Replay a recording through the pipeline.

* **Crop recordings** (``qpi_pha`` events, e.g. written by ``leukoflow run --record``) are
  published as wire ``crops`` messages straight into inference by :class:`ReplayPublisher`
  (it takes acquisition's place: PUSH bound on the crops endpoint, accounting and end of
  stream to the collector), keeping each cell's recorded id, frame, features and labels.
* **Raw-hologram recordings** (``qpi_oah`` events) go through acquisition
  (``leukoflow acquire --source file:PATH``).

Pace: the recorded pace (``realtime``, from the ``time`` feature), a fixed ``rate`` in cells/s,
or as fast as the pipeline takes them (default). After the run, :func:`compare_decisions`
checks the new decisions against the recorded ones cell by cell.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from leukoflow.core import transport, wire
from leukoflow.core.rtdc import open_rtdc
from leukoflow.core.vocabulary import CLASS_NAMES, DECISIONS
from leukoflow.inference.backends import create_backend
from leukoflow.inference.decision import rule_from_artifact
from leukoflow.models.artifact import load_artifact
from leukoflow.run.collector import read_cell_log
from leukoflow.run.recorder import acquisition_features, read_recording

log = logging.getLogger(__name__)


def recording_kind(path: str | Path) -> str:
    """``"crops"`` (``qpi_pha`` events) or ``"raw"`` (``qpi_oah`` holograms)."""

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"recording not found: {p}")
    with open_rtdc(p) as h5:  # also a file being written or whose writer was killed
        ev = h5.get("events", {})
        if "qpi_pha" in ev:
            return "crops"
        if "qpi_oah" in ev:
            return "raw"
    raise ValueError(f"{p}: neither qpi_pha crops nor qpi_oah holograms: nothing to replay")


def _messages(rec: dict[str, Any], batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (indices, crops) per message: cells of one recorded frame, at most ``batch``."""
    n = rec["n"]
    frames = rec.get("frame", np.arange(n))
    start = 0
    while start < n:
        stop = start + 1
        while stop < n and stop - start < batch and frames[stop] == frames[start]:
            stop += 1
        idx = np.arange(start, stop)
        yield idx, rec["qpi_pha"][start:stop]
        start = stop


class ReplayPublisher:
    """Publish a crop recording as ``crops`` messages (acquisition's role).

    Parameters
    ----------
    path : path-like
        Crop recording (``.rtdc`` with ``qpi_pha``).
    crops_endpoint : str
        PUSH endpoint to bind (workers connect).
    collector_endpoint : str
        Collector PULL endpoint for accounting and end of stream.
    run_id : str
        Run id stamped on the messages.
    rate : float, optional
        Cells per second (None: as fast as possible, unless ``realtime``).
    realtime : bool
        Reproduce the recorded pace (``time`` feature) [s].
    batch : int
        Largest number of cells per message (cells of one frame travel together).
    linger_s : float
        At the end, wait up to this long for queued crops to reach a worker [s].
    """

    def __init__(self, path: str | Path, crops_endpoint: str, collector_endpoint: str,
                 run_id: str = "replay", rate: float | None = None, realtime: bool = False,
                 batch: int = 16, linger_s: float = 30.0) -> None:

        self.path = Path(path)
        self.rec = read_recording(self.path)
        if "qpi_pha" not in self.rec:
            raise ValueError(f"{path}: no qpi_pha crops to replay")
        if rate is not None and not rate > 0:
            raise ValueError(f"rate must be > 0 cells/s, got {rate}")
        self.crops_endpoint = crops_endpoint
        self.collector_endpoint = collector_endpoint
        self.run_id = run_id
        self.rate = rate
        self.realtime = realtime
        self.batch = int(batch)
        self.linger_s = float(linger_s)
        self.emitted = 0
        self.stopped = False

    def stop(self) -> None:
        """Stop after the current message (thread- and signal-safe)."""
        self.stopped = True

    def _ids(self) -> np.ndarray:
        n = self.rec["n"]
        ids = self.rec.get("cell_id")
        if ids is None or len(np.unique(ids)) != n or (ids < 0).any():
            ids = np.arange(n, dtype=np.int64)
        return ids

    def run(self) -> dict[str, Any]:
        """Publish every cell (or until :meth:`stop`); return publishing statistics."""
        import zmq


        ctx = zmq.Context.instance()
        push = transport.make_socket(ctx, "PUSH", self.crops_endpoint, bind=True, hwm=100,
                                     immediate=False, serves="crops")
        ctl = transport.make_socket(ctx, "PUSH", self.collector_endpoint, bind=False,
                                    immediate=False, identity="acquire")
        sender = wire.Sender(self.run_id, "replay")
        # control messages get their own sender: the crop messages' sequence numbers stay
        # gap-free, so the collector checks their completeness (leukoflow.run.ledger)
        self._crops_sender = sender
        ctl_sender = wire.Sender(self.run_id, "replay")
        rec = self.rec
        ids = self._ids()
        labels = rec["label"]
        kinds = rec.get("kind") or [""] * rec["n"]
        times = rec.get("time", np.zeros(rec["n"]))
        frames = rec.get("frame", np.arange(rec["n"]))
        feats = acquisition_features(rec["features"])  # the acquisition's names and units
        t0 = time.monotonic()
        last_acc = 0.0
        n_msgs = 0
        try:
            for idx, crops in _messages(rec, self.batch):
                if self.stopped:
                    break
                if self.realtime:
                    wait = float(times[idx[0]] - times[0]) - (time.monotonic() - t0)
                elif self.rate:
                    wait = self.emitted / self.rate - (time.monotonic() - t0)
                else:
                    wait = 0.0
                if wait > 0:
                    time.sleep(wait)
                now = wire.now_ns()
                lab = labels[idx]
                fields: dict[str, Any] = {
                    "frame": int(frames[idx[0]]), "ids": ids[idx].tolist(),
                    "bbox": [[0, 0, crops.shape[1], crops.shape[2]]] * len(idx),
                    "feat": {k: [float(x) for x in v[idx]] for k, v in feats.items()
                             if np.isfinite(v[idx]).all()},
                    "t_acq": [now] * len(idx),
                    "frames": [int(f) for f in frames[idx]],
                    "cum": self.emitted,
                }
                if (lab >= -1).all():
                    fields["labels"] = [int(x) for x in lab]
                    fields["kinds"] = [kinds[i] or (CLASS_NAMES[lab[j]] if lab[j] >= 0 else "ood")
                                       for j, i in enumerate(idx)]
                msg = sender.message("crops", np.ascontiguousarray(crops, dtype=np.float32),
                                     t={"replay": now}, **fields)
                sent = False
                while not self.stopped and not sent:
                    sent = transport.send(push, msg)
                    if not sent:
                        time.sleep(0.001)  # back-pressure: wait for the workers, never drop
                if not sent:
                    sender.seq -= 1  # never sent: no gap in the crop messages' numbers
                    break
                self.emitted += len(idx)
                n_msgs += 1
                if time.monotonic() - last_acc > 0.5:
                    transport.send(ctl, ctl_sender.message("control", cmd="accounting",
                                                       stats=self._stats()), block=True)
                    last_acc = time.monotonic()
            transport.send(ctl, ctl_sender.message("control", cmd="eos",
                                                   stats=self._stats()),
                           block=True)
        finally:
            # crops still queued in ZeroMQ were counted as emitted: deliver them before
            # closing (LINGER), unless stopped by a signal (then they end up as "lost")
            push.close(linger=0 if self.stopped else int(self.linger_s * 1000))
            ctl.close(linger=2000)
        dt = time.monotonic() - t0
        return {"emitted": self.emitted, "messages": n_msgs, "seconds": dt,
                "cells_per_s": self.emitted / dt if dt > 0 else 0.0,
                "complete": self.emitted == rec["n"]}

    def _stats(self) -> dict[str, Any]:
        crops = getattr(self, "_crops_sender", None)
        return {"emitted": self.emitted, "source": str(self.path), "cells": int(self.rec["n"]),
                "crops_sender": crops.sender if crops is not None else "",
                "crops_seq": crops.seq if crops is not None else 0}


def compare_decisions(recording: str | Path, run_dir: str | Path) -> dict[str, Any]:
    """Compare a replay run's decisions with the recorded ones, cell by cell (by cell id).

    Returns
    -------
    dict
        ``compared``, ``identical`` (decision and predicted class), ``decision_mismatch``,
        ``pred_mismatch``, ``missing`` (recorded cells without a replay result),
        ``max_prob_diff`` and ``exact`` (True when every recorded cell got the same decision
        and class).
    """

    rec = read_recording(recording)
    logs = read_cell_log(Path(run_dir) / "cells.bin")
    n = rec["n"]
    ids = rec.get("cell_id")
    if ids is None or len(np.unique(ids)) != n or (ids < 0).any():
        ids = np.arange(n, dtype=np.int64)
    if "decision" not in rec:
        return {"compared": 0, "exact": False, "note": "recording has no decisions"}
    pos = {int(c): i for i, c in enumerate(logs["id"].tolist())}
    rows = np.array([pos.get(int(c), -1) for c in ids])
    have = rows >= 0
    got = logs[rows[have]]
    rec_dec = np.array([DECISIONS.index(d) for d in rec["decision"]])[have]
    rec_pred = rec["pred"][have] if "pred" in rec else got["pred"]
    dec_mis = int((got["decision"] != rec_dec).sum())
    pred_mis = int((got["pred"] != rec_pred).sum())
    both = (got["decision"] == rec_dec) & (got["pred"] == rec_pred)
    max_dp = (float(np.abs(got["p"] - rec["probs"][have]).max())
              if "probs" in rec and have.any() else None)
    return {"recorded": n, "compared": int(have.sum()), "identical": int(both.sum()),
            "decision_mismatch": dec_mis, "pred_mismatch": pred_mis,
            "missing": int((~have).sum()), "max_prob_diff": max_dp,
            "exact": bool(have.all() and both.all())}


def fast_replay(recording: str | Path, model: str | None = None, backend: str = "onnxruntime",
                max_batch: int = 256, threads: int = 1) -> dict[str, Any]:
    """Run the model again on a crop recording, without the ZeroMQ pipeline (one Dask task of
    ``leukoflow replay --fast``).

    The recorded crops go through a local backend and the artifact's decision rule in batches
    of ``max_batch``; the new decisions are compared with the recorded ones cell by cell.

    Parameters
    ----------
    recording : path
        Crop recording (``qpi_pha``).
    model : str, optional
        Artifact name or folder (default: the recording's ``user:model``, else ``lenet5-sim``).
    backend : str
        Inference backend (a local one: ``onnxruntime``, ``torch-cpu`` ...).
    max_batch : int
        Cells per forward pass.
    threads : int
        Backend threads.

    Returns
    -------
    dict
        ``model``, ``backend``, ``n``, ``comparison`` (like :func:`compare_decisions`), and
        the arrays ``probs`` (N, K), ``pred``, ``decision`` (names), ``label``, ``kind`` for
        validation.
    """
    rec = read_recording(recording)
    if "qpi_pha" not in rec:
        raise ValueError(f"{recording}: no qpi_pha crops (raw recordings replay through "
                         "acquisition: leukoflow replay without --fast)")
    name = model or rec["meta"].get("user:model") or "lenet5-sim"
    art = load_artifact(name)
    be = create_backend(backend, art, max_batch=max_batch, threads=threads)
    try:
        out = be.infer(rec["qpi_pha"])
    finally:
        be.close()
    rule = rule_from_artifact(art)
    d = rule(out.logits, out.features, out.ood_score)
    names = np.array(d.names(), dtype=object)
    finite = out.finite
    names[~finite] = "rejected"
    n = rec["n"]
    comp: dict[str, Any] = {"recorded": n, "compared": 0, "identical": 0,
                            "non_finite": int((~finite).sum())}
    if "decision" in rec:
        old_dec = np.asarray(rec["decision"], dtype=object)
        old_pred = np.asarray(rec["pred"]) if "pred" in rec else d.pred
        same_dec = old_dec == names
        same_pred = old_pred == d.pred
        comp.update(compared=n, identical=int((same_dec & same_pred).sum()),
                    decision_mismatch=int((~same_dec).sum()),
                    pred_mismatch=int((~same_pred).sum()),
                    max_prob_diff=float(np.abs(rec["probs"] - d.probs).max()) if n and
                    "probs" in rec else None)
        comp["exact"] = bool(comp["identical"] == n)
    return {"model": str(getattr(art, "name", name)), "backend": backend, "n": int(n),
            "comparison": comp, "probs": d.probs[finite], "pred": d.pred[finite],
            "decision": [str(v) for v in names[finite]],
            "label": np.asarray(rec["label"])[finite],
            "kind": [k for k, ok in zip(rec["kind"], finite, strict=True) if ok],
            "classes": list(rec["classes"])}
