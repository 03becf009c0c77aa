"""End to end with the real services: ``leukoflow run``, ``replay``, ``validate``.

Every run here starts real child processes (collector, inference worker with the shipped
model, explainer, acquisition with the simulated instrument or the replay publisher) on
free ports, so they run beside other tests and services.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from http.client import HTTPException
from pathlib import Path

import numpy as np
import pytest
from helpers import run_port_args

from leukoflow.acquisition.sim.dataset import make_crop_dataset
from leukoflow.benchmarks.faults import FaultRun, analyse
from leukoflow.core.rtdc import read_crop_dataset, write_crop_dataset
from leukoflow.models.artifact import load_artifact
from leukoflow.models.evaluate import evaluate_artifact

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from leukoflow.cli import main; main()"]


def _cli(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    res = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                         cwd=ROOT)
    assert res.returncode == 0, f"{args[0]} failed ({res.returncode}): {res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def crop_data(tmp_path_factory) -> Path:
    """A small labelled crop dataset from the simulated instrument (through the hologram)."""

    d = make_crop_dataset(8, 2, seed=3)
    path = tmp_path_factory.mktemp("data") / "crops.rtdc"
    write_crop_dataset(path, d["x"], d["y"], d["kind"], d["features"])
    return path


@pytest.fixture(scope="module")
def recording(crop_data, tmp_path_factory) -> tuple[Path, dict, Path]:
    """Replay the crops through inference while recording: (recording, summary, run_dir)."""
    out = tmp_path_factory.mktemp("rec")
    rec = out / "rec1.rtdc"
    res = _cli("replay", str(crop_data), "--record", str(rec), "--out", str(out / "run1"),
               "--json", *run_port_args())
    return rec, json.loads(res.stdout), out / "run1"


def test_replay_records_every_cell_and_dclab_reads_it(recording, crop_data) -> None:
    import dclab


    rec, summary, run_dir = recording
    n = len(read_crop_dataset(crop_data)["y"])
    acc = summary["accounting"]
    assert acc["emitted"] == n and acc["balanced"] and acc["dropped_total"] == 0
    assert acc["counted"] + acc["uncertain"] + acc["ood"] == n
    with dclab.new_dataset(rec) as ds:
        assert len(ds) == n
        for feat in ("qpi_pha", "ml_score_neu", "ml_score_eos", "ml_score_mon", "ml_score_lym",
                     "userdef0", "userdef1", "userdef2", "userdef3", "userdef4", "userdef5",
                     "userdef6", "area_um", "qpi_dm", "frame", "time", "index"):
            assert feat in ds.features_innate, feat
        assert ds["qpi_pha"][0].shape == (64, 64)
        scores = np.stack([ds[f] for f in ("ml_score_neu", "ml_score_eos", "ml_score_mon",
                                           "ml_score_lym")], axis=1)
        np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)
        assert "collector" in json.dumps(dict(ds.config["user"]), default=str)  # run params
    assert (run_dir / "report" / "index.html").exists()


def test_replay_of_recording_reproduces_decisions_exactly(recording, tmp_path) -> None:
    rec, _, _ = recording
    res = _cli("replay", str(rec), "--out", str(tmp_path / "run2"), "--json", "--rate", "400",
               *run_port_args())
    cmp_ = json.loads(res.stdout)["comparison"]
    assert cmp_["exact"], cmp_
    assert cmp_["identical"] == cmp_["recorded"] and cmp_["missing"] == 0


def test_validate_matches_offline_evaluation(recording, tmp_path) -> None:

    rec, _, _ = recording
    res = _cli("validate", str(rec), "--json", "--html", str(tmp_path / "val"))
    val = json.loads(res.stdout)
    offline = evaluate_artifact(load_artifact("lenet5-sim"), str(rec), n_boot=10,
                                all_detectors=False)
    assert val["classification"]["confusion_matrix"] == \
        offline["classification"]["confusion_matrix"]
    assert abs(val["classification"]["accuracy"]
               - offline["classification"]["accuracy"]["value"]) < 1e-9
    assert abs(val["calibration"]["ece"]
               - offline["calibration"]["after_T"]["ece"]["value"]) < 1e-4
    assert (tmp_path / "val" / "index.html").exists()


def _emitted(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=1) as r:
            return int(json.loads(r.read())["accounting"]["emitted"])
    except (OSError, ValueError, KeyError, HTTPException):
        return 0


def test_run_json_serves_metrics_and_stops_gracefully_on_ctrl_c(tmp_path) -> None:
    """``leukoflow run --json`` on the simulated instrument: all four services serve
    /metrics; Ctrl-C (SIGINT) stops the source, drains, and still writes summary+report."""
    ports = run_port_args()
    mbase = int(ports[3])
    cmd = [*CLI, "run", "--json", "--duration", "120", "--out", str(tmp_path / "run"), *ports]
    # the acquisition's publish journal: ground truth of every cell that left acquisition
    env = dict(os.environ, LEUKOFLOW_ACQUIRE_JOURNAL=str(tmp_path / "run" / "publish.jsonl"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env)
    seen: set[int] = set()
    t_end = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < t_end:
        for port in (mbase, mbase + 1, mbase + 2, mbase + 3):
            if port in seen:
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
                    if b"leukoflow_" in r.read():
                        seen.add(port)
            except (OSError, ValueError, HTTPException):
                pass
        if len(seen) == 4 and _emitted(mbase + 3) >= 5:
            break
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert seen == {mbase, mbase + 1, mbase + 2, mbase + 3}
    s = json.loads(out)
    for key in ("counts", "decisions", "accounting", "throughput", "latency"):
        assert key in s, key
    acc = s["accounting"]
    # checked against the journal, not against the accounting's own sums: every cell that
    # left acquisition is counted exactly once (or rejected with a reason), nothing is lost
    # when nothing failed, and the collector knows of exactly those cells
    truth = analyse(FaultRun("ctrl-c", tmp_path / "run",
                             summary=json.loads((tmp_path / "run" / "summary.json").read_text())))
    assert truth["published_cells"] >= 5 and truth["distinct_ids"], truth
    assert truth["classified_once"] and truth["phantom"] == 0, truth
    assert truth["classified"] + truth["rejected"] == truth["published_cells"], truth
    assert acc["lost_total"] == 0 and acc["duplicates"] == 0 and acc["in_flight"] == 0
    assert acc["published"] == truth["published_cells"]
    assert s["latency"]["run_p50_s"] is not None
    assert Path(s["report"]).exists()
    sup = json.loads((tmp_path / "run" / "supervisor.json").read_text())
    assert sup["interrupted"] and sup["restarts"] == {}
    body = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert body["truth"]["labelled"] > 0  # the simulator's ground truth travelled along
