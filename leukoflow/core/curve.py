"""CurveZMQ keys, ZAP allow-lists and who may send which message.

Security model (see ``deploy/README.md``, section *Security*):

* Every socket that **binds** is a CurveZMQ *server* holding the deployment's server key
  pair; every socket that **connects** is a *client* with its own key pair and the server's
  public key. The handshake encrypts and authenticates both ends.
* A ZAP handler (:class:`ZapHandler`, one per ZeroMQ context) admits a client only when its
  public key is in the allow-list of the endpoint it connects to (:data:`ENDPOINT_CLIENTS`);
  refused handshakes are counted per endpoint (:func:`refusals`). An admitted client's
  messages carry the ZAP ``User-Id`` ``"<role>:<key name>"``, so a receiver knows per message
  which role sent it (:func:`peer_role`) and enforces :data:`SENDERS` (only the supervisor
  may send ``stop``, only inference workers send ``results``...).
* Key files use ZeroMQ's certificate text format (Z85 keys, no pickle): ``NAME.key`` (public)
  and ``NAME.key_secret`` (public + secret), mode 0600 in a 0700 folder. A secret file that
  other users could read is refused, like ssh does.

Key folder layout (``leukoflow keys create DIR``)::

    DIR/server.key, server.key_secret          the servers' key pair
    DIR/<name>.key, <name>.key_secret          one client key pair per role (metadata role)

A machine gets only what it needs: a server host ``server.key_secret`` plus the public
``<client>.key`` files it admits; a client host ``server.key`` plus its own
``<name>.key_secret``.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ROLES", "ENDPOINT_CLIENTS", "SENDERS", "KEYS_ENV", "KeyError_", "Certificate",
           "KeyStore", "create_keys", "add_client", "write_certificate", "read_certificate",
           "keys_from_env", "ZapHandler", "zap_handler", "refusals", "peer_identity",
           "peer_role", "may_send", "apply_server", "apply_client"]

#: Client roles (the identities a process can have when it connects).
ROLES: tuple[str, ...] = ("acquire", "infer", "collector", "supervisor", "viewer")
#: Name of the server key pair.
SERVER = "server"
#: Environment variable naming the key folder (a global setting of every service).
KEYS_ENV = "LEUKOFLOW_KEYS"

#: Which client roles may connect to each served endpoint (the ZAP allow-list by role).
ENDPOINT_CLIENTS: dict[str, tuple[str, ...]] = {
    "crops": ("infer", "collector"),        # acquisition/replay PUSH: workers, recording tap
    "tap": ("infer",),                      # collector's recording tap PUSH: workers
    "collector": ("acquire", "infer", "supervisor"),  # results and control PULL
    "explain": ("infer",),                  # explainer PULL
    "live": ("viewer", "supervisor"),       # collector's live-state PUB
}

#: Which roles may send a message, by ``(kind, cmd)`` (``cmd`` None: any command). A message
#: whose key is absent here is refused from every authenticated peer.
SENDERS: dict[tuple[str, str | None], frozenset[str]] = {
    ("results", None): frozenset({"infer"}),
    ("explain", None): frozenset({"infer"}),
    ("crops", None): frozenset({"acquire"}),
    ("control", "hello"): frozenset({"acquire", "infer", "supervisor"}),
    ("control", "accounting"): frozenset({"acquire", "infer", "supervisor"}),
    ("control", "eos"): frozenset({"acquire"}),
    ("control", "stop"): frozenset({"supervisor"}),
    ("heartbeat", None): frozenset(ROLES),
}

_Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class KeyError_(ValueError):  # noqa: N801 (KeyError is a builtin)
    """A key file or key folder is missing, malformed or not private enough."""


@dataclass(frozen=True)
class Certificate:
    """One CurveZMQ key pair (or its public half).

    Attributes
    ----------
    name : str
        File stem (``server``, ``infer``, ``infer-gpu2``...).
    role : str
        ``server`` or one of :data:`ROLES`.
    public : bytes
        Z85 public key (40 characters).
    secret : bytes or None
        Z85 secret key; None for a public certificate.
    """

    name: str
    role: str
    public: bytes
    secret: bytes | None = None

    @property
    def user_id(self) -> str:
        """ZAP User-Id given to this client's messages (``role:name``)."""
        return f"{self.role}:{self.name}"


