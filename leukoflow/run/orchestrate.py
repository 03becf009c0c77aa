"""Run orchestration: start every service as a supervised child process on one machine.

:class:`Supervisor` starts children (``python -c "from leukoflow.cli import main; main()"
<command> ...``), restarts a child that crashed (non-zero exit or killed by a signal) after
an exponential backoff, logs and counts each restart (the counts are sent to the collector,
which exports ``leukoflow_child_restarts_total{child}``), and stops children gracefully
(SIGTERM, then SIGKILL after a timeout). Children die with the supervisor: each gets
``LEUKOFLOW_SUPERVISOR_PID`` and calls :func:`leukoflow.core.lifeline.guard` first
(parent-death signal plus a parent watch), so a killed ``leukoflow run`` leaves no service
running and no port held.

:func:`run_pipeline` is ``leukoflow run`` (and ``replay``): it starts the collector, the
explainer, N inference workers and the source (acquisition, or the replay publisher), shows
the live view, stops the source after ``duration_s``/``cells`` or on Ctrl-C/SIGTERM, lets the
queues drain (the collector finishes when every emitted cell is resolved), stops the rest,
writes ``supervisor.json`` and the report, and returns the collector's final summary.

Ports (all configurable): ZeroMQ ``zmq_base_port`` + 0 crops, +1 collector, +2 explainer,
+3 live state, +4 crop tap (recording); metrics ``metrics_base_port`` + 0 acquisition,
+1 first worker (+10+i for worker i >= 1), +2 explainer, +3 collector.
Children get their endpoints as command-line flags where the command has them and as
``LEUKOFLOW_<SECTION>_<KEY>`` environment variables (see :mod:`leukoflow.core.config`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any

from leukoflow.acquisition.realtime import camera_summary
from leukoflow.core import curve, lifeline, transport, wire
from leukoflow.core.config import bounded
from leukoflow.core.service import StopSignals, control_message
from leukoflow.core.vocabulary import DECISIONS
from leukoflow.reports.report import write_run_report
from leukoflow.run.liveview import StateFeed
from leukoflow.run.preflight import (
    check_model_crop_size,
    identity_summary,
    run_pipeline_identity,
)
from leukoflow.run.qc_gate import qc_for_run, sim_params

log = logging.getLogger(__name__)

CLI_PREFIX: tuple[str, ...] = (
    "-c", "from leukoflow.core.lifeline import guard; guard(); "
          "from leukoflow.cli import main; main()")


# ----------------------------------------------------------------------------- supervisor

@dataclass
class ChildSpec:
    """One supervised child process.

    Attributes
    ----------
    name : str
        Child name (``collector``, ``infer-0``...), used in logs and metrics.
    argv : list of str
        Command line after the Python interpreter.
    env : dict
        Extra environment variables.
    restart : bool
        Restart after a crash.
    ready_url : str
        ``/readyz`` URL polled by :meth:`Supervisor.wait_ready` (empty: none).
    """

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    restart: bool = True
    ready_url: str = ""


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    failures: int = 0
    done: bool = False
    returncode: int | None = None
    stopping: bool = False


class Supervisor:
    """Start, watch, restart and stop child processes.

    Parameters
    ----------
    log_dir : path-like
        Each child's stdout/stderr go to ``<log_dir>/<name>.log`` (appended across restarts).
    backoff_initial_s, backoff_max_s : float
        Restart delay after the n-th consecutive crash: ``initial * 2**(n-1)``, capped [s].
    stable_after_s : float
        A child that ran this long before crashing starts its backoff afresh [s].
    max_restarts : int
        Give up restarting a child after this many restarts.
    on_restart : callable, optional
        ``on_restart(name, restarts_by_child)`` after each restart.
    """

    def __init__(self, log_dir: str | Path, backoff_initial_s: float = 0.5,
                 backoff_max_s: float = 10.0, stable_after_s: float = 30.0,
                 max_restarts: int = 10,
                 on_restart: Callable[[str, dict[str, int]], None] | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stable_after_s = stable_after_s
        self.max_restarts = max_restarts
        self.on_restart = on_restart
        self.children: dict[str, _Child] = {}
        self.restarts: Counter[str] = Counter()
        self.events: list[dict[str, Any]] = []
        self.t0 = time.monotonic()

    def _event(self, child: str, event: str, detail: str = "") -> None:
        e = {"t_s": round(time.monotonic() - self.t0, 3), "child": child, "event": event,
             "detail": detail}
        self.events.append(e)
        (log.warning if event in ("crashed", "gave_up", "killed") else log.info)(
            "%s %s %s", child, event, detail)

    def _spawn(self, c: _Child) -> None:
        env = dict(os.environ)
        env.update(c.spec.env)
        env[lifeline.ENV] = str(os.getpid())  # the child dies with this process
        logf = open(self.log_dir / f"{c.spec.name}.log", "ab")  # noqa: SIM115
        try:
            c.proc = subprocess.Popen([sys.executable, *c.spec.argv], stdout=logf,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env, start_new_session=True)
        finally:
            logf.close()
        c.started_at = time.monotonic()
        c.restart_at = None
        self._event(c.spec.name, "started", f"pid {c.proc.pid}")

    def start(self, spec: ChildSpec) -> None:
        """Start a child now."""
        c = _Child(spec)
        self.children[spec.name] = c
        self._spawn(c)

    def pid(self, name: str) -> int | None:
        """Process id of a running child."""
        c = self.children.get(name)
        return c.proc.pid if c and c.proc and c.proc.poll() is None else None

    def running(self, name: str) -> bool:
        """True while the child runs or waits for its restart."""
        c = self.children.get(name)
        return bool(c) and not c.done

    def poll(self) -> None:
        """Reap exited children; schedule and perform restarts."""
        now = time.monotonic()
        for name, c in self.children.items():
            if c.done:
                continue
            if c.proc is not None:
                rc = c.proc.poll()
                if rc is None:
                    continue
                c.returncode = rc
                c.proc = None
                if rc == 0 or c.stopping:
                    c.done = True
                    self._event(name, "exited", f"code {rc}")
                    continue
                how = f"signal {-rc}" if rc < 0 else f"code {rc}"
                self._event(name, "crashed", how)
                if not c.spec.restart or self.restarts[name] >= self.max_restarts:
                    c.done = True
                    self._event(name, "gave_up", f"after {self.restarts[name]} restarts")
                    continue
                if now - c.started_at > self.stable_after_s:
                    c.failures = 0
                c.failures += 1
                delay = min(self.backoff_max_s,
                            self.backoff_initial_s * 2 ** (c.failures - 1))
                c.restart_at = now + delay
                self._event(name, "restart_scheduled", f"in {delay:.2f} s")
            elif c.restart_at is not None and now >= c.restart_at:
                self.restarts[name] += 1
                self._spawn(c)
                self._event(name, "restarted", f"restart {self.restarts[name]}")
                if self.on_restart is not None:
                    try:
                        self.on_restart(name, dict(self.restarts))
                    except Exception as exc:  # never let reporting break supervision
                        log.error("restart notification failed: %s", exc)

    def stop(self, name: str, timeout_s: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Stop a child gracefully (``sig``, then SIGKILL after ``timeout_s``)."""
        c = self.children.get(name)
        if c is None:
            return None
        c.stopping = True
        c.restart_at = None
        if c.proc is None:
            c.done = True
            return c.returncode
        try:
            c.proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            rc = c.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._event(name, "killed", f"no exit {timeout_s:.0f} s after signal {sig}")
            c.proc.kill()
            rc = c.proc.wait(5)
        c.returncode = rc
        c.proc = None
        c.done = True
        self._event(name, "stopped", f"code {rc}")
        return rc

    def stop_many(self, names: Sequence[str], timeout_s: float = 10.0) -> None:
        """Signal several children at once (SIGTERM), then wait for each (SIGKILL late ones)."""
        live = [n for n in names if n in self.children and self.children[n].proc is not None]
        for n in live:
            c = self.children[n]
            c.stopping = True
            c.restart_at = None
            try:
                c.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        t_end = time.monotonic() + timeout_s
        for n in live:
            self.stop(n, timeout_s=max(0.1, t_end - time.monotonic()))

    def wait(self, name: str, timeout_s: float, tick: Callable[[], None] | None = None,
             interval_s: float = 0.1) -> bool:
        """Supervise until child ``name`` is done (exited 0 or given up); False on timeout."""
        t_end = time.monotonic() + timeout_s
        while time.monotonic() < t_end:
            self.poll()
            if tick is not None:
                tick()
            if not self.running(name):
                return True
            time.sleep(interval_s)
        return False

    def wait_ready(self, names: Sequence[str], timeout_s: float,
                   tick: Callable[[], None] | None = None) -> list[str]:
        """Wait until each child's ``ready_url`` answers 200; return those that did not."""
        t_end = time.monotonic() + timeout_s
        pending = [n for n in names if self.children[n].spec.ready_url]
        while pending and time.monotonic() < t_end:
            self.poll()
            if tick is not None:
                tick()
            for n in list(pending):
                if not self.running(n):
                    pending.remove(n)
                    continue
                try:
                    with urllib.request.urlopen(self.children[n].spec.ready_url,
                                                timeout=0.5) as r:
                        if r.status == 200:
                            pending.remove(n)
                except (OSError, HTTPException):
                    pass
            time.sleep(0.1)
        return pending

    def stop_all(self, timeout_s: float = 10.0) -> None:
        """Stop every child still running (reverse start order)."""
        for name in reversed(list(self.children)):
            if self.children[name].proc is not None:
                self.stop(name, timeout_s)

    def report(self) -> dict[str, Any]:
        """Restarts and events (for ``supervisor.json`` and the run report)."""
        return {"restarts": dict(self.restarts), "events": self.events,
                "returncodes": {n: c.returncode for n, c in self.children.items()}}


