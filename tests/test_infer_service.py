"""The inference worker as a service: real ZeroMQ sockets, worker in a thread.

The test plays acquisition (PUSH bound), collector (PULL bound) and explainer (PULL bound)
around a worker that connects to all three, as in production.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import msgpack
import numpy as np
import pytest
import zmq
from helpers import ResultsSink, crop_message, offline_predict

from leukoflow.benchmarks.workload_infer import make_test_artifact, synthetic_crops
from leukoflow.core import wire
from leukoflow.inference.worker import InferConfig, InferWorker

SIZE = 32


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_test_artifact(tmp_path_factory.mktemp("art") / "lenet-test", input_size=SIZE)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


class Rig:
    """Acquisition PUSH + collector sink + explainer PULL around one worker."""

    def __init__(self, ctx, worker, producer, sink, explain):
        self.ctx, self.worker, self.producer, self.sink, self.explain = (
            ctx, worker, producer, sink, explain)
        self.sender = wire.Sender("run-test", "acquire")

    def send(self, msg: wire.Message) -> None:
        self.producer.send_multipart(wire.encode(msg), copy=False)

    def send_crops(self, crops, first_id, **kw) -> None:
        self.send(crop_message(self.sender, crops, first_id, **kw))

    def eos(self) -> None:
        self.send(self.sender.message("control", cmd="eos", stats={"cells_emitted": 0}))

    def totals(self):
        """The worker's latest totals message (after eos)."""
        tot = [m for m in self.sink.control if m.header["stats"].get("event") == "totals"]
        return tot[-1].header["stats"] if tot else None


@contextmanager
def rig(artifact, cache_dir, explain_mode="read", **cfg):
    """explain_mode: 'read' (a reader drains it), 'stall' (bound, never read), 'none'."""
    ctx = zmq.Context()
    producer = ctx.socket(zmq.PUSH)
    producer.setsockopt(zmq.LINGER, 0)
    port = producer.bind_to_random_port("tcp://127.0.0.1")
    sink = ResultsSink(ctx, "tcp://127.0.0.1:*")
    explain = ctx.socket(zmq.PULL)
    explain.setsockopt(zmq.LINGER, 0)
    explain.setsockopt(zmq.RCVHWM, 1)
    explain.setsockopt(zmq.RCVBUF, 4096)
    eport = explain.bind_to_random_port("tcp://127.0.0.1")
    explain_received = []
    stop_reader = False

    def reader():
        while not stop_reader:
            if explain.poll(10):
                explain_received.append(wire.decode(explain.recv_multipart()))

    import threading

    th = None
    if explain_mode == "read":
        th = threading.Thread(target=reader, daemon=True)
        th.start()
    params = dict(backend="torch-cpu", max_batch=32, max_delay_ms=5.0,
                  crops_endpoint=f"tcp://127.0.0.1:{port}", results_endpoint=sink.endpoint,
                  explain_endpoint=f"tcp://127.0.0.1:{eport}", metrics_port=0,
                  cache_dir=cache_dir, heartbeat_s=0.2)
    params.update(cfg)
    worker = InferWorker(InferConfig(**params), artifact=artifact).start()
    assert worker.ready.wait(60), worker.error
    r = Rig(ctx, worker, producer, sink, explain)
    r.explain_received = explain_received
    try:
        yield r
    finally:
        worker.stop()
        worker.join(30)
        stop_reader = True
        if th is not None:
            th.join(2)
        sink.close()
        producer.close(0)
        explain.close(0)
        ctx.term()
    assert worker.error is None, worker.error


def _by_id(results):
    out = {}
    for m in results:
        h = m.header
        for j, cid in enumerate(h["ids"]):
            out[cid] = (h["pred"][j], h["decision"][j], m.array[j], h["conf"][j])
    return out


