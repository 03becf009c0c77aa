"""Collector: loss found while the run goes on, attributed, rebuilt after a restart;
epoch-bearing ids; the per-message error boundary; run after run (``runs_root``).

The run state is fed real wire headers (the source fields a worker copies into its results)
for a known stream of crop messages, so every expected count is known exactly.
"""

from __future__ import annotations

import json

import numpy as np
from helpers import fake_classify, make_crops

from leukoflow.core import wire
from leukoflow.core.identity import make_ids
from leukoflow.core.vocabulary import CLASS_NAMES
from leukoflow.run.collector import Collector, CollectorConfig, IdSet, RunState, read_journal

ACQ = "acquire-11-aaaa"          # acquisition's accounting sender
CROPS = "acquire-11-bbbb"        # its crop messages' sender


class Clock:
    def __init__(self) -> None:
        self.t = 5000.0

    def __call__(self) -> float:
        return self.t


def stream(n_msgs: int, per: int = 3, epoch: int = 0) -> list[dict]:
    """Crop messages of one source: seq, cum and the ids of their cells."""
    return [{"seq": s, "cum": s * per,
             "ids": make_ids(epoch, range(s * per, s * per + per)).tolist()}
            for s in range(n_msgs)]


def results(msg: dict, run: str = "r", src: str = CROPS, seq: int = 0) -> tuple[dict, np.ndarray]:
    crops, _ = make_crops(len(msg["ids"]), seed=msg["seq"])
    probs, dec, conf, ood = fake_classify(crops)
    h = {"v": 1, "kind": "results", "run": run, "sender": "infer-1-w", "seq": seq,
         "t": {"a": 1}, "ids": msg["ids"], "pred": probs.argmax(1).tolist(), "decision": dec,
         "conf": conf, "ood_score": ood, "classes": list(CLASS_NAMES), "model": "m",
         "frame": 0, "src_sender": src, "src_seq": msg["seq"], "src_n": len(msg["ids"]),
         "src_cum": msg["cum"]}
    return h, probs


def control(cmd: str, sender: str, stats: dict, run: str = "r", seq: int = 0) -> dict:
    return {"v": 1, "kind": "control", "cmd": cmd, "run": run, "sender": sender, "seq": seq,
            "t": {"a": 1}, "stats": stats}


def test_loss_is_found_live_and_attributed_to_the_worker_that_died() -> None:
    st = RunState(run_id="r", loss_timeout_s=2.0, silence_s=1000.0)
    clock = st.ledger.clock = Clock()
    msgs = stream(12)
    st.ingest_control(control("hello", ACQ, {"crops_sender": CROPS}))
    for m in msgs:
        if m["seq"] not in (4, 5):  # held by a worker that is killed
            st.ingest_results(*results(m))
    st.ingest_control(control("accounting", ACQ, {"crops_sender": CROPS, "crops_seq": 12,
                                                  "cells_emitted": 36}, seq=1))
    st.ingest_control(control("accounting", "supervisor-1-s", {"restarts": {"infer-0": 1}}))
    st.ledger.advance()
    acc = st.accounting()
    assert acc["lost"] == {} and acc["in_flight"] == 6  # not yet: within the timeout
    clock.t += 3
    st.ledger.advance()
    acc = st.accounting()
    assert acc["lost"] == {"infer:worker_died": 6} and acc["in_flight"] == 0
    assert acc["balanced"] and acc["duplicates"] == 0
    # one of the two messages arrives after all (a slow worker): counted, not lost
    st.ingest_results(*results(msgs[4]))
    acc = st.accounting()
    assert acc["lost"] == {"infer:worker_died": 3} and acc["late"] == 3 and acc["balanced"]
    assert acc["counted"] + acc["uncertain"] + acc["ood"] == 33


def test_a_new_acquisition_start_ends_the_old_stream_and_reuses_no_id() -> None:
    st = RunState(run_id="r", loss_timeout_s=1.0, silence_s=1000.0)
    clock = st.ledger.clock = Clock()
    first, second = stream(5, epoch=0), stream(5, epoch=1)
    st.ingest_control(control("hello", ACQ, {"crops_sender": CROPS}))
    for m in first[:3]:
        st.ingest_results(*results(m))
    st.ingest_control(control("accounting", ACQ, {"crops_sender": CROPS, "crops_seq": 5,
                                                  "cells_emitted": 15}, seq=1))
    # the acquisition was killed and restarted: new senders, next epoch, ids from 0 again
    st.ingest_control(control("hello", "acquire-12-cccc", {"crops_sender": "acquire-12-dddd"}))
    for m in second:
        st.ingest_results(*results(m, src="acquire-12-dddd"))
    clock.t += 2
    st.ledger.advance()
    acc = st.accounting()
    assert acc["duplicates"] == 0  # distinct cells are never taken for duplicates
    assert acc["counted"] + acc["uncertain"] + acc["ood"] == 24
    assert acc["lost"] == {"acquire:source_died": 6}  # published, then died with it
    assert acc["emitted"] == 30 and acc["balanced"]