# ----------------------------------------------------------------------------- run

@dataclass
class RunOptions:
    """Everything ``leukoflow run`` needs (recorded in ``run_params.json``).

    Attributes
    ----------
    source : str
        ``sim``, ``file:PATH`` (raw holograms through acquisition), ``camera:...``, or
        ``replay:PATH`` (a crop recording published straight into inference).
    duration_s : float or None
        Stop the source after this long [s] (None: until the source ends or Ctrl-C).
    cells : int or None
        Stop the source once this many cells were emitted.
    workers : int
        Inference workers.
    record : str
        ``.rtdc`` recording path ('' = none).
    out : str
        Run folder ('' = ``runs/<run id>``).
    explain : bool
        Start the explainer.
    backend : str
        Inference backend ('' = the worker's default).
    model : str
        Model artifact name or folder ('' = the worker's default).
    zmq_base_port : int
        ZeroMQ ports: +0 crops, +1 collector, +2 explainer, +3 live state, +4 recording tap.
    metrics_base_port : int
        Metrics ports: +0 acquire, +1 infer (worker i > 0: +10+i), +2 explain, +3 collector.
    replay_rate : float or None
        Replay: cells/s (None with ``replay_realtime`` False: as fast as possible).
    rate_hz : float or None
        Frame rate of the simulated/replayed camera [frames/s] (None or 0: its nominal
        rate).
    as_fast_as_possible : bool
        Take frames as fast as the acquisition processes them instead of in real time
        (benchmarks: nothing is dropped, simulated time runs slower than real time).
    replay_realtime : bool
        Replay at the recorded pace.
    seed : int or None
        Simulator seed passed to acquisition.
    drain_timeout_s : float
        Collector drain timeout after the source stopped [s].
    ready_timeout_s : float
        Wait this long for the services to be ready before starting the source [s].
    live : bool
        Show the live view (only on a terminal).
    transport : str
        ``ipc`` (default): the ZeroMQ sockets are files in a new private folder (0700, see
        ``socket_dir``): only this user can connect. ``tcp``: loopback TCP ports from
        ``zmq_base_port``, authenticated with CurveZMQ (keys from ``keys``).
    keys : str
        CurveZMQ key folder for ``transport="tcp"`` ('' = ``$LEUKOFLOW_KEYS``, else a fresh
        key set made in ``<run folder>/keys``).
    socket_dir : str
        Folder of the ``ipc`` sockets ('' = a new private folder, removed after the run).
    run_id : str
        Run id ('' = generated from the time).
    extra_acquire_args : list of str
        Further ``leukoflow acquire`` arguments of the source process.
    """

    source: str = "sim"
    duration_s: float | None = None
    cells: int | None = None
    workers: int = bounded(1, 1, 64)
    record: str = ""
    out: str = ""
    explain: bool = True
    backend: str = ""
    model: str = ""
    zmq_base_port: int = transport.DEFAULT_BASE_PORT
    metrics_base_port: int = transport.DEFAULT_METRICS_BASE_PORT
    replay_rate: float | None = None
    rate_hz: float | None = None
    as_fast_as_possible: bool = False
    replay_realtime: bool = False
    seed: int | None = None
    drain_timeout_s: float = 5.0
    ready_timeout_s: float = 120.0
    live: bool = True
    run_id: str = ""
    extra_acquire_args: list[str] = field(default_factory=list)
    transport: str = "ipc"
    keys: str = ""
    socket_dir: str = ""

    def endpoints(self) -> dict[str, str]:
        """ZeroMQ endpoints of this run (``ipc`` needs :attr:`socket_dir`)."""
        if self.transport == "ipc":
            if not self.socket_dir:
                raise ValueError("RunOptions.socket_dir is not set (run_pipeline makes a "
                                 "private folder)")
            return {n: f"ipc://{self.socket_dir}/{n}" for n in transport.ENDPOINT_ROLES}
        if self.transport != "tcp":
            raise ValueError(f"run.transport must be 'ipc' or 'tcp', not {self.transport!r}")
        return transport.loopback_endpoints(self.zmq_base_port)

    def metrics_ports(self) -> dict[str, int]:
        """Metrics ports of this run."""
        return transport.metrics_ports(self.metrics_base_port)


