"""The live terminal view of a run (rich), fed by the collector's PUB state and /metrics.

:class:`StateFeed` subscribes to the collector's live state (wire ``heartbeat`` messages on
the ``live`` endpoint) and, once a second, scrapes the other services' ``/metrics``
(frames/s, queue depths, explainer backlog). :class:`LiveView` renders the differential with
95 % intervals, counted/uncertain/OOD/rejected/dropped, cells/s, frames/s, queue depths,
latency p50/p99 and the explainer backlog. :func:`want_live_view` decides whether to show it
(off when stdout is not a terminal or with ``--json``).
"""

from __future__ import annotations

import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from leukoflow.core import transport, wire
from leukoflow.run.validity_view import live_lines


def want_live_view(json_output: bool, stream: Any = None) -> bool:
    """True when a live view should be drawn (stdout is a TTY and no ``--json``)."""
    stream = stream if stream is not None else sys.stdout
    return not json_output and bool(getattr(stream, "isatty", lambda: False)())


def scrape(port: int, host: str = "127.0.0.1", timeout_s: float = 0.3) -> dict[str, float]:
    """Scrape ``/metrics`` into ``{"name{labels}": value}`` (empty dict when unreachable)."""
    from http.client import HTTPException

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout_s) as r:
            text = r.read().decode("utf-8", "replace")
    except (OSError, ValueError, HTTPException):
        return {}
    out: dict[str, float] = {}
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                lab = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{lab}}}" if lab else s.name] = float(s.value)
    except ValueError:
        return out
    return out


def _sum(samples: Mapping[str, float], prefix: str) -> float:
    return sum(v for k, v in samples.items() if k == prefix or k.startswith(prefix + "{"))


class StateFeed:
    """Latest collector state plus a few numbers scraped from the other services.

    Parameters
    ----------
    live_endpoint : str
        Collector PUB endpoint.
    metrics_ports : mapping
        ``{"acquire": port, "explain": port, ...}``.
    worker_ports : sequence of int
        Metrics ports of the inference workers.
    scrape_interval_s : float
        Period of the ``/metrics`` scrapes [s].
    keys : leukoflow.core.curve.KeyStore, optional
        CurveZMQ keys (role ``viewer``); None: ``$LEUKOFLOW_KEYS`` if set.
    """

    def __init__(self, live_endpoint: str, metrics_ports: Mapping[str, int],
                 worker_ports: Sequence[int] = (), scrape_interval_s: float = 1.0,
                 keys: Any = None) -> None:
        import zmq


        self._sock = transport.make_socket(zmq.Context.instance(), "SUB", live_endpoint,
                                           bind=False, hwm=10, identity="viewer", keys=keys)
        self.metrics_ports = dict(metrics_ports)
        self.worker_ports = list(worker_ports)
        self.scrape_interval_s = scrape_interval_s
        self.state: dict[str, Any] | None = None
        self.services: dict[str, Any] = {}
        self._last_scrape = 0.0
        self._prev_frames: tuple[float, float] | None = None

    def poll(self) -> dict[str, Any] | None:
        """Take every pending state message; return the newest (None if none arrived)."""
        import zmq


        newest = None
        while True:
            try:
                frames = self._sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = wire.decode(frames)
            except wire.WireError:
                continue
            if msg.kind == "heartbeat":
                newest = msg.header.get("stats", {})
        if newest is not None:
            self.state = newest
        now = time.monotonic()
        if now - self._last_scrape >= self.scrape_interval_s:
            self._last_scrape = now
            self._scrape(now)
        return newest

    def _scrape(self, now: float) -> None:
        acq = scrape(self.metrics_ports.get("acquire", 0)) if self.metrics_ports.get(
            "acquire") else {}
        exp = scrape(self.metrics_ports["explain"]) if self.metrics_ports.get("explain") else {}
        workers = [scrape(p) for p in self.worker_ports]
        frames = _sum(acq, "leukoflow_frames_total")
        fps = None
        if self._prev_frames is not None and acq:
            t0, f0 = self._prev_frames
            fps = (frames - f0) / (now - t0) if now > t0 else None
        if acq:
            self._prev_frames = (now, frames)
        queues: dict[str, float] = {}
        for name, samples in [("acquire", acq), *((f"infer-{i}", w) for i, w in
                                                   enumerate(workers))]:
            for k, v in samples.items():
                if k.startswith("leukoflow_queue_depth{"):
                    queues[f"{name}:{k.split('queue=', 1)[-1].rstrip('}')}"] = v
            pend = samples.get("leukoflow_inference_pending_requests")
            if pend is not None:
                queues[f"{name}:pending"] = pend
        self.services = {
            "frames_per_s": fps,
            "frames_total": frames if acq else None,
            # keeping up with the camera (acquisition's own gauges and counters)
            "frame_rate_nominal": acq.get("leukoflow_frame_rate_nominal_hertz"),
            "frame_rate_achieved": acq.get("leukoflow_frame_rate_achieved_hertz"),
            "frames_dropped": _sum(acq, "leukoflow_frames_dropped_total") if acq else None,
            "frame_backlog": acq.get("leukoflow_frame_backlog"),
            "warming_up": acq.get("leukoflow_warming_up"),
            "cells_in_dropped_frames": acq.get("leukoflow_cells_in_dropped_frames"),
            "queues": queues,
            "explainer_backlog": exp.get("leukoflow_explainer_backlog") if exp else None,
            "explanations": _sum(exp, "leukoflow_explanations_total") if exp else None,
            "up": {"acquire": bool(acq), "explain": bool(exp),
                   **{f"infer-{i}": bool(w) for i, w in enumerate(workers)}},
        }

    def close(self) -> None:
        """Close the subscription."""
        self._sock.close(0)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:5.1f} %"


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{1e3 * v:7.1f} ms"


