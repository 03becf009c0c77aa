"""Overload: crops at twice the measured capacity for a bounded time, then back to half.

A real inference worker (``leukoflow infer``, the shipped model, the default CPU backend) and
a real collector (``leukoflow record``) run as processes; this process publishes crops with
acquisition's own :class:`~leukoflow.acquisition.publisher.CropPublisher` (non-blocking: a
crop message the workers cannot take is dropped and counted, ``acquire:backpressure``) and
reports like acquisition (:class:`~leukoflow.acquisition.publisher.AccountingPublisher`).

1. capacity: crops as fast as the workers take them for ``t_cap`` s (the publisher yields the
   CPU when a send is refused); the collector's counted cells per second is the capacity C
   (the baseline of every rate below);
2. overload: crops at 2 C for ``t_over`` s: the counted rate stays near C, the excess is
   dropped at the publisher and counted by reason, the worker's and the collector's memory
   stay bounded (ZeroMQ high-water marks; compared with their memory at the start);
3. recovery: crops at C / 2 for ``t_rec`` s: the counted rate equals the input rate again and
   nothing more is dropped.

At the end of stream the accounting must balance with nothing lost.

Run: ``leukoflow bench overload`` (``--quick``: shorter phases).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import json
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from leukoflow.acquisition.publisher import AccountingPublisher, CropPublisher
from leukoflow.benchmarks.bench_soak import proc_sample
from leukoflow.benchmarks.common import machine, row
from leukoflow.benchmarks.faults import CLI
from leukoflow.core.transport import free_tcp_port
from leukoflow.models.artifact import load_artifact

CELLS_PER_MESSAGE = 8


def _status(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def _classified(port: int) -> int | None:
    st = _status(port)
    return None if st is None else int(st["throughput"]["classified"])


def _cells(n: int, side: int, rng: np.random.Generator, first: int) -> list[Any]:
    out = []
    for i in range(n):
        crop = SimpleNamespace(phase=rng.normal(0, 0.5, (side, side)).astype(np.float32),
                               bbox=(0, 0, side, side), features={})
        out.append(SimpleNamespace(cell_id=first + i, crop=crop, frame=0,
                                   t_acq_ns=time.monotonic_ns(), truth_id=-1, label=-1,
                                   kind=""))
    return out


def run(quick: bool = False) -> dict[str, Any]:
    """Capacity, 2x overload, recovery (see the module docstring)."""
    import zmq

    t_cap, t_over, t_rec = (10.0, 20.0, 15.0) if quick else (20.0, 60.0, 30.0)
    side = int(load_artifact("lenet5-sim").card["input_size"])
    folder = Path(tempfile.mkdtemp(prefix="bench-overload-"))  # private (0700)
    crops_ep, res_ep = f"ipc://{folder}/crops", f"ipc://{folder}/collector"
    wport, cport = free_tcp_port(), free_tcp_port()
    logs = open(folder / "services.log", "wb")  # noqa: SIM115
    coll = subprocess.Popen([*CLI, "record", "--results", res_ep, "--live", "",
                             "--metrics-port", str(cport), "--run-dir", str(folder / "run"),
                             "--run-id", "overload", "--drain-timeout", "10"],
                            stdout=logs, stderr=subprocess.STDOUT)
    work = subprocess.Popen([*CLI, "infer", "--crops-endpoint", crops_ep,
                             "--results-endpoint", res_ep, "--explain-endpoint", "",
                             "--metrics-port", str(wport)], stdout=logs, stderr=subprocess.STDOUT)
    ctx = zmq.Context()
    pub = CropPublisher(ctx, "overload", crops_ep)
    acct = AccountingPublisher(ctx, "overload", res_ep)
    rng = np.random.default_rng(0)
    pool = [_cells(CELLS_PER_MESSAGE, side, rng, 0) for _ in range(16)]
    next_id = 0
    mem: dict[str, list[float]] = {"worker": [], "collector": []}

    def report(cmd: str = "accounting") -> None:
        acct.send(cmd, {"crops_sender": pub.sender.sender, "crops_seq": pub.sender.seq,
                        "cells_emitted": pub.sent_cells, "cells_dropped": dict(pub.dropped)},
                  timeout_ms=2000)

    def phase(seconds: float, rate: float | None) -> dict[str, float]:
        nonlocal next_id
        c0, d0, s0 = _classified(cport) or 0, pub.dropped["backpressure"], pub.sent_cells
        t0 = time.monotonic()
        t_next_sample = t0
        sent_msgs = 0
        while time.monotonic() - t0 < seconds:
            now = time.monotonic()
            if rate is not None:  # paced: the n-th message leaves at n * per-message interval
                due = t0 + sent_msgs * CELLS_PER_MESSAGE / rate
                if now < due:
                    time.sleep(min(due - now, 0.01))
                    continue
            cells = pool[sent_msgs % len(pool)]
            for i, c in enumerate(cells):
                c.cell_id = next_id + i
            next_id += len(cells)
            if not pub.publish(0, cells, {"t_acq": time.monotonic_ns()}) and rate is None:
                time.sleep(0.0005)  # saturated: leave the cores to the worker
            sent_msgs += 1
            if now >= t_next_sample:
                for name, proc in (("worker", work), ("collector", coll)):
                    s = proc_sample(proc.pid)
                    if s is not None:
                        mem[name].append(s[0])
                report()
                t_next_sample = now + 1.0
        dt = time.monotonic() - t0
        time.sleep(1.0)  # results of the last crops reach the collector
        c1 = _classified(cport) or c0
        return {"input_per_s": (pub.sent_cells - s0 + pub.dropped["backpressure"] - d0) / dt,
                "classified_per_s": (c1 - c0) / (dt + 1.0),
                "dropped": pub.dropped["backpressure"] - d0, "seconds": dt}

    try:
        t_end = time.monotonic() + 300
        while time.monotonic() < t_end:  # both services up
            if _status(cport) is not None and _ready(wport):
                break
            time.sleep(0.5)
        acct.send("hello", {"crops_sender": pub.sender.sender}, timeout_ms=2000)
        mem0 = {n: (proc_sample(p.pid) or (float("nan"), 0))[0]
                for n, p in (("worker", work), ("collector", coll))}
        cap = phase(t_cap, None)
        capacity = cap["classified_per_s"]
        over = phase(t_over, 2.0 * capacity)
        rec = phase(t_rec, 0.5 * capacity)
        report("eos")
        coll.wait(300)
        summary = json.loads((folder / "run" / "summary.json").read_text())
    finally:
        pub.close(0)
        acct.close(1000)
        ctx.term()
        for p in (work, coll):
            if p.poll() is None:
                p.terminate()
                p.wait(60)
        logs.close()
    acc = summary.get("accounting", {})
    rows = [
        row("capacity: counted", capacity, "cells/s"),
        row("overload: input", over["input_per_s"], "cells/s", "capacity", capacity),
        row("overload: counted", over["classified_per_s"], "cells/s", "capacity", capacity,
            target="~1x"),
        row("overload: dropped at the publisher (acquire:backpressure)", over["dropped"],
            "cells", target="counted by reason"),
        row("worker memory: max during the run", max(mem["worker"] or [float("nan")]), "MB",
            "at start", mem0["worker"], higher_is_better=False, target="bounded"),
        row("collector memory: max during the run", max(mem["collector"] or [float("nan")]),
            "MB", "at start", mem0["collector"], higher_is_better=False, target="bounded"),
        row("recovery: counted", rec["classified_per_s"], "cells/s", "input", rec["input_per_s"],
            target="~1x"),
        row("recovery: dropped", rec["dropped"], "cells", target="0"),
        row("run: lost", acc.get("lost_total", 0), "cells", target="0"),
    ]
    return {"machine": machine(), "rows": rows, "phases": {"capacity": cap, "overload": over,
                                                          "recovery": rec},
            "memory_mb": mem, "accounting": acc}


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


if __name__ == "__main__":
    from leukoflow.benchmarks.common import main

    main(run)
