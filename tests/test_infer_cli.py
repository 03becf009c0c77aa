"""``leukoflow infer`` as a real subprocess: ready, serves crops, stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import zmq
from helpers import ResultsSink, crop_message, free_port

from leukoflow.benchmarks.workload_infer import make_test_artifact, synthetic_crops
from leukoflow.core import wire

ROOT = Path(__file__).resolve().parents[1]


def test_infer_cli_subprocess_serves_and_stops_on_sigterm(tmp_path):
    art = make_test_artifact(tmp_path / "art", input_size=32)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    sink = ResultsSink(ctx, "tcp://127.0.0.1:*")
    mport = free_port()
    env = {**os.environ, "LEUKOFLOW_INFER_MAX_DELAY_MS": "1", "LEUKOFLOW_CACHE_DIR":
           str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "leukoflow.cli", "infer", "--model", str(art.path),
           "--backend", "torch-cpu", "--max-batch", "16",
           "--crops-endpoint", f"tcp://127.0.0.1:{port}",
           "--results-endpoint", sink.endpoint, "--explain-endpoint", "",
           "--metrics-port", str(mport)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = urllib.request.urlopen(f"http://127.0.0.1:{mport}/readyz",
                                               timeout=1).status == 200
            except OSError:
                ready = False
            if ready:
                break
            time.sleep(0.2)
        assert ready, proc.stderr.read().decode() if proc.poll() is not None else "not ready"
        snd = wire.Sender("cli-run", "acquire")
        push.send_multipart(wire.encode(crop_message(snd, synthetic_crops(40, 32), 0)))
        assert sink.wait_for(lambda s: s.cells() >= 40, 30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read().decode()
        assert sink.wait_for(lambda s: any(m.header["stats"].get("event") == "totals"
                                           for m in s.control), 10)
        tot = [m for m in sink.control if m.header["stats"].get("event") == "totals"][-1]
        assert tot.header["stats"]["received_cells"] == 40
        assert tot.header["run"] == "cli-run"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        sink.close()
        push.close(0)
        ctx.term()
