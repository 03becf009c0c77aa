"""The explain service with real ZeroMQ sockets, real HTTP health/metrics, real files."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import zmq
from helpers import free_port, http_get, wait_for

from leukoflow.benchmarks.workload_explain import toy_crops
from leukoflow.core import transport, wire
from leukoflow.core.vocabulary import CLASS_NAMES
from leukoflow.explain.artifacts import read_cell_artifact
from leukoflow.explain.model import ModelBundle
from leukoflow.explain.service import Backlog, ExplainConfig, ExplainService, FlaggedCell


def _message(sender: wire.Sender, crops: np.ndarray, ids: list[int]) -> wire.Message:
    n = len(ids)
    probs = np.full((n, 4), 0.1, np.float32)
    probs[:, 1] = 0.7
    return sender.message(
        "explain", np.ascontiguousarray(crops, np.float32), ids=ids, dtype="<f4",
        shape=list(crops.shape), pred=[1] * n, decision=["uncertain"] * n, conf=[0.7] * n,
        ood_score=[0.5] * n, classes=list(CLASS_NAMES), model="test",
        probs=probs.tolist(), labels=[1] * n)


@pytest.fixture()
def service(tmp_path):
    from leukoflow.models.architectures import LeNet5

    torch.manual_seed(0)
    bundle = ModelBundle.from_module(LeNet5(), mean=0.5, std=0.5, name="flood-test")
    cfg = ExplainConfig(endpoint=f"tcp://127.0.0.1:{free_port()}", metrics_port=0,
                        run_dir=str(tmp_path), backlog=4, lime_samples=40,
                        lime_segments=(25,), methods=("lime", "guided_backprop"))
    svc = ExplainService(cfg, bundle=bundle).start()
    yield svc
    svc.stop()


def test_backlog_drops_oldest():
    b = Backlog(2)
    cells = [FlaggedCell(i, np.zeros((2, 2)), {}, 0, 0) for i in range(3)]
    assert [b.put(c) for c in cells] == [0, 0, 1]
    assert [c.cell_id for c in b.take(5, 0.0)] == [1, 2] and b.dropped == 1
    with pytest.raises(ValueError):
        Backlog(0)


def test_flood_is_bounded_counted_and_service_keeps_serving(service, tmp_path):
    assert wait_for(lambda: service.health.ready, 60), "service never became ready"
    base = f"http://127.0.0.1:{service.health.port}"
    assert http_get(base + "/healthz")[0] == 200 and http_get(base + "/readyz")[0] == 200
    ctx = zmq.Context()
    push = transport.make_socket(ctx, "PUSH", service.endpoint, bind=False, hwm=1000)
    sender = wire.Sender("run-flood", "infer")
    # the PUSH socket sets IMMEDIATE: wait until the connection is up (heartbeat accepted)
    assert wait_for(lambda: transport.send(push, sender.message("heartbeat", None, stats={})), 20)
    crops, _ = toy_crops(1, seed=1)
    sent_ok = []
    n_msgs, per = 50, 4
    max_backlog = 0
    for m in range(n_msgs):
        batch = np.repeat(crops[m % 4][None], per, axis=0)
        sent_ok.append(transport.send(push, _message(sender, batch, list(
            range(m * per, (m + 1) * per)))))
        max_backlog = max(max_backlog, len(service.backlog))
    # a malformed message is rejected and counted, not fatal
    push.send_multipart([b"\x81\xa1v\x09", b""])
    total = n_msgs * per
    assert all(sent_ok), "the sender saw backpressure from the explainer"
    assert wait_for(lambda: service.status()["received_cells"] == total, 60)
    assert wait_for(lambda: service.status()["rejected_messages"] == 1, 10)
    assert max_backlog <= 4
    st = service.status()
    assert st["dropped_backlog"] > 0
    # keeps serving: a late cell after the flood is explained
    late = 10_000
    assert transport.send(push, _message(sender, crops[:1], [late]))
    out = tmp_path / "explanations"
    assert wait_for(lambda: (out / f"{late}.json").exists(), 120)
    assert wait_for(lambda: len(service.backlog) == 0, 120)
    time.sleep(0.2)
    st = service.status()
    assert st["received_cells"] == total + 1
    accounted = st["explained"] + st["dropped_backlog"] + st["dropped_error"]
    assert accounted == total + 1, st
    metrics = http_get(base + "/metrics")[1]
    line = [ln for ln in metrics.splitlines() if ln.startswith("leukoflow_dropped_total")
            and 'reason="backlog_full"' in ln and 'stage="explain"' in ln][0]
    assert float(line.split()[-1]) == st["dropped_backlog"]
    assert 'leukoflow_explanations_total{method="lime"}' in metrics
    assert "leukoflow_explainer_latency_seconds_count" in metrics
    # the malformed header {"v": 9} is rejected for its schema version, exactly once
    rejected = {ln.split("{", 1)[1].split("}")[0]: float(ln.split()[-1])
                for ln in metrics.splitlines()
                if ln.startswith("leukoflow_messages_rejected_total{")}
    assert rejected == {'reason="version"': 1.0}, rejected
    # the artifact reads back with its decision, probabilities and maps
    doc, maps = read_cell_artifact(out / f"{late}.json")
    assert doc["decision"] == "uncertain" and doc["pred_class"] == "eosinophil"
    assert doc["probabilities"]["eosinophil"] == pytest.approx(0.7)
    assert doc["methods"]["lime"]["params"]["n_samples"] == 40
    assert doc["model"]["name"] == "flood-test" and doc["latency_s"] >= 0
    assert maps["lime"].shape == (64, 64) and maps["guided_backprop"].shape == (64, 64)
    assert "lime_std" in maps and np.array_equal(maps["phase"], crops[0])
    assert (out / f"{late}.png").read_bytes()[:4] == b"\x89PNG"
    json.loads((out / f"{late}.json").read_text())
    push.close(0)
    ctx.term()


def test_stop_control_message_and_shutdown_accounting(service):
    ctx = zmq.Context()
    push = transport.make_socket(ctx, "PUSH", service.endpoint, bind=False)
    sender = wire.Sender("run-x", "infer")
    assert wait_for(lambda: transport.send(push, sender.message("heartbeat", None, stats={})), 20)
    crops, _ = toy_crops(1, seed=1)
    assert transport.send(push, _message(sender, crops, [1, 2, 3, 4]))
    assert transport.send(push, sender.message("control", None, cmd="stop"))
    assert wait_for(lambda: service.stop_event.is_set(), 20)
    st = service.stop()
    assert st["received_cells"] == 4
    assert st["received_cells"] == st["explained"] + st["dropped_backlog"] + \
        st["dropped_error"] + st["dropped_shutdown"]
    push.close(0)
    ctx.term()
