"""Helpers for benchmarks (and tests) of the inference worker: small artifacts, synthetic
crops, a synthetic crop producer, a results counter and a worker process over real ZeroMQ
sockets. (Test-only helpers live in ``tests/helpers.py``.)

Nothing here is used by the service itself.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from leukoflow.core import wire
from leukoflow.core.physics import CROP_SIZE_PX, PIXEL_UM
from leukoflow.core.stats import softmax_t
from leukoflow.core.vocabulary import CLASS_NAMES
from leukoflow.inference.worker import InferConfig, InferWorker
from leukoflow.models.artifact import load_artifact, save_artifact
from leukoflow.models.ood import DETECTORS


def synthetic_crops(n: int, size: int = CROP_SIZE_PX, seed: int = 0,
                    dtype: Any = np.float32) -> np.ndarray:
    """Blob-like phase crops ``(n, size, size)`` [rad]: a disc of random radius and height
    plus a random nucleus and noise, so an untrained network spreads its outputs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) - (size - 1) / 2
    r2 = yy * yy + xx * xx
    rad = rng.uniform(0.15, 0.45, n).astype(np.float32)[:, None, None] * size
    h = rng.uniform(0.5, 3.0, n).astype(np.float32)[:, None, None]
    cell = h * np.clip(1 - r2[None] / rad**2, 0, None) ** 0.5
    oy = rng.uniform(-0.1, 0.1, n).astype(np.float32)[:, None, None] * size
    nuc = rng.uniform(0.0, 2.0, n).astype(np.float32)[:, None, None] * np.exp(
        -((yy[None] - oy) ** 2 + xx[None] ** 2) / (2 * (0.1 * size) ** 2))
    x = cell + nuc + rng.normal(0, 0.05, (n, size, size)).astype(np.float32)
    return x.astype(dtype)


def make_test_artifact(folder: str | Path, input_size: int = 32, seed: int = 0,
                       detector: str = "mahalanobis", temperature: float = 1.5,
                       logit_scale: float = 20.0) -> Any:
    """Write and load a small untrained LeNet5 artifact with a fitted OOD detector.

    The last layer is scaled by ``logit_scale`` so the untrained network is confident on
    some crops; the confidence threshold is the median max-probability and the OOD
    threshold the 90th percentile of the detector score on synthetic crops, so a test set
    contains counted, uncertain and OOD cells.

    Returns
    -------
    models.artifact.Artifact
    """
    import torch

    from leukoflow.models.architectures import LeNet5

    torch.manual_seed(seed)
    model = LeNet5(in_size=input_size, num_classes=len(CLASS_NAMES)).eval()
    with torch.no_grad():
        model.fc_out.weight.mul_(logit_scale)
    mean, std = 1.0, 1.0
    x = synthetic_crops(512, input_size, seed=seed + 1)
    with torch.inference_mode():
        logits, feats = model.forward_with_features(torch.from_numpy((x - mean) / std)[:, None])
    logits, feats = logits.numpy(), feats.numpy()
    labels = logits.argmax(1)
    det = DETECTORS.create(detector)
    det.fit(logits, feats, labels, temperature=temperature)
    scores = det.score(logits, feats)
    thr = float(np.quantile(scores, 0.9))
    conf = softmax_t(logits, temperature).max(1)
    card = {
        "architecture": "lenet5", "arch_kwargs": {}, "input_size": input_size,
        "pixel_size_um": PIXEL_UM, "normalisation": {"mean": mean, "std": std},
        "class_names": list(CLASS_NAMES), "temperature": temperature,
        "confidence_threshold": float(np.median(conf)),
        "ood": {"detector": detector, "params": det.params, "threshold": thr},
        "training_data_sha256": "untrained-test-artifact",
    }
    path = save_artifact(folder, model, card, extra_tensors=det.arrays)
    return load_artifact(path)


