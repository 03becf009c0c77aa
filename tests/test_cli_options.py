"""The CLI in one style: options generated from the config dataclasses, old flags kept.

* every flag the earlier CLI had (and that deploy files, the orchestrator and the tests use)
  still parses;
* every field of a service's config dataclass is a flag with a help text from its
  docstring, so a new field is settable on the command line without touching the CLI;
* the layers: dataclass default < TOML < ``LEUKOFLOW_*`` environment < flag;
* ``leukoflow --help`` does not import the stage modules that hold the dataclasses;
* every command and group answers ``--help``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from leukoflow.cli import app
from leukoflow.cli.options import ConfigOptions, attribute_docs

#: flags of the CLI before the one-style rewrite (fc6f0d7), per command path
OLD_FLAGS = {
    "run": "--source --duration --cells --workers --record --out --json --no-explain --backend "
           "--model --seed --zmq-base-port --metrics-base-port --drain-timeout --no-live",
    "record": "--out --results --live --tap-in --tap-out --metrics-port --run-dir --run-id "
              "--drain-timeout --params-json --keep-running --json",
    "replay": "--realtime --rate --workers --out --record --explain --no-explain --backend "
              "--model --zmq-base-port --metrics-base-port --json",
    "replay-publish": "--crops --collector --run-id --rate --realtime",
    "validate": "--json --html",
    "acquire": "--source --frames --duration --rate --crops-endpoint --collector-endpoint "
               "--metrics-port --seed --run-id --json",
    "infer": "--model --backend --max-batch --max-delay-ms --threads --precision "
             "--crops-endpoint --results-endpoint --explain-endpoint --explain-sample-rate "
             "--metrics-port --cache-dir --print-config",
    "explain": "--run-dir --model --methods --endpoint --backlog --batch-cells --lime-samples "
               "--device --threads --metrics-port --print-config",
    "explain meta": "--out --model --method --split --max-cells --lime-samples "
                    "--location-cells --tcav --no-tcav --seed --json",
    "explain finding": "--model --n-per-class --seed --attribution-cells --methods "
                       "--lime-samples --rim-um --size-factor --n-boot --tcav --no-tcav "
                       "--tcav-concept --tcav-random --tcav-seeds --tcav-layers --out --json",
    "audit": "--out --split --folds --epochs --top --explain-top --flip --seed --threads "
             "--device --json",
    "reconstruct": "--out -o --background -b --mode --filter --filter-size --filter-size-unit "
                   "--sideband --key --bg-key --downsample --padding --backend --device "
                   "--bg-fit --border-px --invert-phase --no-invert-phase --unwrap --no-unwrap "
                   "--json",
}


def _root() -> typer.core.TyperGroup:
    return typer.main.get_command(app)


def _command(path: str):
    cmd = _root()
    ctx = typer.Context(cmd, info_name="leukoflow")
    for name in path.split():
        cmd = cmd.get_command(ctx, name)
        assert cmd is not None, path
        ctx = typer.Context(cmd, info_name=name, parent=ctx)
    return cmd, ctx


def _flags(path: str) -> set[str]:
    cmd, ctx = _command(path)
    return {o for p in cmd.get_params(ctx) for o in (*p.opts, *p.secondary_opts)}


def _config_options() -> dict[str, ConfigOptions]:
    from leukoflow.cli import acquire, explain, infer, reconstruct, run

    return {"acquire": acquire.ACQUIRE, "infer": infer.INFER, "explain": explain.EXPLAIN,
            "record": run.COLLECTOR, "run": run.RUN, "replay": run.REPLAY,
            "reconstruct": reconstruct.RECONSTRUCT}


@pytest.mark.parametrize("path", sorted(OLD_FLAGS))
def test_every_earlier_flag_still_exists(path: str) -> None:
    missing = set(OLD_FLAGS[path].split()) - _flags(path)
    assert not missing, f"leukoflow {path} lost {sorted(missing)}"


@pytest.mark.parametrize("name", ["acquire", "infer", "explain", "record", "run", "reconstruct"])
def test_every_config_field_is_a_documented_flag(name: str) -> None:
    """A field added to the dataclass appears as a flag, with the docstring's help text."""
    opts = _config_options()[name]
    cls = opts.dataclass()
    fields = {f.name for f in dataclasses.fields(cls) if f.init} - set(opts.exclude)
    specs = opts.specs()
    assert {s.name for s in specs} == fields
    undocumented = [s.name for s in specs if s.help.startswith("(")]
    assert not undocumented, f"{opts.dataclass_name}: no Attributes entry for {undocumented}"
    flags = _flags(name)
    for s in specs:
        assert set(d for decl in s.decls for d in decl.split("/")) <= flags, s