def worker_metrics_port(opts: RunOptions, i: int) -> int:
    """Metrics port of inference worker ``i``."""
    return opts.metrics_base_port + 1 if i == 0 else opts.metrics_base_port + 10 + i


def _cli(*args: str) -> list[str]:
    return [*CLI_PREFIX, *args]


def build_specs(opts: RunOptions, run_dir: Path) -> dict[str, ChildSpec]:
    """Child specs of one run, in start order (collector, explainer, workers, source)."""
    ep = opts.endpoints()
    mp = opts.metrics_ports()
    recording = bool(opts.record)
    worker_crops = ep["tap"] if recording else ep["crops"]
    specs: dict[str, ChildSpec] = {}
    coll = ["record", "--results", ep["collector"], "--live", ep["live"],
            "--metrics-port", str(mp["collector"]), "--run-dir", str(run_dir),
            "--run-id", opts.run_id, "--drain-timeout", str(opts.drain_timeout_s),
            "--params-json", str(run_dir / "run_params.json")]
    if recording:
        coll += ["--out", opts.record, "--tap-in", ep["crops"], "--tap-out", ep["tap"]]
    specs["collector"] = ChildSpec(
        "collector", _cli(*coll), ready_url=f"http://127.0.0.1:{mp['collector']}/readyz",
        env={"LEUKOFLOW_COLLECTOR_RUNS_ROOT": ""})  # this one run, in run_dir
    if opts.explain:
        specs["explain"] = ChildSpec(
            "explain", _cli("explain"),
            env={"LEUKOFLOW_EXPLAIN_ENDPOINT": ep["explain"],
                 "LEUKOFLOW_EXPLAIN_METRICS_PORT": str(mp["explain"]),
                 "LEUKOFLOW_EXPLAIN_RUN_DIR": str(run_dir),
                 **({"LEUKOFLOW_EXPLAIN_MODEL": opts.model} if opts.model else {})})
    for i in range(opts.workers):
        port = worker_metrics_port(opts, i)
        args = ["infer", "--crops-endpoint", worker_crops, "--results-endpoint",
                ep["collector"], "--explain-endpoint", ep["explain"] if opts.explain else "",
                "--metrics-port", str(port)]
        if opts.backend:
            args += ["--backend", opts.backend]
        if opts.model:
            args += ["--model", opts.model]
        specs[f"infer-{i}"] = ChildSpec(f"infer-{i}", _cli(*args),
                                        ready_url=f"http://127.0.0.1:{port}/readyz")
    if opts.source.startswith("replay:"):
        args = ["replay-publish", opts.source.split(":", 1)[1], "--crops", ep["crops"],
                "--collector", ep["collector"], "--run-id", opts.run_id]
        if opts.replay_realtime:
            args.append("--realtime")
        elif opts.replay_rate:
            args += ["--rate", str(opts.replay_rate)]
        specs["source"] = ChildSpec("source", _cli(*args), restart=False)
    else:
        env = {"LEUKOFLOW_ACQUIRE_SOURCE": opts.source,
               "LEUKOFLOW_ACQUIRE_CROPS_ENDPOINT": ep["crops"],
               "LEUKOFLOW_ACQUIRE_COLLECTOR_ENDPOINT": ep["collector"],
               "LEUKOFLOW_ACQUIRE_METRICS_PORT": str(mp["acquire"]),
               "LEUKOFLOW_ACQUIRE_RUN_ID": opts.run_id,
               # epochs claimed in the run folder: cell ids unique across restarts
               "LEUKOFLOW_ACQUIRE_STATE_DIR": str(run_dir)}
        if opts.seed is not None:
            env["LEUKOFLOW_ACQUIRE_SEED"] = str(opts.seed)
        if opts.rate_hz is not None:
            env["LEUKOFLOW_ACQUIRE_RATE_HZ"] = str(opts.rate_hz)
        if opts.as_fast_as_possible:
            env["LEUKOFLOW_ACQUIRE_AS_FAST_AS_POSSIBLE"] = "true"
        specs["source"] = ChildSpec(
            "source", _cli("acquire", *opts.extra_acquire_args), restart=True, env=env,
            ready_url=f"http://127.0.0.1:{mp['acquire']}/healthz")
    if opts.transport == "tcp" and opts.keys:
        for spec in specs.values():  # every child authenticates with the run's keys
            spec.env[curve.KEYS_ENV] = opts.keys
    return specs


