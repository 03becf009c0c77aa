"""Authenticated transport (CurveZMQ), per-message roles and resource limits, on real sockets.

A real collector (in a thread) and a real acquisition publisher serve CurveZMQ endpoints;
strangers (no keys), peers with keys of another deployment, and admitted peers sending
what their role may not send, try to push forged results, take crops and stop the run.
The fault suite's "stop sent by a stranger" and "forged results from an unauthenticated
peer" are :func:`test_collector_refuses_strangers_and_counts_them`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zmq
from helpers import wait_for
from typer.testing import CliRunner

from leukoflow.core import curve, transport, wire
from leukoflow.core.vocabulary import CLASS_NAMES
from leukoflow.run.collector import Collector, CollectorConfig


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> curve.KeyStore:
    d = tmp_path_factory.mktemp("auth") / "keys"
    curve.create_keys(d)
    return curve.KeyStore(d)


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory) -> curve.KeyStore:
    """A different deployment's keys (same roles, other key pairs)."""
    d = tmp_path_factory.mktemp("auth-other") / "keys"
    curve.create_keys(d)
    return curve.KeyStore(d)


# ----------------------------------------------------------------------------- key files

def test_key_files_are_private_z85_text(tmp_path) -> None:
    d = tmp_path / "k"
    files = curve.create_keys(d)
    assert os.stat(d).st_mode & 0o777 == 0o700
    assert len(files) == 2 * (1 + len(curve.ROLES))
    for f in files:
        assert os.stat(f).st_mode & 0o777 == 0o600, f
        text = f.read_text()  # text, not pickle: ZeroMQ's certificate format
        assert "public-key = \"" in text and ("secret-key" in text) == f.name.endswith("_secret")
    # pyzmq reads them as ZeroMQ certificates
    import zmq.auth

    pub, sec = zmq.auth.load_certificate(str(d / "infer.key_secret"))
    store = curve.KeyStore(d)
    assert store.client("infer").public == pub and store.client("infer").secret == sec
    assert store.allowed("collector") and all(
        uid.split(":")[0] in curve.ENDPOINT_CLIENTS["collector"]
        for uid in store.allowed("collector").values())
    # a secret readable by others is refused, like ssh does
    os.chmod(d / "infer.key_secret", 0o644)
    with pytest.raises(curve.KeyError_, match="accessible to other users"):
        curve.KeyStore(d)
    os.chmod(d / "infer.key_secret", 0o600)
    os.chmod(d, 0o777)
    with pytest.raises(curve.KeyError_, match="writable by other users"):
        curve.KeyStore(d)
    os.chmod(d, 0o700)
    with pytest.raises(curve.KeyError_, match="exists"):
        curve.create_keys(d)  # never overwritten silently
    (d / "bad.key").write_text('curve\n    public-key = "short"\n')
    with pytest.raises(curve.KeyError_, match="Z85"):
        curve.KeyStore(d)


