"""The acquisition service: in process (bad frames, backpressure, accounting) and as a real
``leukoflow acquire`` subprocess (publishes, /metrics, /readyz, SIGTERM -> EOS)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq
from helpers import free_port, http_get

from leukoflow.acquisition.pipeline import PipelineConfig
from leukoflow.acquisition.service import AcquireConfig, AcquireService
from leukoflow.acquisition.sim import SimConfig
from leukoflow.acquisition.sources.sim import SimSource
from leukoflow.cli import app
from leukoflow.core import transport, wire
from leukoflow.core.config import resolve


class FaultySim(SimSource):
    """The simulator with bad frames injected at fixed indices (a real source, no mock)."""

    BAD = {3: "wrong_size", 5: "non_finite", 7: "all_zero", 9: "saturated"}

    def read(self, timeout_s: float = 1.0):
        raw = super().read(timeout_s)
        kind = self.BAD.get(raw.index)
        if kind == "wrong_size":
            raw.image = raw.image[:100]
        elif kind == "non_finite":
            img = raw.image.astype(np.float32)
            img[10, 10] = np.nan
            raw.image = img
        elif kind == "all_zero":
            raw.image = np.zeros_like(raw.image)
        elif kind == "saturated":
            img = raw.image.copy()
            img[:100] = 255
            raw.image = img
        return raw


def test_bad_frames_rejected_and_backpressure_counted_service_keeps_running():
    ctx = zmq.Context()
    coll_ep = f"tcp://127.0.0.1:{free_port()}"
    coll = transport.make_socket(ctx, "PULL", coll_ep, bind=True)
    cfg = AcquireConfig(frames=60, metrics_port=0, collector_endpoint=coll_ep,
                        crops_endpoint=f"tcp://127.0.0.1:{free_port()}", sndhwm=2)

    # dense (1.5 objects per field) so that 60 frames hold crops to drop
    svc = AcquireService(cfg, source=FaultySim(seed=4, config=SimConfig(seed=4,
                                                                       concentration=1.5)))
    try:
        final = svc.run()  # nobody pulls crops: every crop message is a counted drop
        msgs = []
        while (m := transport.recv(coll, timeout_ms=500)) is not None:
            msgs.append(m)
    finally:
        coll.close()
        ctx.term()
    assert final["frames"] == 60
    assert final["frames_rejected"] == {"wrong_size": 1, "non_finite": 1, "all_zero": 1,
                                        "saturated": 1}
    assert final["frames_processed"] == 56
    assert final["stop_reason"] == "frames"
    assert final["cells_emitted"] == 0
    dropped = final["cells_dropped"].get("backpressure", 0)
    assert dropped > 0
    assert final["cells_total"] == dropped + sum(final["cells_rejected"].values())
    # metrics saw the same
    expo = svc.metrics.exposition().decode()
    assert 'leukoflow_frames_rejected_total{reason="saturated"} 1.0' in expo
    assert f'leukoflow_dropped_total{{reason="backpressure",stage="acquire"}} {dropped}.0' \
        in expo
    cmds = [m.header["cmd"] for m in msgs]
    assert cmds[0] == "hello" and cmds[-1] == "eos"
    assert msgs[-1].header["stats"]["cells_dropped"] == final["cells_dropped"]


@pytest.mark.slow
def test_acquire_subprocess_publishes_serves_metrics_and_stops_on_sigterm(tmp_path):
    ctx = zmq.Context()
    crops_ep = f"tcp://127.0.0.1:{free_port()}"
    coll_ep = f"tcp://127.0.0.1:{free_port()}"
    mport = free_port()
    coll = transport.make_socket(ctx, "PULL", coll_ep, bind=True, hwm=1000)
    pull = transport.make_socket(ctx, "PULL", crops_ep, bind=False, hwm=1000)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "leukoflow.cli", "acquire", "--source", "sim", "--seed", "2",
           "--rate", "100", "--metrics-port", str(mport), "--crops-endpoint", crops_ep,
           "--collector-endpoint", coll_ep, "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=tmp_path)
    crops: list[wire.Message] = []
    try:
        base = f"http://127.0.0.1:{mport}"
        deadline = time.monotonic() + 90
        while http_get(base + "/readyz")[0] != 200:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "service never became ready"
            time.sleep(0.2)
        assert http_get(base + "/healthz")[0] == 200
        deadline = time.monotonic() + 60
        while len(crops) < 3 and time.monotonic() < deadline:
            m = transport.recv(pull, timeout_ms=200)
            if m is not None:
                crops.append(m)
        assert len(crops) >= 3, "no crops published"
        code, text = http_get(base + "/metrics")
        assert code == 200
        for name in ("leukoflow_frames_total", "leukoflow_cells_emitted_total",
                     "leukoflow_stage_duration_seconds_bucket", "leukoflow_ready 1.0"):
            assert name in text
        proc.send_signal(signal.SIGTERM)
        # keep draining while it stops (flushed tracks are published too)
        end = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < end:
            m = transport.recv(pull, timeout_ms=50)
            if m is not None:
                crops.append(m)
        out, err = proc.communicate(timeout=30)
        while (m := transport.recv(pull, timeout_ms=300)) is not None:
            crops.append(m)
        ctrl = []
        while (m := transport.recv(coll, timeout_ms=500)) is not None:
            ctrl.append(m)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pull.close()
        coll.close()
        ctx.term()
    assert proc.returncode == 0, err.decode()
    assert ctrl and ctrl[-1].header["cmd"] == "eos"
    stats = ctrl[-1].header["stats"]
    assert stats["stop_reason"] == "SIGTERM"
    n_cells = sum(m.n for m in crops)
    assert stats["cells_emitted"] == n_cells
    assert stats["cells_total"] == (n_cells + sum(stats["cells_dropped"].values())
                                    + sum(stats["cells_rejected"].values()))
    ids = [i for m in crops for i in m.ids]
    assert len(ids) == len(set(ids))
    assert all(t >= 0 for m in crops for t in m.header["truth_ids"])
    assert [m.seq for m in crops] == list(range(len(crops)))
    assert '"cells_emitted"' in out.decode()


def test_config_layers_and_cli_errors():
    from typer.testing import CliRunner


    env = {"LEUKOFLOW_ACQUIRE_FRAMES": "12", "LEUKOFLOW_ACQUIRE_SOURCE": "file:/x.rtdc",
           "LEUKOFLOW_ACQUIRE_PIPELINE_SEGMENT_THRESHOLD": "0.4"}
    cfg = resolve("acquire", AcquireConfig, {"source": "sim"}, toml={}, env=env)
    assert cfg.frames == 12 and cfg.source == "sim"  # flag beats env
    assert cfg.crops_endpoint == "tcp://127.0.0.1:5555" and cfg.metrics_port == 9101
    pcfg = resolve("acquire_pipeline", PipelineConfig, {}, toml={"acquire_pipeline": {
        "track": {"max_missed": 2}}}, env=env)
    assert pcfg.segment.threshold == 0.4 and pcfg.track.max_missed == 2
    res = CliRunner().invoke(app, [
        "acquire", "--source", "webcam", "--metrics-port", "0",
        "--crops-endpoint", f"tcp://127.0.0.1:{free_port()}",
        "--collector-endpoint", f"tcp://127.0.0.1:{free_port()}"])
    assert res.exit_code == 1
    assert "unknown source spec" in res.output
    res = CliRunner().invoke(app, ["acquire", "--crops-endpoint", "tcp://10.1.2.3:5555",
                                   "--metrics-port", "0"])
    assert res.exit_code == 1 and "non-loopback" in res.output


class StallingSim(SimSource):
    """Simulator frames with a 0.8 s pause (no frames) and a 3-frame index jump."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._pause_until = None

    def read(self, timeout_s: float = 1.0):
        now = time.monotonic()
        if self._pause_until is not None and now < self._pause_until:
            time.sleep(min(timeout_s, 0.05))
            return None
        raw = super().read(timeout_s)
        if raw.index == 8 and self._pause_until is None:
            self._pause_until = now + 0.8
        if raw.index >= 12:
            raw.index += 3  # the camera skipped frames 12..14
        return raw


def test_camera_stall_and_dropout_are_counted():
    ctx = zmq.Context()
    coll_ep = f"tcp://127.0.0.1:{free_port()}"
    coll = transport.make_socket(ctx, "PULL", coll_ep, bind=True)
    cfg = AcquireConfig(frames=20, metrics_port=0, collector_endpoint=coll_ep,
                        crops_endpoint=f"tcp://127.0.0.1:{free_port()}")
    svc = AcquireService(cfg, source=StallingSim(seed=6))
    try:
        final = svc.run()
    finally:
        coll.close()
        ctx.term()
    cam = final["camera"]
    assert cam["stalls"] == 1
    assert cam["dropouts"] == 1 and cam["frames_missing"] == 3
    assert final["frames"] == 20
    assert "leukoflow_camera_stalls_total 2.0" in svc.metrics.exposition().decode()
