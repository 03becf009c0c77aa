"""Explainer flood against the real inference worker: counting never waits for explanations.

Real parts: the :class:`~leukoflow.inference.worker.InferWorker` (its own thread), the
:class:`~leukoflow.explain.service.ExplainService` (receiver and worker threads, HTTP health), real
ZeroMQ sockets over loopback TCP for crops, results and explain messages. The test plays
acquisition (PUSH bound) and the collector (PULL bound). Every cell is flagged
(``explain_sample_rate=1``: OOD and uncertain cells always, counted cells by the sample
rule), and the explainer is deliberately stalled until the producer's whole run has been
counted:

* ``slow``: the explanation thread blocks on the first cell; the receiver keeps draining
  the socket into the bounded backlog, which drops its oldest cells;
* ``stalled``: the receiver blocks too, so the worker's non-blocking explain sends overflow
  and are dropped (and counted) at the worker.

Asserted: every cell reaches the collector exactly once while the explainer is still
stalled (so the worker never waited for it); flagged = delivered + dropped at the worker;
the explainer's backlog never exceeds its bound; each delivered cell ends explained or
counted as dropped. No wall-clock assertions (throughput: ``benchmarks/bench_explain.py``).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import zmq
from helpers import ResultsSink, crop_message, free_port, wait_for

from leukoflow.benchmarks.workload_infer import make_test_artifact, synthetic_crops
from leukoflow.core import wire
from leukoflow.explain.model import ModelBundle
from leukoflow.explain.service import ExplainConfig, ExplainService
from leukoflow.inference.worker import InferConfig, InferWorker

SIZE = 64
N_CELLS = 960
PER_MSG = 16
BACKLOG = 8


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_test_artifact(tmp_path_factory.mktemp("art") / "lenet-flood", input_size=SIZE)


class StalledExplainer(ExplainService):
    """The real explain service, held up until :attr:`release` is set.

    ``stall_receive`` also holds the receiver thread (nothing is read from the socket)."""

    stall_receive = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.release = threading.Event()
        self.stalled_cells = 0

    def _explain(self, cells: Any) -> None:
        if not self.release.is_set():
            self.stalled_cells = len(cells)
            self.release.wait(300)
        super()._explain(cells)

    def _handle(self, msg: Any) -> None:
        if self.stall_receive and not self.release.is_set():
            self.release.wait(300)
        super()._handle(msg)


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    total = 0.0
    for ln in text.splitlines():
        if not ln.startswith(name + "{") and not ln.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in ln for k, v in labels.items()):
            total += float(ln.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("mode", ["slow", "stalled"])
def test_flood_of_flagged_cells_never_blocks_counting(artifact, tmp_path, mode):
    bundle = ModelBundle.from_artifact(str(artifact.path))
    cfg = ExplainConfig(endpoint=f"tcp://127.0.0.1:{free_port()}", metrics_port=0,
                        run_dir=str(tmp_path), backlog=BACKLOG, hwm=1, lime_samples=30,
                        lime_segments=(10,), methods=("lime",), png=False)
    svc = StalledExplainer(cfg, bundle=bundle)
    svc.stall_receive = mode == "stalled"
    svc.start()
    assert wait_for(lambda: svc.health is not None and svc.health.ready, 120), "explainer not ready"

    ctx = zmq.Context()
    producer = ctx.socket(zmq.PUSH)
    producer.setsockopt(zmq.LINGER, 0)
    port = producer.bind_to_random_port("tcp://127.0.0.1")
    sink = ResultsSink(ctx, "tcp://127.0.0.1:*")
    worker = InferWorker(InferConfig(
        backend="torch-cpu", max_batch=32, max_delay_ms=5.0,
        crops_endpoint=f"tcp://127.0.0.1:{port}", results_endpoint=sink.endpoint,
        explain_endpoint=svc.endpoint, explain_sample_rate=1.0, explain_hwm=1,
        explain_sndbuf_bytes=8192, metrics_port=0, cache_dir=str(tmp_path / "cache"),
        heartbeat_s=0.2), artifact=artifact).start()
    max_backlog = 0
    watching = threading.Event()

    def watch() -> None:  # samples the explainer's backlog through the whole flood
        nonlocal max_backlog
        while not watching.is_set():
            max_backlog = max(max_backlog, len(svc.backlog))
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert worker.ready.wait(120), worker.error
        x = synthetic_crops(N_CELLS, SIZE, seed=11)
        sender = wire.Sender("run-flood", "acquire")
        for k, i in enumerate(range(0, N_CELLS, PER_MSG)):
            producer.send_multipart(wire.encode(crop_message(sender, x[i:i + PER_MSG], i,
                                                             frame=k)), copy=False)
        producer.send_multipart(wire.encode(sender.message("control", cmd="eos",
                                                           stats={"cells_emitted": N_CELLS})))

        def totals() -> dict | None:
            tot = [m for m in sink.control if m.header["stats"].get("event") == "totals"]
            return tot[-1].header["stats"] if tot else None

        # the whole run is counted while the explainer is still stalled
        assert sink.wait_for(lambda s: s.cells() >= N_CELLS and totals() is not None, 120)
        assert not svc.release.is_set()
        ids = [int(c) for m in sink.results for c in m.header["ids"]]
        assert sorted(ids) == list(range(N_CELLS))  # each cell exactly once
        tot = totals()
        assert tot["received_cells"] == N_CELLS
        assert tot["counted"] + tot["uncertain"] + tot["ood"] == N_CELLS
        assert not tot["rejected"] and tot["pending"] == 0
        assert tot["counted"] > 0 and tot["uncertain"] + tot["ood"] > 0

        router = worker.router
        delivered_by_worker = sum(router.routed.values())
        flagged = delivered_by_worker + router.dropped
        assert flagged == N_CELLS  # sample rate 1: every cell flagged, each sent or dropped
        assert tot["explain_dropped"] == router.dropped
        assert sum(tot["explain_routed"].values()) == delivered_by_worker
        if mode == "stalled":
            assert router.dropped > 0  # the explain socket overflowed: dropped, not waited
        else:  # the receiver drains everything into the backlog, which drops its oldest
            assert wait_for(lambda: svc.status()["received_cells"] == delivered_by_worker, 120)
            assert svc.stalled_cells > 0 and len(svc.backlog) == BACKLOG
            assert svc.status()["dropped_backlog"] == (delivered_by_worker - BACKLOG
                                                       - svc.stalled_cells)
        metrics = worker.metrics.m.exposition().decode()
        assert _metric(metrics, "leukoflow_dropped_total", stage="explain",
                       reason="explainer_full") == router.dropped
        assert _metric(metrics, "leukoflow_explainer_routed_total") == delivered_by_worker

        # release: everything the worker queued arrives; drops = flagged - delivered
        svc.release.set()
        assert wait_for(lambda: svc.status()["received_cells"] == delivered_by_worker, 120), (
            svc.status(), delivered_by_worker)
        assert router.dropped == flagged - svc.status()["received_cells"]
        assert wait_for(lambda: len(svc.backlog) == 0 and svc.status()["explained"]
                     + svc.status()["dropped_backlog"] + svc.status()["dropped_error"]
                     == delivered_by_worker, 180), svc.status()
    finally:
        watching.set()
        watcher.join(2)
        svc.release.set()
        worker.stop()
        worker.join(30)
        sink.close()
        producer.close(0)
        ctx.term()
        st = svc.stop()
    assert worker.error is None, worker.error
    assert max_backlog <= BACKLOG
    assert st["rejected_messages"] == 0 and st["dropped_error"] == 0
    assert st["received_cells"] == delivered_by_worker
    assert st["explained"] + st["dropped_backlog"] + st["dropped_shutdown"] == \
        st["received_cells"]
    if mode == "slow":  # the backlog overflowed and dropped its oldest cells, counted
        assert delivered_by_worker > BACKLOG + svc.stalled_cells
        assert st["dropped_backlog"] == delivered_by_worker - svc.stalled_cells - BACKLOG
        assert st["explained"] == svc.stalled_cells + BACKLOG
    assert st["explained"] > 0
    files = sorted(p.stem for p in (tmp_path / "explanations").glob("*.json"))
    assert len(files) == st["explained"]
    assert set(int(f) for f in files) <= set(range(N_CELLS))
