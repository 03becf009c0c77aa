"""Test helpers (not shipped): stand-in services, crop and message builders, result sinks.

* Stand-in acquisition and inference services for the live-run tests (:class:`FakeAcquisition`,
  :class:`FakeWorker`). They speak the real wire protocol over real ZeroMQ sockets, so the
  collector, recorder and replay are tested against the same bytes the real services send.
  (The real services are exercised end to end in ``test_run_e2e.py``.)
* Inference worker tests: :func:`crop_message`, :class:`ResultsSink` (a collector stand-in),
  :func:`offline_predict` (reference predictions without the service).
* Explainer tests: :func:`sim_crops`, :func:`train_small`.

Benchmarks' own helpers (synthetic crops, test artifacts, producer processes) stay in
``leukoflow.benchmarks.workload_infer`` / ``workload_explain``.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

import numpy as np

from leukoflow.acquisition.sim import make_crop_dataset
from leukoflow.core import transport, wire
from leukoflow.core.transport import free_tcp_port as free_port
from leukoflow.core.transport import run_port_args
from leukoflow.core.vocabulary import CLASS_NAMES
from leukoflow.inference.decision import rule_from_artifact

if TYPE_CHECKING:  # torch-importing
    from leukoflow.explain.model import ModelBundle

__all__ = ["free_port", "endpoint", "run_port_args", "http_get", "make_crops", "fake_classify",
           "FakeAcquisition", "FakeWorker", "wait_for", "crop_message", "ResultsSink",
           "offline_predict", "sim_crops", "train_small"]


def endpoint() -> str:
    """A free loopback tcp endpoint."""
    return transport.tcp_endpoint(free_port())


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """``(status, body)`` of a GET; an HTTP error gives its code and body, no answer ``(0, "")``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


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


# ----------------------------------------------------------------------------- inference worker

def crop_message(sender: wire.Sender, crops: np.ndarray, first_id: int, frame: int = 0,
                 labels: list[int] | None = None, **fields: Any) -> wire.Message:
    """A valid ``crops`` message for ``crops`` with consecutive cell ids from ``first_id``."""
    n = crops.shape[0]
    s = crops.shape[-1]
    now = time.monotonic_ns()
    extra: dict[str, Any] = {"t_acq": [now] * n}
    if labels is not None:
        extra["labels"] = labels
    extra.update(fields)
    return sender.message("crops", crops, t={"acquire": now}, frame=frame,
                          ids=list(range(first_id, first_id + n)),
                          bbox=[[0, 0, s, s]] * n, feat={}, **extra)


class ResultsSink:
    """PULL socket bound like the collector, draining into lists in a background thread.

    Attributes
    ----------
    results : list of wire.Message
    control : list of wire.Message
    heartbeats : list of wire.Message
    """

    def __init__(self, ctx: Any, endpoint: str) -> None:
        import zmq

        self.sock = ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.results: list[wire.Message] = []
        self.control: list[wire.Message] = []
        self.heartbeats: list[wire.Message] = []
        self.t_recv: list[int] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(20):
                continue
            frames = self.sock.recv_multipart(copy=False)
            msg = wire.decode(frames)  # the worker's output must always validate
            with self._lock:
                if msg.kind == "results":
                    self.results.append(msg)
                    self.t_recv.append(time.monotonic_ns())
                elif msg.kind == "control":
                    self.control.append(msg)
                else:
                    self.heartbeats.append(msg)

    def cells(self) -> int:
        """Cells received in results messages."""
        with self._lock:
            return sum(m.n for m in self.results)

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> bool:
        """Poll ``predicate(self)`` until true or ``timeout`` [s]."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate(self):
                return True
            time.sleep(0.01)
        return predicate(self)

    def close(self) -> None:
        """Stop the thread and close the socket."""
        self._stop.set()
        self._thread.join(2)
        self.sock.close(0)


def offline_predict(artifact: Any, crops: np.ndarray) -> dict[str, np.ndarray]:
    """Reference predictions without the service: the artifact's own preprocessing and
    network in PyTorch (float32, CPU), then :func:`leukoflow.inference.decision.rule_from_artifact`.

    Returns
    -------
    dict
        ``probs``, ``pred``, ``conf``, ``ood_score``, ``decision`` (names) per cell.
    """
    import torch


    model = artifact.build_model()
    with torch.inference_mode():
        logits, feats = model.forward_with_features(torch.from_numpy(artifact.preprocess(crops)))
    d = rule_from_artifact(artifact)(logits.numpy(), feats.numpy())
    return {"probs": d.probs, "pred": d.pred, "conf": d.conf, "ood_score": d.ood_score,
            "decision": np.array(d.names())}


# ----------------------------------------------------------------------------- explainer

def sim_crops(n_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labeled in-distribution crops from ``acquisition.sim.make_crop_dataset`` [rad]."""

    d = make_crop_dataset(n_per_class, 0, seed)
    x = np.asarray(d["x"], np.float32)
    y = np.asarray(d["y"], np.int64)
    keep = y >= 0
    return x[keep], y[keep]


def train_small(x: np.ndarray, y: np.ndarray, seed: int = 0, epochs: int = 12,
                name: str = "test-lenet5") -> ModelBundle:
    """Seeded LeNet5 trained on (x, y) with an 80/20 split; temperature fitted on the 20 %."""
    import torch

    from leukoflow.explain.model import ModelBundle
    from leukoflow.models.architectures import LeNet5
    from leukoflow.models.calibration import fit_temperature
    from leukoflow.models.train import TrainConfig, train_model

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    nv = max(4, len(y) // 5)
    va, tr = idx[:nv], idx[nv:]
    mean, std = float(x[tr].mean()), float(x[tr].std()) or 1.0
    xn = ((x - mean) / std)[:, None].astype(np.float32)
    net = LeNet5(in_size=x.shape[-1], num_classes=int(y.max()) + 1)
    cfg = TrainConfig(epochs=epochs, batch_size=64, patience=epochs, seed=seed, device="cpu")
    train_model(net, xn[tr], y[tr], xn[va], y[va], cfg, norm_std=std, progress=False)
    with torch.no_grad():
        z = net(torch.from_numpy(xn[va])).numpy()
    t = fit_temperature(z, y[va])
    return ModelBundle.from_module(net, mean=mean, std=std, temperature=t, name=name)
