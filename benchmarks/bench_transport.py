"""Transport benchmark: crop messages over a real ZeroMQ loopback socket (PUSH -> PULL).

Side by side in one run, each in a separate receiver process:
* raw: one bare 16 KiB frame per message (the ZeroMQ ceiling, no header, no validation);
* wire v1, one crop per message (msgpack header + payload, fully validated on receipt);
* wire v1, 32 crops per message (batching amortises the per-message cost);
* the same over CurveZMQ (encrypted, ZAP-authenticated: what deployments with keys use) and
  over ``ipc://`` in a private folder (what ``leukoflow run`` uses), against plain TCP.
Throughput is counted in crops/s at the receiver.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np

from leukoflow.benchmarks.common import machine, main, row
from leukoflow.core import curve, transport, wire
from leukoflow.core.physics import CROP_SIZE_PX
from leukoflow.core.transport import tcp_endpoint


def _receiver(endpoint: str, n_msgs: int, mode: str, out: mp.Queue,
              keys_dir: str = "") -> None:
    import zmq

    ctx = zmq.Context()
    if keys_dir:
        s = transport.make_socket(ctx, "PULL", endpoint, bind=True, hwm=1000,
                                  keys=curve.KeyStore(keys_dir), serves="crops")
    else:
        s = ctx.socket(zmq.PULL)
        s.bind(endpoint)
    out.put("ready")
    cells = 0
    t0 = None
    for _ in range(n_msgs):
        frames = s.recv_multipart(copy=False)
        if t0 is None:
            t0 = time.perf_counter()
        if mode == "raw":
            cells += 1
        else:
            cells += wire.decode(frames).n
    out.put((cells, time.perf_counter() - t0))
    ctx.destroy(linger=0)


def _measure(mode: str, n_msgs: int, per_msg: int, port: int, keys_dir: str = "",
             endpoint: str = "") -> float:
    import zmq

    endpoint = endpoint or tcp_endpoint(port)
    q: mp.Queue = mp.get_context("fork").Queue()
    p = mp.get_context("fork").Process(target=_receiver,
                                       args=(endpoint, n_msgs, mode, q, keys_dir))
    p.start()
    q.get(timeout=60)
    ctx = zmq.Context()
    if keys_dir:
        s = transport.make_socket(ctx, "PUSH", endpoint, bind=False, hwm=1000,
                                  immediate=False, keys=curve.KeyStore(keys_dir),
                                  identity="infer")
    else:
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.SNDHWM, 1000)
        s.connect(endpoint)
    side = CROP_SIZE_PX
    crops = np.random.default_rng(0).normal(size=(per_msg, side, side)).astype(np.float32)
    snd = wire.Sender("bench", "acquire")
    msg = snd.message("crops", crops, frame=0, ids=list(range(per_msg)),
                      bbox=[[0, 0, side, side]] * per_msg, feat={})
    for i in range(n_msgs):
        if mode == "raw":
            s.send(crops[0].tobytes(), copy=False)
        else:
            msg.header["seq"] = i
            s.send_multipart(wire.encode(msg), copy=False)
    cells, dt = q.get(timeout=300)
    p.join(10)
    ctx.destroy(linger=0)
    return cells / dt


def run(quick: bool = False) -> dict:
    """Crops/s over loopback TCP for raw frames and wire v1 at 1 and 32 crops/message."""
    n = 5_000 if quick else 50_000
    raw = _measure("raw", n, 1, 5591)
    one = _measure("wire", n, 1, 5592)
    batched = _measure("wire", max(200, n // 16), 32, 5593)
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="bench-keys-")
    sock_dir = transport.private_ipc_folder()
    try:
        curve.create_keys(f"{tmp}/keys")
        one_curve = _measure("wire", n, 1, 5594, keys_dir=f"{tmp}/keys")
        batched_curve = _measure("wire", max(200, n // 16), 32, 5595, keys_dir=f"{tmp}/keys")
        batched_ipc = _measure("wire", max(200, n // 16), 32, 0,
                               endpoint=f"ipc://{sock_dir}/crops")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(sock_dir, ignore_errors=True)
    return {
        "machine": machine(),
        "rows": [
            row("zmq raw 16 KiB frames (ceiling)", raw, "crops/s"),
            row("wire v1, 1 crop/message", one, "crops/s", "raw", raw,
                "per-message cost: batch crops"),
            row("wire v1, 32 crops/message", batched, "crops/s", "raw", raw, "> 1x raw"),
            row("wire v1 + CurveZMQ, 1 crop/message", one_curve, "crops/s",
                "wire v1, 1 crop/message", one, "encryption cost per message"),
            row("wire v1 + CurveZMQ, 32 crops/message", batched_curve, "crops/s",
                "wire v1, 32 crops/message", batched, ">= 0.5x plain TCP"),
            row("wire v1 over ipc://, 32 crops/message", batched_ipc, "crops/s",
                "wire v1, 32 crops/message", batched, ">= 1x TCP (leukoflow run)"),
        ],
    }


if __name__ == "__main__":
    main(run)