def prepare_transport(opts: RunOptions, run_dir: Path) -> curve.KeyStore | None:
    """Make the run's ZeroMQ transport private; return the keys of a ``tcp`` run.

    ``ipc``: create the private socket folder (0700) unless given, and check it.
    ``tcp``: use ``opts.keys``, else ``$LEUKOFLOW_KEYS``, else create a key set in
    ``<run_dir>/keys``; ``opts.keys`` is set to the folder used.
    """
    if opts.transport == "ipc":
        if not opts.socket_dir:
            opts.socket_dir = str(transport.private_ipc_folder())
        transport.check_ipc_folder(opts.socket_dir)
        return None
    if opts.transport != "tcp":
        raise ValueError(f"run.transport must be 'ipc' or 'tcp', not {opts.transport!r}")
    folder = opts.keys or os.environ.get(curve.KEYS_ENV, "")
    if not folder:
        folder = str(run_dir / "keys")
        if not (Path(folder) / "server.key").exists():
            curve.create_keys(folder)
    opts.keys = str(Path(folder).resolve())
    return curve.KeyStore(opts.keys)


class _Notifier:
    """PUSH control messages (restarts, stop) from the supervisor to the collector."""

    def __init__(self, endpoint: str, run_id: str, keys: Any = None) -> None:
        import zmq


        self._ctx = zmq.Context.instance()
        self._sock = transport.make_socket(self._ctx, "PUSH", endpoint, bind=False,
                                           immediate=False, identity="supervisor", keys=keys)
        self._sender = wire.Sender(run_id, "supervisor")

    def send(self, cmd: str, stats: dict[str, Any]) -> None:

        transport.send(self._sock, control_message(self._sender, cmd, stats))

    def close(self) -> None:
        self._sock.close(0)


