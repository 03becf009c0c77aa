"""Start and stop a Triton Inference Server process (tests, benchmarks, a single host).

Production hosts run NVIDIA's container image (``deploy/compose.yaml``, service ``triton``),
which has the onnxruntime and TensorRT backends. Where no image can run (the CPU test
machine, CI), the server comes from the PyPI wheel ``nvidia-pytriton``: it bundles a Triton
2.51 server binary (about 55 MB) with the *python* backend only. This module fetches that
wheel with pip (``pip download --no-deps``: the wheel's own dependencies, e.g. numpy<2, are
never installed into the environment), unpacks the server into the cache
(``$LEUKOFLOW_CACHE_DIR/triton/``) and starts it with the model configuration
``configs/python.pbtxt`` that ``export --triton`` writes (ONNX Runtime inside the python
backend). Two conditions make the python backend work (found on Debian 12, Python 3.11):

* its stub (``triton_python_backend_stub``, one per Python minor version in the wheel) links
  ``libpython3.X.so.1.0``: the interpreter's own shared library (a Python built with
  ``--enable-shared``, e.g. pyenv's default here) is put first on ``LD_LIBRARY_PATH``;
  otherwise Debian's ``libpython3.11`` package provides it (``deploy/ci/install-system-deps.sh``);
* the stub's embedded Python must see this environment's numpy and onnxruntime: the
  interpreter's ``bin`` folder goes first on ``PATH`` (the embedded interpreter locates its
  prefix, and so a virtual environment's ``pyvenv.cfg``, from ``python3`` on ``PATH``).

A server found first wins: ``$LEUKOFLOW_TRITONSERVER`` (path of a ``tritonserver`` binary
whose ``../backends`` holds the backends), then ``tritonserver`` on ``PATH`` or
``/opt/tritonserver/bin`` (inside NVIDIA's image), then the bundled one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leukoflow.core.transport import LOOPBACK, free_tcp_port
from leukoflow.inference.backends.onnx_cpu import default_cache_dir

PYTRITON_REQUIREMENT = "nvidia-pytriton==0.7.0"
"""The wheel whose bundled server is used where no Triton installation exists (2.51.0)."""
BUNDLE_DIR = "pytriton-0.7.0"
ENV_BINARY = "LEUKOFLOW_TRITONSERVER"


class TritonServerError(RuntimeError):
    """No server binary, or the server did not start / become ready."""


@dataclass(frozen=True)
class ServerDist:
    """A Triton installation: the binary, its backends folder and extra library folders."""

    binary: Path
    backends: Path
    libs: tuple[Path, ...] = ()
    kind: str = "system"

    @property
    def has_onnxruntime(self) -> bool:
        """True when the onnxruntime backend is installed."""
        return (self.backends / "onnxruntime").is_dir()


def _py_minor() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _bundle_root(cache_dir: str | Path | None) -> Path:
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return root / "triton" / BUNDLE_DIR


def _bundled(root: Path) -> ServerDist | None:
    binary = root / "tritonserver" / "bin" / "tritonserver"
    stub = root / "tritonserver" / "backends" / "python" / "triton_python_backend_stub"
    if binary.is_file() and stub.is_file():
        return ServerDist(binary, root / "tritonserver" / "backends",
                          (root / "nvidia_pytriton.libs",), "bundled")
    return None


def fetch_bundled(cache_dir: str | Path | None = None, wheel: str | Path | None = None
                  ) -> ServerDist:
    """Download ``nvidia-pytriton`` (no dependencies) and unpack its server into the cache.

    Parameters
    ----------
    cache_dir : path, optional
        Cache root (``$LEUKOFLOW_CACHE_DIR`` or ``~/.cache/leukoflow``).
    wheel : path, optional
        A wheel file already on disk (skips pip).
    """
    root = _bundle_root(cache_dir)
    found = _bundled(root)
    if found is not None:
        return found
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        if wheel is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--quiet", "-d", tmp, PYTRITON_REQUIREMENT]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            wheels = sorted(Path(tmp).glob("nvidia_pytriton-*.whl"))
            if res.returncode != 0 or not wheels:
                raise TritonServerError(f"pip download {PYTRITON_REQUIREMENT} failed: "
                                        f"{res.stderr.strip()[-500:]}")
            wheel = wheels[0]
        out = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                n = info.filename
                if not (n.startswith("pytriton/tritonserver/")
                        or n.startswith("nvidia_pytriton.libs/")):
                    continue
                target = out / n.removeprefix("pytriton/")
                if info.is_dir():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                mode = (info.external_attr >> 16) & 0o777
                target.chmod(mode or 0o644)
        stub_src = out / "tritonserver" / "python_backend_stubs" / _py_minor() / \
            "triton_python_backend_stub"
        if not stub_src.is_file():
            raise TritonServerError(f"{PYTRITON_REQUIREMENT} has no python-backend stub for "
                                    f"Python {_py_minor()}")
        stub = out / "tritonserver" / "backends" / "python" / "triton_python_backend_stub"
        shutil.copyfile(stub_src, stub)
        for p in (stub, out / "tritonserver" / "bin" / "tritonserver"):
            p.chmod(0o755)
        try:
            out.rename(root)
        except OSError:  # another process unpacked it first
            if _bundled(root) is None:
                raise
    found = _bundled(root)
    if found is None:
        raise TritonServerError(f"unpacking {PYTRITON_REQUIREMENT} into {root} failed")
    return found


def find_server(cache_dir: str | Path | None = None, fetch: bool = True) -> ServerDist:
    """The Triton installation to use (see module docstring for the order)."""
    env = os.environ.get(ENV_BINARY)
    if env:
        b = Path(env)
        if not b.is_file():
            raise TritonServerError(f"${ENV_BINARY}={env} is not a file")
        return ServerDist(b, b.resolve().parent.parent / "backends")
    on_path = shutil.which("tritonserver")
    for cand in (on_path, "/opt/tritonserver/bin/tritonserver"):
        if cand and Path(cand).is_file():
            b = Path(cand).resolve()
            return ServerDist(b, b.parent.parent / "backends")
    found = _bundled(_bundle_root(cache_dir))
    if found is not None:
        return found
    if not fetch:
        raise TritonServerError("no Triton server found (set $LEUKOFLOW_TRITONSERVER, or "
                                "allow fetching the bundled one)")
    return fetch_bundled(cache_dir)


def libpython_dirs() -> list[Path]:
    """Folders holding this interpreter's ``libpython3.X.so.1.0`` (empty: rely on the system
    library path, where Debian's ``libpython3.X`` package puts it)."""
    name = f"libpython{_py_minor()}.so.1.0"
    out = []
    for var in ("LIBDIR", "LIBPL"):
        d = sysconfig.get_config_var(var)
        if d and (Path(d) / name).is_file():
            out.append(Path(d))
    return out