def _feed(r, x, sizes, labels=None):
    i = 0
    for k, n in enumerate(sizes):
        lab = None if labels is None else labels[i:i + n].tolist()
        r.send_crops(x[i:i + n], first_id=1000 + i, frame=k, labels=lab)
        i += n
    return i


@pytest.mark.parametrize("backend", ["torch-cpu", "onnxruntime"])
def test_service_predictions_equal_offline(artifact, cache_dir, backend):
    x = synthetic_crops(240, SIZE, seed=11)
    ref = offline_predict(artifact, x)
    sizes = [1, 7, 37, 3, 64, 16, 2, 50, 60]
    assert sum(sizes) == 240
    labels = np.arange(240) % 4
    with rig(artifact, cache_dir, backend=backend) as r:
        _feed(r, x, sizes, labels)
        r.eos()
        assert r.sink.wait_for(lambda s: s.cells() >= 240 and r.totals() is not None, 60)
        res = _by_id(r.sink.results)
        assert sorted(res) == list(range(1000, 1240))
        pred = np.array([res[1000 + i][0] for i in range(240)])
        dec = np.array([res[1000 + i][1] for i in range(240)])
        probs = np.stack([res[1000 + i][2] for i in range(240)])
        if backend == "torch-cpu":  # exact decisions; probabilities up to float32 rounding
            np.testing.assert_array_equal(pred, ref["pred"])  # of other batch compositions
            np.testing.assert_array_equal(dec, ref["decision"])
            np.testing.assert_allclose(probs, ref["probs"], rtol=0, atol=1e-6)
        else:  # same function in another runtime: float32 rounding only
            np.testing.assert_allclose(probs, ref["probs"], atol=1e-5)
            near = (np.abs(ref["conf"] - artifact.confidence_threshold) < 1e-4) | (
                np.abs(ref["ood_score"] - artifact.ood["threshold"])
                < 1e-4 * abs(artifact.ood["threshold"]))
            assert (dec[~near] == ref["decision"][~near]).all()
            assert (pred[~near] == ref["pred"][~near]).all()
        # labels travel with the cells
        for m in r.sink.results:
            assert m.header["labels"] == [(c - 1000) % 4 for c in m.header["ids"]]
        # the acquisition eos is forwarded after every result, then the worker totals
        fwd = [m for m in r.sink.control if m.header.get("cmd") == "eos"]
        assert len(fwd) == 1 and fwd[0].header["sender"] == r.sender.sender
        tot = r.totals()
        assert tot["received_cells"] == 240 and tot["pending"] == 0
        assert tot["counted"] + tot["uncertain"] + tot["ood"] == 240
        assert tot["counted"] == int((ref["decision"] == "counted").sum()) or backend != "torch-cpu"
        assert r.worker.accounting.balanced()
        # the worker's own stream to the collector has no sequence holes
        mine = [m.header["seq"] for m in r.sink.results + r.sink.control + r.sink.heartbeats
                if m.header["sender"] == r.worker.sender.sender]
        assert sorted(mine) == list(range(len(mine)))
        snap = r.worker.differential.snapshot()
        assert snap["counted"] == tot["counted"]


