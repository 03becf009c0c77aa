"""Fuzzing past the decoder: adversarial messages that pass wire validation, fed to the
collector's run state, the inference worker's handler and the explainer's handler.

:func:`message` builds one message of a kind from a :class:`random.Random` (so hypothesis can
drive it with ``st.randoms()`` and shrink, and the benchmark can draw a million): valid in
shape but extreme in content (ids from 0 to 2**63-1 and repeated, unknown classes and runs,
finite but huge crop values, NaN crops for the worker, foreign source fields, arbitrary
``stats`` keys and nesting), and with probability ``wild`` one arbitrary mutation anywhere in
the header (most of those are rejected by the decoder, which is the point of it).

The harnesses (:class:`CollectorHarness`, :class:`WorkerHarness`, :class:`ExplainHarness`)
hold a real service object without its network loop and feed it frames the way its loop
would; they count messages that passed the decoder, those rejected by it, *handler errors*
(an exception that reached the service's error boundary: the message is rejected with reason
``handler_error``, the service goes on) and *crashes* (an exception that escaped the boundary,
or a broken invariant afterwards). The target is zero of both.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from leukoflow.core import wire
from leukoflow.core.jsonutil import dumps
from leukoflow.core.vocabulary import CLASS_NAMES, DECISIONS
from leukoflow.explain.service import ExplainConfig, ExplainService
from leukoflow.inference.worker import InferConfig, InferWorker
from leukoflow.run.collector import Collector, CollectorConfig

ROLES = ("acquire", "infer", "replay", "supervisor", "collector", "x")
EDGE_INTS = (0, 1, 2, 7, 255, 2**31 - 1, 2**36, 2**36 + 1, 2**53 - 1, 2**53, 2**63 - 1)


def _count(rng: random.Random) -> int:
    return rng.choice(EDGE_INTS) if rng.random() < 0.3 else rng.randint(0, 50)


def _text(rng: random.Random, n: int = 12) -> str:
    alphabet = "ab-_:/.0é漢\x00 " if rng.random() < 0.3 else "abcdefghij"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, n)))


def _json_value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth < 3 and r < 0.15:
        return {_text(rng, 6): _json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    if depth < 3 and r < 0.3:
        return [_json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return rng.choice([None, True, False, rng.randint(-2**63, 2**64 - 1), rng.random() * 1e300,
                       -0.0, _text(rng), rng.choice(EDGE_INTS), 1.5])


def _wild(rng: random.Random) -> Any:
    """Any msgpack value, including NaN, bytes and huge nesting."""
    r = rng.random()
    if r < 0.1:
        return float("nan")
    if r < 0.15:
        return b"\x00\xff"
    if r < 0.2:
        return [[[[1]]]] * rng.randint(0, 3)
    return _json_value(rng)


def _sender(rng: random.Random, role: str | None = None) -> str:
    role = role or rng.choice(ROLES)
    return f"{role}-{rng.randint(1, 5)}-{rng.choice(['aaaa', 'bbbb', 'cccc'])}"


def _ids(rng: random.Random, n: int) -> list[int]:
    base = rng.choice([0, 2**36 * rng.randint(0, 3), 2**53 - n - 1, 2**63 - n - 1])
    ids = [base + i for i in range(n)]
    if n > 1 and rng.random() < 0.2:
        ids[-1] = ids[0]  # a repeat inside the message
    return ids


def _stats(rng: random.Random, cmd: str) -> dict[str, Any]:
    st: dict[str, Any] = {}
    for key in rng.sample(list(wire.STATS_COUNTS), rng.randint(0, 4)):
        st[key] = _count(rng)
    for key in rng.sample(list(wire.STATS_COUNT_MAPS), rng.randint(0, 2)):
        st[key] = {_text(rng, 8): _count(rng) for _ in range(rng.randint(0, 3))}
    if rng.random() < 0.5:
        st["crops_sender"] = _sender(rng, "acquire")
    event = rng.choice(["rejected", "dropped", "totals", "hello", None, _text(rng, 5)])
    if event is not None:
        st["event"] = event
    if event in wire.CELL_EVENTS or rng.random() < 0.2:
        st["reason"] = _text(rng, 10)
        n = rng.randint(0, 5)
        st["ids"] = _ids(rng, n)
        st["cells"] = rng.choice([n, _count(rng)])
        if rng.random() < 0.6:
            st.update(src_sender=_sender(rng, "acquire"), src_seq=_count(rng),
                      src_n=rng.randint(1, 6), src_cum=_count(rng))
    if rng.random() < 0.3:
        st["final"] = rng.random() < 0.5
    if rng.random() < 0.3:
        st["restarts"] = {rng.choice(["infer-0", "infer-1", "source", "collector",
                                      _text(rng, 5)]): _count(rng)}
    for _ in range(rng.randint(0, 3)):
        st[_text(rng, 8)] = _json_value(rng)
    return st


def message(rng: random.Random, kind: str, *, side: int = 32, wild: float = 0.2
            ) -> list[bytes]:
    """Two frames of one fuzzed message of ``kind`` (see the module docstring)."""
    h: dict[str, Any] = {"v": 1, "kind": kind, "run": rng.choice(["", "r", "r2", _text(rng)]),
                         "sender": _sender(rng), "seq": _count(rng),
                         "t": {rng.choice(["acquire", "t_acq", "infer_send", _text(rng, 5)]):
                               rng.randint(0, 2**63 - 1) for _ in range(rng.randint(0, 3))}}
    payload = b""
    n = rng.randint(0, 6)
    if kind in ("control", "heartbeat"):
        cmd = rng.choice(wire.CONTROL_COMMANDS)
        if kind == "control":
            h["cmd"] = cmd
        h["stats"] = _stats(rng, cmd)
    elif kind in ("crops", "explain"):
        s = rng.choice([side, side, side, 16, 1])
        dtype = rng.choice(["<f4", "<f4", "<f2"])
        x = np.random.default_rng(rng.randint(0, 2**32 - 1)).normal(0, 1, (n, s, s))
        r = rng.random()
        big = np.finfo(np.dtype(dtype)).max
        if r < 0.2:
            x *= big  # finite but extreme (overflows the network)
        elif r < 0.3 and kind == "crops" and x.size:
            x.reshape(-1)[rng.randrange(x.size)] = np.nan  # the worker rejects this cell
        arr = np.ascontiguousarray(np.clip(x, -big, big).astype(dtype))
        payload = arr.tobytes()
        h.update(dtype=dtype, shape=list(arr.shape), ids=_ids(rng, n))
        if kind == "crops":
            h["frame"] = _count(rng)
            h["bbox"] = [[rng.randint(-5, 5), 0, s, s] for _ in range(n)]
            if rng.random() < 0.7:
                h["cum"] = _count(rng)
        if rng.random() < 0.5:
            h["labels"] = [rng.randint(-1, 63) for _ in range(n)]
        if rng.random() < 0.3:
            h["t_acq"] = [rng.randint(0, 2**63 - 1) for _ in range(n)]
        if rng.random() < 0.3:
            h["feat"] = {rng.choice(["area_um", "bright_avg", _text(rng, 6)]):
                         [rng.choice([0.0, -1e308, 1e308, rng.random()]) for _ in range(n)]
                         for _ in range(rng.randint(1, 3))}
    if kind in ("results", "explain"):
        classes = list(CLASS_NAMES) if rng.random() < 0.8 else \
            [_text(rng, 6) for _ in range(rng.randint(1, 6))]
        k = len(classes)
        probs = np.random.default_rng(rng.randint(0, 2**32 - 1)).dirichlet(np.ones(k), n)
        probs = np.clip(probs, 0, 1).astype(np.float32)
        h.update(classes=classes, pred=[rng.randint(0, k - 1) for _ in range(n)],
                 decision=[rng.choice(DECISIONS) for _ in range(n)],
                 conf=[rng.choice([0.0, 1.0, rng.random()]) for _ in range(n)],
                 ood_score=[rng.choice([0.0, -1e308, 1e308, rng.random()]) for _ in range(n)],
                 model=_text(rng))
        if kind == "results":
            h.update(dtype="<f4", shape=[n, k], ids=_ids(rng, n), frame=_count(rng))
            payload = probs.tobytes()
            if rng.random() < 0.7:
                h.update(src_sender=_sender(rng, "acquire"), src_seq=_count(rng),
                         src_n=rng.randint(1, 6), src_cum=_count(rng))
        else:
            h["probs"] = probs.astype(float).tolist()
    if rng.random() < wild:
        _mutate(rng, h)
    try:
        head = msgpack.packb(h, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        head = msgpack.packb({"v": 1}, use_bin_type=True)
    return [head, payload]


def _mutate(rng: random.Random, h: dict[str, Any]) -> None:
    """One arbitrary change somewhere in the header (key, list entry or stats entry)."""
    target: Any = h
    if "stats" in h and isinstance(h["stats"], dict) and rng.random() < 0.5:
        target = h["stats"]
    keys = list(target) + [_text(rng, 6)]
    key = rng.choice(keys)
    r = rng.random()
    if r < 0.15:
        target.pop(key, None)
    elif r < 0.4 and isinstance(target.get(key), list) and target[key]:
        lst = target[key]
        lst[rng.randrange(len(lst))] = _wild(rng)
    else:
        target[key] = _wild(rng)


# ----------------------------------------------------------------------------- harnesses

class Harness:
    """Counts of one handler under fuzzing."""

    def __init__(self) -> None:
        self.fed = 0
        self.decoded = 0
        self.rejected_by_decoder = 0
        self.handler_errors = 0
        self.crashes = 0
        self.first_crash = ""

    def _crash(self, exc: BaseException, frames: list[bytes]) -> None:
        self.crashes += 1
        if not self.first_crash:
            self.first_crash = f"{type(exc).__name__}: {exc} in {frames[0][:300]!r}"

    def counts(self) -> dict[str, Any]:
        """Counters (JSON-ready)."""
        return {"fed": self.fed, "past_decoder": self.decoded,
                "rejected_by_decoder": self.rejected_by_decoder,
                "handler_errors": self.handler_errors, "crashes": self.crashes,
                "first_crash": self.first_crash}


class CollectorHarness(Harness):
    """A :class:`~leukoflow.run.collector.Collector` (no sockets) fed through ``_handle``."""

    KINDS = ("results", "results", "control", "heartbeat", "crops", "explain")

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__()
        self.coll = Collector(CollectorConfig(results="", live="", metrics_port=-1,
                                              run_dir=str(run_dir), loss_timeout_s=0.1,
                                              silence_s=0.5))
        self.coll._gaps = wire.GapTracker()
        self.coll._switch_to = ""

    def feed(self, frames: list[bytes]) -> None:
        """Hand one message to the collector as its loop does; check its state afterwards."""
        self.fed += 1
        try:
            wire.decode(frames)
            self.decoded += 1
        except wire.WireError:
            self.rejected_by_decoder += 1
        before = self.coll.state.messages_rejected["handler_error"]
        try:
            self.coll._handle(frames)
        except Exception as exc:  # noqa: BLE001 - escaping the boundary is a crash
            self._crash(exc, frames)
        self.handler_errors += self.coll.state.messages_rejected["handler_error"] - before

    def check(self) -> None:
        """Periodic work of the loop and the invariants of the accounting."""
        st = self.coll.state
        try:
            st.check_liveness()
            st.ledger.advance()
            snap = st.snapshot()
            dumps(snap)
            acc = snap["accounting"]
            for key in ("emitted", "in_flight", "lost_total", "duplicates", "rejected_total"):
                if not isinstance(acc[key], int) or acc[key] < 0:
                    raise AssertionError(f"accounting[{key}] = {acc[key]!r}")
        except Exception as exc:  # noqa: BLE001
            self._crash(exc, [b"<periodic>"])


class WorkerHarness(Harness):
    """An :class:`~leukoflow.inference.worker.InferWorker` (real backend and sockets, no
    loop) fed through ``_handle``; batches run through the backend and the decision step."""

    KINDS = ("crops", "crops", "crops", "control", "heartbeat", "results", "explain")

    def __init__(self, artifact: Any, workdir: str | Path, backend: str = "torch-cpu") -> None:
        super().__init__()
        import zmq

        workdir = Path(workdir)
        self.ctx = zmq.Context()
        self.sink = self.ctx.socket(zmq.PULL)
        self.sink.setsockopt(zmq.LINGER, 0)
        port = self.sink.bind_to_random_port("tcp://127.0.0.1")
        cfg = InferConfig(backend=backend, max_batch=16, max_delay_ms=0.0,
                          crops_endpoint=f"ipc://{workdir}/crops",
                          results_endpoint=f"tcp://127.0.0.1:{port}", explain_endpoint="",
                          metrics_port=-1, cache_dir=str(workdir / "cache"), warmup=False,
                          results_timeout_ms=2000, results_linger_ms=0)
        self.worker = InferWorker(cfg, artifact=artifact, context=self.ctx)
        self.worker._setup()
        self.side = int(self.worker._backend.input_size)
        self.results = 0

    def feed(self, frames: list[bytes]) -> None:
        """Hand one message to the worker as its receive loop does."""
        self.fed += 1
        try:
            wire.decode(frames, check_finite=False)
            self.decoded += 1
        except wire.WireError:
            self.rejected_by_decoder += 1
        acc = self.worker.accounting
        before = acc.rejected_messages["handler_error"] + acc.rejected["handler_error"]
        try:
            self.worker._handle(frames, time.monotonic_ns())
            if self.worker.batcher.pending >= self.worker.config.max_batch:
                self.worker._drain()
        except Exception as exc:  # noqa: BLE001
            self._crash(exc, frames)
        self.handler_errors += (acc.rejected_messages["handler_error"]
                                + acc.rejected["handler_error"] - before)

    def check(self) -> None:
        """Run what is pending, read what was sent, check the worker's accounting."""
        import zmq

        try:
            self.worker._drain()
            while self.sink.poll(0):
                msg = wire.decode(self.sink.recv_multipart())  # everything sent validates
                if msg.kind == "results":
                    self.results += msg.n
                    if not np.isfinite(msg.array).all() or not all(
                            math.isfinite(c) for c in msg.header["conf"]):
                        raise AssertionError("a results message with a non-finite value")
            if not self.worker.accounting.balanced(self.worker.batcher.pending):
                raise AssertionError("worker accounting not balanced")
        except (zmq.ZMQError, wire.WireError, AssertionError, Exception) as exc:  # noqa: BLE001
            self._crash(exc, [b"<periodic>"])

    def close(self) -> None:
        """Close the worker's sockets and the context."""
        self.worker._close()
        self.sink.close(0)
        self.ctx.term()


