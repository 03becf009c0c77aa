"""Fault matrix at full size: SIGKILL of each service during a real ``leukoflow run``.

For each fault (none, acquisition, worker 0, worker 1, explainer, collector) one run of the
simulated instrument with two workers and the explainer, the service killed at a seeded
random moment (:mod:`leukoflow.benchmarks.faults`); every published cell is checked against
the acquisition's journal. Rows per fault: cells published, cells classified exactly once
(all of them, or the check failed), cells lost with their stage:reason (against the stated
bound), duplicates, unaccounted cells, recovery time of the killed service, and the run's
throughput beside the fault-free run's (the baseline, same machine, same session).

Run: ``leukoflow bench faults`` (``--quick``: smaller runs).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import tempfile
from pathlib import Path
from typing import Any

from leukoflow.benchmarks.common import machine, row
from leukoflow.benchmarks.faults import analyse, loss_bound_cells, run_fault
from leukoflow.core.transport import run_port_args

FAULTS: tuple[tuple[str, list[str]], ...] = (
    ("none", []), ("acquire", ["source"]), ("infer-0", ["infer-0"]), ("infer-1", ["infer-1"]),
    ("explain", ["explain"]), ("collector", ["collector"]),
)


def run(quick: bool = False, seed: int = 100) -> dict[str, Any]:
    """Run the matrix; ``rows`` per fault plus the full analysis of each run."""
    first, after = ((30, 90), 60) if quick else ((300, 900), 1000)
    out: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    base_rate = None
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        for k, (name, targets) in enumerate(FAULTS):
            try:
                res = run_fault(name, targets, Path(tmp) / name, run_port_args(), seed=seed + k,
                                first=first, after=after, explain=True, timeout_s=3600)
            except RuntimeError as exc:  # report it and go on with the next fault
                out.append({"fault": name, "error": str(exc)})
                rows.append(row(f"{name}: run failed ({str(exc)[:120]})", float("nan"), ""))
                continue
            a = analyse(res)
            rate = (res.summary.get("throughput") or {}).get("mean_cells_per_s") or 0.0
            a["cells_per_s"] = rate
            a["bound_cells"] = loss_bound_cells(targets, a["max_cells_per_message"])
            out.append(a)
            if name == "none":
                base_rate = rate or None
            why = ", ".join(f"{r} {n}" for r, n in sorted(a["lost"].items())) or "none"
            ok = (a["classified_once"] and a["distinct_ids"] and a["phantom"] == 0
                  and a["lost_matches"] and a["unaccounted_not_trailing"] == 0)
            rows += [
                row(f"{name}: cells published", a["published_cells"], "cells"),
                row(f"{name}: classified exactly once, checked against the journal",
                    a["classified"], "cells", target="every cell once" if ok else "FAILED"),
                row(f"{name}: lost ({why})", a["lost_total"] or 0, "cells",
                    target=f"<= {a['bound_cells']} (queue bound)"),
                row(f"{name}: duplicates", a["duplicates"] or 0, "cells", target="0"),
                row(f"{name}: unaccounted (in a killed acquisition's own queue)",
                    a["unaccounted_cells"], "cells", target="only after a source kill"),
            ]
            if a["recovery_s"]:
                rows.append(row(f"{name}: recovery (killed -> serving again)",
                                a["recovery_s"][0] or float("nan"), "s",
                                higher_is_better=False))
            rows.append(row(f"{name}: throughput", rate, "cells/s", "no fault", base_rate))
    return {"machine": machine(), "quick": quick, "rows": rows, "faults": out}


if __name__ == "__main__":
    from leukoflow.benchmarks.common import main

    main(run)
