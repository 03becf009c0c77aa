"""Durability: a writer killed mid-flush loses nothing it reported as flushed.

Real processes are SIGKILLed while the recorder (``.rtdc``, HDF5 SWMR) and the cell log
flush; everything they acknowledged (reported flushed before the kill) is read back, by
h5py and dclab, after :func:`repair_rtdc` - whose result is compared byte for byte with
the HDF5 tool ``h5clear -s --increment=0`` on a copy of the same file. (``h5clear -s``
alone is not enough for a SWMR file: its superblock's end-of-allocation lags behind
flushed data, and the library cuts the file there when it closes it.)
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sysdeps import binary

from leukoflow.core import jsonutil
from leukoflow.run.collector import CELL_DTYPE, CellLog, read_cell_log
from leukoflow.run.recorder import repair_rtdc

#: A recorder fed like the collector feeds it; prints "flushing K" before and "flushed N"
#: (events on disk) after each flush. Event i has crop value i and id i.
_WRITER = r"""
import sys, numpy as np
from leukoflow.core.vocabulary import CLASS_NAMES
from leukoflow.run.recorder import Recorder
rec = Recorder(sys.argv[1], params={"test": "durability"}, flush_interval_s=1e9)
n, k, i = 40, 0, 0
while True:
    ids = list(range(i, i + n))
    crops = np.repeat(np.arange(i, i + n, dtype=np.float32), 48 * 48).reshape(n, 48, 48)
    rec.add_crops({"ids": ids, "frame": k, "feat": {"area_um": [50.0] * n}}, crops)
    probs = np.full((n, len(CLASS_NAMES)), 0.25, np.float32)
    rec.add_results({"ids": ids, "pred": [0] * n, "decision": ["counted"] * n,
                     "conf": [0.25] * n, "ood_score": [0.0] * n}, probs)
    i += n
    k += 1
    print("flushing", k, flush=True)
    rec.flush()
    print("flushed", rec.stats()["flushed_events"], flush=True)
"""

_CELL_WRITER = r"""
import sys, numpy as np
from leukoflow.run.collector import CELL_DTYPE, CellLog
log = CellLog(sys.argv[1])
i = 0
while True:
    rec = np.zeros(97, dtype=CELL_DTYPE)
    rec["id"] = np.arange(i, i + 97)
    log.append(rec)
    i += 97
    log.flush()
    print("flushed", log.flushed, flush=True)
"""


def _kill_mid_flush(script: str, path: Path, after: int, seed: int) -> int:
    """Run ``script`` on ``path``, SIGKILL it during its ``after``-th flush; return the
    last count it acknowledged."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)],
                            stdout=subprocess.PIPE, text=True)
    acked = 0
    flushes = 0
    rng = random.Random(seed)
    try:
        t_end = time.monotonic() + 300
        while time.monotonic() < t_end:
            line = proc.stdout.readline()
            if not line:
                break
            word, n = line.split()
            if word == "flushed":
                acked = int(n)
                flushes += 1
            if flushes >= after and (word == "flushing" or script is _CELL_WRITER):
                time.sleep(rng.uniform(0, 0.01))  # somewhere inside the flush
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        # lines printed before the kill landed are acknowledged too
        for line in proc.stdout.read().splitlines():
            word, n = line.split()
            if word == "flushed":
                acked = int(n)
    finally:
        proc.kill()
    assert flushes >= after, "the writer did not get going"
    return acked


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_recording_killed_mid_flush_keeps_every_acknowledged_event(tmp_path, seed) -> None:
    import dclab
    import h5py
    import hdf5plugin  # noqa: F401

    h5clear = binary("h5clear", package="hdf5-tools")
    path = tmp_path / "rec.rtdc"
    acked = _kill_mid_flush(_WRITER, path, after=3 + seed, seed=seed)
    assert acked > 0
    theirs = tmp_path / "h5clear.rtdc"
    shutil.copy(path, theirs)
    res = subprocess.run([h5clear, "-s", "--increment=0", str(theirs)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert repair_rtdc(path) is True
    assert path.read_bytes() == theirs.read_bytes()  # what h5clear does, byte for byte
    assert repair_rtdc(path) is False  # nothing left to repair
    with h5py.File(path, "r") as h5:
        ev = h5["events"]
        n = min(ev[k].shape[0] for k in ev)
        assert n >= acked, (n, acked)
        ids = ev["userdef6"][:acked]
        np.testing.assert_array_equal(ids, np.arange(acked))
        pha = ev["qpi_pha"][:acked]
        np.testing.assert_array_equal(pha[:, 10, 10], np.arange(acked, dtype=np.float32))
    with dclab.new_dataset(path) as ds:
        assert len(ds) >= acked


def test_repair_extends_a_file_shorter_than_its_allocation_like_h5clear(tmp_path) -> None:
    """The other EOA/EOF shape (a file cut below its stored end of allocation): zeros up to
    the allocation, as ``h5clear --increment=0`` does."""
    h5clear = binary("h5clear", package="hdf5-tools")
    path = tmp_path / "rec.rtdc"
    _kill_mid_flush(_WRITER, path, after=2, seed=0)
    head = path.read_bytes()[:64]
    o = head[9]
    eoa = int.from_bytes(head[12 + 2 * o:12 + 3 * o], "little")
    data = path.read_bytes()[:eoa - 100]
    ours, theirs = tmp_path / "ours.rtdc", tmp_path / "theirs.rtdc"
    ours.write_bytes(data)
    theirs.write_bytes(data)
    assert repair_rtdc(ours) is True
    res = subprocess.run([h5clear, "-s", "--increment=0", str(theirs)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert ours.stat().st_size == eoa
    assert ours.read_bytes() == theirs.read_bytes()


def test_cell_log_killed_mid_flush_keeps_every_acknowledged_record(tmp_path) -> None:
    path = tmp_path / "cells.bin"
    acked = _kill_mid_flush(_CELL_WRITER, path, after=20, seed=4)
    got = read_cell_log(path)
    assert len(got) >= acked > 0
    np.testing.assert_array_equal(got["id"][:acked], np.arange(acked))
    log = CellLog(path)  # a restarted collector appends after the whole records
    log.append(np.zeros(1, dtype=CELL_DTYPE))
    log.close()
    assert log.flushed == 1 and len(read_cell_log(path)) == len(got) + 1


def test_state_files_are_replaced_atomically_and_synced(tmp_path, monkeypatch) -> None:
    import os

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    p = tmp_path / "state.json"
    jsonutil.atomic_write_json(p, {"a": 1})
    jsonutil.atomic_write_json(p, {"a": 2})
    assert jsonutil.json.loads(p.read_text()) == {"a": 2}
    assert len(synced) == 4  # the file and its folder, each time
    assert not list(tmp_path.glob(".*.tmp"))
