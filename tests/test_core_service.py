"""Service scaffolding (signals, health server, hello/heartbeat) and the JSON helpers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import http_get

from leukoflow.core import wire
from leukoflow.core.jsonutil import atomic_write_json, dumps, fsync_folder, json_safe
from leukoflow.core.metrics import ServiceMetrics
from leukoflow.core.service import (
    ServiceScaffold,
    StopSignals,
    control_message,
    heartbeat_message,
    hello_message,
)

# ----------------------------------------------------------------------------- JSON helpers

def test_json_safe_cleans_numpy_nonfinite_and_containers() -> None:
    obj = {1: np.float32(0.5), "a": (np.int64(3), float("nan")), "b": np.array([[1, 2]]),
           "c": Counter(x=2), "d": [np.bool_(True), float("-inf"), Path("/x/y")],
           "e": {"f": np.float64("inf")}, "g": {3}}
    got = json_safe(obj)
    assert got == {"1": 0.5, "a": [3, None], "b": [[1, 2]], "c": {"x": 2},
                   "d": [True, None, "/x/y"], "e": {"f": None}, "g": [3]}
    assert type(got["a"][0]) is int and type(got["d"][0]) is bool
    # the output is plain JSON: the strict encoder (no NaN) accepts it
    json.dumps(got, allow_nan=False)
    with pytest.raises(ValueError):  # ... where the raw object would not even encode
        json.dumps({"x": float("nan")}, allow_nan=False)


def test_json_safe_unknown_types_strict_or_str() -> None:
    class Thing:
        def __repr__(self) -> str:
            return "Thing()"

    assert json_safe({"t": Thing()}) == {"t": "Thing()"}
    with pytest.raises(TypeError, match="Thing"):
        json_safe({"t": Thing()}, strict=True)
    assert dumps({"v": np.float32(np.nan)}) == '{"v": null}'


def test_atomic_write_json_leaves_valid_file_and_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "s.json"
    atomic_write_json(p, {"n": np.int32(7), "x": [float("nan")]})
    atomic_write_json(p, {"n": np.int32(8), "x": [1.5]})  # replaces
    assert json.loads(p.read_text()) == {"n": 8, "x": [1.5]}
    assert sorted(f.name for f in tmp_path.iterdir()) == ["s.json"]
    fsync_folder(tmp_path)
    fsync_folder(tmp_path / "missing")  # best effort: nothing to sync, no error


# ----------------------------------------------------------------------------- messages

def test_hello_heartbeat_control_round_trip_through_the_wire() -> None:
    s = wire.Sender(run="r1", role="infer")
    stats = {"n": np.int64(4), "bad": float("nan"), "shape": (1, 64, 64)}
    with pytest.raises(wire.WireError):  # raw stats are refused by the wire ...
        wire.encode(s.message("control", cmd="hello", stats=stats))
    hello = wire.decode(wire.encode(hello_message(s, stats)))  # ... the built ones pass
    assert hello.kind == "control" and hello.header["cmd"] == "hello"
    assert hello.header["stats"] == {"event": "hello", "n": 4, "bad": None,
                                     "shape": [1, 64, 64]}
    hb = wire.decode(wire.encode(heartbeat_message(s, {"x": np.float32(1.5)}, run="r2")))
    assert hb.kind == "heartbeat" and hb.header["run"] == "r2"
    assert hb.header["stats"] == {"x": 1.5}
    acc = wire.decode(wire.encode(control_message(s, "accounting", {"c": Counter(a=1)})))
    assert acc.header["cmd"] == "accounting" and acc.header["stats"] == {"c": {"a": 1}}
    # consecutive sequence numbers from one sender (the collector's gap detection)
    assert [hello.seq, hb.seq, acc.seq] == [1, 2, 3]


# ----------------------------------------------------------------------------- signals

def test_stop_signals_route_and_restore() -> None:
    before = signal.getsignal(signal.SIGTERM)
    before_int = signal.getsignal(signal.SIGINT)
    got: list[str] = []
    with StopSignals(got.append) as sig:
        assert sig.installed
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt while installed
    assert got == ["SIGTERM", "SIGINT"]
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.getsignal(signal.SIGINT) is before_int


def test_stop_signals_do_nothing_outside_the_main_thread() -> None:
    before = signal.getsignal(signal.SIGTERM)
    out: list[bool] = []

    def body() -> None:
        s = StopSignals(lambda _n: None).install()
        out.append(s.installed)
        s.restore()

    t = threading.Thread(target=body)
    t.start()
    t.join(30)
    assert out == [False] and signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------------------- scaffold

def test_scaffold_health_endpoints_and_close() -> None:
    m = ServiceMetrics("infer", run_id="r1")
    before = signal.getsignal(signal.SIGTERM)
    stopped: list[str] = []
    sc = ServiceScaffold(m, port=0, status=lambda: {"x": 1}, on_stop=stopped.append,
                         live_timeout_s=60.0)
    with sc:
        base = f"http://127.0.0.1:{sc.port}"
        assert http_get(base + "/healthz")[0] == 200
        assert http_get(base + "/readyz")[0] == 503 and not sc.ready
        sc.set_ready()
        assert http_get(base + "/readyz")[0] == 200 and sc.ready
        assert json.loads(urllib.request.urlopen(base + "/status", timeout=30).read()) == {
            "x": 1}
        os.kill(os.getpid(), signal.SIGTERM)
        assert stopped == ["SIGTERM"]
    assert sc.port is None and not sc.ready
    assert "leukoflow_ready 0.0" in m.exposition().decode()
    with pytest.raises(OSError):  # nothing serves there any more
        urllib.request.urlopen(base + "/healthz", timeout=5)
    assert signal.getsignal(signal.SIGTERM) is before


def test_scaffold_negative_port_serves_nothing_but_keeps_the_gauge() -> None:
    m = ServiceMetrics("infer", run_id="r1")
    sc = ServiceScaffold(m, port=-1).open()
    sc.tick()
    sc.set_ready()
    assert sc.port is None and sc.health is None
    assert "leukoflow_ready 1.0" in m.exposition().decode()
    sc.close()


def test_sigterm_stops_a_real_service_process_gracefully(tmp_path: Path) -> None:
    """A child process built on the scaffold: SIGTERM ends its loop, it cleans up, exits 0."""
    script = tmp_path / "svc.py"
    script.write_text(textwrap.dedent("""
        import sys, threading
        from leukoflow.core.metrics import ServiceMetrics
        from leukoflow.core.service import ServiceScaffold
        stop = threading.Event()
        reason = []
        def on_stop(name):
            reason.append(name)
            stop.set()
        with ServiceScaffold(ServiceMetrics("acquire", "r"), port=0,
                             on_stop=on_stop) as sc:
            sc.set_ready()
            print(sc.port, flush=True)
            while not stop.wait(0.05):
                sc.tick()
        print("stopped", reason[0], flush=True)
    """))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(p.stdout.readline())
        assert http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0
    assert out.strip() == "stopped SIGTERM"
