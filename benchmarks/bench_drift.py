"""Drift detection, reference-bead QC and the scale correction, measured (#16 acceptance).

Cells are cut by the live acquisition path from simulated flow
(:func:`leukoflow.acquisition.live_sample.live_sample`, one simulator session per run, like a
live run) and classified through the worker's decision path with the shipped ``lenet5-sim``
(:func:`leukoflow.models.drift_reference.decide`); the collector's drift test
(:class:`leukoflow.inference.drift.DriftMonitor`, the card's reference, default settings)
sees them in arrival order and the run's differential is the collector's
(:class:`leukoflow.inference.differential.Differential`, EM prior-shift estimate with its
bootstrap 95 % interval), compared with the simulator's ground truth. Rows:

* ``null``: runs of the nominal instrument (default profile, 20 seeds x 10,000 cells):
  runs with a drift alarm (target <= 1 of 20); how many differentials' intervals exclude
  the truth;
* per drift (leukocytes +5 % / +10 %, magnification -5 % / +5 %: 20 seeds x 1,000 cells;
  2 µm defocus: 10 x 500): runs alarmed within 1,000 cells (target all), cells to the alarm,
  reports whose interval excludes the truth *without* being marked (target 0) beside the
  baseline without drift detection (every such report unmarked);
* ``corrected``: magnification -5 % / +5 %, a bead QC run after the change, then 10,000
  cells with the QC scale (features at the measured pixel, crops resampled): largest
  |error| of the differential (target <= 2 pp) beside the same run at the nominal scale;
* ``qc``: the QC on simulated beads (nominal, 150 beads): diameter and refractive index
  against the certified 8.0 µm / 1.370 (stated tolerances 1 % and 0.001), magnification
  recovered after a change.

``python benchmarks/bench_drift.py [--quick] [--json]``; ``--generate`` only fills the
record cache (``$LEUKOFLOW_DRIFT_CACHE``; processes: ``LEUKOFLOW_SIM_WORKERS``).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from leukoflow.acquisition.qc.measure import QCConfig, run_qc
from leukoflow.acquisition.sources import create_source
from leukoflow.benchmarks.common import machine, row
from leukoflow.core.vocabulary import CLASS_NAMES
from leukoflow.inference.differential import Differential
from leukoflow.inference.drift import DriftConfig, DriftMonitor, DriftReference
from leukoflow.models.artifact import read_card
from leukoflow.models.drift_reference import records_for

MODEL = "lenet5-sim"
SHIFTS = ("cells+5", "cells+10", "mag-5", "mag+5", "defocus2um")
MAGS = {"mag-5": 0.95, "mag+5": 1.05}


def plan(quick: bool) -> dict[str, Any]:
    """Sizes of the benchmark (full: the #16 acceptance)."""
    if quick:
        return {"null_seeds": 3, "null_cells": 2000, "shift_seeds": 2, "shift_cells": 600,
                "defocus_seeds": 2, "defocus_cells": 400, "corrected_cells": 2000,
                "qc_beads": 60}
    # a 2-um defocus costs ~10x per accepted cell (the focus gate rejects ~80 % of the
    # objects, each propagated): fewer, shorter runs, still past the 1,000-cell mark's need
    return {"null_seeds": 20, "null_cells": 10_000, "shift_seeds": 20, "shift_cells": 1000,
            "defocus_seeds": 10, "defocus_cells": 500, "corrected_cells": 10_000,
            "qc_beads": 150}


def _size(p: dict[str, Any], shift: str) -> tuple[int, int]:
    """(seeds, cells) of the runs of one drift."""
    if shift == "defocus2um":
        return p["defocus_seeds"], p["defocus_cells"]
    return p["shift_seeds"], p["shift_cells"]


def _seed(kind: str, i: int) -> int:
    base = {"null": 1000, "corrected": 3000, "uncorrected": 3000}.get(kind)
    if base is None:
        base = 2000 + 100 * SHIFTS.index(kind)
    return base + i


def _qc_pixel(profile: str, seed: int, beads: int) -> dict[str, Any]:
    """A bead QC run made after the change (the instrument profile + the beads sample)."""
    return run_qc(create_source(f"sim:{seed}:0.3:{profile},beads"), QCConfig(n_beads=beads))


def jobs(p: dict[str, Any]) -> list[tuple]:
    """(profile, seed, cells, pipeline overrides) of every record set the benchmark needs."""
    out = [("", _seed("null", i), p["null_cells"], None) for i in range(p["null_seeds"])]
    for s in SHIFTS:
        k, n = _size(p, s)
        out += [(s, _seed(s, i), n, None) for i in range(k)]
    for s in MAGS:
        out.append((s, _seed("uncorrected", 0), p["corrected_cells"], None))
    return out


def _gen(job: tuple) -> str:
    profile, seed, n, pipeline = job
    records_for([MODEL], n, seed, profile, pipeline=pipeline, parts=1)
    return f"{profile or 'default'}:{seed}"


def generate(p: dict[str, Any], workers: int = 1) -> None:
    """Fill the record cache (each job is one simulator session)."""
    todo = jobs(p)
    if workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            for name in ex.map(_gen, todo):
                print("done", name, flush=True)
    else:
        for j in todo:
            print("done", _gen(j), flush=True)


def evaluate(rec: dict[str, Any], ref: DriftReference, cfg: DriftConfig | None = None,
             chunk: int = 64) -> dict[str, Any]:
    """The collector's view of one run: drift test in arrival order, differential, truth."""
    mon = DriftMonitor(ref, cfg or DriftConfig())
    pen = rec["pen"].astype(np.float64)
    n = len(rec["pred"])
    for i in range(0, n, chunk):
        sl = slice(i, i + chunk)
        mon.add(rec["pred"][sl], rec["code"][sl], {k: v[sl] for k, v in rec["feat"].items()},
                pen[sl])
    mon.finish()
    diff = Differential(CLASS_NAMES)
    diff.add(rec["pred"], rec["code"], rec["probs"])
    est = diff.estimate(exact=True)["classes"]
    lab = rec["label"]
    truth = np.bincount(lab[lab >= 0], minlength=len(CLASS_NAMES)) / max(1, (lab >= 0).sum())
    err = {c: 100 * (est[c]["fraction"] - truth[i]) for i, c in enumerate(CLASS_NAMES)}
    excl = [c for i, c in enumerate(CLASS_NAMES)
            if not est[c]["lower"] - 1e-12 <= truth[i] <= est[c]["upper"] + 1e-12]
    snap = mon.snapshot()
    return {"cells": n, "alarm": mon.alarm, "first_alarm_cell": mon.first_alarm_cell,
            "error_pp": err, "max_abs_error_pp": max(abs(v) for v in err.values()),
            "excludes_truth": excl, "moved": [m["test"] for m in snap["moved"]][:6],
            "max_score": snap["max_score"]}


def run(quick: bool = False) -> dict[str, Any]:
    """Run the benchmark (generating what the cache lacks)."""
    t0 = time.monotonic()
    p = plan(quick)
    workers = max(1, int(os.environ.get("LEUKOFLOW_SIM_WORKERS", "1")))
    generate(p, workers)
    ref = DriftReference.from_card(read_card(MODEL))
    out: dict[str, Any] = {"machine": machine(), "quick": quick, "plan": p, "rows": []}
    rows = out["rows"]

    def recs(profile: str, seed: int, n: int, pipeline: dict | None = None) -> dict:
        return records_for([MODEL], n, seed, profile, pipeline=pipeline, parts=1)[MODEL]

    # -- null runs --------------------------------------------------------------------
    null = [evaluate(recs("", _seed("null", i), p["null_cells"]), ref)
            for i in range(p["null_seeds"])]
    out["null"] = null
    k = sum(r["alarm"] for r in null)
    rows.append(row(f"null: runs with a drift alarm ({len(null)} x {p['null_cells']} cells)",
                    k / len(null), "fraction", target="<= 0.05 (1 of 20)",
                    higher_is_better=False))
    rows.append(row("null: differentials whose 95 % interval excludes the truth",
                    sum(bool(r["excludes_truth"]) for r in null) / len(null), "fraction",
                    target="~0.05 per class (nominal coverage)", higher_is_better=False))
    rows.append(row("null: largest drift score (1 = alarm)",
                    max(r["max_score"] for r in null), "score", target="< 1",
                    higher_is_better=False))

    # -- drifted runs -------------------------------------------------------------------
    out["shifted"] = {}
    for s in SHIFTS:
        k, n = _size(p, s)
        res = [evaluate(recs(s, _seed(s, i), n), ref) for i in range(k)]
        out["shifted"][s] = res
        fired = [r["first_alarm_cell"] for r in res if r["alarm"]]
        within = sum(1 for c in fired if c <= 1000) / len(res)
        excl = [bool(r["excludes_truth"]) for r in res]
        unmarked = sum(1 for r, e in zip(res, excl, strict=True) if e and not r["alarm"])
        rows.append(row(f"{s}: runs alarmed within 1,000 cells", within, "fraction",
                        target="1.0"))
        rows.append(row(f"{s}: median cells to the alarm",
                        float(np.median(fired)) if fired else float("nan"), "cells",
                        target="<= 1000", higher_is_better=False))
        rows.append(row(f"{s}: reports with truth outside the 95 % interval, unmarked",
                        unmarked / len(res), "fraction",
                        "without drift detection", sum(excl) / len(res), target="0",
                        higher_is_better=False))

    # -- QC and the corrected scale -----------------------------------------------------
    qc = run_qc(create_source("sim:4000:0.3:beads"), QCConfig(n_beads=p["qc_beads"]))
    b = qc["beads"]
    out["qc"] = {k: qc[k] for k in ("passed", "scale", "beads", "focus_um", "failed_checks")}
    rows.append(row("qc (nominal beads): diameter error", 100 * (
        b["diameter_nominal_scale_um"] / 8.0 - 1), "%", target="|err| <= 1 %",
        higher_is_better=False))
    rows.append(row("qc (nominal beads): refractive-index error", b["index"] - 1.370, "RIU",
                    target="|err| <= 0.001", higher_is_better=False))
    out["corrected"] = {}
    for s, mag in MAGS.items():
        q = _qc_pixel(s, _seed("corrected", 1), p["qc_beads"])
        pix = q["scale"]["pixel_um"]
        corr = evaluate(recs(s, _seed("corrected", 0), p["corrected_cells"],
                             {"pixel_um": pix}), ref)
        unc = evaluate(recs(s, _seed("uncorrected", 0), p["corrected_cells"]), ref)
        out["corrected"][s] = {"qc_passed": q["passed"], "magnification": q["scale"][
            "magnification"], "pixel_um": pix, "corrected": corr, "uncorrected": unc}
        rows.append(row(f"{s}: QC-measured magnification", q["scale"]["magnification"],
                        "x", "truth", mag, target="within 1 %"))
        rows.append(row(f"{s}: corrected differential max |error|", corr["max_abs_error_pp"],
                        "pp", "nominal scale (uncorrected)", unc["max_abs_error_pp"],
                        target="<= 2 pp", higher_is_better=False))
        rows.append(row(f"{s}: corrected run drift alarm", float(corr["alarm"]), "bool",
                        "uncorrected", float(unc["alarm"]), target="0",
                        higher_is_better=False))
    out["wall_s"] = time.monotonic() - t0
    return out


if __name__ == "__main__":
    if "--generate" in sys.argv:
        generate(plan("--quick" in sys.argv),
                 max(1, int(os.environ.get("LEUKOFLOW_SIM_WORKERS", "1"))))
    else:
        from common import main

        main(run)
