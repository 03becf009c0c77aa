"""Configuration layering, plugin registry, transport defaults, metrics/health server, CLI shell."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from leukoflow.core import config, registry, transport, wire
from leukoflow.core.metrics import METRIC_NAMES, HealthServer, ServiceMetrics


@dataclass(frozen=True)
class _Cfg:
    max_batch: int = 256
    max_delay_ms: float = 2.0
    backend: str = "auto"
    bucket_sizes: tuple[int, ...] = (1, 8, 32)
    fp16: bool = False
    model: str | None = None


def test_config_precedence(tmp_path: Path) -> None:
    toml = {"infer": {"max_batch": 64, "backend": "onnxruntime"}}
    env = {"LEUKOFLOW_INFER_MAX_BATCH": "128", "LEUKOFLOW_INFER_FP16": "yes",
           "LEUKOFLOW_INFER_BUCKET_SIZES": "1,4,16", "LEUKOFLOW_COLLECTOR_HWM": "3"}
    cfg = config.resolve("infer", _Cfg, {"max_delay_ms": 5, "backend": None},
                         toml=toml, env=env)
    assert cfg.max_batch == 128            # env beats TOML
    assert cfg.backend == "onnxruntime"    # TOML beats default; None flag ignored
    assert cfg.max_delay_ms == 5.0         # flag beats everything
    assert cfg.fp16 is True and cfg.bucket_sizes == (1, 4, 16)
    assert config.resolve("infer", _Cfg, toml={}, env={}) == _Cfg()


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="unknown keys"):
        config.resolve("infer", _Cfg, toml={"infer": {"max_btch": 1}}, env={})
    with pytest.raises(config.ConfigError, match="bad value"):
        config.resolve("infer", _Cfg, toml={}, env={"LEUKOFLOW_INFER_MAX_BATCH": "many"})
    bad = tmp_path / "bad.toml"
    bad.write_text("[infer\nmax_batch = 1")
    with pytest.raises(config.ConfigError, match="invalid TOML"):
        config.load_toml(bad)
    good = tmp_path / "good.toml"
    good.write_text("[infer]\nmax_batch = 32\n")
    assert config.resolve("infer", _Cfg, toml=config.load_toml(good), env={}).max_batch == 32


def test_registry() -> None:
    reg: registry.Registry = registry.Registry("widget")

    @reg.register("a")
    class A:
        def __init__(self, x: int = 1) -> None:
            self.x = x

    assert reg.names() == ["a"] and "a" in reg and reg.get("a") is A
    assert reg.create("a", x=3).x == 3
    with pytest.raises(registry.RegistryError, match="unknown widget 'b'; available: a"):
        reg.get("b")
    with pytest.raises(registry.RegistryError, match="already registered"):
        reg.register("a")(type("B", (), {}))


def test_transport_refuses_remote_bind() -> None:
    transport.check_endpoint("tcp://127.0.0.1:5555", bind=True)
    transport.check_endpoint("tcp://localhost:5555", bind=False)
    # another host: only with CurveZMQ keys (connect and bind), binding also needs the opt-in
    transport.check_endpoint("tcp://10.0.0.5:5555", bind=False, secure=True)
    with pytest.raises(transport.EndpointError, match="without CurveZMQ keys"):
        transport.check_endpoint("tcp://10.0.0.5:5555", bind=False)
    with pytest.raises(transport.EndpointError, match="non-loopback"):
        transport.check_endpoint("tcp://0.0.0.0:5555", bind=True)
    with pytest.raises(transport.EndpointError, match="non-loopback"):
        transport.check_endpoint("tcp://0.0.0.0:5555", bind=True, secure=True)
    with pytest.raises(transport.EndpointError, match="without CurveZMQ keys"):
        transport.check_endpoint("tcp://0.0.0.0:5555", bind=True, allow_remote=True)
    transport.check_endpoint("tcp://0.0.0.0:5555", bind=True, allow_remote=True, secure=True)
    with pytest.raises(transport.EndpointError, match="bad endpoint"):
        transport.check_endpoint("http://x", bind=False)


def test_push_never_blocks_when_peer_full() -> None:
    import zmq


    ctx = zmq.Context()
    pull = transport.make_socket(ctx, "PULL", "tcp://127.0.0.1:0", bind=True, hwm=2)
    ep = pull.getsockopt(zmq.LAST_ENDPOINT).decode()
    pull.setsockopt(zmq.RCVHWM, 1)
    push = transport.make_socket(ctx, "PUSH", ep, bind=False, hwm=1)
    time.sleep(0.2)
    s = wire.Sender("r", "t")
    results = [transport.send(push, s.message("heartbeat")) for _ in range(5000)]
    assert not all(results)  # the peer never reads: sends fail fast instead of blocking
    assert results[0]
    got = transport.recv(pull, 1000)
    assert got is not None and got.seq == 0
    ctx.destroy(linger=0)


def test_health_server_endpoints() -> None:
    m = ServiceMetrics("infer", run_id="r1")
    h = HealthServer(m, live_timeout_s=0.5)
    base = f"http://127.0.0.1:{h.port}"
    try:
        m["leukoflow_dropped_total"].labels("infer", "backpressure").inc(3)
        body = urllib.request.urlopen(base + "/metrics").read().decode()
        assert 'leukoflow_dropped_total{reason="backpressure",stage="infer"} 3.0' in body
        assert urllib.request.urlopen(base + "/healthz").status == 200
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(base + "/readyz")
        assert exc.value.code == 503
        h.set_ready()
        assert urllib.request.urlopen(base + "/readyz").status == 200
        assert "leukoflow_ready 1.0" in urllib.request.urlopen(base + "/metrics").read().decode()
        time.sleep(0.6)  # no tick: the loop is considered stalled
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(base + "/healthz")
        h.tick()
        assert urllib.request.urlopen(base + "/healthz").status == 200
    finally:
        h.close()


def test_metric_names_follow_conventions() -> None:
    for name, (kind, _help, labels, _svc) in METRIC_NAMES.items():
        assert name.startswith("leukoflow_")
        if kind == "counter":
            assert name.endswith("_total"), name
        if name.endswith("_seconds"):
            assert kind in ("histogram", "gauge")
        assert "run_id" not in labels or name == "leukoflow_service_info"


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "leukoflow.cli", *args], capture_output=True,
                          text=True, env=e, timeout=120)


def test_cli_help_is_fast_and_lazy() -> None:
    """`leukoflow --help` must not import the heavy libraries (it answers in well under 1 s)."""
    code = ("import sys; sys.argv=['leukoflow','--help']\n"
            "from leukoflow.cli import app\n"
            "try:\n    app()\nexcept SystemExit:\n    pass\n"
            "heavy=[m for m in ('torch','h5py','cv2','captum','sklearn','matplotlib','dclab')"
            " if m in sys.modules]\nprint('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout[-500:] + out.stderr[-2000:]
    for cmd in ("simulate", "reconstruct", "acquire", "infer", "explain", "run", "record",
                "replay", "validate", "train", "calibrate", "evaluate", "export", "audit",
                "bench"):
        assert cmd in out.stdout, cmd


def test_cli_version_and_config_file(tmp_path: Path) -> None:
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("leukoflow ")
    r = _cli("--config", str(tmp_path / "missing.toml"), "bench", "--help")
    assert r.returncode != 0
