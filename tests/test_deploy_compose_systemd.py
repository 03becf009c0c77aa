"""Compose file, container images, systemd units and the CI install script of deploy/:
parsed, every referenced file exists, every port matches the contract, every health path is
served by the services, every ``leukoflow <command>`` exists in the CLI."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from leukoflow.cli import app
from leukoflow.core.config import resolve
from leukoflow.core.metrics import HealthServer, ServiceMetrics
from leukoflow.core.transport import DEFAULT_METRICS_PORTS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
DEFAULT_PORTS = DEFAULT_METRICS_PORTS  # docs/CONTRACTS.md: acquire 9101 ... collector 9104
SERVICES = tuple(DEFAULT_PORTS)
#: The CLI command that runs each service on its own.
SERVICE_COMMAND = {"acquire": "acquire", "infer": "infer", "explain": "explain",
                   "collector": "record"}
COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
COMPOSE_GPU = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())


def cli_command_exists(cmd: str) -> bool:
    """``leukoflow <cmd> --help`` exits 0 (Typer's CliRunner on the real app)."""
    res = CliRunner().invoke(app, [cmd, "--help"])
    return res.exit_code == 0 and cmd in res.output


def health_paths_served() -> dict[str, int]:
    """Status of the health/metrics paths on a real HealthServer (ready and live)."""
    server = HealthServer(ServiceMetrics("infer"), port=0)
    server.set_ready(True)
    try:
        status = {}
        for path in ("/healthz", "/readyz", "/metrics", "/nothing"):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}",
                                            timeout=5) as r:
                    status[path] = r.status
            except urllib.error.HTTPError as exc:
                status[path] = exc.code
        return status
    finally:
        server.close()


# --------------------------------------------------------------------------- compose
def test_compose_has_every_service() -> None:
    assert COMPOSE["name"] == "leukoflow"
    base = {n for n, s in COMPOSE["services"].items() if not s.get("profiles")}
    assert base == {"net", "keys", *SERVICES, "prometheus", "grafana"}  # keys: CurveZMQ
    triton = {n for n, s in COMPOSE["services"].items() if "triton" in s.get("profiles", [])}
    assert triton == {"triton-export", "triton", "instrument-a", "instrument-b"}


def test_compose_triton_profile_wiring() -> None:
    """Two simulated instruments share one Triton: real CLI commands and flags, the gRPC and
    metrics ports Triton serves by default, shared IPC for system shared memory."""
    svc = COMPOSE["services"]
    export = svc["triton-export"]["command"]
    assert export[:3] == ["leukoflow", "export", "--triton"]
    help_export = CliRunner().invoke(app, ["export", "--help"]).output
    assert "--triton" in help_export and "--model" in help_export
    tri = svc["triton"]
    assert tri["depends_on"]["triton-export"]["condition"] == "service_completed_successfully"
    assert "--model-repository=/models" in tri["command"]
    assert all(f"--{k}-address=127.0.0.1" in tri["command"] for k in ("http", "grpc",
                                                                       "metrics"))
    assert tri["ipc"] == "service:net" and svc["net"]["ipc"] == "shareable"
    gpu = COMPOSE_GPU["services"]["triton"]
    assert any(a.startswith("--model-config-name=") for a in gpu["command"])
    help_run = CliRunner().invoke(app, ["run", "--help"]).output
    ports = set()
    for name in ("instrument-a", "instrument-b"):
        inst = svc[name]
        cmd = inst["command"]
        assert cmd[:2] == ["leukoflow", "run"] and cmd[cmd.index("--backend") + 1] == "triton"
        for flag in (a for a in cmd[2:] if a.startswith("--")):
            assert flag in help_run, f"{name}: leukoflow run has no {flag}"
        assert inst["environment"]["LEUKOFLOW_TRITON_URL"] == "127.0.0.1:8001"  # gRPC
        assert inst["ipc"] == "service:net"
        assert inst["depends_on"]["triton"]["condition"] == "service_healthy"
        ports |= {cmd[cmd.index("--zmq-base-port") + 1], cmd[cmd.index("--metrics-base-port") + 1]}
    assert len(ports) == 4  # no two instruments on the same ports
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["triton"]["static_configs"][0]["targets"] == ["127.0.0.1:8002"]  # metrics


