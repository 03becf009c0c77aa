"""Publisher: real ZeroMQ PUSH/PULL, wire-v1 crop messages, backpressure drops, accounting."""

from __future__ import annotations

import numpy as np
import pytest
import zmq
from helpers import free_port

from leukoflow.acquisition.crops import CellCrop
from leukoflow.acquisition.features import Detection
from leukoflow.acquisition.pipeline import EmittedCell
from leukoflow.acquisition.publisher import AccountingPublisher, CropPublisher, build_crops_message
from leukoflow.core import transport, wire


def _cell(i: int, with_nan: bool = False) -> EmittedCell:
    det = Detection(label=1, frame=3, cy=40.0, cx=100.0, bbox=(30, 90, 20, 20), area_px=700,
                    area_um=80.0, diameter_um=10.0, eccentricity=0.3, solidity=0.98,
                    n_peaks=1, focus=1.0, amp_std=float("nan") if with_nan else 0.02,
                    touch="")
    feats = {"area_um": 80.0, "diameter_um": 10.0, "eccentricity": 0.3, "solidity": 0.98,
             "focus": 1.0, "amp_std": det.amp_std, "pos_x": 100.0 + i, "pos_y": 40.0,
             "dm_pg": 30.0, "pha_mean": 1.0, "pha_max": 2.0, "pha_int": 700.0}
    ph = np.full((64, 64), float(i), np.float32)
    crop = CellCrop(ph, None, np.ones((64, 64), bool), (8, 68 + i, 64, 64), feats, det, "fast")
    return EmittedCell(cell_id=i, crop=crop, frame=3, t_acq_ns=123 + i, truth_id=40 + i,
                       label=i % 4, kind="lymphocyte", n_instances=4)


@pytest.fixture()
def ctx():
    c = zmq.Context()
    yield c
    c.term()


def test_crops_message_round_trip(ctx):
    ep = f"tcp://127.0.0.1:{free_port()}"
    pub = CropPublisher(ctx, "run-a", ep, sndhwm=4)
    pull = transport.make_socket(ctx, "PULL", ep, bind=False)
    try:
        cells = [_cell(0, with_nan=True), _cell(1, with_nan=True)]
        ok = False
        for _ in range(200):  # wait for the connection (IMMEDIATE: no queue before it)
            ok = pub.publish(7, cells, {"t_acq": 1, "t_recon": 2, "t_segment": 3},
                             with_truth=True)
            if ok:
                break
            pull.poll(10)
        assert ok
        msg = transport.recv(pull, timeout_ms=5000)
    finally:
        pub.close()
        pull.close()
    assert msg is not None and msg.kind == "crops"
    h = msg.header
    assert h["run"] == "run-a" and h["frame"] == 7 and h["ids"] == [0, 1]
    assert msg.array.shape == (2, 64, 64) and msg.array.dtype == np.float32
    assert float(msg.array[1, 0, 0]) == 1.0
    assert h["bbox"] == [[8, 68, 64, 64], [8, 69, 64, 64]]
    assert h["labels"] == [0, 1] and h["kinds"] == ["lymphocyte"] * 2
    assert h["truth_ids"] == [40, 41]
    assert h["frames"] == [3, 3] and h["t_acq"] == [123, 124]
    assert {"t_acq", "t_recon", "t_segment", "t_publish"} <= set(h["t"])
    assert "amp_std" not in h["feat"]  # NaN features are left out (wire forbids NaN)
    assert h["feat"]["pos_x"] == [100.0, 101.0]
    # the first successful message carries seq 0 even after refused attempts
    assert h["seq"] == 0


def test_backpressure_with_nobody_pulling_is_counted(ctx):
    ep = f"tcp://127.0.0.1:{free_port()}"
    pub = CropPublisher(ctx, "run-b", ep, sndhwm=2)
    try:
        results = [pub.publish(i, [_cell(0), _cell(1)], {"t_acq": 1}) for i in range(10)]
    finally:
        pub.close()
    assert not any(results)
    assert pub.dropped["backpressure"] == 20
    assert pub.sent_cells == 0
    assert pub.sender.seq == 0  # dropped messages give their sequence number back


def test_backpressure_with_slow_consumer(ctx):
    """A connected worker that never reads: the queue fills, then drops are counted."""
    ep = f"tcp://127.0.0.1:{free_port()}"
    pub = CropPublisher(ctx, "run-c", ep, sndhwm=2)
    pull = transport.make_socket(ctx, "PULL", ep, bind=False, hwm=2)
    try:
        sent = dropped = 0
        for _ in range(2000):
            if pub.publish(0, [_cell(0)], {"t_acq": 1}):
                sent += 1
            else:
                dropped += 1
                if sent:
                    break
            pull.poll(1)
        assert sent >= 1 and dropped >= 1
        assert pub.dropped["backpressure"] == dropped
        # every message that was accepted is in the queue, in order, with consecutive seq
        got = []
        while (m := transport.recv(pull, timeout_ms=200)) is not None:
            got.append(m.seq)
        assert got == list(range(sent))
    finally:
        pub.close()
        pull.close()


def test_accounting_and_eos_reach_the_collector(ctx):
    ep = f"tcp://127.0.0.1:{free_port()}"
    coll = transport.make_socket(ctx, "PULL", ep, bind=True)
    acc = AccountingPublisher(ctx, "run-d", ep)
    try:
        stats = {"frames": np.int64(5), "cells_dropped": {"backpressure": 2},
                 "ratio": float("nan")}
        assert acc.send("eos", stats, timeout_ms=3000)
        msg = transport.recv(coll, timeout_ms=5000)
    finally:
        acc.close()
        coll.close()
    assert msg.kind == "control" and msg.header["cmd"] == "eos"
    assert msg.header["stats"]["frames"] == 5
    assert msg.header["stats"]["cells_dropped"] == {"backpressure": 2}
    assert msg.header["stats"]["ratio"] is None


def test_accounting_without_collector_fails_fast(ctx):
    acc = AccountingPublisher(ctx, "run-e", f"tcp://127.0.0.1:{free_port()}")
    try:
        assert not acc.send("accounting", {"frames": 1})
        assert acc.failed == 1
    finally:
        acc.close(linger_ms=0)


def test_wire_rejects_nothing_we_send():
    s = wire.Sender(run="r", role="acquire")

    msg = build_crops_message(s, 0, [_cell(0)], {"t_acq": 5}, with_truth=False, dtype="<f2")
    frames = wire.encode(msg)
    back = wire.decode([bytes(f) for f in frames])
    assert back.array.dtype == np.float16 and "labels" not in back.header