def system_has_libpython() -> bool:
    """True when the dynamic linker finds ``libpython3.X.so.1.0`` on its default path."""
    name = f"libpython{_py_minor()}.so.1.0"
    try:
        res = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return any((Path(d) / name).is_file() for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib"))
    return name in res.stdout


def server_env(dist: ServerDist, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the server process: library path and the Python of the stub."""
    env = dict(os.environ if base is None else base)
    libs = [str(p) for p in (*libpython_dirs(), *dist.libs)]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    if libs:
        env["LD_LIBRARY_PATH"] = ":".join(libs)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@dataclass
class TritonServer:
    """One ``tritonserver`` process serving a model repository on ``host``.

    Parameters
    ----------
    repo : path
        Model repository (``export --triton``).
    config_name : str
        ``--model-config-name`` (``python`` for servers without the onnxruntime backend;
        empty = ``config.pbtxt``). Default: ``python`` for the bundled server, else empty.
    host : str
        Address of the HTTP, gRPC and metrics endpoints (loopback by default).
    http_port, grpc_port, metrics_port : int
        Ports; 0 = a free one.
    dist : ServerDist, optional
        Installation (default :func:`find_server`).
    log_path : path, optional
        Server log file (default: a file in the temporary folder).
    extra_args : list of str
        More ``tritonserver`` flags.
    """

    repo: str | Path
    config_name: str | None = None
    host: str = LOOPBACK
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    dist: ServerDist | None = None
    log_path: str | Path | None = None
    extra_args: list[str] = field(default_factory=list)
    proc: Any = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.dist = self.dist or find_server()
        if self.config_name is None:
            self.config_name = "" if self.dist.has_onnxruntime else "python"
        self.http_port = self.http_port or free_tcp_port(self.host)
        self.grpc_port = self.grpc_port or free_tcp_port(self.host)
        self.metrics_port = self.metrics_port or free_tcp_port(self.host)
        if self.log_path is None:
            fd, p = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = p

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """Base URL of the HTTP endpoint."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """URL of Triton's Prometheus metrics."""
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        """The ``tritonserver`` command line."""
        d = self.dist
        cmd = [str(d.binary), f"--model-repository={Path(self.repo).resolve()}",
               f"--backend-directory={d.backends}",
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
               "--allow-metrics=true", "--strict-readiness=true", "--exit-timeout-secs=10",
               "--log-verbose=0"]
        if d.kind == "bundled":
            cmd.append("--allow-gpu-metrics=false")
        if self.config_name:
            cmd.append(f"--model-config-name={self.config_name}")
        return cmd + list(self.extra_args)

    def start(self, timeout: float = 120.0, models: tuple[str, ...] = ()) -> TritonServer:
        """Start the process and wait until the server (and ``models``) are ready."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        if self.dist.kind == "bundled" and not libpython_dirs() and not system_has_libpython():
            raise TritonServerError(
                f"the python backend needs libpython{_py_minor()}.so.1.0: install Debian's "
                f"libpython{_py_minor()} (deploy/ci/install-system-deps.sh) or use a Python "
                "built with --enable-shared")
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        try:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         env=server_env(self.dist), start_new_session=True)
        finally:
            log.close()
        self.starts += 1
        self.wait_ready(timeout, models)
        return self

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=5) as r:
                return int(r.status)
        except Exception:  # connection refused, 400 while loading ...
            return 0

    def wait_ready(self, timeout: float = 120.0, models: tuple[str, ...] = ()) -> None:
        """Block until ``/v2/health/ready`` (and each model's ready endpoint) answer 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise TritonServerError(f"tritonserver exited with {self.proc.returncode}: "
                                        f"{self.log_tail()}")
            if self._get("/v2/health/ready") == 200 and all(
                    self._get(f"/v2/models/{m}/ready") == 200 for m in models):
                return
            time.sleep(0.2)
        raise TritonServerError(f"tritonserver not ready after {timeout:.0f} s: "
                                f"{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server log."""
        try:
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``) and whatever is left of
        its process group (python-backend stubs)."""
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self._kill_group()

    def kill(self) -> None:
        """Kill the server and its backend stubs at once (SIGKILL to the process group): a
        crash, like a container that dies."""
        p = self.proc
        if p is not None and p.poll() is None:
            self._kill_group()
            p.wait(10)

    def _kill_group(self) -> None:
        # the server runs in its own session (start_new_session): its group id is its pid;
        # the python-backend stubs it started outlive a killed server otherwise
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
