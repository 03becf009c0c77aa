"""``/readyz`` follows the backend: not ready with a reason after repeated failures, ready
again after it recovers (like Triton's model readiness). A real worker with real sockets
and HTTP; the backend faults are injected into the real backend object (a GPU that fails
cannot be had here)."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
import zmq
from helpers import ResultsSink, crop_message, http_get, wait_for

from leukoflow.benchmarks.workload_infer import make_test_artifact, synthetic_crops
from leukoflow.core import wire
from leukoflow.core.metrics import FailureGate
from leukoflow.inference.worker import BACKEND_FAILURES_NOT_READY, InferConfig, InferWorker

SIZE = 32


def test_failure_gate_trips_and_recovers() -> None:
    calls = []
    g = FailureGate(lambda ok, why: calls.append((ok, why)), "backend", fail_after=2)
    g.success()
    assert calls == []  # never cleared: nothing to restore
    g.failure(RuntimeError("x"))
    assert calls == []
    g.failure(RuntimeError("device lost"))
    assert calls == [(False, "backend failed 2 times in a row: device lost")]
    g.failure("again")
    assert calls[-1][0] is False and "3 times" in calls[-1][1]
    g.success()
    assert calls[-1] == (True, "")
    with pytest.raises(ValueError):
        FailureGate(lambda *a: None, fail_after=0)


def test_worker_not_ready_while_backend_fails_and_ready_after(tmp_path) -> None:
    art = make_test_artifact(tmp_path / "art", input_size=SIZE)
    ctx = zmq.Context()
    producer = ctx.socket(zmq.PUSH)
    producer.setsockopt(zmq.LINGER, 0)
    port = producer.bind_to_random_port("tcp://127.0.0.1")
    sink = ResultsSink(ctx, "tcp://127.0.0.1:*")
    cfg = InferConfig(backend="torch-cpu", max_batch=8, max_delay_ms=1.0,
                      crops_endpoint=f"tcp://127.0.0.1:{port}", results_endpoint=sink.endpoint,
                      explain_endpoint="", metrics_port=0, cache_dir=str(tmp_path / "c"),
                      heartbeat_s=0.2)
    worker = InferWorker(cfg, artifact=art).start()
    try:
        assert worker.ready.wait(120), worker.error
        hport = worker.health.port
        readyz = f"http://127.0.0.1:{hport}/readyz"
        assert http_get(readyz) == (200, "ready\n")
        sender = wire.Sender("run-ready", "acquire")
        x = synthetic_crops(64, SIZE, seed=1)
        real_submit = worker._backend.submit
        failures = {"n": 0}

        def broken(*a, **kw):
            failures["n"] += 1
            raise RuntimeError("injected: CUDA error: an illegal memory access")

        worker._backend.submit = broken
        sent = 0
        for k in range(BACKEND_FAILURES_NOT_READY + 2):  # one batch per message
            producer.send_multipart(wire.encode(crop_message(sender, x[sent:sent + 4], sent,
                                                             frame=k)))
            sent += 4
            assert wait_for(lambda k=k: failures["n"] >= k + 1, 60)
            if k + 1 < BACKEND_FAILURES_NOT_READY:
                assert http_get(readyz)[0] == 200  # isolated failures: still ready
        code, body = http_get(readyz)
        assert code == 503, body
        assert "backend failed" in body and "illegal memory access" in body
        assert worker.error is None  # not ready, still serving (it recovers below)
        worker._backend.submit = real_submit  # the device recovers
        producer.send_multipart(wire.encode(crop_message(sender, x[sent:sent + 4], sent,
                                                         frame=99)))
        assert wait_for(lambda: http_get(readyz) == (200, "ready\n"), 60)
        assert wait_for(lambda: sum(m.n for m in sink.results) == 4, 30)
        with urllib.request.urlopen(f"http://127.0.0.1:{hport}/metrics", timeout=5) as r:
            assert "leukoflow_ready 1.0" in r.read().decode()
    finally:
        worker.stop()
        worker.join(30)
        sink.close()
        producer.close(0)
        ctx.term()
    assert worker.error is None, worker.error
