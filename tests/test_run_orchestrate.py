"""Supervisor: restarts with exponential backoff, graceful stop, and a collector SIGKILL.

Real child processes throughout; the collector test runs the real ``leukoflow record``
service as a supervised child and kills it with SIGKILL in the middle of a stream sent by
stand-in acquisition/inference services (tests/helpers.py).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request

import numpy as np
from helpers import FakeAcquisition, FakeWorker, endpoint, free_port, make_crops, wait_for

from leukoflow.reports.report import write_run_report
from leukoflow.run.collector import read_cell_log
from leukoflow.run.orchestrate import (
    CLI_PREFIX,
    ChildSpec,
    RunOptions,
    Supervisor,
    build_specs,
    worker_metrics_port,
)
from leukoflow.run.recorder import count_events


def _py(code: str) -> list[str]:
    return ["-c", code]


def test_supervisor_restarts_with_backoff_and_gives_up(tmp_path) -> None:
    seen: list[dict] = []
    sup = Supervisor(tmp_path / "logs", backoff_initial_s=0.1, backoff_max_s=0.3,
                     max_restarts=3, on_restart=lambda n, r: seen.append(dict(r)))
    sup.start(ChildSpec("crashy", _py("import sys, time; time.sleep(0.1); sys.exit(3)")))
    assert sup.wait("crashy", 30)
    rep = sup.report()
    assert rep["restarts"] == {"crashy": 3}
    assert seen[-1] == {"crashy": 3}
    delays = [e["detail"] for e in rep["events"] if e["event"] == "restart_scheduled"]
    assert delays == ["in 0.10 s", "in 0.20 s", "in 0.30 s"]  # doubling, capped
    assert rep["events"][-1]["event"] == "gave_up"
    assert (tmp_path / "logs" / "crashy.log").exists()


def test_supervisor_does_not_restart_clean_exit_and_stops_gracefully(tmp_path) -> None:
    sup = Supervisor(tmp_path / "logs", backoff_initial_s=0.05)
    sup.start(ChildSpec("ok", _py("print('bye')")))
    assert sup.wait("ok", 20)
    assert sup.report()["restarts"] == {}
    graceful = ("import signal, sys, time\n"
                "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
                "print('up', flush=True)\n"
                "while True: time.sleep(0.05)\n")
    sup.start(ChildSpec("graceful", _py(graceful)))
    stubborn = ("import signal, time\n"
                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "print('up', flush=True)\n"
                "while True: time.sleep(0.05)\n")
    sup.start(ChildSpec("stubborn", _py(stubborn)))
    for name in ("graceful", "stubborn"):
        assert wait_for(lambda n=name: b"up" in (tmp_path / "logs" / f"{n}.log").read_bytes(), 20)
    assert sup.stop("graceful", timeout_s=10) == 0
    assert sup.stop("stubborn", timeout_s=0.5) == -signal.SIGKILL
    assert any(e["event"] == "killed" and e["child"] == "stubborn" for e in sup.events)


def test_port_layout_and_child_commands(tmp_path) -> None:
    opts = RunOptions(workers=3, record=str(tmp_path / "r.rtdc"), run_id="x", transport="tcp")
    assert opts.metrics_ports() == {"acquire": 9101, "infer": 9102, "explain": 9103,
                                    "collector": 9104}
    assert [worker_metrics_port(opts, i) for i in range(3)] == [9102, 9112, 9113]
    specs = build_specs(opts, tmp_path)
    assert list(specs) == ["collector", "explain", "infer-0", "infer-1", "infer-2", "source"]
    coll = specs["collector"].argv
    assert coll[:2] == list(CLI_PREFIX) and coll[2] == "record"
    # with recording, workers read the collector's tap instead of acquisition directly
    assert "tcp://127.0.0.1:5559" in specs["infer-1"].argv
    assert specs["source"].env["LEUKOFLOW_ACQUIRE_CROPS_ENDPOINT"] == "tcp://127.0.0.1:5555"
    assert specs["explain"].env["LEUKOFLOW_EXPLAIN_METRICS_PORT"] == "9103"
    moved = RunOptions(zmq_base_port=20000, metrics_base_port=30000, transport="tcp")
    assert moved.endpoints()["collector"] == "tcp://127.0.0.1:20001"
    assert moved.metrics_ports()["collector"] == 30003


def test_collector_sigkill_is_restarted_and_loss_is_reported(tmp_path) -> None:
    """Kill the collector (with its recorder) mid-stream: restart, readable files, report."""
    import dclab


    res_ep, crops_ep, tap_ep, live_ep = endpoint(), endpoint(), endpoint(), endpoint()
    run_dir = tmp_path / "run"
    rec = tmp_path / "rec.rtdc"
    mport = free_port()
    argv = [*CLI_PREFIX, "record", "--results", res_ep, "--live", live_ep, "--metrics-port",
            str(mport), "--run-dir", str(run_dir), "--run-id", "test", "--out", str(rec),
            "--tap-in", crops_ep, "--tap-out", tap_ep, "--drain-timeout", "3"]
    sup = Supervisor(tmp_path / "logs", backoff_initial_s=0.2)
    acq = FakeAcquisition(crops_ep, res_ep)
    sup.start(ChildSpec("collector", argv, ready_url=f"http://127.0.0.1:{mport}/readyz"))
    assert sup.wait_ready(["collector"], 60) == []
    worker = FakeWorker(tap_ep, res_ep)
    worker.start()
    crops, labels = make_crops(400, seed=5)

    def send(k0: int, k1: int) -> None:
        for k in range(k0, k1):
            sl = slice(10 * k, 10 * k + 10)
            acq.send_crops(list(range(10 * k, 10 * k + 10)), crops[sl], labels[sl], frame=k)
            time.sleep(0.01)
        acq.account()

    send(0, 20)

    def recorded() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/status", timeout=2) as r:
                return int(json.loads(r.read())["recording"].get("events", 0))
        except (OSError, ValueError, KeyError):
            return 0

    assert wait_for(lambda: recorded() >= 100, 60, interval=0.2)
    time.sleep(1.2)  # more than one flush interval: those events are on disk
    pid = sup.pid("collector")
    # the cells counted so far are in the cell log (written through as they are handled)
    logged_before = set(read_cell_log(run_dir / "cells.bin")["id"].tolist())
    assert logged_before
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: (sup.poll(), sup.pid("collector") not in (None, pid))[1], 30)
    assert sup.wait_ready(["collector"], 60) == []
    # the first recording segment is readable (the restarted collector repaired its flags)
    n_first = count_events(rec)
    assert n_first > 0
    with dclab.new_dataset(rec) as ds:
        assert len(ds) == n_first and "qpi_pha" in ds.features_innate
    send(20, 40)
    acq.account(eos=True)
    assert sup.wait("collector", 60)
    worker.stop_event.set()
    worker.join(5)
    acq.close()
    summary = json.loads((run_dir / "summary.json").read_text())
    acc = summary["accounting"]
    assert summary["collector_restarts"] == 1
    assert acc["emitted"] == 400
    # against the ids the stand-ins really sent (0..399), not the accounting's own sums
    ids = read_cell_log(run_dir / "cells.bin")["id"].tolist()
    assert len(ids) == len(set(ids)) and set(ids) <= set(range(400))  # once, real cells only
    assert logged_before <= set(ids)  # nothing the first collector had counted is lost
    assert set(range(200, 400)) <= set(ids)  # every cell sent after the restart is counted
    assert acc["duplicates"] == 0  # cells restored from the log are not counted again
    resolved = acc["counted"] + acc["uncertain"] + acc["ood"]
    assert resolved == len(ids)
    # what died with the collector: only results in its receive queue (the worker kept the
    # rest queued while it was down); here at most the 20 frames in flight at the kill
    assert acc["lost_total"] == 400 - len(ids) <= 200
    segs = summary["recording"]["segments"]
    assert len(segs) == 2
    total = 0
    for seg in segs:
        with dclab.new_dataset(seg) as ds:
            total += len(ds)
            ids = np.asarray(ds["userdef6"]).astype(int)
            np.testing.assert_array_equal(ds["qpi_pha"][0], crops[ids[0]])
    assert total <= resolved
    (run_dir / "supervisor.json").write_text(json.dumps(sup.report()))
    html = write_run_report(run_dir).read_text()
    assert "collector was restarted 1 time" in html
    assert acc["lost_total"] == 0 or "pipeline:unattributed" in html
    assert sys.executable  # children ran with this interpreter
