"""CLI: ``leukoflow bench`` — benchmarks with side-by-side baselines.

Each benchmark lives in ``benchmarks/bench_<name>.py`` and exposes
``run(quick: bool = False) -> dict``; the dict holds a ``rows`` list of
``{"stage", "value", "unit", "baseline", "baseline_value", "ratio", "target"}`` entries that
this command prints as one table (or as JSON).
"""

from __future__ import annotations

import importlib
import json
from typing import Annotated

import typer

BENCHMARKS = ("sim", "reconstruct", "acquire", "transport", "infer", "models", "explain", "e2e",
              "triton", "drift", "realtime", "faults", "fuzz", "soak", "overload")


def load_benchmark(name: str):
    """Import :mod:`leukoflow.benchmarks.bench_<name>` (installed with the package)."""
    if name not in BENCHMARKS:
        raise FileNotFoundError(f"benchmark {name!r} not found; choose from {BENCHMARKS}")
    return importlib.import_module(f"leukoflow.benchmarks.bench_{name}")


def print_rows(name: str, result: dict) -> None:
    """Print a benchmark result as a rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bench {name} — {result.get('machine', '')}")
    if "rows" not in result:  # a benchmark that reports named values, not stage rows
        table.add_column("quantity")
        table.add_column("value")
        for key, value in _flat(result):
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        Console().print(table)
        return
    for col in ("stage", "value", "baseline", "ratio", "target"):
        table.add_column(col)
    for r in result.get("rows", []):
        val = f"{r.get('value', float('nan')):.4g} {r.get('unit', '')}"
        base = r.get("baseline", "")
        if r.get("baseline_value") is not None:
            base = f"{base}: {r['baseline_value']:.4g} {r.get('unit', '')}"
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else ""
        table.add_row(str(r.get("stage", "")), val, str(base), ratio, str(r.get("target", "")))
    Console().print(table)


def _flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out.extend(_flat(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out.append((f"{prefix}{k}", v))
    return out


def bench(
    which: Annotated[str, typer.Argument(help=f"one of {', '.join(BENCHMARKS)}, or all")
                     ] = "all",
    quick: Annotated[bool, typer.Option("--quick", help="Small sizes (smoke run).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Run benchmarks: each stage beside its baseline, in one run, with the ratio."""
    names = BENCHMARKS if which == "all" else (which,)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        typer.echo(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}",
                   err=True)
        raise typer.Exit(2)
    results = {}
    failed = False
    for name in names:
        try:
            results[name] = load_benchmark(name).run(quick=quick)
        except Exception as exc:  # report and go on with the others
            failed = True
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            typer.echo(f"bench {name} failed: {exc}", err=True)
            continue
        if not as_json:
            print_rows(name, results[name])
    if as_json:
        typer.echo(json.dumps(results, indent=2, default=str))
    raise typer.Exit(1 if failed else 0)


def register(app: typer.Typer) -> None:
    """Add ``bench`` to ``app``."""
    app.command("bench")(bench)
