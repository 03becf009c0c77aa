"""ZeroMQ socket helpers with secure, non-blocking defaults.

* Endpoints default to loopback; binding to another interface must be asked for
  explicitly (``allow_remote=True``) and needs CurveZMQ keys; connecting to another host
  needs them too. ``ipc://`` sockets must live in a folder only this user can open (0700).
* With keys (``keys=`` or ``$LEUKOFLOW_KEYS``, see :mod:`leukoflow.core.curve`) every bound
  socket is a CurveZMQ server admitting only the client roles of the endpoint it
  ``serves``; every connecting socket authenticates with its ``identity``'s key pair.
  :func:`authorize` then checks per message that the sending role may send it.
* ``MAXMSGSIZE`` on every receiving socket (:func:`message_limit`): ZeroMQ drops a peer
  that announces a larger frame before reading it into memory.
* ``LINGER`` is 0 so a stopping service never hangs on unsent messages.
* Small high-water marks: backpressure shows up quickly and is counted, not hidden.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import socket
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from leukoflow.core import curve, wire
from leukoflow.core.physics import DEFAULT_OPTICS

log = logging.getLogger(__name__)

#: The one place for addresses and ports: every default endpoint and metrics port derives
#: from these (services, ``leukoflow run``, deploy files, docs/CONTRACTS.md).
LOOPBACK = "127.0.0.1"
#: ZeroMQ endpoints in port order: a run's endpoint ``role`` is ``base + index`` (see
#: :func:`loopback_endpoints`): crops (acquire -> infer), collector (results/control), explain
#: (infer -> explainer), live (collector state), tap (recording tap of ``leukoflow run``).
ENDPOINT_ROLES: tuple[str, ...] = ("crops", "collector", "explain", "live", "tap")
DEFAULT_BASE_PORT = 5555
#: Services in metrics-port order: ``base + index`` (inference worker i > 0: ``base + 10 + i``).
METRICS_ROLES: tuple[str, ...] = ("acquire", "infer", "explain", "collector")
DEFAULT_METRICS_BASE_PORT = 9101


def tcp_endpoint(port: int, host: str = LOOPBACK) -> str:
    """``tcp://host:port`` (loopback by default)."""
    return f"tcp://{host}:{int(port)}"


