"""Fault injection on the real multi-process pipeline, checked cell by cell.

:func:`run_fault` starts ``leukoflow run`` (simulated instrument, real processes, real
ZeroMQ sockets) with the acquisition's publish journal on, SIGKILLs the named services one
after the other at seeded random moments (measured in cells, so the moments do not depend on
the machine's speed), waits until each killed service is serving again, lets the run go on,
stops it with Ctrl-C (SIGINT), and then checks every physical cell against ground truth:

* the *journal* (written by acquisition before each send) lists every crop message that left
  acquisition with its cell ids and the simulator's truth ids;
* the collector's cell log (``cells.bin``) lists every cell counted, its ledger journal
  (``ledger.jsonl``) every per-cell rejection with ids and every message declared lost with
  its stage and reason.

:func:`analyse` classifies each published cell as classified (exactly once), rejected, lost
inside a span the collector declared lost, or *unaccounted*; unaccounted cells are allowed
only for a killed acquisition, in the messages after the last one the collector heard of
(they were still in acquisition's own queue, never reached a worker). It also checks that
the collector's ``lost`` equals the missing cells in its declared spans (no loss invented or
missed), that no two distinct cells share an id, and that no cell was counted twice.

Used by ``tests/test_faults.py`` (small runs) and ``benchmarks/bench_faults.py`` (full size).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any

import numpy as np

from leukoflow.run.collector import read_cell_log, read_journal

#: ``leukoflow run`` children that can be killed: name -> how to find it in its command line
TARGETS = ("source", "infer-0", "infer-1", "explain", "collector")

#: Loss bounds per fault, in crop messages (stated by the queue sizes that can hold crops
#: or results when a process dies): a worker holds at most acquisition's send queue to it
#: (``sndhwm`` 16) plus its own receive queue (``crops_hwm`` 100) plus a batch; a killed
#: acquisition takes its send queues (16 per worker) with it; a killed collector its receive
#: queue (``hwm`` 1000, results are logged as they are handled). Nothing else may be lost.
LOSS_BOUND_MESSAGES = {"source": 2 * 16, "infer-0": 16 + 100 + 256,
                       "infer-1": 16 + 100 + 256, "explain": 0, "collector": 1000}

CLI = [sys.executable, "-c", "from leukoflow.cli import main; main()"]


@dataclass
class Kill:
    """One SIGKILL: which child, at which emitted-cell count, how long it took to recover."""

    target: str
    at_cells: int
    pid: int = 0
    t_kill_ns: int = 0
    emitted_at_kill: int = 0
    recovery_s: float | None = None


@dataclass
class FaultRun:
    """Everything one faulted run produced (see :func:`run_fault`)."""

    name: str
    run_dir: Path
    kills: list[Kill] = field(default_factory=list)
    returncode: int | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    stderr_tail: str = ""


def _get_json(url: str, timeout: float = 2.0) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())
    except (OSError, ValueError, HTTPException):
        return None


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as r:
            return r.status == 200
    except (OSError, HTTPException):
        return False


def children(ppid: int) -> dict[str, int]:
    """Running ``leukoflow run`` children of ``ppid`` by name (from their command lines)."""
    out: dict[str, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != ppid:
                continue
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                continue
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        args = [a.decode(errors="replace") for a in argv]
        if "record" in args:
            out["collector"] = int(d.name)
        elif "explain" in args:
            out["explain"] = int(d.name)
        elif "acquire" in args:
            out["source"] = int(d.name)
        elif "infer" in args and "--metrics-port" in args:
            out[f"infer-port-{args[args.index('--metrics-port') + 1]}"] = int(d.name)
    return out


def _child_pid(ppid: int, target: str, mbase: int) -> int | None:
    kids = children(ppid)
    if target.startswith("infer-"):
        i = int(target.split("-")[1])
        port = mbase + 1 if i == 0 else mbase + 10 + i
        return kids.get(f"infer-port-{port}")
    return kids.get(target)


def _ready_url(target: str, mbase: int) -> str:
    if target.startswith("infer-"):
        i = int(target.split("-")[1])
        return f"http://127.0.0.1:{mbase + 1 if i == 0 else mbase + 10 + i}/readyz"
    port = {"explain": mbase + 2, "collector": mbase + 3, "source": mbase}[target]
    return f"http://127.0.0.1:{port}/{'healthz' if target == 'source' else 'readyz'}"


def run_fault(name: str, targets: list[str], run_dir: Path, port_args: list[str], *,
              seed: int = 0, first: tuple[int, int] = (30, 90), between: tuple[int, int] = (40,
              100), after: int = 60, workers: int = 2, explain: bool = False,
              timeout_s: float = 900.0, extra_args: list[str] | None = None) -> FaultRun:
    """Run ``leukoflow run`` and SIGKILL ``targets`` in order (see the module docstring).

    Parameters
    ----------
    name : str
        Name of the fault (reporting only).
    targets : list of str
        Children to kill, in order (names of :data:`TARGETS`; empty: a fault-free run).
    run_dir : path
        Run folder (``--out``); the publish journal is ``<run_dir>/publish.jsonl``.
    port_args : list of str
        ``--zmq-base-port``/``--metrics-base-port`` flags (free ports).
    seed : int
        Seeds the simulator and the kill moments.
    first, between : (int, int)
        The first kill comes after a random number of emitted cells in ``first``, each
        further kill that many cells (``between``) after the previous one recovered.
    after : int
        Cells emitted after the last recovery before the run is stopped.
    workers : int
        Inference workers.
    explain : bool
        Run the explainer.
    timeout_s : float
        Bound of the whole run [s] (the machine may be slow; nothing asserts on time).
    """
    rng = random.Random(seed)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mbase = int(port_args[port_args.index("--metrics-base-port") + 1])
    status = f"http://127.0.0.1:{mbase + 3}/status"
    env = dict(os.environ, LEUKOFLOW_ACQUIRE_JOURNAL=str(run_dir / "publish.jsonl"))
    cmd = [*CLI, "run", "--json", "--as-fast-as-possible", "--workers", str(workers),
           "--out", str(run_dir), "--seed", str(seed), *port_args, *(extra_args or [])]
    if not explain:
        cmd.append("--no-explain")
    res = FaultRun(name, run_dir)
    t0 = time.monotonic()
    t_end = t0 + timeout_s
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)

    def emitted() -> int | None:
        st = _get_json(status)
        return None if st is None else int(st["accounting"]["emitted"])

    def wait_cells(n: int) -> int:
        last = 0
        while time.monotonic() < t_end and proc.poll() is None:
            e = emitted()
            if e is not None:
                last = e
                if e >= n:
                    return e
            time.sleep(0.2)
        raise TimeoutError(f"{name}: {n} emitted cells not reached (last {last})")

    failure: BaseException | None = None
    try:
        base = wait_cells(1)
        for k, target in enumerate(targets):
            lo, hi = first if k == 0 else between
            kill = Kill(target, base + rng.randint(lo, hi))
            kill.emitted_at_kill = wait_cells(kill.at_cells)
            pid = _child_pid(proc.pid, target, mbase)
            if pid is None:
                raise RuntimeError(f"{name}: no running {target} child to kill")
            kill.pid = pid
            kill.t_kill_ns = time.monotonic_ns()
            os.kill(pid, signal.SIGKILL)
            res.kills.append(kill)
            # serving again: a new process of that child, ready (acquisition: cells flow)
            t_kill = time.monotonic()
            while time.monotonic() < t_end and proc.poll() is None:
                new = _child_pid(proc.pid, target, mbase)
                if new not in (None, pid) and _ready(_ready_url(target, mbase)):
                    if target != "source":
                        break
                    e = emitted()
                    if e is not None and e > kill.emitted_at_kill:
                        break
                time.sleep(0.1)
            else:
                raise TimeoutError(f"{name}: {target} did not recover")
            kill.recovery_s = time.monotonic() - t_kill
            base = emitted() or kill.emitted_at_kill
        wait_cells(base + after)
    except (TimeoutError, RuntimeError) as exc:
        failure = exc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: stop the source, drain, report
        try:
            out, err = proc.communicate(timeout=max(60.0, t_end - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        res.returncode = proc.returncode
        res.stderr_tail = err[-3000:]
        res.duration_s = time.monotonic() - t0
        try:
            res.summary = json.loads((run_dir / "summary.json").read_text())
        except (OSError, ValueError):
            res.summary = {}
        del out
    if failure is not None:  # say why, with the run's own last words
        raise RuntimeError(f"{failure}; leukoflow run exited {res.returncode}: "
                           f"{res.stderr_tail[-1500:]}") from failure
    return res


def _journal(path: Path) -> list[dict[str, Any]]:
    lines = []
    if path.exists():
        for raw in path.read_bytes().splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue  # a torn last line of a killed acquisition
    return lines


def analyse(res: FaultRun) -> dict[str, Any]:
    """Check every published cell of a :class:`FaultRun` against what the run reported."""
    run_dir = res.run_dir
    pub = _journal(run_dir / "publish.jsonl")
    msgs = {}
    for x in pub:  # in the order written: a drop follows its message, a retry comes later
        if "unsent" in x:
            msgs.pop((x["sender"], x["unsent"]), None)  # dropped at the source, not sent
        else:
            msgs[(x["sender"], x["seq"])] = x
    all_ids = [i for m in msgs.values() for i in m["ids"]]
    cells = read_cell_log(run_dir / "cells.bin")
    counted = cells["id"].astype(np.int64)
    counted_set = set(counted.tolist())
    ledger = read_journal(run_dir / "ledger.jsonl")
    rejected_ids = {i for line in ledger if line.get("k") == "cell_event"
                    for i in line.get("ids", [])}
    spans: dict[str, list[tuple[int, int, str]]] = {}
    last_known: dict[str, int] = {}
    for line in ledger:
        if line.get("k") == "lost":
            spans.setdefault(line["src"], []).append((line["a"], line["b"], line["why"]))
            last_known[line["src"]] = max(last_known.get(line["src"], -1), line["b"])
        elif line.get("k") == "res":
            last_known[line["src"]] = max(last_known.get(line["src"], -1), line["seq"])
        elif line.get("k") == "rep":
            last_known[line["src"]] = max(last_known.get(line["src"], -1), line["m"] - 1)
    killed_sources = res.summary.get("completeness", {}).get("sources", {})
    missing_in_spans: Counter[str] = Counter()
    unaccounted = 0
    unaccounted_msgs = 0
    not_trailing = 0
    for (sender, seq), m in msgs.items():
        missing = [i for i in m["ids"] if i not in counted_set and i not in rejected_ids]
        if not missing:
            continue
        why = next((w for a, b, w in spans.get(sender, ()) if a <= seq <= b), None)
        if why is not None:
            missing_in_spans[why] += len(missing)
            continue
        unaccounted += len(missing)
        unaccounted_msgs += 1
        if seq <= last_known.get(sender, -1):
            not_trailing += 1  # the collector knew of it: it should have been declared
    acc = res.summary.get("accounting", {})
    lost = acc.get("lost", {})
    per_msg = max((len(m["ids"]) for m in msgs.values()), default=1)
    sources = sorted({s for s, _ in msgs})
    return {
        "fault": res.name,
        "returncode": res.returncode,
        "sources": len(sources),
        "published_messages": len(msgs),
        "published_cells": len(all_ids),
        "distinct_ids": len(set(all_ids)) == len(all_ids),
        "classified": int(counted.size),
        "classified_once": len(counted_set) == counted.size,
        "phantom": len(counted_set - set(all_ids)),
        "rejected": len(rejected_ids & set(all_ids)),
        "duplicates": acc.get("duplicates"),
        "lost_total": acc.get("lost_total"),
        "lost": lost,
        "lost_found": dict(missing_in_spans),
        "lost_matches": dict(missing_in_spans) == {k: v for k, v in lost.items() if v},
        "unaccounted_cells": unaccounted,
        "unaccounted_messages": unaccounted_msgs,
        "unaccounted_not_trailing": not_trailing,
        "in_flight": acc.get("in_flight"),
        "balanced": acc.get("balanced"),
        "published_known": acc.get("published"),
        "max_cells_per_message": per_msg,
        "killed": [k.target for k in res.kills],
        "recovery_s": [k.recovery_s for k in res.kills],
        "counted_after_last_kill": int((cells["t_recv_ns"] > res.kills[-1].t_kill_ns).sum())
        if res.kills and cells.size else int(cells.size),
        "collector_restarts": res.summary.get("collector_restarts", 0),
        "source_states": {n: {"dead": s.get("dead"), "ended": s.get("ended")}
                          for n, s in killed_sources.items()},
        "duration_s": round(res.duration_s, 1),
    }


def loss_bound_cells(targets: list[str], per_message: int) -> int:
    """The stated loss bound of killing ``targets`` [cells] (:data:`LOSS_BOUND_MESSAGES`)."""
    return sum(LOSS_BOUND_MESSAGES[t] for t in targets) * max(1, per_message)
