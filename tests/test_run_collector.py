"""Collector: exact accounting, duplicates, rejections, live state, metrics and recording.

Stand-in acquisition/inference services (tests/helpers.py) send real wire messages
over real ZeroMQ sockets to a real collector running in a thread.
"""

from __future__ import annotations

import json
import threading
import urllib.request

import h5py
import numpy as np
import pytest
from helpers import (
    FakeAcquisition,
    FakeWorker,
    endpoint,
    fake_classify,
    free_port,
    make_crops,
    wait_for,
)

from leukoflow.acquisition.pipeline import PipelineConfig, identity, parse_identity
from leukoflow.core import transport, wire
from leukoflow.core.vocabulary import CLASS_NAMES
from leukoflow.run.collector import (
    CELL_DTYPE,
    CellLog,
    Collector,
    CollectorConfig,
    IdSet,
    RunState,
    read_cell_log,
)


def test_idset_detects_repeats_dense_and_sparse() -> None:
    s = IdSet(bitmap_limit=1000)
    assert s.add_new([1, 2, 3]).tolist() == [True, True, True]
    assert s.add_new([3, 4, 4, 5000, 5000]).tolist() == [False, True, False, True, False]
    assert s.add_new([70_000 - 1]).tolist() == [True]  # beyond the limit: the set path
    assert 4 in s and 5000 in s and 7 not in s
    assert len(s) == 6


def test_cell_log_survives_torn_record(tmp_path) -> None:
    log = CellLog(tmp_path / "cells.bin")
    rec = np.zeros(3, dtype=CELL_DTYPE)
    rec["id"] = [1, 2, 3]
    log.append(rec)
    log.close()
    with open(tmp_path / "cells.bin", "ab") as fh:  # a kill in the middle of a write
        fh.write(b"\x01" * 10)
    assert read_cell_log(tmp_path / "cells.bin")["id"].tolist() == [1, 2, 3]
    log2 = CellLog(tmp_path / "cells.bin")  # reopening truncates the torn tail
    log2.append(rec[:1])
    log2.close()
    assert read_cell_log(tmp_path / "cells.bin")["id"].tolist() == [1, 2, 3, 1]


def _results_header(ids, probs, dec, run="r"):
    return {"kind": "results", "run": run, "sender": "infer-1-a", "seq": 0, "t": {"a": 1},
            "ids": ids, "pred": probs.argmax(1).tolist(), "decision": dec,
            "conf": probs.max(1).tolist(), "ood_score": [0.0] * len(ids),
            "classes": list(CLASS_NAMES), "model": "m"}


def test_runstate_balances_and_ignores_duplicates() -> None:
    st = RunState(run_id="r")
    crops, labels = make_crops(40)
    probs, dec, _, _ = fake_classify(crops)
    h = _results_header(list(range(40)), probs, dec)
    st.ingest_results(h, probs)
    st.ingest_results(h, probs)  # the same cells again: duplicates, never counted twice
    st.ingest_control({"cmd": "eos", "sender": "acquire-1-x", "stats": {"emitted": 45}})
    acc = st.accounting()
    assert acc["duplicates"] == 40
    assert acc["in_flight"] == 5 and not acc["balanced"]
    final = st.accounting(final=True)
    assert final["lost"] == {"pipeline:unattributed": 5} and final["balanced"]
    assert final["dropped"] == {} and final["lost_total"] == 5
    assert final["counted"] + final["uncertain"] + final["ood"] == 40
    assert final["ood"] == int((labels == -1).sum())
    # results for another class order are rejected, not counted
    bad = dict(h, ids=[100, 101], classes=list(reversed(CLASS_NAMES)), pred=[0, 0],
               decision=["counted"] * 2, conf=[0.9, 0.9], ood_score=[0, 0])
    st.ingest_results(bad, probs[:2])
    assert st.accounting()["rejected"] == {"collector:class_mismatch": 2}


def _start(cfg: CollectorConfig) -> tuple[Collector, threading.Thread, dict]:
    coll = Collector(cfg)
    out: dict = {}
    th = threading.Thread(target=lambda: out.update(coll.run(install_signals=False)),
                          daemon=True)
    th.start()
    assert wait_for(lambda: coll._health is not None and coll._health.ready, 10)
    return coll, th, out