def test_keys_cli_create_add_list(tmp_path) -> None:
    from leukoflow.cli import app

    d = tmp_path / "k"
    r = CliRunner().invoke(app, ["keys", "create", str(d), "--role", "infer", "--role",
                                 "supervisor"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["keys", "add", str(d), "infer-gpu2", "--role", "infer"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["keys", "list", str(d), "--json"])
    assert r.exit_code == 0, r.output
    import json

    doc = json.loads(r.output)
    roles = {k["name"]: k["role"] for k in doc["keys"]}
    assert roles == {"server": "server", "infer": "infer", "supervisor": "supervisor",
                     "infer-gpu2": "infer"}
    assert "secret" not in r.output.replace("secret_here", "")
    r = CliRunner().invoke(app, ["keys", "add", str(d), "x", "--role", "root"])
    assert r.exit_code == 2 and "unknown role" in r.output


# ----------------------------------------------------------------------------- endpoint rules

def test_allow_remote_and_remote_peers_need_keys(keys, tmp_path) -> None:
    ctx = zmq.Context()
    try:
        with pytest.raises(transport.EndpointError, match="without CurveZMQ keys"):
            transport.make_socket(ctx, "PULL", "tcp://0.0.0.0:0", bind=True,
                                  allow_remote=True, keys=False)
        with pytest.raises(transport.EndpointError, match="without CurveZMQ keys"):
            transport.make_socket(ctx, "PUSH", "tcp://192.0.2.7:5556", bind=False,
                                  keys=False)
        s = transport.make_socket(ctx, "PULL", "tcp://0.0.0.0:0", bind=True,
                                  allow_remote=True, keys=keys, serves="collector")
        assert s.getsockopt(zmq.CURVE_SERVER) == 1
        s.close(0)
        # ipc sockets only in a folder other users cannot open
        open_dir = tmp_path / "open"
        open_dir.mkdir(mode=0o755)
        os.chmod(open_dir, 0o755)
        with pytest.raises(transport.EndpointError, match="open to other users"):
            transport.make_socket(ctx, "PULL", f"ipc://{open_dir}/s", bind=True, keys=False)
        priv = transport.private_ipc_folder()
        try:
            assert os.stat(priv).st_mode & 0o777 == 0o700
            s = transport.make_socket(ctx, "PULL", f"ipc://{priv}/s", bind=True, keys=False)
            s.close(0)
        finally:
            for f in priv.iterdir():
                f.unlink()
            priv.rmdir()
    finally:
        ctx.destroy(0)


# ----------------------------------------------------------------------------- collector

def _results(sender: wire.Sender, ids: list[int], run: str) -> wire.Message:
    n = len(ids)
    probs = np.full((n, len(CLASS_NAMES)), 0.02, np.float32)
    probs[:, 0] = 1 - 0.02 * (len(CLASS_NAMES) - 1)
    return sender.message("results", probs, run=run, ids=ids, pred=[0] * n,
                          decision=["counted"] * n, conf=probs.max(1).tolist(),
                          ood_score=[-1.0] * n, classes=list(CLASS_NAMES), model="m")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_collector_refuses_strangers_and_counts_them(keys, other_keys, tmp_path,
                                                     monkeypatch) -> None:
    """Forged results and ``stop`` from strangers, wrong keys and wrong roles are refused."""
    monkeypatch.setenv(curve.KEYS_ENV, str(keys.folder))
    run = "auth-run"
    res_ep = f"tcp://127.0.0.1:{_free_port()}"
    mport = _free_port()
    cfg = CollectorConfig(results=res_ep, live="", metrics_port=mport,
                          run_dir=str(tmp_path / "run"), run_id=run, drain_timeout_s=1.0,
                          flush_interval_s=0.2)
    coll = Collector(cfg)
    out: dict = {}
    th = threading.Thread(target=lambda: out.update(coll.run(install_signals=False)),
                          daemon=True)
    th.start()
    assert wait_for(lambda: coll._health is not None and coll._health.ready, 60)
    ctx = zmq.Context()
    refused0 = sum(curve.refusals().values())
    socks = []

    def peer(**kw) -> zmq.Socket:
        s = transport.make_socket(ctx, "PUSH", res_ep, bind=False, immediate=False, **kw)
        socks.append(s)
        return s

    try:
        stranger = peer(keys=False)                             # no keys at all
        wrong = peer(keys=other_keys, identity="infer")         # another deployment's key
        viewer = peer(keys=keys, identity="viewer")             # a key not admitted here
        worker = peer(keys=keys, identity="infer")              # admitted, may send results
        acquire = peer(keys=keys, identity="acquire")           # admitted, may not send results
        forged_ids = list(range(0, 20))
        for s, role in ((stranger, "infer"), (wrong, "infer"), (viewer, "viewer")):
            snd = wire.Sender(run, role)
            transport.send(s, _results(snd, forged_ids, run), block=True)
            transport.send(s, snd.message("control", cmd="stop", stats={}), block=True)
        # admitted peers sending what their role may not: counted as unauthorized
        transport.send(worker, wire.Sender(run, "infer").message("control", cmd="stop",
                                                                 stats={}), block=True)
        transport.send(acquire, _results(wire.Sender(run, "acquire"), forged_ids, run),
                       block=True)
        assert wait_for(lambda: coll.state.messages_rejected["unauthorized"] == 2, 30), \
            dict(coll.state.messages_rejected)
        # the three unadmitted peers keep trying to handshake: every attempt is refused
        assert wait_for(lambda: sum(curve.refusals().values()) - refused0 >= 3, 30)
        assert th.is_alive(), "a stop from an unauthorized peer ended the collector"
        assert not coll.state.stop_requested
        # the real worker's cells are counted, none of them taken as a duplicate of a
        # forged pre-sent id
        snd = wire.Sender(run, "infer")
        transport.send(worker, _results(snd, forged_ids, run), block=True)
        assert wait_for(lambda: coll.state.accounting()["counted"] == 20, 30)
        acc = coll.state.accounting()
        assert acc["duplicates"] == 0 and acc["counted"] == 20
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        assert 'leukoflow_messages_rejected_total{reason="unauthenticated"}' in metrics
        # the supervisor's stop is obeyed
        sup = peer(keys=keys, identity="supervisor")
        transport.send(sup, wire.Sender(run, "supervisor").message(
            "control", cmd="stop", stats={}), block=True)
        th.join(60)
        assert not th.is_alive()
        assert out["accounting"]["counted"] == 20
        assert out["accounting"]["messages_rejected"].get("unauthorized") == 2
    finally:
        coll.stop()
        th.join(10)
        for s in socks:
            s.close(0)
        ctx.term()


# ----------------------------------------------------------------------------- crops

def test_crops_only_reach_admitted_workers(keys, other_keys, monkeypatch) -> None:
    """A stranger's PULL on the crops endpoint gets nothing; the real worker gets all."""
    from leukoflow.acquisition.publisher import CropPublisher

    monkeypatch.setenv(curve.KEYS_ENV, str(keys.folder))
    ctx = zmq.Context()
    ep = f"tcp://127.0.0.1:{_free_port()}"
    pub = CropPublisher(ctx, "auth-run", ep, sndhwm=1000)
    pub.sock.setsockopt(zmq.IMMEDIATE, 1)
    thieves = [transport.make_socket(ctx, "PULL", ep, bind=False, keys=False),
               transport.make_socket(ctx, "PULL", ep, bind=False, keys=other_keys,
                                     identity="infer"),
               transport.make_socket(ctx, "PULL", ep, bind=False, keys=keys,
                                     identity="supervisor")]
    refused0 = sum(curve.refusals().values())
    worker = transport.make_socket(ctx, "PULL", ep, bind=False, keys=keys, identity="infer")
    try:
        assert wait_for(lambda: sum(curve.refusals().values()) - refused0 >= 3, 30)
        sender = wire.Sender("auth-run", "acquire")
        n = 30
        crops = np.zeros((2, 8, 8), np.float32)
        sent = 0
        t_end = time.monotonic() + 30
        while sent < n and time.monotonic() < t_end:
            msg = sender.message("crops", crops, ids=[2 * sent, 2 * sent + 1],
                                 bbox=[[0, 0, 8, 8]] * 2, frame=sent)
            if transport.send(pub.sock, msg):
                sent += 1
            else:
                time.sleep(0.01)
        assert sent == n
        got = []
        while len(got) < n and (m := transport.recv(worker, timeout_ms=5000)) is not None:
            got.append(m.header["frame"])
        assert got == list(range(n))
        for t in thieves:
            assert transport.recv(t, timeout_ms=200) is None
    finally:
        for s in (*thieves, worker):
            s.close(0)
        pub.sock.close(0)
        ctx.term()


# ----------------------------------------------------------------------------- limits

_RECEIVER = r"""
import sys, time, zmq
from leukoflow.core import transport, wire
def hwm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
ctx = zmq.Context()
pull = transport.make_socket(ctx, "PULL", "tcp://127.0.0.1:0", bind=True, keys=False,
                             max_msg_bytes=int(sys.argv[1]))
print(pull.getsockopt(zmq.LAST_ENDPOINT).decode(), hwm_kib(), flush=True)
got = []
t_end = time.monotonic() + 60
while time.monotonic() < t_end:
    if pull.poll(100):
        frames = pull.recv_multipart(copy=False)
        got.append(sum(len(f.buffer) for f in frames))
        if len(frames[-1].buffer) < 1024:  # the small message sent after the junk
            break
print(got, hwm_kib(), flush=True)
"""


@pytest.mark.parametrize("limited", [True, False])
def test_junk_frame_is_refused_by_zeromq(limited: bool) -> None:
    """A 64 MiB frame never reaches a socket with the default limit, nor its memory."""
    junk_bytes = 64 * 2**20
    limit = transport.message_limit() if limited else 2**40
    assert not limited or limit < junk_bytes
    proc = subprocess.Popen([sys.executable, "-c", _RECEIVER, str(limit)],
                            stdout=subprocess.PIPE, text=True)
    try:
        ep, hwm0 = proc.stdout.readline().split()
        ctx = zmq.Context()
        junk = transport.make_socket(ctx, "PUSH", ep, bind=False, immediate=False, keys=False)
        good = transport.make_socket(ctx, "PUSH", ep, bind=False, immediate=False, keys=False)
        junk.send_multipart([b"\x80", b"\0" * junk_bytes])
        time.sleep(0.5)
        good.send_multipart([b"\x80", b"ok"])
        got, hwm1 = proc.stdout.readline().rsplit(" ", 1)
        proc.wait(60)
        junk.close(0)
        good.close(0)
        ctx.term()
    finally:
        proc.kill()
    sizes = eval(got)  # noqa: S307 (a list of ints printed by the receiver above)
    grew_kib = int(hwm1) - int(hwm0)
    if limited:
        assert sizes == [3] and grew_kib < 16 * 1024, (sizes, grew_kib)
    else:  # the control: without the limit the junk is read into memory
        assert junk_bytes + 1 in sizes and grew_kib >= 60 * 1024, (sizes, grew_kib)


def test_message_limit_follows_crop_size_and_batch() -> None:
    assert transport.message_limit(64, 1024) == 64 * 64 * 4 * 1024
    assert transport.message_limit(48, 256) == wire.MAX_HEADER_BYTES  # header bound
    assert transport.message_limit(64, 4096, 2) == 64 * 64 * 2 * 4096
    with pytest.raises(ValueError):
        transport.message_limit(0, 10)


# ----------------------------------------------------------------------------- deployment

def test_compose_and_systemd_run_the_services_with_keys(tmp_path) -> None:
    """Compose makes the keys once and gives every service LEUKOFLOW_KEYS; the systemd units
    and the environment template point at the keys; the command they use works."""
    import configparser

    import yaml

    from leukoflow.cli import app

    root = Path(__file__).resolve().parents[1] / "deploy"
    compose = yaml.safe_load((root / "compose.yaml").read_text())["services"]
    keys_cmd = compose["keys"]["command"]
    assert keys_cmd[:3] == ["leukoflow", "keys", "create"] and "--if-missing" in keys_cmd
    folder = keys_cmd[3]
    for name in ("acquire", "infer", "explain", "collector"):
        svc = compose[name]
        assert svc["environment"]["LEUKOFLOW_KEYS"] == folder, name
        assert svc["depends_on"]["keys"]["condition"] == "service_completed_successfully"
    # the command works twice (container restarts keep the keys) and yields every identity
    d = tmp_path / "keys"
    for _ in range(2):
        r = CliRunner().invoke(app, ["keys", "create", str(d), "--if-missing"])
        assert r.exit_code == 0, r.output
    store = curve.KeyStore(d)
    assert store.server().secret and all(store.client(r).secret for r in curve.ROLES)
    env = dict(line.split("=", 1) for line in (root / "systemd" / "leukoflow.env.example")
               .read_text().splitlines() if line.startswith("LEUKOFLOW_"))
    for unit in ("acquire", "infer", "explain", "collector"):
        cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
        cp.optionxform = str
        cp.read(root / "systemd" / f"leukoflow-{unit}.service")
        assert cp["Service"]["Environment"] == f"LEUKOFLOW_KEYS={env['LEUKOFLOW_KEYS']}"


def test_explainer_refuses_strangers_wrong_roles_and_wrong_crop_sizes(keys, other_keys,
                                                                      tmp_path,
                                                                      monkeypatch) -> None:
    """Only workers' explain requests with crops of the model's size are explained; a
    ``stop`` from anyone but a supervisor (who is not even admitted here) is refused."""
    import torch

    from leukoflow.explain.model import ModelBundle
    from leukoflow.explain.service import ExplainConfig, ExplainService
    from leukoflow.models.architectures import LeNet5

    monkeypatch.setenv(curve.KEYS_ENV, str(keys.folder))
    torch.manual_seed(0)
    bundle = ModelBundle.from_module(LeNet5(), mean=0.5, std=0.5, name="auth-test")
    side = bundle.module.input_size or 64
    cfg = ExplainConfig(endpoint=f"tcp://127.0.0.1:{_free_port()}", metrics_port=0,
                        run_dir=str(tmp_path), backlog=8, methods=("guided_backprop",))
    svc = ExplainService(cfg, bundle=bundle).start()
    ctx = zmq.Context()
    socks = []

    def peer(**kw) -> zmq.Socket:
        s = transport.make_socket(ctx, "PUSH", svc.endpoint, bind=False, immediate=False, **kw)
        socks.append(s)
        return s

    def explain_msg(sender, n_side, cid):
        probs = np.full((1, 4), 0.25, np.float32)
        crops = np.zeros((1, n_side, n_side), np.float32)
        return sender.message("explain", crops, ids=[cid], pred=[1], decision=["uncertain"],
                              conf=[0.25], ood_score=[0.0], classes=list(CLASS_NAMES),
                              model="m", probs=probs.tolist())

    def rejected(reason: str) -> float:
        body = svc.metrics.exposition().decode()
        for line in body.splitlines():
            if line.startswith(f'leukoflow_messages_rejected_total{{reason="{reason}"}}'):
                return float(line.split()[-1])
        return 0.0

    try:
        assert wait_for(lambda: svc.health.ready, 120)
        stranger, wrong = peer(keys=False), peer(keys=other_keys, identity="infer")
        worker = peer(keys=keys, identity="infer")
        for s in (stranger, wrong):
            snd = wire.Sender("r", "supervisor")
            transport.send(s, snd.message("control", cmd="stop", stats={}), block=True)
            transport.send(s, explain_msg(wire.Sender("r", "infer"), side, 7), block=True)
        snd = wire.Sender("r", "infer")
        transport.send(worker, snd.message("control", cmd="stop", stats={}), block=True)
        transport.send(worker, explain_msg(snd, side - 16, 8), block=True)  # wrong size
        transport.send(worker, explain_msg(snd, side, 9), block=True)
        assert wait_for(lambda: (tmp_path / "explanations" / "9.json").exists(), 120)
        assert wait_for(lambda: rejected("unauthorized") == 1 and rejected("shape") == 1, 30)
        assert wait_for(lambda: rejected("unauthenticated") >= 2, 30)
        assert not svc.stop_event.is_set()
        assert not (tmp_path / "explanations" / "7.json").exists()
        assert not (tmp_path / "explanations" / "8.json").exists()
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
        svc.stop()