def test_layers_default_toml_env_flag(tmp_path: Path, monkeypatch) -> None:
    """default < TOML < env < flag, seen through ``infer --print-config``."""
    toml = tmp_path / "c.toml"
    toml.write_text('[infer]\nmax_batch = 64\nthreads = 2\nprecision = "fp32"\n')
    monkeypatch.setenv("LEUKOFLOW_INFER_THREADS", "3")
    monkeypatch.setenv("LEUKOFLOW_INFER_PRECISION", "fp16")
    r = CliRunner().invoke(app, ["--config", str(toml), "infer", "--precision", "fp32",
                                 "--explain-endpoint", "", "--no-warmup", "--print-config"])
    assert r.exit_code == 0, r.output
    cfg = json.loads(r.output)
    assert cfg["max_batch"] == 64            # TOML over the default 256
    assert cfg["threads"] == 3               # env over TOML
    assert cfg["precision"] == "fp32"        # flag over env
    assert cfg["explain_endpoint"] == ""     # an empty flag value is a value
    assert cfg["warmup"] is False            # a switch flips the default
    assert cfg["max_delay_ms"] == 2.0 and cfg["cpu_pipeline"] is True  # untouched defaults


def test_tuple_fields_and_switches(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["explain", "--methods", "lime,gradcam", "--lime-segments",
                                 "10,20", "--no-png", "--print-config"])
    assert r.exit_code == 0, r.output
    cfg = json.loads(r.output)
    assert cfg["methods"] == ["lime", "gradcam"] and cfg["lime_segments"] == [10, 20]
    assert cfg["png"] is False and cfg["backlog"] == 64


def test_bad_values_fail_clearly() -> None:
    r = CliRunner().invoke(app, ["infer", "--max-batch", "many"])
    assert r.exit_code == 2 and "--max-batch" in r.output
    r = CliRunner().invoke(app, ["infer", "--print-config"],
                           env={"LEUKOFLOW_INFER_MAX_BATCH": "many"})
    assert r.exit_code == 2 and "max_batch" in r.output


def test_help_does_not_import_the_stages() -> None:
    code = ("import sys; sys.argv=['leukoflow','--help']\n"
            "from leukoflow.cli import app\n"
            "try:\n    app()\nexcept SystemExit:\n    pass\n"
            "print('LOADED', sorted(m for m in sys.modules if m.startswith(("
            "'leukoflow.acquisition', 'leukoflow.inference', 'leukoflow.explain', "
            "'leukoflow.models', 'leukoflow.run', 'numpy', 'scipy'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert "LOADED []" in out.stdout, out.stdout[-800:] + out.stderr[-2000:]
    assert "acquire" in out.stdout and "record" in out.stdout


def _paths(cmd, ctx, prefix=()):
    yield " ".join(prefix)
    if isinstance(cmd, typer.core.TyperGroup):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            yield from _paths(sub, typer.Context(sub, info_name=name, parent=ctx),
                              (*prefix, name))


def test_every_command_has_help() -> None:
    root = _root()
    paths = list(_paths(root, typer.Context(root, info_name="leukoflow")))
    assert {"run", "record", "acquire", "infer", "explain", "explain meta", "bench"} <= set(
        paths)
    runner = CliRunner()
    for path in paths:
        r = runner.invoke(app, [*path.split(), "--help"])
        assert r.exit_code == 0, (path, r.output[-1000:])
        assert "Usage:" in r.output, path
        cut = re.findall(r"-[\w-]*…", r.output)  # a flag name cut short at 80 columns
        assert not cut, (path, cut)


def test_clashing_generated_option_is_refused() -> None:
    """A config field whose flag a command already declares is an error, not a shadow."""
    clash = ConfigOptions("leukoflow.inference.worker:InferConfig", "infer",
                          include=("model",))
    tiny = typer.Typer()

    def cmd(model: str = "x") -> None:
        """A command with its own --model."""

    tiny.command("cmd", cls=clash.command_class())(cmd)
    tiny.command("other")(cmd)
    r = CliRunner().invoke(tiny, ["cmd", "--help"])
    assert r.exit_code != 0 and "--model" in str(r.exception)


def test_attribute_docs_parses_numpydoc() -> None:
    @dataclasses.dataclass
    class C:
        """Doc.

        Attributes
        ----------
        a, b : int
            Shared ``text`` [s].
        c : str
            First line
            second line.

        Notes
        -----
        d : int
            not an attribute.
        """

        a: int = 1
        b: int = 2
        c: str = ""

    docs = attribute_docs(C)
    assert docs == {"a": "Shared text (s).", "b": "Shared text (s).",
                    "c": "First line second line."}
