"""Configuration that refuses nonsense: unknown names, non-finite and out-of-range numbers,
remote metrics without the opt-in; checked on the real service configurations and the CLI."""

from __future__ import annotations

import dataclasses
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from leukoflow.core import config
from leukoflow.core.config import ConfigError, resolve
from leukoflow.inference.worker import InferConfig

ROOT = Path(__file__).resolve().parents[1]

#: the configuration dataclass of each section
CLASSES = {
    "acquire": "leukoflow.acquisition.service:AcquireConfig",
    "acquire_pipeline": "leukoflow.acquisition.pipeline:PipelineConfig",
    "infer": "leukoflow.inference.worker:InferConfig",
    "explain": "leukoflow.explain.service:ExplainConfig",
    "collector": "leukoflow.run.collector:CollectorConfig",
    "run": "leukoflow.run.orchestrate:RunOptions",
    "reconstruct": "leukoflow.acquisition.reconstruct.config:OffAxisConfig",
    "qc": "leukoflow.acquisition.qc.measure:QCConfig",
    "triton": "leukoflow.inference.backends.triton:TritonClientConfig",
}


def _cls(spec: str) -> type:
    mod, name = spec.split(":")
    return getattr(importlib.import_module(mod), name)


@pytest.mark.parametrize(("env", "match"), [
    ({"LEUKOFLOW_INFER_MAX_DELAY_MS": "nan"}, r"infer\.max_delay_ms = nan: a finite"),
    ({"LEUKOFLOW_INFER_MAX_DELAY_MS": "inf"}, r"infer\.max_delay_ms = inf"),
    ({"LEUKOFLOW_INFER_MAX_DELAY_MS": "-1"}, r"infer\.max_delay_ms = -1\.0 is outside"),
    ({"LEUKOFLOW_INFER_MAX_BATCH": "0"}, r"infer\.max_batch = 0 is outside its range \[1,"),
    ({"LEUKOFLOW_INFER_METRICS_PORT": "70000"}, r"infer\.metrics_port = 70000"),
    ({"LEUKOFLOW_INFER_HEARTBEAT_S": "1e400"}, r"infer\.heartbeat_s = inf"),
    ({"LEUKOFLOW_INFER_MAX_BACH": "64"}, r"unknown setting LEUKOFLOW_INFER_MAX_BACH \(did you "
                                         r"mean LEUKOFLOW_INFER_MAX_BATCH\?\)"),
    ({"LEUKOFLOW_INFRE_MAX_BATCH": "64"}, r"LEUKOFLOW_INFRE_MAX_BATCH.*did you mean "
                                          r"LEUKOFLOW_INFER_MAX_BATCH"),
    ({"LEUKOFLOW_LOG_LEVL": "INFO"}, r"did you mean LEUKOFLOW_LOG_LEVEL"),
    ({"LEUKOFLOW_INFER_METRICS_HOST": "0.0.0.0"}, r"infer\.metrics_host = '0\.0\.0\.0' is not "
                                                  r"loopback.*allow_remote"),
])
def test_environment_nonsense_is_refused_by_name(env, match) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve("infer", InferConfig, toml={}, env=env)


def test_good_settings_globals_and_other_sections_pass() -> None:
    env = {"LEUKOFLOW_INFER_MAX_DELAY_MS": "0", "LEUKOFLOW_INFER_MAX_BATCH": "64",
           "LEUKOFLOW_LOG_LEVEL": "INFO", "LEUKOFLOW_KEYS": "/x", "LEUKOFLOW_SIM_CACHE": "/y",
           "LEUKOFLOW_CONFIG": "", "LEUKOFLOW_COLLECTOR_NOT_A_FIELD_OF_INFER": "1",
           "LEUKOFLOW_ACQUIRE_PIPELINE_SEGMENT_THRESHOLD": "0.3", "PATH": "/bin"}
    cfg = resolve("infer", InferConfig, toml={}, env=env)
    assert cfg.max_delay_ms == 0.0 and cfg.max_batch == 64
    # the acquire section does not claim acquire_pipeline's variables as its own
    acq = _cls(CLASSES["acquire"])
    resolve("acquire", acq, toml={},
            env={"LEUKOFLOW_ACQUIRE_PIPELINE_SEGMENT_THRESHOLD": "0.3"})
    # remote metrics with the opt-in
    cfg = resolve("infer", InferConfig, toml={}, env={
        "LEUKOFLOW_INFER_METRICS_HOST": "0.0.0.0", "LEUKOFLOW_INFER_ALLOW_REMOTE": "true"})
    assert cfg.metrics_host == "0.0.0.0"