def free_tcp_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` now (below the ephemeral range, see :func:`free_port_block`).

    For tests, benchmarks and local launchers: another process may take it before it is used.
    """
    return free_port_block(1, host)


def _ephemeral_low() -> int:
    """Lowest port of the kernel's ephemeral range (32768 where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_block(count: int, host: str = LOOPBACK, exclude: tuple[range, ...] = ()) -> int:
    """First port of ``count`` consecutive TCP ports that are all free on ``host`` now.

    Drawn from 10000 up to the kernel's ephemeral range (``net.ipv4.ip_local_port_range``,
    by default 32768-60999), so outgoing connections of other processes do not take one of
    them between the check and the bind; blocks overlapping ``exclude`` are skipped. For tests,
    benchmarks and local launchers (``leukoflow run --zmq-base-port/--metrics-base-port``).
    """
    lo, hi = 10000, max(_ephemeral_low(), 10000 + 10 * count)
    for _ in range(500):
        base = random.randrange(lo, hi - count)
        block = range(base, base + count)
        if any(b.start < block.stop and block.start < b.stop for b in exclude):
            continue
        socks = []
        try:
            for p in block:
                s = socket.socket()
                socks.append(s)
                s.bind((host, p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {count} free ports on {host}")


def run_port_args() -> list[str]:
    """``leukoflow run`` flags for free, non-overlapping ZeroMQ and metrics port blocks.

    The ZeroMQ block covers one port per :data:`ENDPOINT_ROLES` role, the metrics block
    base+0..+19 (workers > 0 at +10+i).
    """
    nz = len(ENDPOINT_ROLES)
    z = free_port_block(nz)
    m = free_port_block(20, exclude=(range(z, z + nz),))
    return ["--zmq-base-port", str(z), "--metrics-base-port", str(m)]


def loopback_endpoints(base_port: int = DEFAULT_BASE_PORT) -> dict[str, str]:
    """Loopback endpoint per :data:`ENDPOINT_ROLES` role, from ``base_port`` upwards."""
    return {role: tcp_endpoint(base_port + i) for i, role in enumerate(ENDPOINT_ROLES)}


def metrics_ports(base_port: int = DEFAULT_METRICS_BASE_PORT) -> dict[str, int]:
    """Metrics (health server) port per :data:`METRICS_ROLES` service."""
    return {role: base_port + i for i, role in enumerate(METRICS_ROLES)}


DEFAULT_ENDPOINTS: dict[str, str] = loopback_endpoints()
DEFAULT_METRICS_PORTS: dict[str, int] = metrics_ports()
#: Cells per message a receiving socket accepts by default (crops of one frame, one batch of
#: results or explain requests); services that know their batch size pass their own.
DEFAULT_MAX_CELLS = 1024
#: Socket kinds that receive (they get a ``MAXMSGSIZE``).
RECEIVING = ("PULL", "SUB")


class EndpointError(ValueError):
    """An endpoint string is malformed or not allowed."""


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_ipc_folder(path: str | os.PathLike) -> Path:
    """Refuse an ``ipc://`` socket folder other users could open or write.

    The folder must exist, belong to this user and have no group/other permission bits
    (a private 0700 folder: the file system then authenticates every peer as this user).
    """
    d = Path(path)
    try:
        st = d.stat()
    except OSError as exc:
        raise EndpointError(f"ipc socket folder {d} does not exist: {exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise EndpointError(f"ipc socket folder {d} is not a folder")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise EndpointError(f"ipc socket folder {d} belongs to another user")
    if st.st_mode & 0o077:
        raise EndpointError(f"ipc socket folder {d} is open to other users (mode "
                            f"{stat.S_IMODE(st.st_mode):04o}); use a 0700 folder "
                            "(transport.private_ipc_folder)")
    return d


def private_ipc_folder(prefix: str = "leukoflow-") -> Path:
    """Create a new 0700 folder for ``ipc://`` sockets (short path: sockets need < 108 B).

    Under ``$XDG_RUNTIME_DIR`` when set, else the system temporary folder.
    """
    base = os.environ.get("XDG_RUNTIME_DIR") or None
    if base and not Path(base).is_dir():
        base = None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def check_endpoint(endpoint: str, *, bind: bool, allow_remote: bool = False,
                   secure: bool = False) -> str:
    """Validate a ZeroMQ endpoint against the transport rules.

    * ``tcp``: binding a non-loopback address needs ``allow_remote`` **and** CurveZMQ
      (``secure``); connecting to another host needs CurveZMQ.
    * ``ipc``: a bound socket's folder must be private (:func:`check_ipc_folder`).

    Parameters
    ----------
    endpoint : str
        ``tcp://HOST:PORT``, ``ipc://PATH`` or ``inproc://NAME``.
    bind : bool
        Whether the endpoint will be bound.
    allow_remote : bool
        Permit binding to a non-loopback address.
    secure : bool
        The socket uses CurveZMQ keys.
    """
    u = urlparse(endpoint)
    if u.scheme == "inproc":
        return endpoint
    if u.scheme == "ipc":
        path = endpoint[len("ipc://"):]
        if not path or path.startswith("@"):
            raise EndpointError(f"bad endpoint {endpoint!r}: ipc needs a file path "
                                "(abstract sockets cannot be made private)")
        if bind:
            check_ipc_folder(Path(path).parent)
        return endpoint
    if u.scheme != "tcp" or not u.hostname or u.port is None:
        raise EndpointError(
            f"bad endpoint {endpoint!r}; expected tcp://HOST:PORT, ipc:// or inproc://")
    if _is_loopback(u.hostname):
        return endpoint
    if bind and not allow_remote:
        raise EndpointError(
            f"refusing to bind {endpoint!r} to a non-loopback address; "
            "pass allow_remote (with CurveZMQ keys) for multi-machine setups")
    if not secure:
        raise EndpointError(
            f"refusing {'to bind' if bind else 'to connect to'} {endpoint!r} without "
            f"CurveZMQ keys: create them with `leukoflow keys create DIR` and set "
            f"{curve.KEYS_ENV}=DIR")
    return endpoint


def message_limit(crop_side: int = DEFAULT_OPTICS.crop_size,
                  max_cells: int = DEFAULT_MAX_CELLS, itemsize: int = 4) -> int:
    """Largest frame [bytes] a receiving socket accepts (``ZMQ_MAXMSGSIZE``).

    The bigger of the largest header (:data:`wire.MAX_HEADER_BYTES`) and a payload of
    ``max_cells`` crops of ``crop_side``² pixels (results and explain payloads are smaller).

    Parameters
    ----------
    crop_side : int
        Crop side [pixels] (the model's input size).
    max_cells : int
        Most cells in one message (the largest batch).
    itemsize : int
        Bytes per pixel (4: float32).
    """
    if crop_side < 1 or max_cells < 1 or itemsize < 1:
        raise ValueError("crop_side, max_cells and itemsize must be >= 1")
    return max(wire.MAX_HEADER_BYTES, int(crop_side) ** 2 * int(max_cells) * int(itemsize))


_warned_plain: set[str] = set()


def make_socket(ctx: Any, kind: str, endpoint: str, *, bind: bool, hwm: int = 100,
                allow_remote: bool = False, immediate: bool = True,
                keys: curve.KeyStore | None | bool = None, serves: str = "",
                identity: str = "", max_msg_bytes: int | None = None,
                options: Mapping[int, Any] | None = None) -> Any:
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
    allow_remote : bool
        Permit binding a non-loopback address (needs keys).
    immediate : bool
        ``ZMQ_IMMEDIATE`` on PUSH sockets.
    keys : KeyStore, None or False
        CurveZMQ keys; None: ``$LEUKOFLOW_KEYS`` if set; False: none (plain transport).
    serves : str
        Bound sockets with keys: the endpoint's name in :data:`curve.ENDPOINT_CLIENTS`
        (whose client roles are admitted).
    identity : str
        Connecting sockets with keys: this process's role (:data:`curve.ROLES`).
    max_msg_bytes : int, optional
        ``ZMQ_MAXMSGSIZE`` of a receiving socket (default :func:`message_limit`).
    options : mapping, optional
        Further socket options set before bind/connect (e.g. ``{zmq.SNDBUF: n}``).
    """
    import zmq

    if keys is None:
        keys = curve.keys_from_env()
    elif keys is False:
        keys = None
    check_endpoint(endpoint, bind=bind, allow_remote=allow_remote, secure=keys is not None)
    sock = ctx.socket(getattr(zmq, kind))
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        if kind in RECEIVING:
            sock.setsockopt(zmq.MAXMSGSIZE, int(max_msg_bytes or message_limit()))
        if kind == "PUSH" and immediate:
            sock.setsockopt(zmq.IMMEDIATE, 1)
        if kind == "SUB":
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        for opt, val in (options or {}).items():
            sock.setsockopt(opt, val)
        if keys is not None and not endpoint.startswith("inproc://"):
            if bind:
                if not serves:
                    raise EndpointError(f"binding {endpoint!r} with keys needs serves=")
                curve.apply_server(ctx, sock, keys, serves)
            else:
                if not identity:
                    raise EndpointError(f"connecting {endpoint!r} with keys needs identity=")
                curve.apply_client(sock, keys, identity)
        elif bind and endpoint.startswith("tcp://") and endpoint not in _warned_plain:
            _warned_plain.add(endpoint)
            log.warning("%s is not authenticated (no CurveZMQ keys): any local process can "
                        "connect; set %s or use ipc:// in a private folder",
                        endpoint, curve.KEYS_ENV)
        if bind:
            sock.bind(endpoint)
        else:
            sock.connect(endpoint)
    except BaseException:
        sock.close(0)
        raise
    return sock


def authorize(frames: Any, header: Mapping[str, Any]) -> bool:
    """True when the peer that sent ``frames`` may send a message like ``header``.

    On a CurveZMQ server socket every message carries its sender's role (ZAP User-Id) and
    :data:`curve.SENDERS` decides. Elsewhere (``ipc://`` in a private folder, where the
    file system admits only this user; plain loopback TCP, the unauthenticated development
    mode; the client side of a connection, whose server was authenticated by its key) the
    transport does not tell peers apart and every message is allowed. ``frames`` must be
    received with ``copy=False``.
    """
    role = curve.peer_role(frames[0]) if frames else None
    if role is None:
        return True
    return curve.may_send(role, str(header.get("kind")), header.get("cmd"))


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