def test_slow_feeder_waits_bounded_and_full_batches_go_at_once(artifact, cache_dir):
    max_delay_ms = 100.0
    x = synthetic_crops(20, SIZE, seed=3)
    with rig(artifact, cache_dir, max_batch=64, max_delay_ms=max_delay_ms) as r:
        for i in range(20):  # one cell every 20 ms: batches must close on the delay
            r.send_crops(x[i:i + 1], first_id=i)
            time.sleep(0.02)
        assert r.sink.wait_for(lambda s: s.cells() >= 20, 30)
        compute = max(m.header["t"]["infer_done"] - m.header["t"]["infer_batch"]
                      for m in r.sink.results) * 1e-9
        for m in r.sink.results:
            t = m.header["t"]
            wait = (t["infer_batch"] - t["acquire"]) * 1e-9
            # max_delay + one batch compute, plus a generous allowance for a loaded machine
            assert wait <= max_delay_ms * 1e-3 + compute + 0.5, wait
        batch_hist = r.worker.metrics["leukoflow_batch_size"]
        n_batches = r.worker.metrics["leukoflow_inference_exec_count_total"]._value.get()
        assert 2 <= n_batches < 20  # the delay grouped cells, but no batch waited for 64
        assert batch_hist._sum.get() == 20
    # a full batch goes at once even with a very long max_delay
    x = synthetic_crops(64, SIZE, seed=4)
    with rig(artifact, cache_dir, max_batch=64, max_delay_ms=60_000.0) as r:
        t0 = time.monotonic()
        r.send_crops(x, first_id=0)
        assert r.sink.wait_for(lambda s: s.cells() >= 64, 30)
        assert time.monotonic() - t0 < 30  # far below the 60 s max_delay
        # and a partial batch does not go before max_delay
        r.send_crops(x[:5], first_id=100)
        time.sleep(0.3)
        assert r.sink.cells() == 64
        assert r.worker.batcher.pending == 5