def test_toml_and_flag_numbers_are_checked_too() -> None:
    import tomllib

    doc = tomllib.loads("[infer]\nmax_delay_ms = nan\n")  # valid TOML, nonsense value
    with pytest.raises(ConfigError, match="infer.max_delay_ms = nan"):
        resolve("infer", InferConfig, toml=doc, env={})
    with pytest.raises(ConfigError, match="an integer is required"):
        resolve("infer", InferConfig, toml={"infer": {"max_batch": 2.5}}, env={})
    with pytest.raises(ConfigError, match="not a boolean"):
        resolve("infer", InferConfig, toml={"infer": {"max_batch": True}}, env={})
    with pytest.raises(ConfigError, match="max_batch = -3"):
        resolve("infer", InferConfig, {"max_batch": -3}, toml={}, env={})
    with pytest.raises(ConfigError, match="unknown keys in \\[infer\\]"):
        resolve("infer", InferConfig, toml={"infer": {"max_bach": 3}}, env={})
    # numbers inside tuples
    @dataclasses.dataclass(frozen=True)
    class _C:
        sizes: tuple[float, ...] = config.bounded((1.0, 2.0), 0.0, 10.0)

    assert resolve("x", _C, toml={}, env={"LEUKOFLOW_X_SIZES": "3,4"}).sizes == (3.0, 4.0)
    with pytest.raises(ConfigError, match="x.sizes = nan"):
        resolve("x", _C, toml={}, env={"LEUKOFLOW_X_SIZES": "3,nan"})
    with pytest.raises(ConfigError, match="x.sizes = 11.0 is outside"):
        resolve("x", _C, toml={}, env={"LEUKOFLOW_X_SIZES": "11"})


@pytest.mark.parametrize("section", sorted(CLASSES))
def test_every_default_configuration_is_valid(section) -> None:
    cls = _cls(CLASSES[section])
    config.validate(cls(), section)
    assert resolve(section, cls, toml={}, env={}) == cls()


def test_every_configuration_section_in_the_code_is_known() -> None:
    """A section resolved anywhere must be in config.SECTIONS, or its environment variables
    would be refused as unknown by the other services."""
    pat = re.compile(r"""(?:resolve\(\s*|ConfigOptions\(\s*"[^"]+",\s*|^SECTION\s*=\s*)"""
                     r""""([a-z_]+)\"""", re.M)
    found = set()
    for folder in ("leukoflow", "acquisition", "inference", "explain", "models"):
        for path in (ROOT / folder).rglob("*.py"):
            found |= set(pat.findall(path.read_text()))
    assert found, "the scan found no sections"
    assert found <= config.SECTIONS, sorted(found - config.SECTIONS)
    assert set(CLASSES) <= config.SECTIONS


def test_cli_refuses_a_nan_setting_and_a_misspelt_variable() -> None:
    cli = [sys.executable, "-c", "from leukoflow.cli import main; main()"]
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith("LEUKOFLOW_")}
    res = subprocess.run([*cli, "infer", "--print-config"], capture_output=True, text=True,
                         env={**base, "LEUKOFLOW_INFER_MAX_DELAY_MS": "nan"}, timeout=120)
    assert res.returncode != 0 and "max_delay_ms = nan" in res.stderr + res.stdout
    res = subprocess.run([*cli, "infer", "--print-config"], capture_output=True, text=True,
                         env={**base, "LEUKOFLOW_INFER_MAX_BACH": "8"}, timeout=120)
    assert res.returncode != 0 and "LEUKOFLOW_INFER_MAX_BACH" in res.stderr + res.stdout
    res = subprocess.run([*cli, "infer", "--print-config"], capture_output=True, text=True,
                         env={**base, "LEUKOFLOW_INFER_MAX_BATCH": "8"}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert '"max_batch": 8' in res.stdout
