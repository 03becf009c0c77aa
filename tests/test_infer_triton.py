"""Triton Inference Server tier: a real ``tritonserver`` started on this CPU machine.

The server binary is the one bundled in the ``nvidia-pytriton`` wheel (Triton 2.51; fetched
with ``pip download --no-deps`` into the cache by :func:`fetch_bundled`, never installed).
It has only the python backend, so it serves the ``configs/python.pbtxt`` configuration that
``export --triton`` writes: the exported ONNX graph run by ONNX Runtime inside Triton's python
backend. Nothing is mocked: real gRPC, real system shared memory, real dynamic batching, a
real server killed and restarted under a running worker.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from contextlib import contextmanager

import numpy as np
import pytest
import sysdeps
import zmq
from helpers import ResultsSink, crop_message

from leukoflow.benchmarks.workload_infer import synthetic_crops
from leukoflow.core import wire
from leukoflow.inference.backends import create_backend
from leukoflow.inference.backends.base import BackendUnavailable
from leukoflow.inference.backends.triton import TritonBackend, TritonClientConfig
from leukoflow.inference.decision import rule_from_artifact
from leukoflow.inference.triton_repo import (
    TritonExportConfig,
    TritonExportError,
    export_triton,
)
from leukoflow.inference.triton_server import (
    TritonServer,
    fetch_bundled,
    libpython_dirs,
    system_has_libpython,
)
from leukoflow.inference.worker import InferConfig, InferWorker
from leukoflow.models.artifact import load_artifact

MODEL = "lenet5-sim"
WORKER_BATCH = 32


@pytest.fixture(scope="module")
def artifact():
    return load_artifact(MODEL)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, artifact):
    root = tmp_path_factory.mktemp("triton-repo")
    cfg = TritonExportConfig(max_batch=WORKER_BATCH, max_delay_ms=2.0, tensorrt="off")
    manifest = export_triton(artifact, root, cfg, cache_dir=tmp_path_factory.mktemp("cache"))
    return root, manifest


@pytest.fixture(scope="module")
def server(repo):
    # the python-backend stub links libpython3.X.so (Debian package libpython3.11)
    lib = "libpython{}.{}".format(*sysdeps.python_version())
    sysdeps.require(libpython_dirs() or system_has_libpython(), f"the shared {lib}", lib)
    # the bundled server lives in the user cache (one 55 MB download per machine)
    srv = TritonServer(repo[0], dist=fetch_bundled())
    srv.start(timeout=180, models=(MODEL,))
    yield srv
    srv.stop()


def _triton(artifact, server, **kw):
    cfg = TritonClientConfig(url=server.grpc_url, **kw)
    return TritonBackend(artifact, max_batch=WORKER_BATCH, config=cfg)


def _pbtxt_value(text: str, key: str) -> list[str]:
    return re.findall(rf"\b{key}: ([^\n]+)", text)


def test_export_writes_a_repository_with_the_workers_batching(repo, artifact, tmp_path):
    root, manifest = repo
    d = root / MODEL
    cpu = (d / "config.pbtxt").read_text()
    gpu = (d / "configs" / "gpu.pbtxt").read_text()
    py = (d / "configs" / "python.pbtxt").read_text()
    assert 'backend: "onnxruntime"' in cpu and "KIND_CPU" in cpu and "KIND_GPU" not in cpu
    assert 'backend: "onnxruntime"' in gpu and "KIND_GPU" in gpu
    assert 'backend: "python"' in py and (d / "1" / "model.py").is_file()
    for text in (cpu, gpu, py):
        # dynamic batching follows the worker: a full worker batch is preferred, the queue
        # delay is the worker's max_delay_ms, and two workers' requests fit one execution
        assert _pbtxt_value(text, "preferred_batch_size") == [f"[ {WORKER_BATCH}, "
                                                              f"{2 * WORKER_BATCH} ]"]
        assert _pbtxt_value(text, "max_queue_delay_microseconds") == ["2000"]
        assert _pbtxt_value(text, "max_batch_size") == [str(2 * WORKER_BATCH)]
        assert artifact.sha256 in text
        assert _pbtxt_value(text, "dims")[:1] == ["[ 64, 64 ]"]
    # the card beside the model is the artifact: same network, same decision parameters
    beside = load_artifact(d / "artifact")
    assert beside.sha256 == artifact.sha256
    assert beside.card["ood"] == artifact.card["ood"]
    assert beside.temperature == artifact.temperature
    assert manifest["model_sha256"] == artifact.sha256
    assert manifest["tensorrt"]["built"] is False  # tensorrt="off"
    assert json.loads((d / "leukoflow.json").read_text())["outputs"]["logits"] == [4]
    # a folder that leukoflow did not write is never replaced
    (tmp_path / MODEL).mkdir()
    (tmp_path / MODEL / "config.pbtxt").write_text("name: \"other\"\n")
    with pytest.raises(TritonExportError):
        export_triton(artifact, tmp_path, TritonExportConfig(tensorrt="off"))
    assert (tmp_path / MODEL / "config.pbtxt").read_text() == "name: \"other\"\n"


@pytest.mark.parametrize("shm", ["on", "off"])
def test_triton_predictions_equal_the_local_backend(artifact, server, shm):
    x = synthetic_crops(200, artifact.input_size, seed=3)
    x[17, 5, 5] = np.nan  # a non-finite crop is flagged exactly like locally
    local = create_backend("onnxruntime", artifact, max_batch=WORKER_BATCH)
    be = _triton(artifact, server, shared_memory=shm)
    try:
        assert be.use_shm == (shm == "on")
        got, ref = be.infer(x), local.infer(x)
    finally:
        be.close()
        local.close()
    ok = ref.finite
    assert not ok[17] and ok.sum() == 199
    np.testing.assert_array_equal(got.finite, ref.finite)
    np.testing.assert_allclose(got.logits[ok], ref.logits[ok], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.features[ok], ref.features[ok], rtol=0, atol=1e-4)
    rule = rule_from_artifact(artifact)
    d_got = rule(got.logits[ok], got.features[ok])
    d_ref = rule(ref.logits[ok], ref.features[ok])
    np.testing.assert_array_equal(d_got.pred, d_ref.pred)
    np.testing.assert_array_equal(d_got.code, d_ref.code)


def test_wrong_network_or_batch_size_is_refused(artifact, server, tmp_path):
    class Other:  # same card, another network hash
        def __getattr__(self, k):
            return getattr(artifact, k)

        sha256 = "0" * 64

    with pytest.raises(BackendUnavailable, match="export it again"):
        TritonBackend(Other(), max_batch=8,
                      config=TritonClientConfig(url=server.grpc_url, model=MODEL))
    with pytest.raises(BackendUnavailable, match="takes batches up to"):
        TritonBackend(artifact, max_batch=4 * WORKER_BATCH,
                      config=TritonClientConfig(url=server.grpc_url))


def _metrics(server) -> dict[str, float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(rf'^(nv_inference_\w+)\{{model="{MODEL}",version="1"\}} (\S+)$', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def test_dynamic_batching_merges_requests_of_two_workers(artifact, server):
    """Two backends (two instruments' workers) send small batches at once: Triton executes
    fewer, larger batches than it received requests (statistics and metrics agree)."""
    before = _metrics(server)
    bes = [_triton(artifact, server, in_flight=8) for _ in range(2)]
    x = synthetic_crops(4 * 16 * 2, artifact.input_size, seed=5)
    try:
        handles = []
        for i in range(16):  # 8 requests in flight per worker, 4 cells each
            for j, be in enumerate(bes):
                if len(handles) >= 16:
                    be_old, h = handles.pop(0)
                    be_old.collect(h)
                buf = be.host_buffer(4)
                k = (2 * i + j) * 4
                buf[:] = x[k:k + 4]
                handles.append((be, be.submit(buf, 4)))
        for be, h in handles:
            be.collect(h)
        stats = bes[0].statistics()["model_stats"][0]
    finally:
        for be in bes:
            be.close()
    after = _metrics(server)
    requests = after["nv_inference_request_success"] - before.get("nv_inference_request_success",
                                                                  0)
    cells = after["nv_inference_count"] - before.get("nv_inference_count", 0)
    execs = after["nv_inference_exec_count"] - before.get("nv_inference_exec_count", 0)
    assert requests == 32 and cells == 128
    assert execs < requests, (execs, requests)  # requests were merged
    sizes = {int(b["batch_size"]) for b in stats["batch_stats"]}
    assert max(sizes) > 4, sizes  # at least one execution merged several requests
    assert int(stats["inference_count"]) >= 128


@contextmanager
def _worker(artifact, backend):
    ctx = zmq.Context()
    producer = ctx.socket(zmq.PUSH)
    producer.setsockopt(zmq.LINGER, 0)
    port = producer.bind_to_random_port("tcp://127.0.0.1")
    sink = ResultsSink(ctx, "tcp://127.0.0.1:*")
    cfg = InferConfig(backend="triton", max_batch=WORKER_BATCH, max_delay_ms=2.0,
                      crops_endpoint=f"tcp://127.0.0.1:{port}", results_endpoint=sink.endpoint,
                      explain_endpoint="", metrics_port=-1, heartbeat_s=0.2, crops_hwm=1000)
    worker = InferWorker(cfg, artifact=artifact, backend=backend).start()
    assert worker.ready.wait(60), worker.error
    try:
        yield worker, producer, sink
    finally:
        worker.stop()
        worker.join(60)
        sink.close()
        producer.close(0)
        ctx.term()
    assert worker.error is None, worker.error


def _outcomes(sink):
    classified = {}
    for m in sink.results:
        for cid, dec in zip(m.header["ids"], m.header["decision"], strict=True):
            assert cid not in classified, f"cell {cid} delivered twice"
            classified[cid] = dec
    rejected = {}
    for m in sink.control:
        st = m.header.get("stats") or {}
        if st.get("event") == "rejected":
            for cid in st["ids"]:
                assert cid not in rejected, f"cell {cid} rejected twice"
                rejected[cid] = st["reason"]
    return classified, rejected


@pytest.mark.parametrize("retry_s", [120.0, 0.3])
def test_worker_survives_a_triton_restart_with_every_cell_accounted(artifact, repo, retry_s):
    """A worker streams cells through Triton; the server is killed (SIGKILL) mid-run and
    started again on the same ports. With a long retry window every cell is classified,
    with the same decisions as the local reference; with a short one, the cells in flight
    during the outage are reported rejected (reason ``backend``) with their ids, and every
    other cell is classified: each sent cell has exactly one outcome."""
    srv = TritonServer(repo[0], dist=fetch_bundled())
    srv.start(timeout=180, models=(MODEL,))
    n_msgs, per = 48, 12
    x = synthetic_crops(n_msgs * per, artifact.input_size, seed=9)
    sender = wire.Sender("run-triton", "acquire")
    try:
        be = _triton(artifact, srv, retry_s=retry_s, timeout_s=10.0)
        with _worker(artifact, be) as (worker, producer, sink):
            killed = threading.Event()

            def feed():
                for k in range(n_msgs):
                    if k == n_msgs // 2:
                        killed.wait(120)
                    producer.send_multipart(wire.encode(crop_message(
                        sender, x[k * per:(k + 1) * per], first_id=k * per, frame=k)))
                    time.sleep(0.01)

            th = threading.Thread(target=feed, daemon=True)
            th.start()
            assert sink.wait_for(lambda s: s.cells() >= per * 8, 120)
            srv.kill()  # crash: cells are in flight
            killed.set()
            time.sleep(1.5)  # outage: the second half of the run arrives meanwhile
            srv.start(timeout=180, models=(MODEL,))
            th.join(120)
            producer.send_multipart(wire.encode(sender.message(
                "control", cmd="eos", stats={"cells_emitted": n_msgs * per})))

            def done(s):
                c, r = _outcomes(s)
                return len(c) + len(r) >= n_msgs * per
            assert sink.wait_for(done, 240), _outcomes(sink)
            classified, rejected = _outcomes(sink)
            acc = worker.accounting
            assert sink.wait_for(lambda s: acc.balanced(worker.batcher.pending), 30)
        sent = set(range(n_msgs * per))
        assert set(classified) | set(rejected) == sent
        assert not set(classified) & set(rejected)
        assert set(rejected.values()) <= {"backend"}
        assert be.retries >= 1  # the outage was seen
        if retry_s > 10:
            assert not rejected  # bridged: nothing lost
            assert be.reregistrations >= 1  # shared memory registered with the new server
        else:
            assert rejected  # the outage outlasted the retry window: lost with a reason
        assert acc.received_cells == n_msgs * per
        assert acc.rejected.get("backend", 0) == len(rejected)
        # decisions through the restarted server equal the local ones
        local = create_backend("onnxruntime", artifact, max_batch=WORKER_BATCH)
        ref = local.infer(x)
        local.close()
        names = np.array(rule_from_artifact(artifact)(ref.logits, ref.features).names())
        ids = np.array(sorted(classified))
        assert (np.array([classified[i] for i in ids]) == names[ids]).all()
    finally:
        srv.stop()


def test_cli_export_triton_follows_the_workers_batching(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from leukoflow.cli import app

    monkeypatch.setenv("LEUKOFLOW_INFER_MAX_BATCH", "16")
    monkeypatch.setenv("LEUKOFLOW_INFER_MAX_DELAY_MS", "0.5")
    monkeypatch.setenv("LEUKOFLOW_CACHE_DIR", str(tmp_path / "cache"))
    r = CliRunner().invoke(app, ["export", "--triton", str(tmp_path / "repo"), "--model",
                                 MODEL, "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["export"]["max_batch"] == 16 and res["export"]["served_max_batch"] == 32
    text = (tmp_path / "repo" / MODEL / "config.pbtxt").read_text()
    assert _pbtxt_value(text, "preferred_batch_size") == ["[ 16, 32 ]"]
    assert _pbtxt_value(text, "max_queue_delay_microseconds") == ["500"]
    r = CliRunner().invoke(app, ["export"])
    assert r.exit_code == 2 and "--triton" in r.output


def test_the_dashboards_triton_series_exist_on_a_real_server(server, artifact):
    """Every Triton series the Grafana row and the alerts use is exported by Triton (the CPU
    ones here; GPU ones only exist on GPU hosts)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "deploy" / "tools" / "monitoring_queries.py"
    spec = importlib.util.spec_from_file_location("monitoring_queries", path)
    mq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mq)
    be = _triton(artifact, server)
    be.infer(synthetic_crops(8, artifact.input_size, seed=1))
    be.close()
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    names = {ln.split("{")[0].split()[0] for ln in text.splitlines()
             if ln and not ln.startswith("#")}
    assert mq.TRITON_SERIES <= names, sorted(mq.TRITON_SERIES - names)
    used = set()
    for _d, _t, expr in mq.all_queries():
        used |= mq.metric_names(expr) & (mq.TRITON_SERIES | mq.TRITON_GPU_SERIES)
    for rule in mq.alert_rules().values():
        used |= mq.metric_names(rule["expr"]) & mq.TRITON_SERIES
    assert {"nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
            "nv_inference_exec_count", "nv_inference_request_success",
            "nv_inference_request_failure"} <= used