def render(state: Mapping[str, Any] | None, services: Mapping[str, Any] | None = None) -> Any:
    """A rich renderable of one live state."""
    from rich.console import Group
    from rich.table import Table

    if not state:
        return Table(title="leukoflow: waiting for the collector…")
    services = services or {}
    diff = state.get("differential", {})
    truth = (state.get("truth") or {}).get("classes", {})
    valid = (state.get("validity") or {}).get("valid", True)
    t = Table(title=f"leukoflow run {state.get('run', '')} — differential "
                    f"({diff.get('counted', 0)} counted cells)"
                    + ("" if valid else " — NOT VALID (drift)"), expand=False)
    est = (diff.get("estimate") or {}).get("classes", {})
    for col in ("class", "differential", "95 % interval", "count", "counted %"):
        t.add_column(col, justify="right")
    if truth:
        t.add_column("truth", justify="right")
    for name, c in diff.get("classes", {}).items():
        e = est.get(name, {"fraction": None, "lower": 0.0, "upper": 1.0})
        row = [name, _pct(e["fraction"]), f"{_pct(e['lower'])} – {_pct(e['upper'])}",
               str(c["count"]), _pct(c["fraction"])]
        if truth:
            row.append(_pct(truth.get(name, {}).get("fraction")))
        t.add_row(*row)
    acc = state.get("accounting", {})
    thr = state.get("throughput", {})
    lat = state.get("latency", {})
    s = Table(show_header=False, expand=False)
    s.add_column("k", style="bold")
    s.add_column("v", justify="right")
    s.add_column("k2", style="bold")
    s.add_column("v2", justify="right")
    fps = services.get("frames_per_s")
    s.add_row("emitted", str(acc.get("emitted", 0)), "cells/s", f"{thr.get('cells_per_s', 0):.0f}")
    s.add_row("counted", str(acc.get("counted", 0)), "frames/s",
              "–" if fps is None else f"{fps:.0f}")
    s.add_row("uncertain", str(acc.get("uncertain", 0)), "latency p50", _ms(lat.get("p50_s")))
    s.add_row("OOD", str(acc.get("ood", 0)), "latency p99", _ms(lat.get("p99_s")))
    s.add_row("rejected", str(acc.get("rejected_total", 0)), "in flight",
              str(acc.get("in_flight", 0)))
    s.add_row("dropped", str(acc.get("dropped_total", 0)), "explainer backlog",
              "–" if services.get("explainer_backlog") is None
              else f"{services['explainer_backlog']:.0f}")
    s.add_row("lost", str(acc.get("lost_total", 0)), "duplicates",
              str(acc.get("duplicates", 0)))
    camera = camera_line(services)
    queues = services.get("queues") or {}
    q = ", ".join(f"{k} {v:.0f}" for k, v in sorted(queues.items())) or "–"
    restarts = state.get("restarts") or {}
    footer = f"queues: {q}"
    if restarts:
        footer += " | restarts: " + ", ".join(f"{k} {v}" for k, v in restarts.items())
    from rich.text import Text

    lines = [Text(text, style=style) for text, style in live_lines(state)]
    loss = loss_line(acc)
    if loss is not None:
        lines.insert(0, Text(*loss))
    if camera is not None:
        lines.insert(0, Text(*camera))
    return Group(t, s, Text(footer), *lines)


