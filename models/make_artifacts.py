"""Rebuild the shipped model artifacts with the exact documented commands.

Usage::

    python -m leukoflow.models.make_artifacts              # all, in order
    python -m leukoflow.models.make_artifacts lenet5-sim   # one
    python -m leukoflow.models.make_artifacts --list       # print the commands
    python -m leukoflow.models.make_artifacts --summary    # markdown table of the cards' metrics
    python -m leukoflow.models.make_artifacts --reduced-ref  # re-record the reduced-budget
    reference

Every artifact is produced by one ``leukoflow train`` command (recorded verbatim in its
card). ``--data simflow:5000:200:2500`` generates the simulated dataset deterministically,
cut by the live acquisition path (``acquisition.pipeline_dataset.make_pipeline_dataset``:
flow simulator -> reconstruction -> segmentation -> gates -> tracking -> crops; 5000 cells
per class for train/val (85/15: 17,000 / 3,000), an independent seed for 2500 test cells per
class and 200 objects per OOD kind, which pass the same path with the quality gates opened).
The sets are this large for calibration: the binned ECE's finite-sample floor is ~1.2 % at
4,000 test cells and ~0.7 % at 10,000 (``leukoflow.models.calibration.ece_if_calibrated``), and a
temperature fitted on 1,500 validation cells missed the test optimum by 0.1. Generation
takes ~45 CPU-minutes; ``LEUKOFLOW_SIM_WORKERS=N`` spreads it over N processes and the arrays are
cached (``LEUKOFLOW_SIM_CACHE``). After ``lenet5-sim`` the
reduced-budget reference (:data:`REDUCED`) is trained and its test accuracy stored in the
card under ``reproduction``; ``tests/test_models_repro.py`` reruns that command and
compares, and ``benchmarks/bench_models.py`` reruns the full command with its time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from leukoflow.models.artifact import ARTIFACTS_DIR, update_card

ROOT = Path(__file__).resolve().parents[1]
ART = "models/artifacts"
PBC = "../shared/data/real/pbc-4class-64/pbc64.npz"
SIM = "simflow:5000:200:2500"

COMMANDS: dict[str, list[str]] = {
    "lenet5-sim": ["--data", SIM, "--arch", "lenet5", "--ood", "combined", "--seed", "0",
                   "--epochs", "30", "--patience", "5", "--out", f"{ART}/lenet5-sim"],
    "alexnet-sim": ["--data", SIM, "--arch", "alexnet", "--arch-kwarg", "width=0.25",
                    "--arch-kwarg", "hidden=256", "--ood", "combined", "--seed", "0",
                    "--epochs", "30", "--patience", "5", "--out", f"{ART}/alexnet-sim"],
    "lenet5-vi-sim": ["--data", SIM, "--arch", "lenet5_vi", "--ood", "combined", "--seed", "0",
                      "--epochs", "30", "--patience", "5", "--out", f"{ART}/lenet5-vi-sim"],
    # PBC (real data, cards only): trained on a lent NVIDIA H100 with --device cuda
    # (benchmarks/gpu_train_pbc.sh, ~35 s each); on a CPU drop --device (~60 s/epoch for AlexNet)
    "lenet5-pbc": ["--data", PBC, "--arch", "lenet5", "--lr", "0.001", "--ood", "mahalanobis",
                   "--seed", "0", "--epochs", "80", "--patience", "15", "--device", "cuda",
                   "--out", f"{ART}/lenet5-pbc", "--no-weights"],
    "alexnet-pbc": ["--data", PBC, "--arch", "alexnet", "--lr", "0.0005", "--ood", "rmds",
                    "--seed", "0", "--epochs", "80", "--patience", "15", "--device", "cuda",
                    "--out", f"{ART}/alexnet-pbc", "--no-weights"],
}
"""Artifact name -> ``leukoflow train`` arguments (run from the repository root)."""

REDUCED: list[str] = ["--data", "simflow:100:10", "--arch", "lenet5", "--seed", "0", "--epochs",
                      "3", "--patience", "3", "--n-boot", "200", "--knn-bank", "200"]
"""Reduced-budget version of the lenet5-sim command (test of reproducibility)."""

REDUCED_TOLERANCE = 0.01
"""Allowed |accuracy difference| between a rerun and the recorded reference (1 point)."""


def train_command(args: list[str]) -> list[str]:
    """Full argv of ``leukoflow train`` with ``args``, quiet progress."""
    return [sys.executable, "-c", "from leukoflow.cli import main; main()", "train", *args,
            "--no-progress", "--json"]


def run_train(args: list[str]) -> tuple[dict, float]:
    """Run one ``leukoflow train``; returns (card, seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    r = subprocess.run(train_command(args), cwd=ROOT, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"leukoflow train {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout), dt


def record_reduced_reference() -> dict:
    """Train the reduced-budget command and store its accuracy in the lenet5-sim card."""

    with tempfile.TemporaryDirectory() as tmp:
        card, dt = run_train([*REDUCED, "--out", str(Path(tmp) / "reduced")])
    ref = {"command": "leukoflow train " + " ".join(REDUCED) + " --out DIR",
           "test_accuracy": card["metrics"]["classification"]["accuracy"]["value"],
           "n_test": card["metrics"]["n_test"], "tolerance": REDUCED_TOLERANCE,
           "seconds": dt, "model_sha256": card.get("model_sha256"),
           "data_sha256": card["training"]["data_sha256"],
           "note": "reduced-budget reference for tests/test_models_repro.py; the full "
                   "command is rerun by benchmarks/bench_models.py"}
    update_card(ROOT / ART / "lenet5-sim", {"reproduction": ref})
    return ref


def _pct(m: dict, key: str = "value") -> str:
    return f"{100 * m[key]:.2f}"


def _ci(m: dict) -> str:
    return f"{100 * m['value']:.2f} [{100 * m['ci95'][0]:.2f}, {100 * m['ci95'][1]:.2f}]"


def summary(names: list[str] | None = None) -> str:
    """Markdown summary of the cards in ``models/artifacts`` (numbers with 95 % CIs)."""

    lines = ["| artifact | arch | test n | accuracy % | ECE % before T | ECE % after T | "
             "ECE % if perfectly calibrated | NLL after T | T | OOD detector |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ood_lines = ["| artifact | detector | " + "OOD kind: AUROC [95 % CI] / FPR@95TPR (ID positive)"
                 + " |", "|---|---|---|"]
    for d in sorted(ARTIFACTS_DIR.iterdir()):
        if not (d / "card.json").is_file() or (names and d.name not in names):
            continue
        c = json.loads((d / "card.json").read_text())
        m = c["metrics"]
        b, a = m["calibration"]["before_T"], m["calibration"]["after_T"]
        lines.append(f"| {d.name} | {c['architecture']} {c['arch_kwargs'] or ''} | "
                     f"{m['n_test']} | {_ci(a['accuracy'])} | {_ci(b['ece'])} | "
                     f"{_ci(a['ece'])} | "
                     f"{_ci(a['ece_if_calibrated']) if 'ece_if_calibrated' in a else '-'} | "
                     f"{a['nll']['value']:.4f} | {c['temperature']:.3f} | "
                     f"{c['ood']['detector']} |")
        for det, r in m.get("ood", {}).get("detectors", {}).items():
            cells = []
            for kind, v in r["per_kind"].items():
                if isinstance(v, dict) and "auroc" in v:
                    ci = v.get("auroc_ci95")
                    cis = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
                    cells.append(f"{kind} {v['auroc']:.3f}{cis} / {v['fpr95']:.3f}")
            ood_lines.append(f"| {d.name} | {det} | " + "; ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(ood_lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--summary" in argv:
        print(summary([a for a in argv if not a.startswith("-")] or None))
        return 0
    if "--reduced-ref" in argv:
        ref = record_reduced_reference()
        print(f"reduced reference: {100 * ref['test_accuracy']:.2f} %")
        return 0
    if "--list" in argv:
        for name, args in COMMANDS.items():
            print(f"{name}: leukoflow train {' '.join(args)}")
        print(f"reduced reference: leukoflow train {' '.join(REDUCED)} --out DIR")
        return 0
    names = [a for a in argv if not a.startswith("-")] or list(COMMANDS)
    for name in names:
        card, dt = run_train(COMMANDS[name])
        acc = card["metrics"]["classification"]["accuracy"]["value"]
        print(f"{name}: test accuracy {100 * acc:.2f} % in {dt:.0f} s", flush=True)
        if name == "lenet5-sim":
            ref = record_reduced_reference()
            print(f"reduced reference: {100 * ref['test_accuracy']:.2f} %", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