def produce(endpoint: str, n_messages: int, crops_per_message: int, size: int = CROP_SIZE_PX,
            dtype: str = "float32", run: str = "bench", seed: int = 0, hwm: int = 16,
            bind: bool = True, ready: Any = None) -> None:
    """Synthetic acquisition: send ``n_messages`` valid crop messages, then ``eos``.

    Headers are encoded before sending starts (distinct seq and cell ids), so the producer
    costs little CPU beside the ZeroMQ send. Meant to run in its own process.

    Parameters
    ----------
    endpoint : str
        Where to bind (or connect) the PUSH socket.
    n_messages, crops_per_message : int
        Volume [messages], [cells/message].
    size : int
        Crop side [px].
    dtype : str
        ``float32`` or ``float16`` payload.
    ready : multiprocessing.Event, optional
        Waited for before sending (so the consumer is connected and warmed up).
    """
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, -1)
    sock.setsockopt(zmq.SNDHWM, hwm)
    if bind:
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)
    crops = synthetic_crops(crops_per_message, size, seed=seed, dtype=np.dtype(dtype))
    payload = memoryview(np.ascontiguousarray(crops)).cast("B")
    snd = wire.Sender(run, "acquire")
    headers = []
    bbox = [[0, 0, size, size]] * crops_per_message
    for i in range(n_messages):
        first = i * crops_per_message
        msg = snd.message("crops", crops, t={"acquire": 0}, frame=i,
                          ids=list(range(first, first + crops_per_message)), bbox=bbox,
                          feat={})
        headers.append(msg.header)
    if ready is not None:
        ready.wait()
    import msgpack

    for h in headers:
        h["t"] = {"acquire": time.monotonic_ns()}
        h["dtype"] = crops.dtype.str
        h["shape"] = list(crops.shape)
        sock.send_multipart([msgpack.packb(h, use_bin_type=True), payload], copy=False)
    eos = snd.message("control", cmd="eos", stats={"cells_emitted":
                                                   n_messages * crops_per_message})
    sock.send_multipart(wire.encode(eos))
    sock.close()
    ctx.term()


def count_results(endpoint: str, n_cells: int, timeout_s: float = 120.0,
                  ctx: Any = None) -> dict[str, float]:
    """Collector stand-in: bind PULL, count result cells cheaply until ``n_cells`` arrived.

    Returns
    -------
    dict
        ``cells``, ``seconds`` (first to last result) and ``cells_per_s``.
    """
    import msgpack
    import zmq

    own = ctx is None
    ctx = ctx or zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    cells = 0
    t_first = t_last = None
    msgs = 0
    end = time.monotonic() + timeout_s
    first_n = 0
    while cells + first_n < n_cells and time.monotonic() < end:
        if not sock.poll(100):
            continue
        frames = sock.recv_multipart(copy=False)
        h = msgpack.unpackb(frames[0].buffer, raw=False)
        if h.get("kind") != "results":
            continue
        now = time.perf_counter()
        if t_first is None:
            t_first = now - 1e-9
            first_n = len(h["ids"])
        else:
            cells += len(h["ids"])
        t_last = now
        msgs += 1
    sock.close(0)
    if own:
        ctx.term()
    # the first message only starts the clock: rate = cells after it / time after it
    dt = (t_last - t_first) if t_first is not None else float("nan")
    total = cells + first_n
    return {"cells": total, "seconds": dt, "cells_per_s": cells / dt if dt and dt > 0 else 0.0,
            "messages": msgs}


class _EnergyScore:
    """Energy OOD score ``-T logsumexp(logits / T)`` (no fitted arrays)."""

    registry_name = "energy"

    def __init__(self, temperature: float = 1.0, threshold: float = 0.0) -> None:
        self.temperature = temperature
        self.threshold = threshold
        self.params = {"temperature": temperature}
        self.arrays: dict[str, np.ndarray] = {}

    def score(self, logits: np.ndarray, features: np.ndarray) -> np.ndarray:
        z = np.asarray(logits, np.float64) / self.temperature
        m = z.max(axis=1)
        return -self.temperature * (m + np.log(np.exp(z - m[:, None]).sum(axis=1)))