def loss_line(acc: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(text, style)`` naming lost cells (by stage:reason) and duplicates, or None."""
    parts = []
    lost = acc.get("lost") or {}
    if acc.get("lost_total"):
        why = ", ".join(f"{k} {v}" for k, v in sorted(lost.items()))
        parts.append(f"LOST {acc['lost_total']} cells ({why})")
    if acc.get("duplicates"):
        parts.append(f"{acc['duplicates']} duplicate results (counted once)")
    return (" | ".join(parts), "bold red") if parts else None


def camera_line(services: Mapping[str, Any]) -> tuple[str, str] | None:
    """Keeping up with the camera: (text, style), red when frames are lost after the warm-up.

    None when the acquisition's metrics are not available (replay of crop recordings).
    """
    nominal = services.get("frame_rate_nominal")
    achieved = services.get("frame_rate_achieved")
    if nominal is None or achieved is None:
        return None
    dropped = services.get("frames_dropped") or 0.0
    cells = services.get("cells_in_dropped_frames") or 0.0
    warming = bool(services.get("warming_up"))
    if nominal <= 0:
        return f"camera: unpaced, {achieved:.0f} frames/s (as fast as possible)", "dim"
    text = (f"camera: {achieved:.0f} of {nominal:.0f} frames/s "
            f"({100 * achieved / nominal:.0f} %), backlog "
            f"{services.get('frame_backlog') or 0:.0f} frames, dropped {dropped:.0f} frames "
            f"(~{cells:.0f} cells)")
    if warming:
        return text + " — warming up", "yellow"
    behind = achieved < 0.95 * nominal
    return (text + (" — FALLING BEHIND" if behind else ""),
            "bold red" if behind else ("yellow" if dropped else "green"))


class LiveView:
    """rich ``Live`` display of the run state (refreshed at most 4 times a second)."""

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console

        self.console = console or Console()
        self._live: Any = None
        self._last = 0.0

    def start(self) -> None:
        """Begin drawing."""
        from rich.live import Live

        self._live = Live(render(None), console=self.console, refresh_per_second=4,
                          transient=False)
        self._live.start()

    def update(self, state: Mapping[str, Any] | None, services: Mapping[str, Any]) -> None:
        """Redraw with a new state."""
        now = time.monotonic()
        if self._live is not None and now - self._last >= 0.25:
            self._live.update(render(state, services))
            self._last = now

    def stop(self) -> None:
        """Stop drawing (the last frame stays on screen)."""
        if self._live is not None:
            self._live.stop()
            self._live = None
