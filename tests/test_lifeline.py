"""Children die with their supervisor: parent-death signal, parent watch, and a real
``leukoflow run`` whose supervisor is SIGKILLed (every child exits, every port is freed)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from http.client import HTTPException
from pathlib import Path

import pytest
from helpers import wait_for

from leukoflow.core import lifeline, transport

ROOT = Path(__file__).resolve().parents[1]

#: a stand-in supervisor: starts one child with the lifeline, prints its pid, waits
_PARENT = r"""
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]],
                         env={**os.environ, "LEUKOFLOW_SUPERVISOR_PID": str(os.getpid())})
print(child.pid, flush=True)
time.sleep(600)
"""
_CHILD_GUARD = ("from leukoflow.core.lifeline import guard; guard(grace_s=5)\n"
                "import time; time.sleep(600)\n")
# the fallback alone: no parent-death signal, only the watch thread
_CHILD_WATCH = ("import os; from leukoflow.core.lifeline import watch_parent\n"
                "watch_parent(int(os.environ['LEUKOFLOW_SUPERVISOR_PID']), interval_s=0.1)\n"
                "import time; time.sleep(600)\n")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
@pytest.mark.parametrize("child", [_CHILD_GUARD, _CHILD_WATCH], ids=["pdeathsig", "watch"])
def test_child_exits_when_its_supervisor_is_killed(child) -> None:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, child], stdout=subprocess.PIPE,
                              text=True)
    try:
        pid = int(parent.stdout.readline())
        time.sleep(1.0)  # let the child arm its lifeline
        assert _alive(pid)
        parent.kill()
        parent.wait(10)
        assert wait_for(lambda: not _alive(pid), 30), "child outlived its supervisor"
    finally:
        parent.kill()
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, UnboundLocalError):
            pass


def test_guard_is_a_no_op_without_a_supervisor_and_exits_when_it_is_gone() -> None:
    assert lifeline.guard(env={}) is False
    with pytest.raises(SystemExit):
        lifeline.guard(env={lifeline.ENV: "1"} if os.getppid() != 1 else {lifeline.ENV: "2"})
    assert lifeline.set_parent_death_signal(0) is sys.platform.startswith("linux")


def _children_of(sup_pid: int) -> list[int]:
    """Processes started by ``sup_pid``'s Supervisor (their environment names it)."""
    out = []
    tag = f"{lifeline.ENV}={sup_pid}".encode()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if tag in (d / "environ").read_bytes().split(b"\0"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def _port_free(port: int) -> bool:
    """True when a new server could bind ``port`` (as ZeroMQ and http.server do, with
    SO_REUSEADDR: connections left in TIME_WAIT do not hold a port)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return r.status == 200
    except (OSError, HTTPException):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_sigkill_of_leukoflow_run_leaves_no_child_and_no_port(tmp_path) -> None:
    """``leukoflow run`` over loopback TCP with CurveZMQ; SIGKILL of the supervisor."""
    zbase = transport.free_tcp_port()
    mbase = transport.free_tcp_port()
    while abs(zbase - mbase) < 20 or max(zbase, mbase) > 65000:
        zbase, mbase = transport.free_tcp_port(), transport.free_tcp_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEUKOFLOW_")}
    env["LEUKOFLOW_RUN_TRANSPORT"] = "tcp"
    cmd = [sys.executable, "-c", "from leukoflow.cli import main; main()", "run", "--json",
           "--no-explain", "--duration", "600", "--out", str(tmp_path / "run"),
           "--zmq-base-port", str(zbase), "--metrics-base-port", str(mbase)]
    sup = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                           cwd=ROOT)
    metrics = [mbase, mbase + 1, mbase + 3]  # acquire, infer-0, collector
    zmq_ports = [zbase, zbase + 1, zbase + 3]  # crops, collector, live
    try:
        assert wait_for(lambda: all(_ready(p) for p in metrics), 300), "services never came up"
        children = _children_of(sup.pid)
        assert len(children) >= 3, children  # collector, infer-0, source
        # every port in use (a service binds its ZeroMQ port after its health server)
        assert wait_for(lambda: not any(_port_free(p) for p in zmq_ports + metrics), 120), \
            {p: _port_free(p) for p in zmq_ports + metrics}
        assert (tmp_path / "run" / "keys" / "server.key_secret").exists()  # Curve on TCP
        sup.kill()
        sup.wait(10)
        assert wait_for(lambda: not any(_alive(p) for p in children), 60), \
            [p for p in children if _alive(p)]
        assert wait_for(lambda: all(_port_free(p) for p in zmq_ports + metrics), 30)
    finally:
        sup.kill()
        for p in _children_of(sup.pid):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
