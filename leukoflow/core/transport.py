"""ZeroMQ socket helpers with secure, non-blocking defaults.

* Endpoints default to loopback; binding to another interface must be asked for
  explicitly (``allow_remote=True``) — remote deployments should add CurveZMQ keys.
* ``LINGER`` is 0 so a stopping service never hangs on unsent messages.
* Small high-water marks: backpressure shows up quickly and is counted, not hidden.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlparse

from leukoflow.core import wire

DEFAULT_ENDPOINTS = {
    "crops": "tcp://127.0.0.1:5555",
    "collector": "tcp://127.0.0.1:5556",
    "explain": "tcp://127.0.0.1:5557",
    "live": "tcp://127.0.0.1:5558",
}
DEFAULT_METRICS_PORTS = {"acquire": 9101, "infer": 9102, "explain": 9103, "collector": 9104}


class EndpointError(ValueError):
    """An endpoint string is malformed or not allowed."""


def check_endpoint(endpoint: str, *, bind: bool, allow_remote: bool = False) -> str:
    """Validate a ZeroMQ endpoint; refuse non-loopback binds unless ``allow_remote``.

    Parameters
    ----------
    endpoint : str
        ``tcp://HOST:PORT``, ``ipc://PATH`` or ``inproc://NAME``.
    bind : bool
        Whether the endpoint will be bound (the loopback rule applies to binds).
    allow_remote : bool
        Permit binding to a non-loopback address.
    """
    u = urlparse(endpoint)
    if u.scheme in ("ipc", "inproc"):
        return endpoint
    if u.scheme != "tcp" or not u.hostname or u.port is None:
        raise EndpointError(f"bad endpoint {endpoint!r}; expected tcp://HOST:PORT, ipc:// or inproc://")
    if bind and not allow_remote:
        host = u.hostname
        try:
            loop = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loop = False
        if not loop:
            raise EndpointError(
                f"refusing to bind {endpoint!r} to a non-loopback address; "
                "pass allow_remote (and configure CurveZMQ) for multi-machine setups"
            )
    return endpoint


def make_socket(ctx: Any, kind: str, endpoint: str, *, bind: bool, hwm: int = 100,
                allow_remote: bool = False, immediate: bool = True) -> Any:
    """Create, configure and bind/connect a socket.

    Parameters
    ----------
    ctx : zmq.Context
    kind : str
        ``PUSH``, ``PULL``, ``PUB`` or ``SUB``.
    endpoint : str
    bind : bool
        Bind (server side) or connect.
    hwm : int
        Send/receive high-water mark [messages].
    """
    import zmq

    check_endpoint(endpoint, bind=bind, allow_remote=allow_remote)
    sock = ctx.socket(getattr(zmq, kind))
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if kind == "PUSH" and immediate:
        sock.setsockopt(zmq.IMMEDIATE, 1)
    if kind == "SUB":
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    if bind:
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)
    return sock


def send(sock: Any, msg: wire.Message, *, block: bool = False) -> bool:
    """Encode and send ``msg``; return False (nothing sent) when the peer is full.

    Non-blocking by default: the caller counts the drop (reason ``backpressure``).
    """
    import zmq

    frames = wire.encode(msg)
    try:
        sock.send_multipart(frames, flags=0 if block else zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return False
    return True


def recv(sock: Any, timeout_ms: int | None = None, *, check_finite: bool = True
         ) -> wire.Message | None:
    """Receive and decode one message; None on timeout. Raises :class:`wire.WireError`."""
    if timeout_ms is not None and not sock.poll(timeout_ms):
        return None
    frames = sock.recv_multipart(copy=False)
    return wire.decode(frames, check_finite=check_finite)