@pytest.mark.parametrize("service", SERVICES)
def test_compose_service_command_port_and_healthcheck(service: str) -> None:
    svc = COMPOSE["services"][service]
    cmd = svc["command"]
    assert cmd[0] == "leukoflow" and cmd[1] == SERVICE_COMMAND[service]
    assert cli_command_exists(cmd[1]), f"leukoflow {cmd[1]} --help failed"
    test = " ".join(svc["healthcheck"]["test"])
    urls = re.findall(r"https?://([\d.]+):(\d+)(/\w*)", test)
    assert urls == [("127.0.0.1", str(DEFAULT_PORTS[service]), "/healthz")], test
    assert svc["network_mode"] == "service:net"
    assert svc["cap_drop"] == ["ALL"] and svc["read_only"] is True


def test_compose_health_paths_are_served() -> None:
    """Every path the healthchecks call answers 200 on a live, ready HealthServer."""
    used = set()
    for svc in COMPOSE["services"].values():
        test = " ".join(svc.get("healthcheck", {}).get("test", []))
        for _host, port, path in re.findall(r"https?://([\d.]+):(\d+)(/[\w/-]*)", test):
            if int(port) in DEFAULT_PORTS.values():
                used.add(path)
    assert used == {"/healthz"}
    status = health_paths_served()
    assert all(status[p] == 200 for p in used)
    assert status["/nothing"] == 404  # the check above can fail


def test_compose_publishes_only_on_loopback() -> None:
    published = []
    for name, svc in COMPOSE["services"].items():
        for p in svc.get("ports", []):
            assert name == "net", f"{name} publishes ports but shares net's namespace"
            host, host_port, container_port = p.split(":")
            assert host == "127.0.0.1", p
            published.append(int(container_port))
    assert sorted(published) == [3000, 9090]
    prom_cmd = " ".join(COMPOSE["services"]["prometheus"]["command"])
    assert "--web.listen-address=:9090" in prom_cmd


def test_compose_referenced_files_exist() -> None:
    for name, svc in {**COMPOSE["services"], **COMPOSE_GPU["services"]}.items():
        build = svc.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert context == ROOT, name
            assert (context / build["dockerfile"]).is_file(), build["dockerfile"]
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: {src}"
        for env_file in svc.get("env_file", []):
            path = env_file["path"] if isinstance(env_file, dict) else env_file
            required = env_file.get("required", True) if isinstance(env_file, dict) else True
            assert required is False or (DEPLOY / path).is_file(), path
    assert (SYSTEMD / "leukoflow.env.example").is_file()  # the template for ./leukoflow.env


def test_compose_prometheus_mounts_match_its_config() -> None:
    prom = COMPOSE["services"]["prometheus"]
    mounts = dict(v.split(":")[:2] for v in prom["volumes"])
    assert mounts["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for rule_file in cfg["rule_files"]:  # relative to the config file's folder
        assert f"/etc/prometheus/{Path(rule_file).parent}" in mounts.values()
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]


def test_compose_gpu_override() -> None:
    assert set(COMPOSE_GPU["services"]) <= set(COMPOSE["services"])
    infer = COMPOSE_GPU["services"]["infer"]
    assert infer["build"]["dockerfile"] == "deploy/docker/Dockerfile.cuda"
    (dev,) = infer["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    declared = set(COMPOSE["volumes"]) | set(COMPOSE_GPU.get("volumes", {}))
    for svc in COMPOSE_GPU["services"].values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            assert src.startswith(".") or src in declared, src


# --------------------------------------------------------------------------- images
@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda",
                                        "Dockerfile.cuda-torch"])