def _new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-{os.getpid() % 10000:04d}"


def run_pipeline(opts: RunOptions, *, on_state: Callable[[dict], None] | None = None,
                 view: Any = None) -> dict[str, Any]:
    """Run everything on one machine (see the module docstring); return the summary.

    Parameters
    ----------
    opts : RunOptions
        Run parameters.
    on_state : callable, optional
        Called with each live state received from the collector.
    view : leukoflow.run.liveview.LiveView, optional
        Live view to update (started and stopped here).
    """

    # refuse crops the model cannot take (CropSizeError) before anything starts
    crop_check = check_model_crop_size(opts.source, opts.model)
    opts.run_id = opts.run_id or _new_run_id()
    run_dir = Path(opts.out or Path("runs") / opts.run_id).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if opts.record:
        opts.record = str(Path(opts.record).resolve())
    own_socket_dir = opts.transport == "ipc" and not opts.socket_dir
    keys = prepare_transport(opts, run_dir)
    qc, qc_env = qc_for_run(opts.source)  # raises QCError when the QC policy refuses
    params = {"run": asdict(opts), "endpoints": opts.endpoints(),
              "metrics_ports": opts.metrics_ports(), "qc": qc,
              **sim_params(opts.source, opts.seed)}
    params["crop_check"] = crop_check
    # what will run (identifier, hash, every parameter, model, versions), resolved with the
    # acquisition child's environment; the recording and summary.json carry it from here
    params["pipeline"] = run_pipeline_identity(opts.source, opts.model,
                                               {**os.environ, **qc_env})
    (run_dir / "run_params.json").write_text(json.dumps(params, indent=1))
    specs = build_specs(opts, run_dir)
    if "source" in specs and qc_env:  # the acquisition uses the last passing QC's scale
        specs["source"].env.update(qc_env)
    ep = opts.endpoints()
    notifier = _Notifier(ep["collector"], opts.run_id, keys)
    sup = Supervisor(run_dir / "logs",
                     on_restart=lambda name, r: notifier.send("accounting", {"restarts": r}))
    feed = StateFeed(ep["live"], opts.metrics_ports(),
                     [worker_metrics_port(opts, i) for i in range(opts.workers)], keys=keys)
    interrupted = {"n": 0}

    def _on_signal(name: str) -> None:
        interrupted["n"] += 1
        log.warning("%s: stopping the run gracefully", name)

    signals = StopSignals(_on_signal).install()

    def tick() -> None:
        st = feed.poll()
        if st is not None:
            if on_state is not None:
                on_state(st)
            if view is not None:
                view.update(st, feed.services)

    t_start = time.monotonic()
    t_source = None
    summary: dict[str, Any] = {}
    try:
        if view is not None:
            view.start()
        sup.start(specs["collector"])
        if sup.wait_ready(["collector"], 30, tick):
            raise RuntimeError("collector did not become ready; see "
                               f"{run_dir / 'logs' / 'collector.log'}")
        for name, spec in specs.items():
            if name not in ("collector", "source"):
                sup.start(spec)
        late = sup.wait_ready([n for n in specs if n.startswith("infer-")],
                              opts.ready_timeout_s, tick)
        if late:
            log.warning("not ready after %.0f s: %s", opts.ready_timeout_s, late)
        if interrupted["n"] == 0:
            sup.start(specs["source"])
            t_source = time.monotonic()
            # run: until duration, cell count, end of source or a signal
            while interrupted["n"] == 0:
                sup.poll()
                tick()
                if not sup.running("source"):
                    break
                if opts.duration_s is not None and time.monotonic() - t_source >= opts.duration_s:
                    break
                st = feed.state
                if opts.cells and st and st["accounting"]["emitted"] >= opts.cells:
                    break
                if not sup.running("collector"):
                    rc = sup.children["collector"].returncode
                    (log.info if rc == 0 else log.error)(
                        "collector finished (code %s); stopping the run", rc)
                    break
                time.sleep(0.05)
            sup.stop("source", timeout_s=15.0)
        # drain: the collector ends once every emitted cell is resolved (or times out)
        notifier.send("stop", {"reason": "source stopped"})

        def drain_tick() -> None:
            tick()
            if interrupted["n"] > 1:  # a second Ctrl-C: stop waiting for the drain
                sup.stop("collector", timeout_s=5.0)

        if not sup.wait("collector", opts.drain_timeout_s + 60.0, tick=drain_tick):
            sup.stop("collector", timeout_s=10.0)
        sup.stop_many([n for n in specs if n not in ("collector", "source")], timeout_s=10.0)
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    finally:
        sup.stop_all(timeout_s=5.0)
        signals.restore()
        notifier.close()
        feed.close()
        if own_socket_dir:
            shutil.rmtree(opts.socket_dir, ignore_errors=True)
        if view is not None:
            view.stop()
        sup_rep = sup.report()
        sup_rep["duration_s"] = round(time.monotonic() - t_start, 3)
        sup_rep["source_s"] = round(time.monotonic() - t_source, 3) if t_source else 0.0
        sup_rep["interrupted"] = interrupted["n"] > 0
        sup_rep["params"] = params
        (run_dir / "supervisor.json").write_text(json.dumps(sup_rep, indent=1))

    try:
        report = write_run_report(run_dir)
    except Exception as exc:  # a report problem must not lose the summary
        log.error("report failed: %s", exc)
        report = None
    summary.setdefault("accounting", {})
    summary["run_dir"] = str(run_dir)
    summary["report"] = str(report) if report else None
    summary["supervisor"] = {"restarts": sup_rep["restarts"],
                             "duration_s": sup_rep["duration_s"],
                             "interrupted": sup_rep["interrupted"]}
    return summary