class SyntheticArtifact:
    """Artifact stand-in (same attributes as ``leukoflow.models.artifact.Artifact``) for an
    untrained LeNet5 built from a seed, with an energy OOD score: no files, no safetensors, so GPU
    benchmarks run where only torch and numpy are installed."""

    architecture = "lenet5"
    class_names = CLASS_NAMES
    temperature = 1.0
    confidence_threshold = 0.25  # untrained: max p is barely above 1/K, count them all
    pixel_size_um = PIXEL_UM
    normalisation = {"mean": 0.0, "std": 1.0}

    def __init__(self, input_size: int = CROP_SIZE_PX, seed: int = 0) -> None:
        self.input_size = int(input_size)
        self.seed = int(seed)
        self.name = f"synthetic-lenet5-{input_size}"
        self.sha256 = f"synthetic{seed:055d}"
        self.ood = {"detector": "energy", "params": {}, "threshold": -1.0}

    def build_model(self, device: str = "cpu") -> Any:
        import torch

        from leukoflow.models.architectures import LeNet5

        torch.manual_seed(self.seed)
        return LeNet5(in_size=self.input_size, num_classes=len(CLASS_NAMES)).to(device).eval()

    def ood_detector(self) -> _EnergyScore:
        return _EnergyScore(self.temperature, self.ood["threshold"])


def worker_process(cfg: dict, ready: Any, stop: Any, out: Any = None,
                   synthetic_size: int | None = None, io_threads: int = 1) -> None:
    """Run an :class:`~leukoflow.inference.worker.InferWorker` in this (child) process.

    Sets ``ready`` once the worker is warmed up, stops when ``stop`` is set and puts the
    worker's batch/cell/compute counters on the queue ``out``.

    Parameters
    ----------
    cfg : dict
        :class:`~leukoflow.inference.worker.InferConfig` fields.
    synthetic_size : int, optional
        Use a :class:`SyntheticArtifact` of this crop size instead of ``cfg["model"]``.
    io_threads : int
        ZeroMQ I/O threads of the worker's context.
    """
    import torch
    import zmq

    torch.set_num_threads(int(cfg.get("threads", 1)))

    art = SyntheticArtifact(synthetic_size) if synthetic_size else None
    ctx = zmq.Context(io_threads=io_threads)
    w = InferWorker(InferConfig(**cfg), artifact=art, context=ctx).start()
    if not w.ready.wait(300):
        if out is not None:
            out.put({"error": repr(w.error)})
        return
    ready.set()
    stop.wait(900)
    w.stop()
    w.join(60)
    if out is not None:
        m = w.metrics
        out.put({
            "batches": m["leukoflow_inference_exec_count_total"]._value.get(),
            "cells": m["leukoflow_inference_count_total"]._value.get(),
            "compute_s": m["leukoflow_inference_compute_infer_duration_seconds"]._sum.get(),
            "error": repr(w.error) if w.error else None,
        })
    ctx.term()


def measure_service(cfg: dict, n_msgs: int, per_msg: int, size: int, dtype: str = "float32",
                    *, worker_kwargs: dict | None = None, producer_kwargs: dict | None = None,
                    timeout_s: float = 600.0, worker_stats: bool = False) -> dict:
    """Cells/s of an inference worker process fed by a producer process over real ZeroMQ.

    Starts :func:`worker_process` (``cfg``: :class:`~leukoflow.inference.worker.InferConfig`
    fields) and :func:`produce` (``n_msgs`` messages of ``per_msg`` crops of ``size`` px,
    ``dtype``) in spawned processes, counts results at ``cfg["results_endpoint"]`` with
    :func:`count_results`, then stops and reaps both.

    Returns
    -------
    dict
        :func:`count_results` output; with ``worker_stats`` also ``worker`` (the worker's
        own statistics, or ``{"error": ...}``).
    """
    import multiprocessing as mp

    mpc = mp.get_context("spawn")
    ready, stop = mpc.Event(), mpc.Event()
    out = mpc.Queue() if worker_stats else None
    worker = mpc.Process(target=worker_process, args=(cfg, ready, stop, out),
                         kwargs=dict(worker_kwargs or {}), daemon=True)
    worker.start()
    producer = mpc.Process(target=produce,
                           args=(cfg["crops_endpoint"], n_msgs, per_msg, size, dtype),
                           kwargs={"ready": ready, **(producer_kwargs or {})}, daemon=True)
    producer.start()
    try:
        res = count_results(cfg["results_endpoint"], n_msgs * per_msg, timeout_s=timeout_s)
    finally:
        stop.set()
        producer.join(30)
        if out is not None:
            try:
                res["worker"] = out.get(timeout=90)
            except Exception as exc:  # noqa: BLE001 - report, do not hide the measurement
                res["worker"] = {"error": repr(exc)}
        worker.join(60)
        for p in (producer, worker):
            if p.is_alive():
                p.kill()
    return res
