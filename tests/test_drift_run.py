"""Drift detection and the QC gate in a real ``leukoflow run`` (#16).

Real processes (acquisition on the simulated instrument with a drifted sample profile, an
inference worker with the shipped lenet5-sim and its card's drift reference, the
collector), real ZeroMQ, real summary/report: the live integration of the drift test and
of the QC policy. The statistical properties are measured in benchmarks/bench_drift.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
from helpers import run_port_args

from leukoflow.acquisition.qc.record import write_record

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from leukoflow.cli import main; main()"]


def _run(args: list[str], env: dict[str, str], timeout: float = 500
         ) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "run", *args, *run_port_args()], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **env})


def test_live_run_of_larger_cells_is_marked_not_valid(tmp_path) -> None:
    """Leukocytes 10 % larger (sample profile cells+10): the collector's drift test fires
    during the run, the summary, --json output, report and metrics say the differential is
    not valid and name the features that moved; no QC record: a loud QC warning."""
    qc = tmp_path / "qc"
    rec = tmp_path / "rec.rtdc"
    res = _run(["--json", "--no-explain", "--source", "sim:5:1.5:cells+10", "--cells", "700",
                "--out", str(tmp_path / "run"), "--record", str(rec)],
               {"LEUKOFLOW_QC_FOLDER": str(qc), "LEUKOFLOW_QC_POLICY": "warn"})
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads(res.stdout)
    assert s["accounting"]["balanced"]
    body = json.loads((tmp_path / "run" / "summary.json").read_text())
    d = body["drift"]
    assert d["enabled"] and d["model"] == "lenet5-sim"
    assert d["cells"] >= 500 and d["cells"] <= body["accounting"]["emitted"]
    assert d["alarm"] and d["first_alarm_cell"] <= 500
    moved = {m["feature"] for m in d["moved"]}
    assert moved & {"diameter_um", "dm_pg", "pen0", "pen1", "pen2"}
    size = [m for m in d["moved"] if m["feature"] == "diameter_um"]
    assert all(m["live"] > m["ref"] for m in size)  # larger, as simulated
    assert body["validity"]["valid"] is False and "drift" in body["validity"]["reasons"][0]
    assert s["validity"]["valid"] is False and s["drift"]["alarm"]
    assert body["qc"]["state"] == "none"
    assert any("QC none" in w for w in body["validity"]["warnings"])
    params = json.loads((tmp_path / "run" / "run_params.json").read_text())
    assert params["sim"]["profiles"] == ["cells+10"]
    assert params["sim"]["config"]["size_scale"]["neutrophil"] == 1.1
    with h5py.File(rec, "r") as h5:  # the recording carries the instrument profile too
        lines = h5["logs"]["leukoflow-params"][:]
        logged = json.loads("".join(v.decode() if isinstance(v, bytes) else str(v)
                                    for v in lines))
    assert logged["sim"]["profiles"] == ["cells+10"] and logged["qc"]["state"] == "none"
    html = Path(s["report"]).read_text()
    assert "DIFFERENTIAL NOT VALID" in html and "Instrument drift and QC" in html


def test_qc_policy_refuse_stops_the_run_before_it_starts(tmp_path) -> None:
    env = {"LEUKOFLOW_QC_FOLDER": str(tmp_path / "qc"), "LEUKOFLOW_QC_POLICY": "refuse"}
    res = _run(["--json", "--no-explain", "--duration", "5", "--out", str(tmp_path / "r")],
               env, timeout=120)
    assert res.returncode == 1
    assert "refused by QC policy" in res.stderr and "no QC record" in res.stderr
    assert not (tmp_path / "r" / "summary.json").exists()
    # a failed last QC is refused too, naming the failed check
    write_record({"passed": False, "failed_checks": ["focus"],
                  "scale": {"pixel_um": 0.34, "magnification": 1.0}}, tmp_path / "qc")
    res = _run(["--json", "--no-explain", "--duration", "5", "--out", str(tmp_path / "r")],
               env, timeout=120)
    assert res.returncode == 1 and "focus" in res.stderr
