"""CLI: ``leukoflow info FILE_OR_RUN_DIR`` - the configuration a recording or run was made with.

Reads a run folder (``run_params.json``, ``summary.json``) or a recording (``.rtdc``: the
``logs/leukoflow-params`` log and the ``user:`` attributes) and prints the pipeline
identifier, its hash (checked against the identifier), the generation, the model and its
sha256, the software versions, and every parameter of the acquisition pipeline as TOML that
``leukoflow --config FILE`` takes back (the tables ``[acquire_pipeline]``,
``[acquire_pipeline.crop]``, ...). ``--json`` prints the same as one JSON object. Exit code 1
when the stored hash does not match the identifier or the identifier does not parse.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer


def _read_params(path: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(kind, params, extra)`` of a run folder, a recording or a params JSON file."""
    if path.is_dir():
        params_file = path / "run_params.json"
        if not params_file.is_file():
            raise ValueError(f"{path} is not a run folder (no run_params.json)")
        params = json.loads(params_file.read_text())
        extra: dict[str, Any] = {}
        summary = path / "summary.json"
        if summary.is_file():
            s = json.loads(summary.read_text())
            extra = {"accounting": {k: (s.get("accounting") or {}).get(k)
                                    for k in ("emitted", "counted", "uncertain", "ood",
                                              "balanced")},
                     "recording": s.get("recording") or {}}
        return "run", params, extra
    if path.suffix == ".json":
        return "params", json.loads(path.read_text()), {}
    return "recording", *_read_recording(path)


def _read_recording(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from leukoflow.core.rtdc import open_rtdc

    try:
        h5 = open_rtdc(path)
    except OSError as exc:
        raise ValueError(f"{path}: not a readable .rtdc file ({exc})") from exc
    with h5:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in h5.attrs.items()}
        params: dict[str, Any] = {}
        if "logs" in h5 and "leukoflow-params" in h5["logs"]:
            lines = h5["logs"]["leukoflow-params"][:]
            params = json.loads("".join(v.decode() if isinstance(v, bytes) else str(v)
                                        for v in lines))
        events = min((h5["events"][k].shape[0] for k in h5["events"]), default=0) \
            if "events" in h5 else 0
    if "pipeline" not in params and attrs.get("user:pipeline id"):
        params["pipeline"] = {"id": str(attrs["user:pipeline id"]),
                              "hash": str(attrs.get("user:pipeline hash", ""))}
    extra = {"events": int(events),
             "software": attrs.get("setup:software version"),
             "recorded": f"{attrs.get('experiment:date', '')} "
                         f"{attrs.get('experiment:time', '')}".strip()}
    return params, extra


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else f'"{v}"'
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)  # a TOML basic string


def config_toml(cfg: Any, section: str, derived: Mapping[str, str] | None = None) -> str:
    """``cfg`` (a config dataclass) as TOML tables ``[section]``, ``[section.<stage>]``, ...

    Fields named in ``derived`` are left out (they are no settings); None values are
    written as comments (TOML has no null: leaving the key out gives the default None).
    """
    import dataclasses

    derived = derived if derived is not None else getattr(type(cfg), "DERIVED", {})
    out: list[str] = []

    def table(obj: Any, name: str, path: str) -> None:
        own: list[str] = []
        subs: list[tuple[Any, str, str]] = []
        for f in dataclasses.fields(obj):
            if f"{path}{f.name}" in derived:
                continue
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v) and not isinstance(v, type):
                subs.append((v, f"{name}.{f.name}", f"{path}{f.name}."))
            elif v is None:
                own.append(f"# {f.name} = (none)")
            else:
                own.append(f"{f.name} = {_toml_value(v)}")
        out.append(f"[{name}]")
        out.extend(own)
        out.append("")
        for sub in subs:
            table(*sub)

    table(cfg, section, "")
    return "\n".join(out)