@pytest.mark.parametrize("record", [False, True])
def test_collector_end_to_end_with_standins(tmp_path, record: bool) -> None:
    res_ep, live_ep, crops_ep = endpoint(), endpoint(), endpoint()
    tap_out = endpoint() if record else ""
    mport = free_port()
    cfg = CollectorConfig(results=res_ep, live=live_ep, metrics_port=mport,
                          run_dir=str(tmp_path / "run"), run_id="test",
                          record=str(tmp_path / "rec.rtdc") if record else "",
                          tap_in=crops_ep if record else "", tap_out=tap_out,
                          drain_timeout_s=3.0, flush_interval_s=0.2)
    acq = FakeAcquisition(crops_ep, res_ep)
    coll, th, out = _start(cfg)
    worker = FakeWorker(tap_out or crops_ep, res_ep, duplicate_every=5, drop_every=11,
                        reject_every=13)
    worker.start()
    import zmq

    sub = transport.make_socket(zmq.Context.instance(), "SUB", live_ep, bind=False)
    crops, labels = make_crops(600, seed=3)
    for k in range(60):  # 60 frames of 10 cells
        sl = slice(10 * k, 10 * k + 10)
        acq.send_crops(list(range(10 * k, 10 * k + 10)), crops[sl], labels[sl], frame=k)
        if k % 20 == 0:
            acq.account()
    # live state arrives on the PUB socket while the run goes on
    live = transport.recv(sub, timeout_ms=5000)
    assert live is not None and live.kind == "heartbeat"
    assert "accounting" in live.header["stats"]
    body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
    assert "leukoflow_run_cells_total" in body and "leukoflow_differential_ratio_lower" in body
    # the acquisition reports the pipeline it cut the crops with (a standalone collector has
    # no run_params: its recording and summary carry this identity)
    ident = identity(PipelineConfig())
    acq.account(eos=True, pipeline={"id_parts": [ident["id"][:512], ident["id"][512:]],
                                    "hash": ident["hash"], "generation": ident["generation"]})
    th.join(30)
    assert not th.is_alive()
    worker.stop_event.set()
    worker.join(5)
    acq.close()
    sub.close(0)

    acc = out["accounting"]
    dropped_msgs = [i for i in range(1, 61) if i % 11 == 0 and i % 13 != 0]
    rejected_msgs = [i for i in range(1, 61) if i % 13 == 0]
    assert acc["emitted"] == 600
    assert acc["balanced"], acc
    assert acc["rejected"] == {"infer:non_finite": 10 * len(rejected_msgs)}
    # the stand-ins carry no source sequence fields: the loss is only known at the end
    assert acc["lost"] == {"pipeline:unattributed": 10 * len(dropped_msgs)}
    assert acc["duplicates"] > 0
    assert acc["counted"] + acc["uncertain"] + acc["ood"] == 600 - 10 * (
        len(dropped_msgs) + len(rejected_msgs))
    # the differential equals an independent count of the cells that got results
    recs = read_cell_log(tmp_path / "run" / "cells.bin")
    assert len(recs) == len(np.unique(recs["id"])) == acc["counted"] + acc["uncertain"] + acc["ood"]
    counted = recs[recs["decision"] == 0]
    for i, name in enumerate(CLASS_NAMES):
        assert out["differential"]["classes"][name]["count"] == int((counted["pred"] == i).sum())
    assert out["truth"]["labelled"] == int((recs["label"] >= 0).sum())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final"] and summary["accounting"] == acc
    assert summary["params"]["pipeline"]["hash"] == ident["hash"]

    if record:
        import dclab

        n_results = acc["counted"] + acc["uncertain"] + acc["ood"]
        with h5py.File(tmp_path / "rec.rtdc", "r") as h5:
            rec_id = h5.attrs["user:pipeline id"]
            assert h5.attrs["user:pipeline hash"] == ident["hash"]
        # parsed back, it is the pipeline configuration the acquisition ran with
        assert parse_identity(rec_id).config == PipelineConfig()
        with dclab.new_dataset(tmp_path / "rec.rtdc") as ds:
            assert len(ds) == n_results
            for feat in ("qpi_pha", "ml_score_neu", "ml_score_lym", "userdef0", "userdef2",
                         "userdef6", "area_um", "frame", "time"):
                assert feat in ds.features_innate, feat
            assert "not_a_dclab_feature" not in ds.features_innate
            ids = np.asarray(ds["userdef6"]).astype(int)
            order = np.argsort(ids)
            by_id = {int(r["id"]): r for r in recs}
            for j in order[:50]:
                r = by_id[int(ids[j])]
                assert np.asarray(ds["userdef2"])[j] == r["decision"]
                assert np.asarray(ds["userdef0"])[j] == r["label"]
                np.testing.assert_array_equal(ds["qpi_pha"][j], crops[ids[j]])
            assert ds.config["user"]  # run parameters are in the metadata


def test_collector_rejects_garbage_without_crashing(tmp_path) -> None:
    import zmq

    res_ep = endpoint()
    cfg = CollectorConfig(results=res_ep, live="", metrics_port=0,
                          run_dir=str(tmp_path / "run"), drain_timeout_s=0.3)
    coll, th, out = _start(cfg)
    push = transport.make_socket(zmq.Context.instance(), "PUSH", res_ep, bind=False,
                                 immediate=False)
    push.send_multipart([b"\x93garbage", b""])
    push.send_multipart([b"one frame only"])
    s = wire.Sender("r", "acquire")
    transport.send(push, s.message("control", cmd="eos", stats={"emitted": 0}), block=True)
    th.join(20)
    push.close(0)
    assert not th.is_alive()
    rej = out["accounting"]["messages_rejected"]
    assert sum(rej.values()) == 2 and "frames" in rej


def test_collector_restart_restores_counts(tmp_path) -> None:
    """A restarted collector rebuilds its counts from the cell log and saved reports."""
    run_dir = tmp_path / "run"
    st_cfg = CollectorConfig(results=endpoint(), live="", metrics_port=0, run_dir=str(run_dir))
    first = Collector(st_cfg)
    crops, _ = make_crops(30)
    probs, dec, _, _ = fake_classify(crops)
    recs, _ = first.state.ingest_results(_results_header(list(range(30)), probs, dec), probs)
    first.state.ingest_control({"cmd": "accounting", "sender": "acquire-1-x",
                                "stats": {"emitted": 30}})
    first.cell_log.append(recs)
    first._flush()  # what the loop does every flush interval; then the process is killed
    second = Collector(st_cfg)
    assert second.state.collector_restarts == 1
    assert second.state.diff.classified == 30
    assert second.state.accounting()["emitted"] == 30
    # a result that the predecessor counted already is a duplicate now
    _, new = second.state.ingest_results(_results_header([5], probs[:1], dec[:1]), probs[:1])
    assert not new.any()