class ExplainHarness(Harness):
    """An :class:`~leukoflow.explain.service.ExplainService` (no threads) fed through
    ``_handle``; :meth:`check` explains a few backlog cells with Guided Backprop."""

    KINDS = ("explain", "explain", "explain", "control", "heartbeat", "crops", "results")

    def __init__(self, run_dir: str | Path, side: int = 32) -> None:
        super().__init__()
        import torch

        from leukoflow.explain.methods import EXPLAINERS
        from leukoflow.explain.model import ModelBundle
        from leukoflow.models.architectures import LeNet5

        torch.manual_seed(0)
        bundle = ModelBundle.from_module(LeNet5(in_size=side), mean=0.0, std=1.0, name="fuzz")
        self.svc = ExplainService(ExplainConfig(run_dir=str(run_dir), backlog=8, png=False,
                                                methods=("guided_backprop",), metrics_port=-1),
                                  bundle=bundle)
        self.svc.explainers = [EXPLAINERS.create("guided_backprop", bundle=bundle)]
        self.svc.crop_side = side  # what _load sets once the model is loaded
        self.svc.class_names = tuple(bundle.class_names)

    def feed(self, frames: list[bytes]) -> None:
        """Decode and hand one message to the service's handler (its boundary counts)."""
        self.fed += 1
        try:
            msg = wire.decode(frames)
            self.decoded += 1
        except wire.WireError:
            self.rejected_by_decoder += 1
            return
        try:
            self.svc._handle(msg)
        except Exception:  # noqa: BLE001 - the receive loop's boundary: handler_error
            self.handler_errors += 1

    def check(self, explain: int = 2) -> None:
        """Explain up to ``explain`` backlog cells as the work loop does."""
        try:
            cells = self.svc.backlog.take(explain, 0.0)
            if cells:
                self.svc._explain(cells)
        except Exception as exc:  # noqa: BLE001
            self._crash(exc, [b"<explain>"])


def fuzz(harness: Harness, n: int, seed: int = 0, check_every: int = 200,
         wild: float = 0.2) -> dict[str, Any]:
    """Feed ``n`` fuzzed messages to ``harness``; return its counts and the rate."""
    rng = random.Random(seed)
    side = getattr(harness, "side", 32)
    t0 = time.perf_counter()
    for i in range(n):
        harness.feed(message(rng, rng.choice(harness.KINDS), side=side, wild=wild))
        if (i + 1) % check_every == 0:
            harness.check()
    harness.check()
    dt = time.perf_counter() - t0
    return {**harness.counts(), "seconds": dt, "messages_per_s": n / dt if dt > 0 else 0.0}
