"""Explainer routing: selection rule, seeded sampling, non-blocking sends with counted drops."""

from __future__ import annotations

import time

import numpy as np
import zmq

from leukoflow.core import wire
from leukoflow.inference.decision import DecisionRule
from leukoflow.inference.routing import ROUTE_REASONS, ExplainRouter


def test_selection_and_seeded_sampling():
    code = np.array([0] * 1000 + [1] * 10 + [2] * 5, dtype=np.uint8)
    a = ExplainRouter(None, wire.Sender("r", "infer"), sample_rate=0.1, seed=42)
    b = ExplainRouter(None, wire.Sender("r", "infer"), sample_rate=0.1, seed=42)
    ia, ra = a.select(code)
    ib, rb = b.select(code)
    assert (ia == ib).all() and (ra == rb).all()  # reproducible
    reasons = [ROUTE_REASONS[r] for r in ra]
    assert reasons.count("uncertain") == 10 and reasons.count("ood") == 5
    assert 60 <= reasons.count("sample") <= 140  # ~100 of 1000 confident cells
    none = ExplainRouter(None, wire.Sender("r", "infer"), sample_rate=0.0)
    assert len(none.select(code)[0]) == 15


def test_send_without_peer_never_blocks_and_counts_drops():
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.connect("tcp://127.0.0.1:1")  # nobody there
        r = ExplainRouter(sock, wire.Sender("r", "infer"), classes=("a", "b"), model="m")
        dec = DecisionRule(1.0, 0.9)(np.zeros((3, 2)), np.zeros((3, 1)))
        t0 = time.monotonic()
        for _ in range(50):
            assert r.send("r", np.zeros((3, 8, 8), np.float32), [1, 2, 3], dec,
                          np.array([1, 1, 1]), {"x": 1}) is False
        assert time.monotonic() - t0 < 5  # nothing waited for a peer
        assert r.dropped == 150 and r.messages_dropped == 50 and not r.routed
        sock.close(0)
    finally:
        ctx.term()


def test_explain_message_is_valid_wire():
    ctx = zmq.Context()
    try:
        pull = ctx.socket(zmq.PULL)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push = ctx.socket(zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{port}")
        r = ExplainRouter(push, wire.Sender("run1", "infer"), classes=("a", "b"), model="m")
        logits = np.array([[3.0, 0.0], [0.0, 0.1]])
        dec = DecisionRule(1.0, 0.9)(logits, np.zeros((2, 1)))
        deadline = time.monotonic() + 10
        while not r.send("run1", np.ones((2, 8, 8), np.float16), [7, 8], dec,
                         np.array([2, 1]), {"infer_batch": 5}, labels=[0, 1]):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        msg = wire.decode(pull.recv_multipart())
        assert msg.kind == "explain" and msg.ids == [7, 8] and msg.array.dtype == np.float16
        assert msg.header["route"] == ["sample", "uncertain"]
        assert msg.header["decision"] == ["counted", "uncertain"]
        assert msg.header["labels"] == [0, 1] and msg.header["run"] == "run1"
        np.testing.assert_allclose(msg.header["probs"], dec.probs, rtol=1e-6)
        push.close(0)
        pull.close(0)
    finally:
        ctx.term()