def test_dockerfile_sources_exist_and_runs_unprivileged(dockerfile: str) -> None:
    text = (DEPLOY / "docker" / dockerfile).read_text()
    text = re.sub(r"\\\n", " ", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert any(ln.startswith("FROM ") for ln in lines)
    copies = [shlex.split(ln)[1:] for ln in lines if ln.startswith("COPY ")]
    assert copies
    for args in copies:
        if any(a.startswith("--from") for a in args):
            continue
        for src in args[:-1]:
            assert (ROOT / src).exists() or src == "README.md", f"{dockerfile}: COPY {src}"
    for pkg in ("leukoflow", "acquisition", "inference", "explain", "models"):
        assert any(pkg in args[:-1] for args in copies), pkg
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    cmd = next(ln for ln in reversed(lines) if ln.startswith("CMD "))
    assert "leukoflow" in cmd
    if dockerfile.endswith("cuda-torch"):
        assert "tensorrt" in text.lower() and "download.pytorch.org/whl/${TORCH_CUDA}" in text
    elif dockerfile.endswith("cuda"):  # lean: TensorRT + pycuda; torch only in the export stage
        stages = re.split(r"^FROM ", text, flags=re.M)
        final, export = stages[-1], [st for st in stages if " AS export" in st.split("\n")[0]]
        assert export and "download.pytorch.org/whl/cpu" in export[0]
        assert "torch" not in final.lower().replace("leukoflow", "")
        build = next(st for st in stages if " AS build" in st.split("\n")[0])
        assert "pycuda" in build and "tensorrt" in build.lower() and "--no-deps ." in build
        assert "import torch" in build  # the build fails if torch sneaked in
    else:
        assert "download.pytorch.org/whl/cpu" in text


def test_readme_the_images_build_from_exists() -> None:
    """Both images copy README.md (pyproject.toml's readme); it is the lead's file."""
    assert (ROOT / "pyproject.toml").is_file()
    if not (ROOT / "README.md").is_file():
        pytest.fail("README.md missing at the repository root: the images copy it")


# --------------------------------------------------------------------------- systemd
def read_unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # keys are case-sensitive in systemd
    cp.read_string(path.read_text())
    return cp


def test_one_unit_per_service() -> None:
    units = sorted(p.name for p in SYSTEMD.glob("*.service"))
    assert units == sorted(f"leukoflow-{s}.service" for s in SERVICES)
    target = read_unit(SYSTEMD / "leukoflow.target")
    assert set(target["Unit"]["Wants"].split()) == set(units)
    assert target["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.parametrize("service", SERVICES)
def test_unit_command_environment_restart_and_hardening(service: str) -> None:
    unit = read_unit(SYSTEMD / f"leukoflow-{service}.service")
    svc = unit["Service"]
    exe, *args = shlex.split(svc["ExecStart"])
    assert exe == "/opt/leukoflow/venv/bin/leukoflow"
    assert args == [SERVICE_COMMAND[service]]
    assert cli_command_exists(args[0])
    assert svc["EnvironmentFile"] == "/etc/leukoflow/leukoflow.env"
    assert svc["Restart"] == "on-failure"
    assert svc["RestartSec"] and svc["RestartMaxDelaySec"] and int(svc["RestartSteps"]) > 0
    assert svc["User"] == "leukoflow" and svc["KillSignal"] == "SIGINT"
    hardening = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                 "PrivateTmp": "yes", "ProtectKernelTunables": "yes",
                 "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
                 "RestrictNamespaces": "yes", "RestrictSUIDSGID": "yes",
                 "LockPersonality": "yes", "CapabilityBoundingSet": ""}
    for key, value in hardening.items():
        assert svc.get(key) == value, key
    assert svc["StateDirectory"] == "leukoflow" and svc["WorkingDirectory"] == "/var/lib/leukoflow"
    assert unit["Install"]["WantedBy"] == "leukoflow.target"
    assert unit["Unit"]["PartOf"] == "leukoflow.target"


def test_env_example_ports_match_the_contract() -> None:
    values = {}
    for line in (SYSTEMD / "leukoflow.env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    for service, port in DEFAULT_PORTS.items():
        assert values[f"LEUKOFLOW_{service.upper()}_METRICS_PORT"] == str(port)
    assert all(k.startswith(("LEUKOFLOW_", "OMP_", "OPENBLAS_", "MKL_")) for k in values)


#: The configuration dataclass behind each ``LEUKOFLOW_<SECTION>_*`` environment variable.
CONFIG_CLASSES = {"acquire": ("leukoflow.acquisition.service", "AcquireConfig"),
                  "infer": ("leukoflow.inference.worker", "InferConfig"),
                  "explain": ("leukoflow.explain.service", "ExplainConfig"),
                  "collector": ("leukoflow.run.collector", "CollectorConfig")}


def test_env_example_variables_are_real_configuration_keys() -> None:
    """Every ``LEUKOFLOW_<SECTION>_<KEY>`` in the example is a field the service reads
    (leukoflow.core.config.resolve convention), with a value its type accepts."""
    import dataclasses
    import importlib


    env = {}
    for line in (SYSTEMD / "leukoflow.env.example").read_text().splitlines():
        line = line.strip().lstrip("#").strip()
        if re.fullmatch(r"LEUKOFLOW_[A-Z_]+=\S*", line):
            key, _, value = line.partition("=")
            env[key] = value
    sections = {k.split("_")[1].lower() for k in env} & set(CONFIG_CLASSES)
    assert sections == set(CONFIG_CLASSES)
    for section, (module, cls_name) in CONFIG_CLASSES.items():
        cls = getattr(importlib.import_module(module), cls_name)
        fields = {f.name for f in dataclasses.fields(cls)}
        prefix = f"LEUKOFLOW_{section.upper()}_"
        mine = {k: v for k, v in env.items() if k.startswith(prefix)}
        for key in mine:
            assert key[len(prefix):].lower() in fields, f"{key}: no such {cls_name} field"
        cfg = resolve(section, cls, toml={}, env=mine)
        assert cfg.metrics_port == DEFAULT_PORTS[section]


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own parser accepts the units (ExecStart pointed at this checkout's CLI)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (the structural checks above still ran)")
    version = int(re.search(r"systemd (\d+)", subprocess.run(
        [analyze, "--version"], capture_output=True, text=True).stdout).group(1))
    cli = shutil.which("leukoflow") or str(Path(sys.executable).with_name("leukoflow"))
    for unit in [*SYSTEMD.glob("*.service"), SYSTEMD / "leukoflow.target"]:
        text = unit.read_text().replace("/opt/leukoflow/venv/bin/leukoflow", cli)
        (tmp_path / unit.name).write_text(text)
    res = subprocess.run([analyze, "verify", "--man=no",
                          *sorted(str(p) for p in tmp_path.iterdir())],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    out = res.stdout + res.stderr
    tolerated = ("RestartSteps", "RestartMaxDelaySec") if version < 254 else ()
    problems = [ln for ln in out.splitlines()
                if ln.strip() and not any(f"Unknown key '{k}'" in ln or
                                          f"Unknown key name '{k}'" in ln for k in tolerated)]
    assert res.returncode == 0 and not problems, out


# --------------------------------------------------------------------------- CI script
def test_install_script_syntax_and_packages() -> None:
    script = DEPLOY / "ci" / "install-system-deps.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    # libpython3.11: the python-backend stub of the Triton server the Triton tests start;
    # hdf5-tools: h5clear, the reference of tests/test_durability.py
    assert re.search(r"packages=\(prometheus chromium chromium-driver libpython3\.11 "
                     r"hdf5-tools\)", text)
    assert "apt-get update" in text and "apt-get install -y" in text


def test_install_script_is_idempotent(tmp_path: Path) -> None:
    """With every package installed it changes nothing. ``dpkg-query``, ``apt-get`` and
    ``sudo`` are stand-ins on PATH here (a real apt run needs root and the network): dpkg
    reports all installed, apt-get fails loudly if it is called."""
    (tmp_path / "dpkg-query").write_text("#!/bin/sh\necho 'install ok installed'\n")
    (tmp_path / "apt-get").write_text("#!/bin/sh\necho 'apt-get called' >&2\nexit 99\n")
    (tmp_path / "sudo").write_text('#!/bin/sh\n[ "$1" = -n ] && shift\nexec "$@"\n')
    for f in tmp_path.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    for _ in range(2):
        res = subprocess.run(["bash", str(DEPLOY / "ci" / "install-system-deps.sh")],
                             capture_output=True, text=True, env=env, timeout=30)
        assert res.returncode == 0, res.stderr
        assert "all present" in res.stdout and "apt-get called" not in res.stderr
    # and when a package is missing it does call apt-get (which fails here)
    (tmp_path / "dpkg-query").write_text("#!/bin/sh\necho 'unknown ok not-installed'\n")
    res = subprocess.run(["bash", str(DEPLOY / "ci" / "install-system-deps.sh")],
                         capture_output=True, text=True, env=env, timeout=30)
    assert res.returncode != 0 and "apt-get called" in res.stderr