# ----------------------------------------------------------------------------- files

def _text(cert: Certificate, secret: bool) -> str:
    kind = "Secret" if secret else "Public"
    lines = [
        f"#   ****  Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by leukoflow keys  ****",
        f"#   ZeroMQ CURVE {kind} Certificate",
    ]
    if secret:
        lines.append("#   Keep private: do not copy to other users or loosen its mode (0600).")
    lines += ["", "metadata", f'    role = "{cert.role}"', "curve",
              f'    public-key = "{cert.public.decode()}"']
    if secret:
        assert cert.secret is not None
        lines.append(f'    secret-key = "{cert.secret.decode()}"')
    return "\n".join(lines) + "\n"


def _write_private(path: Path, text: str, force: bool) -> None:
    """Write ``text`` to a new file created with mode 0600 (never briefly wider)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError as exc:
        raise KeyError_(f"{path} exists (--force replaces the keys)") from exc
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def write_certificate(folder: str | os.PathLike, cert: Certificate, *,
                      force: bool = False) -> tuple[Path, Path | None]:
    """Write ``NAME.key`` (and ``NAME.key_secret`` when the secret is known), mode 0600.

    Returns the public and secret paths.
    """
    if not _NAME.match(cert.name):
        raise KeyError_(f"bad key name {cert.name!r} (letters, digits, '_', '.', '-')")
    d = Path(folder)
    pub = d / f"{cert.name}.key"
    _write_private(pub, _text(cert, secret=False), force)
    sec = None
    if cert.secret is not None:
        sec = d / f"{cert.name}.key_secret"
        _write_private(sec, _text(cert, secret=True), force)
    return pub, sec


def _check_private(path: Path) -> None:
    st = path.stat()
    if st.st_mode & 0o077:
        raise KeyError_(f"{path} is accessible to other users (mode "
                        f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise KeyError_(f"{path} belongs to another user (uid {st.st_uid})")


def read_certificate(path: str | os.PathLike) -> Certificate:
    """Read a certificate written by :func:`write_certificate` (or by ZeroMQ's tools).

    A ``.key_secret`` file must be private (no group/other permission bits, owned by this
    user). Raises :class:`KeyError_` on anything else.
    """
    p = Path(path)
    secret_file = p.name.endswith(".key_secret")
    if secret_file:
        _check_private(p)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyError_(f"cannot read {p}: {exc}") from exc
    values: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r'^\s*([a-z-]+)\s*=\s*"([^"]*)"\s*$', line)
        if m:
            values[m.group(1)] = m.group(2)
    name = p.name.rsplit(".key", 1)[0]
    public = values.get("public-key", "").encode()
    secret = values.get("secret-key", "").encode() or None
    if not _Z85_KEY.match(public.decode()):
        raise KeyError_(f"{p}: no valid Z85 public-key")
    if secret_file and (secret is None or not _Z85_KEY.match(secret.decode())):
        raise KeyError_(f"{p}: no valid Z85 secret-key")
    role = values.get("role", SERVER if name == SERVER else name)
    if role != SERVER and role not in ROLES:
        raise KeyError_(f"{p}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
    return Certificate(name, role, public, secret if secret_file else None)


def _new_pair(name: str, role: str) -> Certificate:
    import zmq

    public, secret = zmq.curve_keypair()
    return Certificate(name, role, public, secret)


def _private_folder(folder: str | os.PathLike) -> Path:
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    return d


def create_keys(folder: str | os.PathLike, roles: Iterable[str] = ROLES, *,
                force: bool = False) -> list[Path]:
    """Create the server key pair and one client key pair per role in ``folder`` (0700).

    Returns the files written. Existing files are kept unless ``force``.
    """
    d = _private_folder(folder)
    written: list[Path] = []
    for cert in [_new_pair(SERVER, SERVER), *(_new_pair(r, r) for r in roles)]:
        if cert.role != SERVER and cert.role not in ROLES:
            raise KeyError_(f"unknown role {cert.role!r}")
        pub, sec = write_certificate(d, cert, force=force)
        written += [pub, sec] if sec else [pub]
    return written


def add_client(folder: str | os.PathLike, name: str, role: str, *,
               force: bool = False) -> list[Path]:
    """Create one more client key pair ``name`` with ``role`` in ``folder``."""
    if role not in ROLES:
        raise KeyError_(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if name == SERVER:
        raise KeyError_("the name 'server' is reserved for the server key pair")
    pub, sec = write_certificate(_private_folder(folder), _new_pair(name, role), force=force)
    return [pub, sec] if sec else [pub]


# ----------------------------------------------------------------------------- key store

class KeyStore:
    """The certificates of one key folder.

    Parameters
    ----------
    folder : path-like
        Key folder (see the module docstring). It must not be writable by other users.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        d = Path(folder)
        if not d.is_dir():
            raise KeyError_(f"key folder not found: {d} (create it with `leukoflow keys "
                            "create`)")
        if d.stat().st_mode & 0o022:
            raise KeyError_(f"key folder {d} is writable by other users; chmod 700 it")
        self.folder = d
        self.public: dict[str, Certificate] = {}
        self.secret: dict[str, Certificate] = {}
        for p in sorted(d.glob("*.key")):
            c = read_certificate(p)
            self.public[c.name] = c
        for p in sorted(d.glob("*.key_secret")):
            c = read_certificate(p)
            self.secret[c.name] = c
            self.public.setdefault(c.name, Certificate(c.name, c.role, c.public))
        if SERVER not in self.public:
            raise KeyError_(f"{d} has no {SERVER}.key")

    @property
    def server_public(self) -> bytes:
        """The servers' Z85 public key."""
        return self.public[SERVER].public

    def server(self) -> Certificate:
        """The server key pair (binding sockets); error when this host lacks the secret."""
        c = self.secret.get(SERVER)
        if c is None:
            raise KeyError_(f"{self.folder} has no {SERVER}.key_secret: this host cannot "
                            "serve an endpoint")
        return c

    def client(self, role: str) -> Certificate:
        """This host's key pair for ``role`` (``ROLE.key_secret``, else the only one)."""
        if role not in ROLES:
            raise KeyError_(f"unknown role {role!r}")
        c = self.secret.get(role)
        if c is not None and c.role == role:
            return c
        found = [c for c in self.secret.values() if c.role == role]
        if len(found) != 1:
            raise KeyError_(f"{self.folder}: {'no' if not found else 'several'} secret key "
                            f"for role {role!r} (expected {role}.key_secret)")
        return found[0]

    def allowed(self, endpoint: str) -> dict[bytes, str]:
        """Z85 public key -> User-Id of every client admitted to ``endpoint``."""
        roles = ENDPOINT_CLIENTS.get(endpoint)
        if roles is None:
            raise KeyError_(f"unknown endpoint {endpoint!r}; expected one of "
                            f"{', '.join(ENDPOINT_CLIENTS)}")
        return {c.public: c.user_id for c in self.public.values()
                if c.role != SERVER and c.role in roles}

    def describe(self) -> dict[str, Any]:
        """Names, roles and public keys (never secrets)."""
        return {"folder": str(self.folder),
                "keys": [{"name": c.name, "role": c.role, "public": c.public.decode(),
                          "secret_here": c.name in self.secret}
                         for c in self.public.values()]}


_STORES: dict[str, KeyStore] = {}
_STORES_LOCK = threading.Lock()


def keys_from_env(env: Mapping[str, str] | None = None) -> KeyStore | None:
    """The key store named by ``$LEUKOFLOW_KEYS``; None when it is unset or empty."""
    folder = (os.environ if env is None else env).get(KEYS_ENV, "")
    if not folder:
        return None
    key = str(Path(folder).resolve())
    with _STORES_LOCK:
        if key not in _STORES:
            _STORES[key] = KeyStore(key)
        return _STORES[key]


# ----------------------------------------------------------------------------- ZAP

_REFUSED: Counter[str] = Counter()
_REFUSED_LOCK = threading.Lock()


def refusals() -> dict[str, int]:
    """Handshakes refused by the ZAP handlers of this process, by endpoint."""
    with _REFUSED_LOCK:
        return dict(_REFUSED)


class ZapHandler:
    """ZeroMQ Authentication Protocol handler (RFC 27) of one context, in a thread.

    Each serving socket gets its own ZAP domain (``<endpoint>#<n>``) with its allow-list; a
    CURVE client whose key is listed is admitted with User-Id ``role:name``; everything else
    (unknown key, other mechanism, unknown domain) is refused. The same thread reads each
    serving socket's monitor and counts every failed handshake per endpoint
    (:func:`refusals`): refused keys, peers without keys (plain ZeroMQ) and peers that do
    not know the server key alike. The thread ends when the context terminates.
    """

    #: monitor events counted as refused handshakes
    _FAILED = ("EVENT_HANDSHAKE_FAILED_NO_DETAIL", "EVENT_HANDSHAKE_FAILED_PROTOCOL",
               "EVENT_HANDSHAKE_FAILED_AUTH")

    def __init__(self, ctx: Any) -> None:
        import zmq

        self._ctx = ctx
        self._lock = threading.Lock()
        self._domains: dict[str, tuple[str, dict[bytes, str]]] = {}
        self._new_monitors: list[tuple[Any, str]] = []
        self._n = 0
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind("inproc://zeromq.zap.01")
        self._thread = threading.Thread(target=self._serve, name="leukoflow-zap", daemon=True)
        self._thread.start()

    def register(self, endpoint: str, allowed: Mapping[bytes, str]) -> str:
        """Add a domain admitting ``allowed`` (Z85 key -> User-Id); return the domain name."""
        with self._lock:
            self._n += 1
            domain = f"{endpoint}#{self._n}"
            self._domains[domain] = (endpoint, dict(allowed))
        return domain

    def watch(self, sock: Any, endpoint: str) -> None:
        """Count failed handshakes on ``sock`` (call before it binds)."""
        import zmq

        events = 0
        for name in self._FAILED:
            events |= getattr(zmq, name, 0)
        with self._lock:
            addr = f"inproc://leukoflow-monitor-{id(self)}-{self._n}-{len(self._new_monitors)}"
        sock.monitor(addr, events | zmq.EVENT_MONITOR_STOPPED)
        pair = self._ctx.socket(zmq.PAIR)
        pair.setsockopt(zmq.LINGER, 0)
        pair.connect(addr)
        with self._lock:  # hand-over to the ZAP thread (the lock is the memory barrier)
            self._new_monitors.append((pair, endpoint))

    def _decide(self, domain: str, mechanism: bytes, credentials: list[bytes]
                ) -> tuple[bool, str]:
        from zmq.utils import z85

        with self._lock:
            entry = self._domains.get(domain)
        if entry is None:
            return False, "unknown domain"
        _endpoint, allowed = entry
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            return False, "CURVE required"
        user = allowed.get(z85.encode(credentials[0]))
        if user is None:
            return False, "key not allowed"
        return True, user

    def _answer(self) -> None:
        msg = self._sock.recv_multipart()
        if len(msg) < 6:
            rid = msg[1] if len(msg) > 1 else b""
            self._sock.send_multipart([b"1.0", rid, b"400", b"malformed", b"", b""])
            return
        _version, rid, domain, _address, _identity, mechanism = msg[:6]
        ok, detail = self._decide(domain.decode("utf-8", "replace"), mechanism, list(msg[6:]))
        if ok:
            self._sock.send_multipart([b"1.0", rid, b"200", b"OK", detail.encode(), b""])
        else:
            self._sock.send_multipart([b"1.0", rid, b"400", detail.encode(), b"", b""])

    def _serve(self) -> None:
        import zmq
        from zmq.utils.monitor import parse_monitor_message

        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        monitors: dict[Any, str] = {}
        try:
            while True:
                with self._lock:
                    new, self._new_monitors = self._new_monitors, []
                for pair, endpoint in new:
                    monitors[pair] = endpoint
                    poller.register(pair, zmq.POLLIN)
                events = dict(poller.poll(100))
                if self._sock in events:
                    self._answer()
                for pair in [p for p in monitors if p in events]:
                    ev = parse_monitor_message(pair.recv_multipart())["event"]
                    if ev == zmq.EVENT_MONITOR_STOPPED:
                        poller.unregister(pair)
                        pair.close(0)
                        del monitors[pair]
                        continue
                    with _REFUSED_LOCK:
                        _REFUSED[monitors[pair]] += 1
        except zmq.ContextTerminated:
            pass
        except zmq.ZMQError:  # socket closed under us
            pass
        finally:
            self._sock.close(0)
            for pair in monitors:
                pair.close(0)
            with self._lock:
                for pair, _ in self._new_monitors:
                    pair.close(0)


_HANDLERS: weakref.WeakKeyDictionary[Any, ZapHandler] = weakref.WeakKeyDictionary()
_HANDLERS_LOCK = threading.Lock()


def zap_handler(ctx: Any) -> ZapHandler:
    """The ZAP handler of ``ctx`` (started on first use)."""
    with _HANDLERS_LOCK:
        h = _HANDLERS.get(ctx)
        if h is None:
            h = _HANDLERS[ctx] = ZapHandler(ctx)
        return h


def apply_server(ctx: Any, sock: Any, keys: KeyStore, endpoint: str) -> str:
    """Make ``sock`` (not yet bound) a CURVE server admitting ``endpoint``'s client roles.

    Returns the ZAP domain.
    """
    import zmq

    cert = keys.server()
    handler = zap_handler(ctx)
    domain = handler.register(endpoint, keys.allowed(endpoint))
    handler.watch(sock, endpoint)
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, cert.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, cert.public)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    return domain


def apply_client(sock: Any, keys: KeyStore, role: str) -> Certificate:
    """Make ``sock`` (not yet connected) a CURVE client with ``role``'s key pair."""
    import zmq

    cert = keys.client(role)
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, cert.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, cert.secret)
    return cert


# ----------------------------------------------------------------------------- per message

def peer_identity(frame: Any) -> str | None:
    """ZAP User-Id of a received frame (``role:name``); None without ZAP (plain/ipc/client).

    The frame must have been received with ``copy=False`` (a :class:`zmq.Frame`).
    """
    import zmq

    get = getattr(frame, "get", None)
    if get is None:
        return None
    try:
        uid = get("User-Id")
    except zmq.ZMQError:
        return None
    return uid or None


def peer_role(frame: Any) -> str | None:
    """Role part of :func:`peer_identity` (None when the transport does not authenticate)."""
    uid = peer_identity(frame)
    return uid.split(":", 1)[0] if uid else None


def may_send(role: str, kind: str, cmd: str | None = None) -> bool:
    """True when ``role`` may send a message of ``kind`` (and control ``cmd``)."""
    allowed = SENDERS.get((kind, cmd if kind == "control" else None))
    return allowed is not None and role in allowed
