"""Scaffolding every long-running service uses: stop signals, health server, hello/heartbeat.

* :class:`StopSignals` routes SIGTERM/SIGINT to a stop callback and restores the previous
  handlers afterwards (only the main thread may install handlers; elsewhere it does nothing).
* :class:`ServiceScaffold` owns a service's signals and its :class:`~leukoflow.core.metrics.
  HealthServer` (``/metrics``, ``/healthz``, ``/readyz``, ``/status``): open it at start,
  :meth:`~ServiceScaffold.tick` it from the main loop, mark it ready when serving, close it
  at the end (a context manager or explicit :meth:`~ServiceScaffold.open`/``close``).
* :func:`control_message`, :func:`hello_message`, :func:`heartbeat_message` build the wire
  messages a service sends about itself, with JSON-safe ``stats``.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from leukoflow.core import transport, wire
from leukoflow.core.jsonutil import json_safe
from leukoflow.core.metrics import HealthServer, ServiceMetrics

__all__ = ["STOP_SIGNALS", "StopSignals", "ServiceScaffold", "control_message",
           "hello_message", "heartbeat_message"]

#: Signals that ask a service to stop gracefully.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Call ``on_stop(signal_name)`` on SIGTERM/SIGINT while installed.

    Parameters
    ----------
    on_stop : callable
        Called in the main thread with the signal's name (``"SIGTERM"``); must be quick and
        signal-safe (set a flag or an event). Called again on every further signal.
    signals : sequence of signal.Signals
        Signals to route (default :data:`STOP_SIGNALS`).
    """

    def __init__(self, on_stop: Callable[[str], Any],
                 signals: Sequence[signal.Signals] = STOP_SIGNALS) -> None:
        self.on_stop = on_stop
        self.signals = tuple(signals)
        self._old: dict[int, Any] = {}

    @property
    def installed(self) -> bool:
        """True while the handlers are in place."""
        return bool(self._old)

    def _handler(self, signum: int, _frame: Any) -> None:
        self.on_stop(signal.Signals(signum).name)

    def install(self) -> StopSignals:
        """Install the handlers (no-op outside the main thread or when already installed)."""
        if self._old or threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install` (idempotent)."""
        old, self._old = self._old, {}
        for sig, handler in old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()


class ServiceScaffold:
    """Signals and health server of one service.

    Parameters
    ----------
    metrics : ServiceMetrics
        The service's registry (served on ``/metrics``; its ``leukoflow_ready`` gauge follows
        :meth:`set_ready`).
    host : str
        Health server address (loopback by default).
    port : int
        Health server TCP port; 0 picks a free one, a negative port serves nothing.
    status : callable, optional
        Returns the JSON document served on ``/status``.
    on_stop : callable, optional
        Called with the signal name on SIGTERM/SIGINT while open; ``None`` installs no
        handlers (a service embedded in a thread, or whose caller handles signals).
    live_timeout_s : float
        ``/healthz`` answers 503 when :meth:`tick` was not called for this long [s].
    """

    def __init__(self, metrics: ServiceMetrics, *, host: str = transport.LOOPBACK, port: int = 0,
                 status: Callable[[], dict] | None = None,
                 on_stop: Callable[[str], Any] | None = None,
                 live_timeout_s: float = 5.0) -> None:
        self.metrics = metrics
        self.host = host
        self.requested_port = int(port)
        self.status = status
        self.live_timeout_s = live_timeout_s
        self.signals = StopSignals(on_stop) if on_stop is not None else None
        self.health: HealthServer | None = None

    @property
    def port(self) -> int | None:
        """Bound health port (``None`` when not serving)."""
        return self.health.port if self.health is not None else None

    @property
    def ready(self) -> bool:
        """True while serving and marked ready."""
        return self.health is not None and self.health.ready

    @property
    def live(self) -> bool:
        """True while serving and the main loop ticked recently."""
        return self.health is not None and self.health.live

    def open(self) -> ServiceScaffold:
        """Install the stop signals and start the health server (not ready yet)."""
        if self.signals is not None:
            self.signals.install()
        if self.health is None and self.requested_port >= 0:
            try:
                self.health = HealthServer(self.metrics, host=self.host,
                                           port=self.requested_port,
                                           live_timeout_s=self.live_timeout_s,
                                           status=self.status)
            except BaseException:
                if self.signals is not None:
                    self.signals.restore()
                raise
        return self

    def tick(self) -> None:
        """Mark the main loop alive (``/healthz``)."""
        if self.health is not None:
            self.health.tick()

    def set_ready(self, ready: bool = True, reason: str = "") -> None:
        """Set readiness (``/readyz`` and the ``leukoflow_ready`` gauge); ``reason``: why
        not (shown by ``/readyz``)."""
        if self.health is not None:
            self.health.set_ready(ready, reason)
        else:
            self.metrics["leukoflow_ready"].set(1 if ready else 0)

    def close(self) -> None:
        """Not ready, stop serving, restore the signal handlers (idempotent)."""
        try:
            if self.health is not None:
                self.health.set_ready(False)
                self.health.close()
                self.health = None
        finally:
            if self.signals is not None:
                self.signals.restore()

    def __enter__(self) -> ServiceScaffold:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def control_message(sender: wire.Sender, cmd: str, stats: Mapping[str, Any],
                    **fields: Any) -> wire.Message:
    """A ``control`` message ``cmd`` (see :data:`wire.CONTROL_COMMANDS`) with JSON-safe stats."""
    return sender.message("control", None, cmd=cmd, stats=json_safe(stats), **fields)


def hello_message(sender: wire.Sender, info: Mapping[str, Any]) -> wire.Message:
    """The ``hello`` a service sends when it starts: who it is and with which parameters.

    ``stats`` is ``{"event": "hello", **info}``.
    """
    return control_message(sender, "hello", {"event": "hello", **info})


def heartbeat_message(sender: wire.Sender, stats: Mapping[str, Any],
                      **fields: Any) -> wire.Message:
    """A ``heartbeat`` carrying the sender's cumulative ``stats`` (JSON-safe)."""
    return sender.message("heartbeat", None, stats=json_safe(stats), **fields)
