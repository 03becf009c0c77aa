"""Cell identity that survives restarts: an acquisition epoch in every cell id.

A cell id is ``epoch * 2**ID_LOCAL_BITS + local``: ``local`` counts the cells one
acquisition process emitted (0, 1, 2, ...), ``epoch`` numbers the acquisition starts of a
run. A restarted acquisition claims the next epoch, so its cells never reuse an id of the
cells before the restart, and every consumer that keys on the id (the collector's duplicate
check, the recording, the explanations) stays correct. A true duplicate, the same physical
cell sent twice, keeps its id and is still detected.

The epoch comes from a small state file (``acquire_identity.json``) in the acquisition's
state folder (``leukoflow run``: the run folder; systemd/compose: ``StateDirectory``),
written atomically under a lock: epochs increase by one per start. The same file lets a
restarted acquisition without a fixed run id resume the run it was serving when it died
(no clean ``eos``), instead of starting a new one. Without a state folder the epoch is the
start time in seconds modulo ``2**ID_EPOCH_BITS`` (unique unless two starts of one run fall
in the same second or 36 h apart; say so in deployments that need more).

Ids fit in 53 bits (:data:`ID_BITS`), so they survive float64 (dclab ``userdef6``) and
JSON/JavaScript readers exactly: 2**36 cells per start (~8 days at 100,000 cells/s), 2**17
starts per run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leukoflow.core.jsonutil import atomic_write_json

__all__ = ["ID_BITS", "ID_LOCAL_BITS", "ID_EPOCH_BITS", "MAX_LOCAL_ID", "IDENTITY_FILE",
           "IdSpaceExhausted", "SourceIdentity", "make_ids", "split_ids", "clock_epoch",
           "claim", "release"]

#: Bits of the per-start cell counter.
ID_LOCAL_BITS = 36
#: Bits of the epoch (acquisition starts of one run).
ID_EPOCH_BITS = 17
#: Total id bits (exact in float64).
ID_BITS = ID_LOCAL_BITS + ID_EPOCH_BITS
#: Largest local cell number of one acquisition start.
MAX_LOCAL_ID = 2**ID_LOCAL_BITS - 1
#: State file name in the acquisition's state folder.
IDENTITY_FILE = "acquire_identity.json"


class IdSpaceExhausted(RuntimeError):
    """One acquisition start emitted 2**36 cells: restart it (a new epoch) to go on."""


@dataclass
class SourceIdentity:
    """Run id and epoch claimed by one acquisition start.

    Attributes
    ----------
    run : str
        Run id (the configured one, the resumed one, or a new one).
    epoch : int
        Epoch of this start (``0 <= epoch < 2**ID_EPOCH_BITS``).
    resumed : bool
        True when this start continues a run a previous start served.
    path : pathlib.Path or None
        State file (None without a state folder).
    """

    run: str
    epoch: int
    resumed: bool = False
    path: Path | None = None

    @property
    def id_base(self) -> int:
        """Offset added to the local cell numbers of this start."""
        return self.epoch << ID_LOCAL_BITS


def make_ids(epoch: int, local: np.ndarray | list[int]) -> np.ndarray:
    """Cell ids of ``local`` cell numbers in ``epoch`` (int64).

    Raises
    ------
    IdSpaceExhausted
        When a local number does not fit in :data:`ID_LOCAL_BITS`.
    """
    loc = np.asarray(local, dtype=np.int64)
    if loc.size and (int(loc.max()) > MAX_LOCAL_ID or int(loc.min()) < 0):
        raise IdSpaceExhausted(f"cell number outside [0, 2**{ID_LOCAL_BITS}) in one start")
    return (np.int64(epoch) << np.int64(ID_LOCAL_BITS)) | loc


def split_ids(ids: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(epoch, local)`` of cell ids (int64 arrays)."""
    arr = np.asarray(ids, dtype=np.int64)
    return arr >> np.int64(ID_LOCAL_BITS), arr & np.int64(MAX_LOCAL_ID)


def clock_epoch(now_s: float | None = None) -> int:
    """Epoch without a state folder: the start time [s] modulo ``2**ID_EPOCH_BITS``."""
    t = time.time() if now_s is None else now_s
    return int(t) % (2**ID_EPOCH_BITS)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict[str, Any]) -> None:
    atomic_write_json(path, data)  # fsynced: an epoch once claimed is never handed out again


def claim(state_dir: str | Path, run_id: str, new_run_id: Callable[[], str]) -> SourceIdentity:
    """Claim the run id and the next epoch for one acquisition start.

    Parameters
    ----------
    state_dir : path-like
        Acquisition state folder ('' = none: :func:`clock_epoch`, the configured or a new
        run id).
    run_id : str
        Configured run id ('' = resume the run of a start that died, else a new one).
    new_run_id : callable
        Makes a new run id.

    Returns
    -------
    SourceIdentity
    """
    if not state_dir:
        return SourceIdentity(run_id or new_run_id(), clock_epoch())
    folder = Path(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / IDENTITY_FILE
    with _locked(folder / (IDENTITY_FILE + ".lock")):
        prev = _read(path)
        prev_run = prev.get("run") if isinstance(prev.get("run"), str) else ""
        prev_epoch = prev.get("epoch")
        epoch = (int(prev_epoch) + 1) % (2**ID_EPOCH_BITS) \
            if isinstance(prev_epoch, int) and not isinstance(prev_epoch, bool) else 0
        if run_id:
            run, resumed = run_id, prev_run == run_id
        elif prev_run and not prev.get("closed", False):
            run, resumed = prev_run, True  # the previous start died mid-run: continue it
        else:
            run, resumed = new_run_id(), False
        _write(path, {"run": run, "epoch": epoch, "closed": False, "pid": os.getpid(),
                      "started_unix": time.time()})
    return SourceIdentity(run, epoch, resumed, path)


def release(identity: SourceIdentity) -> None:
    """Mark the run closed (clean end of stream): the next start begins a new run."""
    if identity.path is None:
        return
    with _locked(identity.path.with_name(IDENTITY_FILE + ".lock")):
        data = _read(identity.path)
        if data.get("run") == identity.run and data.get("epoch") == identity.epoch:
            data["closed"] = True
            _write(identity.path, data)