def _run_counting(artifact, cache_dir, mode, x):
    with rig(artifact, cache_dir, explain_mode=mode, explain_sample_rate=1.0,
             explain_hwm=1, explain_sndbuf_bytes=8192) as r:
        _feed(r, x, [16] * (x.shape[0] // 16))
        r.eos()
        assert r.sink.wait_for(lambda s: s.cells() >= x.shape[0] and r.totals() is not None,
                               60)
        return r.sink.cells(), r.worker.router.dropped, dict(r.worker.router.routed), \
            len(r.explain_received), r.worker.metrics.m.exposition().decode()


def test_stalled_explainer_never_blocks_counting(artifact, cache_dir):
    x = synthetic_crops(320, SIZE, seed=5)
    cells_ok, dropped_ok, routed_ok, got_ok, _ = _run_counting(artifact, cache_dir, "read", x)
    cells_st, dropped_st, routed_st, got_st, text = _run_counting(artifact, cache_dir,
                                                                  "stall", x)
    cells_none, dropped_none, _, _, _ = _run_counting(artifact, cache_dir, "none", x)
    assert cells_ok == cells_st == cells_none == 320  # every cell counted in all cases
    assert got_ok > 0 and sum(routed_ok.values()) > 0
    assert dropped_st > 0 and dropped_none > 0  # overflow dropped and counted ...
    assert sum(routed_st.values()) + dropped_st == 320  # ... every flagged cell accounted
    assert 'leukoflow_dropped_total{reason="explainer_full",stage="explain"}' in text


def test_gaps_and_sender_restart_are_counted(artifact, cache_dir):
    x = synthetic_crops(8, SIZE, seed=6)
    with rig(artifact, cache_dir) as r:
        s = r.sender
        r.send_crops(x[:2], first_id=0)       # seq 0
        s.seq += 3                            # seq 1..3 lost
        r.send_crops(x[2:4], first_id=2)      # seq 4
        r.sender = wire.Sender("run-test", "acquire")  # restarted process: new sender id
        r.send_crops(x[4:6], first_id=4)
        r.sender.seq += 1                     # one more lost from the new sender
        r.send_crops(x[6:8], first_id=6)
        r.eos()
        assert r.sink.wait_for(lambda s_: r.totals() is not None, 30)
        tot = r.totals()
        assert tot["gaps"] == 4
        assert tot["sender_restarts"] == 1
        assert tot["received_cells"] == 8 and tot["pending"] == 0
        text = r.worker.metrics.m.exposition().decode()
        assert "leukoflow_sequence_gaps_total 4.0" in text


def test_bad_messages_are_rejected_with_reasons_and_worker_keeps_running(artifact, cache_dir,
                                                                         caplog):
    x = synthetic_crops(10, SIZE, seed=7)
    caplog.set_level(logging.ERROR, logger="leukoflow.inference.worker")
    with rig(artifact, cache_dir) as r:
        s = r.sender
        # corrupt msgpack
        r.producer.send_multipart([b"\xc1\xff\x00garbage", b""])
        # wrong number of frames
        r.producer.send_multipart([b"only-one-frame"])
        # wrong dtype: float64 payload (not on the allow-list), 2 listed cells
        h = msgpack.unpackb(wire.encode(crop_message(s, x[:2], 500))[0])
        f8 = x[:2].astype(np.float64)
        r.producer.send_multipart([msgpack.packb({**h, "dtype": "<f8"}), f8.tobytes()])
        # payload size mismatch (3 cells announced, 2 sent)
        h = msgpack.unpackb(wire.encode(crop_message(s, x[:3], 600))[0])
        r.producer.send_multipart([msgpack.packb(h), x[:2].tobytes()])
        # wrong crop size for the model: 16 x 16 crops (twice: said once, counted each time)
        r.send_crops(synthetic_crops(2, 16, seed=1), first_id=700)
        r.send_crops(synthetic_crops(2, 16, seed=2), first_id=702)
        # NaN in two of five crops: only those two are rejected
        y = x[:5].copy()
        y[1, 3, 3] = np.nan
        y[4, 0, 0] = np.inf
        msg = crop_message(s, y, 800)
        r.producer.send_multipart(wire.encode(msg, validate=False), copy=False)
        # and a good message afterwards
        r.send_crops(x[5:10], first_id=900)
        r.eos()
        assert r.sink.wait_for(lambda s_: r.totals() is not None, 30)
        tot = r.totals()
        assert tot["rejected_messages"]["header_decode"] == 1
        assert tot["rejected_messages"]["frames"] == 1
        assert tot["rejected"]["dtype"] == 2
        assert tot["rejected"]["payload_size"] == 3
        assert tot["rejected"]["shape"] == 4
        assert tot["rejected"]["non_finite"] == 2
        got = sorted(c for m in r.sink.results for c in m.header["ids"])
        assert got == [800, 802, 803] + list(range(900, 905))
        rej = [m.header["stats"] for m in r.sink.control
               if m.header["stats"].get("event") == "rejected"]
        ids: dict[str, list[int]] = {}
        for st in rej:
            ids[st["reason"]] = sorted(ids.get(st["reason"], []) + st["ids"])
        assert ids["non_finite"] == [801, 804]
        assert ids["shape"] == [700, 701, 702, 703]
        assert ids["dtype"] == [500, 501]
        assert tot["received_cells"] == 2 + 3 + 4 + 5 + 5
        assert r.worker.accounting.balanced()
        assert r.worker.finished.is_set() is False  # still serving
        # the size mismatch is named once, with both sizes and the fix
        said = [rec.getMessage() for rec in caplog.records if "would be rejected" in
                rec.getMessage()]
        assert len(said) == 1 and "16 px crops" in said[0] and f"takes {SIZE} px" in said[0]


def test_metrics_health_and_control_stop(artifact, cache_dir):
    with rig(artifact, cache_dir) as r:
        port = r.worker.metrics_port
        base = f"http://127.0.0.1:{port}"
        assert urllib.request.urlopen(base + "/readyz", timeout=5).status == 200
        assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
        r.send_crops(synthetic_crops(5, SIZE, seed=8), first_id=0)
        assert r.sink.wait_for(lambda s: s.cells() >= 5, 30)
        text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        for fam in ("leukoflow_inference_count_total 5.0",
                    "leukoflow_inference_exec_count_total",
                    "leukoflow_inference_request_success_total 1.0",
                    "leukoflow_inference_queue_duration_seconds_bucket",
                    "leukoflow_inference_compute_infer_duration_seconds_bucket",
                    "leukoflow_e2e_latency_seconds_count 5.0",
                    "leukoflow_batch_size_bucket", "leukoflow_confidence_count 5.0",
                    "leukoflow_ood_score_count 5.0", 'leukoflow_cells_classified_total{class=',
                    'leukoflow_decisions_total{decision="counted"}',
                    'leukoflow_model_info{backend="torch-cpu"', "leukoflow_ready 1.0"):
            assert fam in text, fam
        # the worker introduced itself with every parameter it runs with
        hello = [m for m in r.sink.control if m.header["cmd"] == "hello"]
        assert len(hello) == 1
        st = hello[0].header["stats"]
        assert st["config"]["max_batch"] == 32 and st["backend"]["backend"] == "torch-cpu"
        assert st["decision"]["temperature"] == artifact.temperature
        assert st["input_size"] == SIZE  # what crop size this worker can take
        # a heartbeat with totals reaches the collector
        assert r.sink.wait_for(lambda s: len(s.heartbeats) > 0, 10)
        # control stop: graceful exit, readiness gone
        r.send(r.sender.message("control", cmd="stop", stats={}))
        r.worker.join(30)
        assert r.worker.finished.is_set()
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(base + "/readyz", timeout=2)


def test_undeliverable_results_end_as_counted_rejections(artifact, cache_dir):
    """No collector: results that cannot be queued within the timeout are rejected (counted),
    never silently lost, and the worker keeps serving."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"tcp://127.0.0.1:{s.getsockname()[1]}"  # nobody listens here
    with rig(artifact, cache_dir, results_endpoint=dead, results_hwm=1,
             results_timeout_ms=20) as r:
        x = synthetic_crops(40, SIZE, seed=9)
        for i in range(10):
            r.send_crops(x[4 * i:4 * i + 4], first_id=4 * i)
        acc = r.worker.accounting
        deadline = time.monotonic() + 30
        while acc.finished < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert acc.received_cells == 40 and acc.finished == 40 and acc.balanced()
        assert acc.rejected["results_backpressure"] > 0
        assert acc.counted + acc.uncertain + acc.ood + acc.rejected_cells == 40


def test_two_workers_share_one_acquisition(artifact, cache_dir):
    """PUSH/PULL fan-out: every cell is classified exactly once by one of the workers, and
    the collector can check completeness from ``src_sender``/``src_seq``."""
    ctx = zmq.Context()
    producer = ctx.socket(zmq.PUSH)
    producer.setsockopt(zmq.LINGER, 0)
    port = producer.bind_to_random_port("tcp://127.0.0.1")
    sink = ResultsSink(ctx, "tcp://127.0.0.1:*")
    workers = [InferWorker(InferConfig(
        backend="torch-cpu", max_batch=16, max_delay_ms=2.0,
        crops_endpoint=f"tcp://127.0.0.1:{port}", results_endpoint=sink.endpoint,
        explain_endpoint="", metrics_port=-1, cache_dir=cache_dir), artifact=artifact).start()
        for _ in range(2)]
    try:
        for w in workers:
            assert w.ready.wait(60), w.error
        time.sleep(0.2)  # both connected, so round-robin reaches both
        snd = wire.Sender("fan", "acquire")
        x = synthetic_crops(120, SIZE, seed=12)
        for i in range(30):
            producer.send_multipart(wire.encode(crop_message(snd, x[4 * i:4 * i + 4], 4 * i)))
        assert sink.wait_for(lambda s: s.cells() >= 120, 60)
        ids = sorted(c for m in sink.results for c in m.header["ids"])
        assert ids == list(range(120))  # each cell exactly once
        by_worker = {m.header["sender"] for m in sink.results}
        assert len(by_worker) == 2  # both workers took a share
        assert sorted({m.header["src_seq"] for m in sink.results}) == list(range(30))
        assert sum(w.accounting.received_cells for w in workers) == 120
    finally:
        for w in workers:
            w.stop()
        for w in workers:
            w.join(30)
        sink.close()
        producer.close(0)
        ctx.term()
    assert all(w.error is None for w in workers)