def compact_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The ``--json`` output of ``leukoflow run``: counts, decisions, accounting, speed."""
    acc = summary.get("accounting", {})
    diff = summary.get("differential", {})
    out = {
        "run": summary.get("run"),
        "run_dir": summary.get("run_dir"),
        "report": summary.get("report"),
        "counts": {n: c["count"] for n, c in diff.get("classes", {}).items()},
        "differential": {n: {"fraction": e["fraction"], "lower": e["lower"],
                             "upper": e["upper"]}
                         for n, e in (diff.get("estimate") or {}).get("classes", {}).items()},
        "differential_method": (diff.get("estimate") or {}).get("method"),
        "validity": summary.get("validity"),
        "drift": {k: (summary.get("drift") or {}).get(k)
                  for k in ("enabled", "alarm", "first_alarm_cell", "moved", "reason")},
        "qc": {k: (summary.get("qc") or {}).get(k)
               for k in ("state", "ok", "pixel_um", "magnification", "message")},
        "counted_fraction": {n: {"fraction": c["fraction"], "lower": c["lower"],
                                 "upper": c["upper"]}
                             for n, c in diff.get("classes", {}).items()},
        "decisions": {k: acc.get(k, 0) for k in DECISIONS},
        "accounting": acc,
        "throughput": summary.get("throughput", {}),
        "latency": summary.get("latency", {}),
        "truth": summary.get("truth"),
        "restarts": summary.get("supervisor", {}).get("restarts", {}),
        "collector_restarts": summary.get("collector_restarts", 0),
        "recording": summary.get("recording", {}),
        "duration_s": summary.get("supervisor", {}).get("duration_s"),
        "camera": camera_summary(summary.get("senders") or {}),
        "pipeline": identity_summary((summary.get("params") or {}).get("pipeline") or {}),
    }
    return out
