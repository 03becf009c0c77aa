"""Stand-in acquisition and inference services for the live-run tests.

They speak the real wire protocol over real ZeroMQ sockets, so the collector, recorder and
replay are tested against the same bytes the real services send. (The real services are
exercised end to end in ``test_run_e2e.py``.)
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import numpy as np

from leukoflow.core import transport, wire
from leukoflow.core.vocabulary import CLASS_NAMES


def free_port() -> int:
    """A currently free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def endpoint() -> str:
    """A free loopback tcp endpoint."""
    return f"tcp://127.0.0.1:{free_port()}"


def make_crops(n: int, seed: int = 0, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``n`` crops whose class is encoded in their mean (labels 0..3, -1 = OOD)."""
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, 1, 2, 3, -1], size=n, p=[0.5, 0.05, 0.1, 0.3, 0.05])
    crops = rng.normal(0, 0.01, (n, size, size)).astype(np.float32)
    crops += (labels + 2).astype(np.float32)[:, None, None]
    return crops, labels.astype(np.int64)


def fake_classify(crops: np.ndarray) -> tuple[np.ndarray, list[str], list[float], list[float]]:
    """Deterministic stand-in model: class from the crop mean, OOD for mean ~1."""
    mean = crops.reshape(len(crops), -1).mean(axis=1)
    code = np.rint(mean).astype(int) - 2
    k = len(CLASS_NAMES)
    probs = np.full((len(crops), k), 0.02, dtype=np.float32)
    pred = np.clip(code, 0, k - 1)
    probs[np.arange(len(crops)), pred] = 1 - 0.02 * (k - 1)
    # every 7th in-distribution cell is made uncertain
    unsure = (np.arange(len(crops)) % 7 == 3) & (code >= 0)
    probs[unsure] = 1.0 / k
    decisions = ["ood" if c < 0 else ("uncertain" if u else "counted")
                 for c, u in zip(code, unsure, strict=True)]
    conf = probs.max(axis=1).astype(float).tolist()
    ood = [2.0 if c < 0 else -1.0 for c in code]
    return probs, decisions, conf, ood


class FakeAcquisition:
    """PUSH crops (bound) and send accounting/EOS control messages to the collector."""

    def __init__(self, crops_ep: str, collector_ep: str, run: str = "test") -> None:
        import zmq

        self.ctx = zmq.Context.instance()
        self.push = transport.make_socket(self.ctx, "PUSH", crops_ep, bind=True, hwm=1000,
                                          immediate=False)
        self.ctl = transport.make_socket(self.ctx, "PUSH", collector_ep, bind=False,
                                         immediate=False)
        self.sender = wire.Sender(run, "acquire")
        self.emitted = 0

    def send_crops(self, ids: list[int], crops: np.ndarray, labels: np.ndarray,
                   frame: int = 0) -> None:
        t = wire.now_ns()
        msg = self.sender.message(
            "crops", crops, t={"acquire": t}, frame=frame, ids=[int(i) for i in ids],
            bbox=[[0, 0, crops.shape[1], crops.shape[2]]] * len(ids),
            feat={"area_um": [50.0 + i for i in range(len(ids))],
                  "not_a_dclab_feature": [1.0] * len(ids)},
            labels=[int(x) for x in labels], t_acq=[t] * len(ids),
            kinds=[CLASS_NAMES[x] if x >= 0 else "erythrocyte" for x in labels])
        assert transport.send(self.push, msg, block=True)
        self.emitted += len(ids)

    def account(self, eos: bool = False, **extra: Any) -> None:
        stats = {"emitted": self.emitted, **extra}
        msg = self.sender.message("control", cmd="eos" if eos else "accounting", stats=stats)
        transport.send(self.ctl, msg, block=True)

    def close(self) -> None:
        self.push.close(0)
        self.ctl.close(0)


class FakeWorker(threading.Thread):
    """PULL crops, classify with :func:`fake_classify`, PUSH results to the collector.

    Parameters
    ----------
    duplicate_every : int
        Send every n-th results message twice (0: never).
    drop_every : int
        Silently lose every n-th crops message (0: never) — the collector must report the
        cells as ``lost``.
    reject_every : int
        Reject every n-th crops message and report it in accounting (0: never).
    """

    def __init__(self, crops_ep: str, collector_ep: str, run: str = "test",
                 duplicate_every: int = 0, drop_every: int = 0, reject_every: int = 0) -> None:
        super().__init__(daemon=True)
        import zmq

        self.ctx = zmq.Context.instance()
        self.crops_ep, self.collector_ep = crops_ep, collector_ep
        self.sender = wire.Sender(run, "infer")
        self.duplicate_every, self.drop_every = duplicate_every, drop_every
        self.reject_every = reject_every
        self.rejected = 0
        self.stop_event = threading.Event()
        self.n_msgs = 0
        self.ready = threading.Event()

    def run(self) -> None:
        pull = transport.make_socket(self.ctx, "PULL", self.crops_ep, bind=False)
        push = transport.make_socket(self.ctx, "PUSH", self.collector_ep, bind=False,
                                     immediate=False, hwm=10000)
        self.ready.set()
        try:
            while not self.stop_event.is_set():
                msg = transport.recv(pull, timeout_ms=50)
                if msg is None:
                    continue
                self.n_msgs += 1
                if self.drop_every and self.n_msgs % self.drop_every == 0:
                    continue
                if self.reject_every and self.n_msgs % self.reject_every == 0:
                    self.rejected += msg.n
                    ctl = self.sender.message("control", cmd="accounting",
                                              stats={"rejected": {"non_finite": self.rejected}})
                    transport.send(push, ctl, block=True)
                    continue
                probs, dec, conf, ood = fake_classify(np.asarray(msg.array))
                h = msg.header
                t = dict(h["t"])
                t["infer"] = wire.now_ns()
                out = self.sender.message(
                    "results", probs, t=t, ids=h["ids"], pred=probs.argmax(1).tolist(),
                    decision=dec, conf=conf, ood_score=ood, classes=list(CLASS_NAMES),
                    model="fake", labels=h.get("labels"), t_acq=h.get("t_acq"))
                transport.send(push, out, block=True)
                if self.duplicate_every and self.n_msgs % self.duplicate_every == 0:
                    transport.send(push, out, block=True)
        finally:
            pull.close(0)
            push.close(0)


def wait_for(cond: Any, timeout: float = 20.0, interval: float = 0.02) -> bool:
    """Poll ``cond()`` until true or ``timeout`` [s]."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        time.sleep(interval)
    return False
