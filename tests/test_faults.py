"""Fault injection on the real pipeline: SIGKILL of each service at a seeded random moment.

Each test starts ``leukoflow run`` on the simulated instrument (real processes, real sockets,
the shipped model) with the acquisition's publish journal on, kills services with SIGKILL at
random moments measured in emitted cells, lets the supervisor restart them, stops the run
with Ctrl-C and checks every physical cell against the journal
(:mod:`leukoflow.benchmarks.faults`): each cell that left acquisition is classified exactly
once, rejected with a reason, or inside a message the collector declared lost with a stage
and reason; the declared loss equals the cells really missing; distinct cells never share an
id and none is taken for a duplicate; the loss stays within the bound the queues allow; and
cells are counted again after the kill. (``stop`` from a stranger and forged results from an
unauthenticated peer: tests/test_auth.py, on CurveZMQ sockets.) The full matrix at full size
is ``leukoflow bench faults``.
"""

from __future__ import annotations

import pytest
from helpers import run_port_args

from leukoflow.benchmarks.faults import LOSS_BOUND_MESSAGES, analyse, loss_bound_cells, run_fault

pytestmark = pytest.mark.slow


def _check(res, targets: list[str], reasons: set[str]) -> dict:
    a = analyse(res)
    assert res.returncode == 0, res.stderr_tail
    assert a["published_cells"] > 0 and a["distinct_ids"], a  # no two cells share an id
    assert a["classified_once"] and a["phantom"] == 0, a      # counted once, only real cells
    assert a["duplicates"] == 0, a                             # no distinct cell dropped
    assert a["lost_matches"], a          # declared loss == cells really missing, by reason
    assert a["unaccounted_not_trailing"] == 0, a  # every message it heard of is resolved
    assert set(a["lost"]) <= reasons, a
    assert a["lost_total"] <= loss_bound_cells(targets, a["max_cells_per_message"]), a
    assert a["in_flight"] == 0 and a["balanced"], a
    assert all(r is not None for r in a["recovery_s"]), a
    assert a["counted_after_last_kill"] > 0, a  # the pipeline counts again after the kill
    return a


def test_sigkill_of_acquisition(tmp_path) -> None:
    res = run_fault("acquire", ["source"], tmp_path / "run", run_port_args(), seed=11)
    a = _check(res, ["source"], {"acquire:source_died"})
    assert a["sources"] == 2  # the restarted acquisition: new sender, next epoch of ids
    assert sum(s["dead"] for s in a["source_states"].values()) == 1
    # crops still in the killed acquisition's own queue never reached a worker; the
    # collector never heard of them (they follow its last message)
    assert a["unaccounted_messages"] <= LOSS_BOUND_MESSAGES["source"], a


def test_sigkill_of_each_inference_worker(tmp_path) -> None:
    targets = ["infer-0", "infer-1"]
    res = run_fault("workers", targets, tmp_path / "run", run_port_args(), seed=12)
    a = _check(res, targets, {"infer:worker_died"})
    assert a["unaccounted_cells"] == 0, a


def test_sigkill_of_explainer_and_collector(tmp_path) -> None:
    targets = ["explain", "collector"]
    res = run_fault("explain+collector", targets, tmp_path / "run", run_port_args(), seed=13,
                    explain=True)
    a = _check(res, targets, {"collector:restart"})
    assert a["unaccounted_cells"] == 0, a
    assert a["collector_restarts"] == 1
