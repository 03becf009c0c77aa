"""The import layers of the code base (core < stages < application) and one namespace.

* the core (``leukoflow.core``) imports nothing else of ours;
* the stages (acquisition, inference, explain, models) never import the application
  (run, reports, research, cli, benchmarks); acquisition and inference never import each
  other;
* no import cycles between files (module-level and function-level imports alike);
* project imports inside functions only where the target pulls in a heavy library
  (torch), and in the CLI, whose commands load their stage on use so that
  ``leukoflow --help`` stays fast;
* every source folder is an installed subpackage of ``leukoflow`` (pyproject), and no
  file imports the repository folders under their old top-level names.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"leukoflow": "leukoflow", "leukoflow.acquisition": "acquisition",
                "leukoflow.inference": "inference", "leukoflow.explain": "explain",
                "leukoflow.models": "models", "leukoflow.benchmarks": "benchmarks"}
CORE = ("leukoflow.core",)
STAGES = ("leukoflow.acquisition", "leukoflow.inference", "leukoflow.explain",
          "leukoflow.models")
APP = ("leukoflow.run", "leukoflow.reports", "leukoflow.research", "leukoflow.cli",
       "leukoflow.benchmarks", "leukoflow.__main__")
OLD_TOPS = ("acquisition", "inference", "explain", "models", "benchmarks")
#: modules that import torch when imported (checked below): lazy imports of them are fine
HEAVY = {
    "leukoflow.models.architectures", "leukoflow.models.descriptors",
    "leukoflow.inference.backends.torch_module", "leukoflow.inference.backends.device_ood",
    "leukoflow.explain.model", "leukoflow.explain.ort_engine",
    "leukoflow.explain.lime_batched", "leukoflow.explain.artifacts",
    "leukoflow.explain.methods", "leukoflow.explain.methods.base",
    "leukoflow.explain.methods.captum_methods", "leukoflow.explain.methods.lime",
    "leukoflow.research.evaluation", "leukoflow.research.finding",
    "leukoflow.acquisition.batched",
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if folder == "leukoflow" and parts and parts[0] in {
                    "acquisition", "inference", "explain", "models", "benchmarks"}:
                continue
            out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for every project import of a file."""
    tree = ast.parse(path.read_text())
    parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                if path.name != "__init__.py":
                    base = base[:-1]
                base = base[:len(base) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod
                       for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        p, infunc = parents.get(node), False
        while p is not None:
            infunc |= isinstance(p, ast.FunctionDef | ast.AsyncFunctionDef)
            p = parents.get(p)
        for t in targets:
            top = t.split(".")[0]
            if top == "leukoflow" or top in OLD_TOPS:
                found.append((t, infunc, node.lineno))
    return found


def _resolve(target: str) -> str | None:
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


GRAPH = {m: [(_resolve(t), f, ln, t) for t, f, ln in _imports(m, p)] for m, p in MODULES.items()}


def _in(mod: str, groups: tuple[str, ...]) -> bool:
    return any(mod == g or mod.startswith(g + ".") for g in groups)


def test_no_old_top_level_names():
    bad = [f"{m}:{ln} imports {t}" for m, edges in GRAPH.items() for _r, _f, ln, t in edges
           if t.split(".")[0] in OLD_TOPS]
    tests = [f"{p.name}: {t}" for p in (ROOT / "tests").glob("*.py")
             for t, _f, _l in _imports("tests." + p.stem, p) if t.split(".")[0] in OLD_TOPS]
    assert not bad and not tests, bad + tests


def test_core_imports_nothing_else_of_ours():
    # the package root holds only ``__version__``
    bad = [f"{m} -> {r}" for m, edges in GRAPH.items() if _in(m, CORE)
           for r, *_ in edges if r and r != "leukoflow" and not _in(r, CORE)]
    assert not bad, bad


def test_stages_never_import_the_application():
    bad = [f"{m} -> {r}" for m, edges in GRAPH.items() if _in(m, STAGES)
           for r, *_ in edges if r and _in(r, APP)]
    assert not bad, bad


def test_acquisition_and_inference_are_independent():
    pairs = (("leukoflow.acquisition", "leukoflow.inference"),
             ("leukoflow.inference", "leukoflow.acquisition"))
    bad = [f"{m} -> {r}" for a, b in pairs for m, edges in GRAPH.items() if _in(m, (a,))
           for r, *_ in edges if r and _in(r, (b,))]
    assert not bad, bad


def test_no_import_cycles_between_files():
    graph = {m: {r for r, *_ in edges if r and r != m} for m, edges in GRAPH.items()}
    # a package's __init__ that re-exports its own submodules is not a cycle of files
    for m in graph:
        graph[m] = {r for r in graph[m] if not (MODULES[m].name == "__init__.py"
                                                 and r.startswith(m + "."))}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, cycles[:5]


def test_function_level_project_imports_only_for_heavy_modules():
    bad = [f"{m}:{ln} imports {r} inside a function"
           for m, edges in GRAPH.items() if not _in(m, ("leukoflow.cli",))
           for r, infunc, ln, _t in edges if infunc and r and r not in HEAVY]
    assert not bad, bad


def test_heavy_list_is_true():
    """Each module named heavy really imports torch (else its imports must be hoisted)."""
    code = ("import importlib, sys\nlight = []\nfor m in sys.argv[1:]:\n"
            "    importlib.import_module(m)\n"
            "print(' '.join(sorted(m for m in sys.argv[1:] if 'torch' not in sys.modules)))")
    # one module per interpreter would be exact; the heavy ones each import torch at their
    # top, so checking them one by one in a single process after a fresh start per module
    # is what matters: run each separately.
    light = []
    for m in sorted(HEAVY):
        r = subprocess.run([sys.executable, "-c", code, m], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr[-1000:]
        light += r.stdout.split()
    assert not light, f"these modules do not import torch: {light}"


def test_pyproject_installs_every_folder_under_one_namespace():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"] == PACKAGE_DIRS
    on_disk = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert set(cfg["packages"]) == on_disk
    assert all(p == "leukoflow" or p.startswith("leukoflow.") for p in cfg["packages"])


@pytest.mark.parametrize("folder", sorted(PACKAGE_DIRS.values()))
def test_every_source_folder_is_a_package(folder):
    missing = [str(d.relative_to(ROOT)) for d in (ROOT / folder).rglob("*")
               if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))
               and not (d / "__init__.py").is_file()]
    assert not missing, missing