def describe(path: Path) -> dict[str, Any]:
    """Everything ``leukoflow info`` shows about ``path`` (see the module docstring)."""
    from leukoflow.acquisition.pipeline import SECTION, parse_identity
    from leukoflow.core.config import ConfigError, pipeline_hash

    kind, params, extra = _read_params(path)
    pipe = dict(params.get("pipeline") or {})
    run = params.get("run") or {}
    out: dict[str, Any] = {
        "path": str(path), "kind": kind, "run": run.get("run_id") or params.get("run_id"),
        "source": run.get("source"), "record": run.get("record") or None, **extra,
        "pipeline": {k: pipe.get(k) for k in ("id", "hash", "generation", "model",
                                              "model_sha")},
        "versions": pipe.get("versions") or {}, "problems": [],
    }
    if kind == "recording" and extra.get("software"):
        out["versions"] = {"recorded by": extra["software"], **out["versions"]}
    text = pipe.get("id")
    if not text:
        out["problems"].append("no pipeline identifier recorded"
                               + (f" ({pipe['note']})" if pipe.get("note") else ""))
        return out
    ok = pipeline_hash(text) == pipe.get("hash")
    out["pipeline"]["hash_ok"] = ok
    if not ok:
        out["problems"].append(f"stored hash {pipe.get('hash')!r} does not match the "
                               f"identifier (its hash is {pipeline_hash(text)!r})")
    try:
        parsed = parse_identity(text)
    except ConfigError as exc:
        out["problems"].append(f"the identifier does not parse: {exc}")
        return out
    out["pipeline"].update(model=parsed.model, model_sha=parsed.model_sha,
                           generation=parsed.generation)
    out["config"] = parsed.config.to_dict()
    out["optics"] = parsed.extra["optics"].to_dict() if "optics" in parsed.extra else None
    out["toml"] = config_toml(parsed.config, SECTION)
    if pipe.get("config") is not None and _plain(pipe["config"]) != _plain(out["config"]):
        out["problems"].append("the recorded parameters differ from the identifier's")
    return out


def _plain(v: Any) -> Any:
    """Comparable form: tuples as lists, empty values (stored as "none") as None."""
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v] or None
    if v is None or v == "" or v == "none":
        return None
    return v


def _print(d: dict[str, Any]) -> None:
    p = d["pipeline"]
    echo = typer.echo
    where = {"run": "run folder", "recording": "recording", "params": "parameters"}[d["kind"]]
    events = f" ({d['events']} events)" if "events" in d else ""
    echo(f"{where}   {d['path']}{events}")
    if d.get("run"):
        echo(f"run          {d['run']}" + (f"   source {d['source']}" if d.get("source") else ""))
    if d.get("recorded"):
        echo(f"recorded     {d['recorded']} UTC")
    if d.get("record"):
        echo(f"recording    {d['record']}")
    acc = d.get("accounting")
    if acc and acc.get("emitted") is not None:
        echo(f"cells        {acc['emitted']} emitted: {acc['counted']} counted, "
             f"{acc['uncertain']} uncertain, {acc['ood']} OOD"
             + ("" if acc.get("balanced") else " (NOT balanced)"))
    if p.get("hash"):
        state = "verified" if p.get("hash_ok") else "DOES NOT MATCH the identifier"
        echo(f"pipeline     hash {p['hash']} ({state}), generation {p.get('generation')}")
    if p.get("model"):
        echo(f"model        {p['model']}  sha256 {p.get('model_sha') or '?'}")
    if d.get("versions"):
        echo("versions     " + ", ".join(f"{k} {v}" for k, v in d["versions"].items()))
    if p.get("id"):
        echo(f"identifier   {p['id']}")
    if d.get("optics"):
        echo("optics       " + ", ".join(f"{k} {v}" for k, v in d["optics"].items()))
    for problem in d["problems"]:
        echo(f"PROBLEM      {problem}")
    if d.get("toml"):
        echo("\n# acquisition pipeline (TOML: leukoflow --config FILE runs with it)")
        echo(d["toml"].rstrip())


def info(
    path: Annotated[Path, typer.Argument(
        help="Run folder (run_params.json) or recording (.rtdc).", exists=True)],
    as_json: Annotated[bool, typer.Option("--json", help="Print as one JSON object.")] = False,
) -> None:
    """Print the configuration a recording or run was made with.

    Pipeline identifier, hash (checked), model, versions, every parameter (TOML).
    """
    try:
        d = describe(path)
    except (ValueError, OSError) as exc:
        typer.echo(f"leukoflow info: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    if as_json:
        typer.echo(json.dumps({k: v for k, v in d.items() if k != "toml"}, indent=1,
                              default=str))
    else:
        _print(d)
    if d["problems"] and d["pipeline"].get("id"):
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    """Add ``info`` to ``app``."""
    app.command("info")(info)