def test_true_duplicates_are_counted_once_and_reported() -> None:
    st = RunState(run_id="r")
    m = stream(1, per=4, epoch=3)[0]
    st.ingest_results(*results(m))
    st.ingest_results(*results(m, seq=1))  # the same cells sent again
    acc = st.accounting()
    assert acc["duplicates"] == 4
    assert acc["counted"] + acc["uncertain"] + acc["ood"] == 4


def test_idset_keeps_epochs_apart_and_is_vectorised() -> None:
    s = IdSet()
    a = make_ids(0, np.arange(1000))
    b = make_ids(9, np.arange(1000))
    assert s.add_new(a).all() and s.add_new(b).all()
    assert not s.add_new(a[::7]).any()
    assert len(s) == 2000 and int(b[5]) in s and int(make_ids(2, [5])[0]) not in s


def test_error_boundary_rejects_the_message_not_the_service(tmp_path, monkeypatch) -> None:
    coll = Collector(CollectorConfig(results="", live="", metrics_port=-1,
                                     run_dir=str(tmp_path / "run"), run_id="r"))
    msgs = stream(3)
    real = RunState.ingest_results

    def flaky(self, header, p, t_recv_ns=None):
        if header["src_seq"] == 1:
            raise RuntimeError("boom")
        return real(self, header, p, t_recv_ns)

    monkeypatch.setattr(RunState, "ingest_results", flaky)
    coll._gaps = wire.GapTracker()
    for m in msgs:
        coll._handle(wire.encode(wire.Message(*results(m))))
    acc = coll.state.accounting()
    assert acc["messages_rejected"] == {"handler_error": 1}
    assert acc["rejected"] == {"collector:handler_error": 3}
    assert acc["counted"] + acc["uncertain"] + acc["ood"] == 6
    # the failed message's cells are resolved for the completeness check: nothing lost
    coll.state.ledger.advance(final=True)
    assert coll.state.accounting()["lost"] == {}


def test_restarted_collector_rebuilds_the_ledger_and_blames_the_restart(tmp_path) -> None:
    cfg = CollectorConfig(results="", live="", metrics_port=-1, run_dir=str(tmp_path / "run"),
                          run_id="r", loss_timeout_s=0.5)
    first = Collector(cfg)
    msgs = stream(8)
    first._gaps = wire.GapTracker()
    first._handle(wire.encode(wire.Message(control("hello", ACQ, {"crops_sender": CROPS}))))
    for m in msgs[:4]:
        first._handle(wire.encode(wire.Message(*results(m))))
    first.state.ingest_control(control("accounting", "infer-1-w", {
        "event": "rejected", "reason": "non_finite", "cells": 1, "ids": [99],
        "src_sender": CROPS, "src_seq": 9, "src_n": 1, "src_cum": 24}, seq=3))
    # killed here: no flush, no state file; what it handled is on disk already
    journal = read_journal(tmp_path / "run" / "ledger.jsonl")
    assert sum(1 for line in journal if line["k"] == "res") == 5
    second = Collector(cfg)
    assert second.state.collector_restarts == 1
    assert second.state.diff.classified == 12
    assert second.state.accounting()["rejected"] == {"infer:non_finite": 1}
    src = second.state.ledger.sources[CROPS]
    assert len(src.open) == 5  # 0-3 complete (passed on advance) and 9 (rejected)
    second._gaps = wire.GapTracker()
    # message 4 reached the first collector, which died before handling it; 5.. arrive
    for m in msgs[5:]:
        second._handle(wire.encode(wire.Message(*results(m))))
    second.state.ledger.advance(now=second.state.ledger.clock() + 1)
    assert second.state.accounting()["lost"] == {"collector:restart": 3}


