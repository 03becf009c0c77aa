"""Triton Inference Server as the engine: the worker batches, decides and routes; Triton runs
the forward passes (gRPC, ``tritonclient``).

Several workers (one per instrument) share one Triton; Triton's own dynamic batcher merges
their requests. The served model comes from ``leukoflow export --triton``
(:mod:`leukoflow.inference.triton_repo`): input ``crops`` (N, S, S) float32 raw phase in rad
(normalisation inside the graph, as for every local backend), outputs ``logits`` (N, K) and
``features`` (N, D). Its ``config.pbtxt`` carries the artifact's model sha256 as the parameter
``leukoflow_model_sha256``; the backend refuses a served model whose hash differs from the
local artifact's, so the worker's decision rule (temperature, OOD detector, thresholds from the
card) always applies to the network it was fitted for.

Data path per batch. When the server is on the same host (``shared_memory="auto"`` and a
loopback URL, or ``"on"``), every in-flight slot owns three POSIX shared-memory regions
(input, logits, features) registered with Triton: the worker gathers the crops straight into
the input region (:meth:`TritonBackend.host_buffer`), the request carries only region names,
and the outputs are read from their regions. Otherwise the crops travel inside the gRPC
request. Requests are asynchronous (``async_infer``); up to ``in_flight`` batches are in
flight, so Triton computes batch *k* while the worker finishes batch *k - 1*.

Outages. A failed request is retried (after re-registering the shared-memory regions, which a
restarted server has forgotten) until ``retry_s`` has passed; only then does :meth:`collect`
raise, and the worker rejects the batch's cells with reason ``backend``: every cell in flight
during a Triton restart is either classified or counted as lost with a reason.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from leukoflow.core.config import resolve
from leukoflow.inference.backends.base import (
    BACKENDS,
    Backend,
    BackendOutput,
    BackendUnavailable,
    finite_rows,
)

log = logging.getLogger(__name__)

SECTION = "triton"
INPUT = "crops"
OUTPUTS = ("logits", "features")
PARAM_SHA = "leukoflow_model_sha256"
"""config.pbtxt parameter holding ``Artifact.sha256`` of the exported network."""
PARAM_INPUT_SIZE = "leukoflow_input_size"
PARAM_NORMALISATION = "leukoflow_normalisation"
SHM_MODES = ("auto", "on", "off")
_counter = itertools.count()


class TritonError(RuntimeError):
    """Triton cannot serve this worker (unreachable, model missing, wrong model)."""


@dataclass(frozen=True)
class TritonClientConfig:
    """How a worker reaches its Triton server (section ``[triton]``,
    ``LEUKOFLOW_TRITON_*``).

    Attributes
    ----------
    url : str
        gRPC endpoint ``host:port`` (Triton's default gRPC port is 8001).
    model : str
        Served model name; empty = the artifact's name (what ``export --triton`` writes).
    model_version : str
        Served version; empty = the server's choice (latest).
    shared_memory : str
        ``auto`` (system shared memory when ``url`` is a loopback address), ``on``, ``off``.
    in_flight : int
        Batches in flight at once [batches].
    timeout_s : float
        Deadline of one request [s].
    retry_s : float
        How long a failing batch is retried (server restart, network) before its cells are
        rejected [s].
    connect_timeout_s : float
        How long the backend waits at start for the server and the model to be ready [s].
    ssl : bool
        gRPC over TLS (across hosts; see deploy/README.md).
    root_certificates, private_key, certificate_chain : str
        PEM files for TLS (server CA; client key and certificate for mutual TLS).
    """

    url: str = "127.0.0.1:8001"
    model: str = ""
    model_version: str = ""
    shared_memory: str = "auto"
    in_flight: int = 2
    timeout_s: float = 30.0
    retry_s: float = 30.0
    connect_timeout_s: float = 60.0
    ssl: bool = False
    root_certificates: str = ""
    private_key: str = ""
    certificate_chain: str = ""

    def __post_init__(self) -> None:
        if self.shared_memory not in SHM_MODES:
            raise ValueError(f"shared_memory must be one of {SHM_MODES}, "
                             f"got {self.shared_memory!r}")
        if self.in_flight < 1 or self.timeout_s <= 0 or self.retry_s < 0:
            raise ValueError("need in_flight >= 1, timeout_s > 0, retry_s >= 0")
        host, sep, port = self.url.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"url must be host:port, got {self.url!r}")


def is_loopback(url: str) -> bool:
    """True when the ``host:port`` URL names this host's loopback interface."""
    host = url.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _grpc() -> Any:
    import tritonclient.grpc as grpcclient

    return grpcclient


@dataclass
class _Slot:
    """Staging of one in-flight batch: shared-memory regions (or a plain array)."""

    x: np.ndarray                      # (max_batch, S, S) float32, the input staging
    regions: dict[str, Any] = field(default_factory=dict)   # name -> tritonclient handle
    names: dict[str, str] = field(default_factory=dict)     # tensor -> region name
    sizes: dict[str, int] = field(default_factory=dict)     # tensor -> region bytes
    outs: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class _Handle:
    slot: int
    n: int
    b: int
    future: Future
    t_submit: float


@BACKENDS.register("triton")
class TritonBackend(Backend):
    """Forward passes on a Triton Inference Server (see module docstring).

    Parameters
    ----------
    artifact, max_batch
        See :class:`~leukoflow.inference.backends.base.Backend`; ``max_batch`` must not
        exceed the served model's ``max_batch_size``.
    config : TritonClientConfig, optional
        Connection settings (default: resolved from TOML/env, section ``[triton]``).
    **options
        Fields of :class:`TritonClientConfig` override ``config`` (e.g. ``url=``); other
        worker options (``threads``, ``precision`` ...) are ignored.
    """

    name = "triton"
    device_kind = "remote"

    def __init__(self, artifact: Any, max_batch: int = 256,
                 config: TritonClientConfig | None = None, **options: Any) -> None:
        super().__init__(artifact, max_batch)
        ok, why = self.available()
        if not ok:
            raise BackendUnavailable(why)
        fields = set(TritonClientConfig.__dataclass_fields__)
        given = {k: v for k, v in options.items() if k in fields and v is not None}
        if config is None:
            self.config = resolve(SECTION, TritonClientConfig, given)
        else:
            self.config = TritonClientConfig(**{**_asdict(config), **given})
        cfg = self.config
        self.model = cfg.model or str(getattr(artifact, "name", "") or "")
        if not self.model:
            raise BackendUnavailable("no Triton model name (set [triton] model)")
        self.max_in_flight = int(cfg.in_flight)
        self.use_shm = cfg.shared_memory == "on" or (
            cfg.shared_memory == "auto" and is_loopback(cfg.url))
        self._lock = threading.Lock()
        self._client = self._connect()
        self._served = self._check_model()
        self._slots: list[_Slot] = []
        self._slot = 0
        self._busy: set[int] = set()
        self.retries = 0
        """Requests retried after a failure (cumulative)."""
        self.reregistrations = 0
        """Times the shared-memory regions were registered again (server restarts)."""
        try:
            for _ in range(self.max_in_flight):
                self._slots.append(self._new_slot())
            if self.use_shm:
                self._register_all()
        except Exception:
            self.close()
            raise

    # -- setup -----------------------------------------------------------------------------
    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            _grpc()
        except ImportError:
            return False, "tritonclient[grpc] is not installed"
        return True, ""

    def _connect(self) -> Any:
        cfg = self.config
        grpc = _grpc()

        def read(p: str) -> str | None:
            return p or None

        client = grpc.InferenceServerClient(
            url=cfg.url, ssl=cfg.ssl, root_certificates=read(cfg.root_certificates),
            private_key=read(cfg.private_key), certificate_chain=read(cfg.certificate_chain))
        deadline = time.monotonic() + cfg.connect_timeout_s
        last: Exception | None = None
        while True:
            try:
                if client.is_server_live() and client.is_model_ready(
                        self.model, cfg.model_version):
                    return client
                last = TritonError(f"model {self.model!r} not ready on {cfg.url}")
            except Exception as exc:  # InferenceServerException, grpc errors
                last = exc
            if time.monotonic() > deadline:
                client.close()
                raise BackendUnavailable(f"Triton at {cfg.url}: {last}")
            time.sleep(0.2)

    def _check_model(self) -> dict[str, Any]:
        """Read the served model's configuration and check it against the artifact."""
        cfg = self.config
        conf = self._client.get_model_config(self.model, cfg.model_version,
                                             as_json=True)["config"]
        params = {k: v.get("string_value", "") for k, v in conf.get("parameters", {}).items()}
        sha = params.get(PARAM_SHA, "")
        want = str(getattr(self.artifact, "sha256", ""))
        if sha != want:
            raise BackendUnavailable(
                f"Triton model {self.model!r} serves network {sha[:16] or '?'}..., the "
                f"artifact is {want[:16]}...: export it again (leukoflow export --triton) or "
                "point the worker at the matching artifact")
        served_max = int(conf.get("max_batch_size", 0))
        if served_max < self.max_batch:
            raise BackendUnavailable(
                f"Triton model {self.model!r} takes batches up to {served_max}, the worker "
                f"sends up to {self.max_batch}: lower max_batch or export with a larger "
                "--triton-max-batch")
        dims = {o["name"]: [int(d) for d in o.get("dims", [])] for o in conf.get("output", [])}
        ins = {i["name"]: [int(d) for d in i.get("dims", [])] for i in conf.get("input", [])}
        s = self.input_size
        if ins.get(INPUT) != [s, s] or set(dims) != set(OUTPUTS):
            raise BackendUnavailable(
                f"Triton model {self.model!r} has inputs {ins} / outputs {sorted(dims)}, "
                f"expected {INPUT} [{s}, {s}] -> {list(OUTPUTS)}")
        if dims["logits"] != [self.num_classes] or len(dims["features"]) != 1 \
                or dims["features"][0] < 1:
            raise BackendUnavailable(f"Triton model {self.model!r}: output dims {dims}")
        self._feature_dim = int(dims["features"][0])
        return {"max_batch_size": served_max, "sha256": sha,
                "backend": conf.get("backend") or conf.get("platform", ""),
                "instance_group": conf.get("instance_group", []),
                "dynamic_batching": conf.get("dynamic_batching", {})}

    def _new_slot(self) -> _Slot:
        s, m, k, d = self.input_size, self.max_batch, self.num_classes, self._feature_dim
        sizes = {INPUT: m * s * s * 4, "logits": m * k * 4, "features": m * d * 4}
        if not self.use_shm:
            return _Slot(np.empty((m, s, s), np.float32))
        from tritonclient.utils import shared_memory as shm

        tag = f"leukoflow_{os.getpid()}_{next(_counter)}"
        slot = _Slot(np.empty(0, np.float32), sizes=sizes)
        for t, size in sizes.items():
            name = f"{tag}_{t}"
            slot.regions[t] = shm.create_shared_memory_region(name, "/" + name, size,
                                                              create_only=True)
            slot.names[t] = name
        slot.x = shm.get_contents_as_numpy(slot.regions[INPUT], np.float32, (m, s, s))
        slot.outs = {"logits": shm.get_contents_as_numpy(slot.regions["logits"], np.float32,
                                                         (m, k)),
                     "features": shm.get_contents_as_numpy(slot.regions["features"],
                                                           np.float32, (m, d))}
        return slot

    def _register_all(self) -> int:
        """Register every slot's regions the server does not know (all of them at start or
        after a server restart; regions in use by requests in flight are left alone).

        Returns
        -------
        int
            Regions registered.
        """
        c = self._client
        status = c.get_system_shared_memory_status(as_json=True) or {}
        known = set(status.get("regions", {}))
        done = 0
        for slot in self._slots:
            for t, name in slot.names.items():
                if name not in known:
                    c.register_system_shared_memory(name, "/" + name, slot.sizes[t])
                    done += 1
        return done

    # -- execution -------------------------------------------------------------------------
    def host_buffer(self, rows: int) -> np.ndarray:
        return self._slots[self._slot].x[:rows]

    def _request(self, slot: _Slot, n: int, b: int) -> tuple[list[Any], list[Any]]:
        grpc = _grpc()
        s = self.input_size
        inp = grpc.InferInput(INPUT, [b, s, s], "FP32")
        outs = [grpc.InferRequestedOutput(o) for o in OUTPUTS]
        if self.use_shm:
            inp.set_shared_memory(slot.names[INPUT], b * s * s * 4)
            dims = {"logits": self.num_classes, "features": self._feature_dim}
            for o in outs:
                name = o.name()
                o.set_shared_memory(slot.names[name], b * dims[name] * 4)
        else:
            inp.set_data_from_numpy(slot.x[:b])
        return [inp], outs

    def _send(self, slot_i: int, n: int, b: int, fut: Future, deadline: float) -> None:
        """Start (or restart) the request of a batch; completes ``fut`` from the callback."""
        slot = self._slots[slot_i]
        inputs, outputs = self._request(slot, n, b)
        cfg = self.config

        def done(result: Any, error: Any) -> None:
            if error is None:
                fut.set_result(result)
            else:
                fut.set_exception(error if isinstance(error, BaseException)
                                  else TritonError(str(error)))

        self._client.async_infer(self.model, inputs, done, model_version=cfg.model_version,
                                 outputs=outputs, client_timeout=cfg.timeout_s)

    def submit(self, x: np.ndarray, n: int) -> _Handle:
        i = self._slot
        slot = self._slots[i]
        b = x.shape[0]
        if b > self.max_batch:
            raise ValueError(f"batch {b} above max_batch {self.max_batch}")
        if x.__array_interface__["data"][0] != slot.x.__array_interface__["data"][0]:
            slot.x[:b] = x
        fut: Future = Future()
        t = time.monotonic()
        try:
            self._send(i, n, b, fut, t + self.config.retry_s)
        except Exception as exc:  # server gone at submit time: retried in collect
            fut.set_exception(exc)
        self._busy.add(i)
        self._slot = (i + 1) % len(self._slots)
        return _Handle(i, n, b, fut, t)

    def collect(self, handle: _Handle) -> BackendOutput:
        cfg = self.config
        slot = self._slots[handle.slot]
        deadline = handle.t_submit + cfg.retry_s
        fut = handle.future
        try:
            while True:
                try:
                    result = fut.result(timeout=cfg.timeout_s + 5.0)
                    break
                except Exception as exc:
                    if time.monotonic() >= deadline:
                        raise TritonError(f"Triton request failed for {cfg.retry_s:.0f} s: "
                                          f"{exc}") from exc
                    log.warning("Triton request failed (%s); retrying", _short(exc))
                    self.retries += 1
                    fut = self._retry(handle, deadline)
            return self._outputs(slot, result, handle)
        finally:
            self._busy.discard(handle.slot)

    def _retry(self, handle: _Handle, deadline: float) -> Future:
        """Wait until the server answers again, re-register shared memory, resend."""
        while True:
            time.sleep(0.2)
            fut: Future = Future()
            try:
                if not self._client.is_model_ready(self.model, self.config.model_version):
                    raise TritonError("model not ready")
                if self.use_shm:
                    with self._lock:
                        if self._register_all():
                            self.reregistrations += 1
                self._send(handle.slot, handle.n, handle.b, fut, deadline)
                return fut
            except Exception as exc:
                if time.monotonic() >= deadline:
                    fut = Future()
                    fut.set_exception(exc)
                    return fut

    def _outputs(self, slot: _Slot, result: Any, handle: _Handle) -> BackendOutput:
        n = handle.n
        if self.use_shm:
            lo = slot.outs["logits"][:n].copy()
            fe = slot.outs["features"][:n].copy()
        else:
            lo = np.asarray(result.as_numpy("logits"), np.float32)[:n].copy()
            fe = np.asarray(result.as_numpy("features"), np.float32)[:n].copy()
        if lo.shape != (n, self.num_classes) or fe.shape != (n, self._feature_dim):
            raise TritonError(f"Triton returned logits {lo.shape}, features {fe.shape} for "
                              f"{n} cells")
        return BackendOutput(lo, fe, finite_rows(slot.x[:n]))

    def statistics(self) -> dict[str, Any]:
        """Triton's inference statistics of the served model (as JSON)."""
        return self._client.get_inference_statistics(self.model, self.config.model_version,
                                                     as_json=True)

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        return {**super().describe(), "url": cfg.url, "model": self.model,
                "model_version": cfg.model_version or "latest",
                "shared_memory": self.use_shm, "in_flight": self.max_in_flight,
                "ssl": cfg.ssl, "served": self._served}

    def close(self) -> None:
        client = getattr(self, "_client", None)
        for slot in getattr(self, "_slots", []):
            for t, handle in slot.regions.items():
                if client is not None:
                    try:
                        client.unregister_system_shared_memory(slot.names[t])
                    except Exception:  # server gone: nothing to unregister
                        pass
                from tritonclient.utils import shared_memory as shm

                try:
                    shm.destroy_shared_memory_region(handle)
                except Exception as exc:  # already gone
                    log.debug("shared memory %s: %s", slot.names[t], exc)
            slot.regions.clear()
        self._slots = []
        if client is not None:
            try:
                client.close()
            except Exception:  # channel already closed
                pass
            self._client = None
        super().close()


def _asdict(cfg: TritonClientConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in TritonClientConfig.__dataclass_fields__}


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
