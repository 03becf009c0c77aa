"""Recorder: crash safety under SIGKILL (h5py and dclab read the file), HDF5 flag repair."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from leukoflow.run.recorder import lookup3, read_recording, repair_rtdc

WRITER = r"""
import json, sys, time
import numpy as np
from leukoflow.core.vocabulary import CLASS_NAMES
from leukoflow.run.recorder import Recorder

rec = Recorder(sys.argv[1], params={"test": {"seed": 1}}, flush_interval_s=0.5)
rng = np.random.default_rng(0)
cid = 0
while True:
    ids = list(range(cid, cid + 8))
    cid += 8
    crops = rng.normal(0, 1, (8, 64, 64)).astype(np.float32)
    rec.add_crops({"ids": ids, "frame": cid, "feat": {"area_um": [50.0] * 8},
                   "labels": [0, 1, 2, 3, -1, 0, 1, 2], "t": {"acquire": 1000}}, crops)
    probs = np.full((8, 4), 0.25, dtype=np.float32)
    rec.add_results({"ids": ids, "pred": [0] * 8, "decision": ["uncertain"] * 8,
                     "conf": [0.25] * 8, "ood_score": [0.0] * 8,
                     "classes": list(CLASS_NAMES)}, probs)
    print(json.dumps({"t": time.monotonic(), "appended": cid}), flush=True)
    time.sleep(0.02)
"""


def test_lookup3_is_the_hdf5_superblock_checksum(tmp_path) -> None:
    import h5py

    p = tmp_path / "x.h5"
    with h5py.File(p, "w", libver="latest") as h5:
        h5["a"] = np.arange(3)
    head = p.read_bytes()[:64]
    size = 12 + 4 * head[9]
    assert lookup3(head[:size]) == int.from_bytes(head[size:size + 4], "little")
    assert repair_rtdc(p) is False  # a cleanly closed file needs nothing
    assert lookup3(b"") == 0xDEADBEEF and lookup3(b"a" * 12) != lookup3(b"a" * 13)
    with pytest.raises(ValueError):
        bad = tmp_path / "bad.h5"
        bad.write_bytes(b"not hdf5" * 10)
        repair_rtdc(bad)


def test_sigkilled_recorder_leaves_a_readable_file_missing_at_most_a_second(tmp_path) -> None:
    import dclab
    import h5py

    path = tmp_path / "killed.rtdc"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    progress: list[tuple[float, int]] = []
    t_start = None
    while True:
        line = proc.stdout.readline()
        if not line:
            break
        d = json.loads(line)
        progress.append((d["t"], d["appended"]))
        t_start = t_start or d["t"]
        if d["t"] - t_start > 2.5:
            break
    t_kill = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL and len(progress) > 10
    # HDF5 leaves its "open for writing" flags set: plain readers refuse until repaired
    with pytest.raises(OSError):
        h5py.File(path, "r").close()
    assert repair_rtdc(path) is True
    with dclab.new_dataset(path) as ds:
        n = len(ds)
        for feat in ("qpi_pha", "ml_score_neu", "userdef0", "userdef2", "userdef6", "area_um"):
            assert feat in ds.features_innate, feat
        ids = np.asarray(ds["userdef6"]).astype(int)
    np.testing.assert_array_equal(ids, np.arange(n))  # contiguous: nothing torn in between
    safe = max((a for t, a in progress if t <= t_kill - 1.0), default=0)
    assert n >= safe, f"only {n} events, {safe} were appended more than 1 s before the kill"
    rec = read_recording(path)
    assert rec["n"] == n and rec["label"][:5].tolist() == [0, 1, 2, 3, -1]
    assert rec["decision"][0] == "uncertain"
