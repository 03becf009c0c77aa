"""Supervised children end with their supervisor (no orphans holding ports and sockets).

A supervisor (:class:`leukoflow.run.orchestrate.Supervisor`) starts each child with
``LEUKOFLOW_SUPERVISOR_PID`` set to its own pid, and the child calls :func:`guard` first:

* on Linux, ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` (through ctypes): the kernel sends the
  child SIGTERM the moment the supervisor dies, even by SIGKILL; the child then stops as on
  Ctrl-C (queues drained, files flushed);
* a watch thread (every platform, and a fallback should the signal be missed) checks every
  ``interval_s`` that the parent is still the supervisor, and sends the same SIGTERM when it
  is not;
* a child that was still stopping ``grace_s`` after its parent died is killed (SIGKILL), so
  it cannot outlive the run by more than that.

The parent-death signal belongs to the supervisor *thread* that started the child: start
children from the supervisor's main thread (``Supervisor`` does).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping

__all__ = ["ENV", "guard", "set_parent_death_signal", "watch_parent"]

#: Environment variable with the supervisor's pid (set by the supervisor for each child).
ENV = "LEUKOFLOW_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux).

    Returns False where ``prctl`` is not available.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_parent(parent_pid: int, interval_s: float = 0.5, grace_s: float = 30.0,
                 sig: int = signal.SIGTERM) -> threading.Thread:
    """Send ``sig`` to this process once ``parent_pid`` is no longer its parent; SIGKILL it
    ``grace_s`` later if it is still running. Returns the (daemon) watch thread."""

    def _watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        os.kill(os.getpid(), sig)
        time.sleep(grace_s)
        os.kill(os.getpid(), signal.SIGKILL)

    t = threading.Thread(target=_watch, name="leukoflow-lifeline", daemon=True)
    t.start()
    return t


def guard(env: Mapping[str, str] | None = None, grace_s: float = 30.0) -> bool:
    """Tie this process's life to its supervisor's (no-op without ``$LEUKOFLOW_SUPERVISOR_PID``).

    Returns True when guarded. Exits at once (code 1) if the supervisor is already gone.
    """
    raw = (os.environ if env is None else env).get(ENV, "")
    if not raw:
        return False
    try:
        parent = int(raw)
    except ValueError:
        return False
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:  # the supervisor died before the signal was armed
        sys.stderr.write("leukoflow: supervisor gone before start; exiting\n")
        raise SystemExit(1)
    watch_parent(parent, grace_s=grace_s)
    return True