def test_kill_between_ledger_line_and_cell_log_declares_the_message_lost(tmp_path,
                                                                         monkeypatch) -> None:
    """A kill after a message's ledger line but before (all of) its cells reached the cell
    log: the restarted collector neither counts those cells nor forgets them (lost with
    collector:restart); the cells before it stay counted, and a second restart agrees."""
    from leukoflow.run import collector as cmod

    cfg = CollectorConfig(results="", live="", metrics_port=-1, run_dir=str(tmp_path / "run"),
                          run_id="r", loss_timeout_s=0.5)
    first = Collector(cfg)
    msgs = stream(6)
    first._gaps = wire.GapTracker()
    for m in msgs[:3]:
        first._handle(wire.encode(wire.Message(*results(m))))

    class Killed(BaseException):  # SIGKILL: nothing after this point runs
        pass

    real_append = cmod.CellLog.append

    def torn_append(self, records):
        real_append(self, records[:1])  # one of the three records got there, then the kill
        raise Killed

    monkeypatch.setattr(cmod.CellLog, "append", torn_append)
    try:
        first._dispatch(wire.Message(*results(msgs[3])))
    except Killed:
        pass
    monkeypatch.setattr(cmod.CellLog, "append", real_append)
    first.cell_log._fh.flush()
    assert len(cmod.read_cell_log(tmp_path / "run" / "cells.bin")) == 10  # 9 + the torn one

    second = Collector(cfg)
    assert second.state.diff.classified == 9  # message 3's record cut back
    second._gaps = wire.GapTracker()
    for m in msgs[4:]:
        second._handle(wire.encode(wire.Message(*results(m))))
    second.state.ledger.advance(now=second.state.ledger.clock() + 1)
    counted = set(cmod.read_cell_log(tmp_path / "run" / "cells.bin")["id"].tolist())
    truth_counted = {i for m in msgs[:3] + msgs[4:] for i in m["ids"]}
    assert counted == truth_counted  # ground truth: the ids really sent and logged
    assert second.state.accounting()["lost"] == {"collector:restart": 3}
    second.cell_log.close()
    second.journal.close()

    third = Collector(cfg)  # the repaired files agree on the next restart as well
    assert third.state.diff.classified == 15
    third.state.ledger.advance(now=third.state.ledger.clock() + 1)
    assert third.state.accounting()["lost"] == {"collector:restart": 3}


def test_runs_root_serves_run_after_run(tmp_path) -> None:
    root = tmp_path / "runs"
    cfg = CollectorConfig(results="", live="", metrics_port=-1, runs_root=str(root))
    coll = Collector(cfg)
    coll._gaps = wire.GapTracker()
    coll._switch_to = ""

    def feed(run: str, n: int, acq: str, crops: str) -> None:
        coll._handle(wire.encode(wire.Message(control("hello", acq, {"crops_sender": crops},
                                                      run=run))))
        if coll._switch_to:
            coll._switch_run(coll._switch_to, None, wire.Sender("x", "collector"))
            coll._switch_to = ""
            coll._handle(wire.encode(wire.Message(control("hello", acq,
                                                          {"crops_sender": crops}, run=run))))
        for m in stream(n):
            coll._handle(wire.encode(wire.Message(*results(m, run=run, src=crops))))
        coll._handle(wire.encode(wire.Message(control(
            "eos", acq, {"crops_sender": crops, "crops_seq": n, "cells_emitted": 3 * n},
            run=run, seq=1))))

    feed("run-a", 4, "acquire-1-a", "acquire-1-b")
    assert coll.run_dir == root / "run-a" and coll.state.run_id == "run-a"
    feed("run-b", 6, "acquire-2-a", "acquire-2-b")  # a new run: the old one is finished
    assert coll.state.run_id == "run-b"
    a = json.loads((root / "run-a" / "summary.json").read_text())
    assert a["final"] and a["accounting"]["emitted"] == 12 and a["accounting"]["balanced"]
    assert coll.state.accounting()["emitted"] == 18
    assert json.loads((root / "current.json").read_text()) == {"run": "run-b"}
    # a restarted collector resumes the unfinished run
    again = Collector(cfg)
    assert again.state.run_id == "run-b" and again.state.diff.classified == 18


def test_reports_about_another_run_do_not_count() -> None:
    st = RunState(run_id="r2")
    # a long-lived worker's totals of the run before, then its first report of this run
    st.ingest_control(control("accounting", "infer-1-w", {"event": "totals",
                                                          "rejected": {"shape": 5}}, run="r1"))
    st.ingest_control(control("accounting", "infer-1-w", {"event": "totals",
                                                          "rejected": {"shape": 1}}, run="r2",
                              seq=1))
    assert st.accounting()["rejected"] == {"infer:shape": 1}
    assert "infer-1-w" in st.peers  # heard from: alive


def test_run_latency_percentiles_in_bounded_memory() -> None:
    from leukoflow.run.collector import LatencyHistogram

    h = LatencyHistogram()
    x = np.random.default_rng(0).lognormal(-4, 1.5, 200_000)
    size = h.counts.nbytes
    for chunk in np.array_split(x, 50):
        h.add(chunk)
    h.add([np.nan, np.inf])  # ignored
    assert h.counts.nbytes == size and h.n == x.size and h.max == x.max()
    for q in (50, 90, 99):
        assert abs(h.percentile(q) / np.percentile(x, q) - 1) < 0.015
