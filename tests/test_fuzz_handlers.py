"""Fuzzing past the decoder: messages that pass wire validation but are extreme in content
(and some wildly mutated ones) fed to the collector's run state, the inference worker's
handler (real backend, decision step, results validated when sent) and the explainer's
handler (and its explanation of what it queued). :mod:`leukoflow.benchmarks.fuzz` builds the
messages from a hypothesis-controlled random source, so a failure shrinks.

Nothing may escape a service's error boundary (a *crash*) and nothing that decodes may even
reach it (a *handler error*: the schema or the handler has a hole); the accounting stays
consistent. ``leukoflow bench fuzz`` runs a million.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leukoflow.benchmarks.fuzz import (
    CollectorHarness,
    ExplainHarness,
    WorkerHarness,
    fuzz,
    message,
)
from leukoflow.benchmarks.workload_infer import make_test_artifact
from leukoflow.models.artifact import load_artifact

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    return CollectorHarness(tmp_path_factory.mktemp("coll"))


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    # the shipped model: on it a finite 3e38 crop overflows to NaN outputs (the case)
    d = tmp_path_factory.mktemp("worker")
    h = WorkerHarness(load_artifact("lenet5-sim"), d)
    yield h
    h.close()


@pytest.fixture(scope="module")
def explainer(tmp_path_factory):
    return ExplainHarness(tmp_path_factory.mktemp("explain"))


def _feed(h, rng: random.Random, n: int, wild: float) -> None:
    for _ in range(n):
        h.feed(message(rng, rng.choice(h.KINDS), side=getattr(h, "side", 32), wild=wild))
    h.check()
    assert h.crashes == 0, h.first_crash
    assert h.handler_errors == 0, "a message that decodes reached the error boundary"


@SETTINGS
@given(rng=st.randoms(use_true_random=False), n=st.integers(1, 6),
       wild=st.sampled_from([0.0, 0.3, 1.0]))
def test_collector_survives_anything_that_decodes(collector, rng, n, wild) -> None:
    _feed(collector, rng, n, wild)


@SETTINGS
@given(rng=st.randoms(use_true_random=False), n=st.integers(1, 6),
       wild=st.sampled_from([0.0, 0.3, 1.0]))
def test_worker_survives_anything_that_decodes(worker, rng, n, wild) -> None:
    _feed(worker, rng, n, wild)


@SETTINGS
@given(rng=st.randoms(use_true_random=False), n=st.integers(1, 4),
       wild=st.sampled_from([0.0, 0.3, 1.0]))
def test_explainer_survives_anything_that_decodes(explainer, rng, n, wild) -> None:
    _feed(explainer, rng, n, wild)


def test_a_few_thousand_each_and_most_pass_the_decoder(tmp_path) -> None:
    art = make_test_artifact(tmp_path / "art", input_size=32)
    w = WorkerHarness(art, tmp_path)
    try:
        for h, n in ((CollectorHarness(tmp_path / "c"), 3000), (w, 3000),
                     (ExplainHarness(tmp_path / "e"), 1000)):
            res = fuzz(h, n, seed=7, check_every=250)
            assert res["crashes"] == 0 and res["handler_errors"] == 0, res
            # the fuzzer really goes past the decoder (not only into its rejections)
            assert res["past_decoder"] > 0.6 * n and res["rejected_by_decoder"] > 0.05 * n, res
    finally:
        w.close()
    # the worker sent results for the cells it could classify, every one of them valid
    assert w.results > 0


def _drain_sink(h) -> list:
    from leukoflow.core import wire

    out = []
    while h.sink.poll(200):
        out.append(wire.decode(h.sink.recv_multipart()))
    return out


def test_extreme_crop_is_rejected_alone_and_a_failing_decision_step_rejects_one_batch(
        worker) -> None:
    import numpy as np

    from leukoflow.core import wire

    h = worker
    _drain_sink(h)
    s = wire.Sender("r", "acquire")
    x = np.random.default_rng(0).normal(0, 1, (3, h.side, h.side)).astype(np.float32)
    x[1] = 3e38  # finite, but it overflows the network: conf would be NaN
    msg = s.message("crops", x, frame=0, ids=[10, 11, 12], bbox=[[0, 0, 1, 1]] * 3, cum=0)
    h.worker._handle(wire.encode(msg), 0)
    h.worker._drain()
    got = _drain_sink(h)
    results = [m for m in got if m.kind == "results"]
    events = [m.header["stats"] for m in got if m.kind == "control"
              and m.header["stats"].get("event") == "rejected"]
    assert sorted(i for m in results for i in m.header["ids"]) == [10, 12]
    assert all(np.isfinite(m.header["conf"]).all() for m in results)
    assert [(e["reason"], e["ids"], e["src_seq"]) for e in events] == \
        [("non_finite_output", [11], 0)]
    # an exception in the decision step rejects that batch's cells; the worker goes on
    rule = h.worker.rule

    def broken(*a, **k):
        raise RuntimeError("decision step failed")

    h.worker.rule = broken
    try:
        h.worker._handle(wire.encode(s.message("crops", x[[0]], frame=1, ids=[20],
                                               bbox=[[0, 0, 1, 1]], cum=3)), 0)
        h.worker._drain()
    finally:
        h.worker.rule = rule
    h.worker._handle(wire.encode(s.message("crops", x[[2]], frame=2, ids=[30],
                                           bbox=[[0, 0, 1, 1]], cum=4)), 0)
    h.worker._drain()
    got = _drain_sink(h)
    assert [m.header["ids"] for m in got if m.kind == "results"] == [[30]]
    assert [(e.header["stats"]["reason"], e.header["stats"]["ids"]) for e in got
            if e.kind == "control"] == [("handler_error", [20])]
    assert h.worker.accounting.balanced(h.worker.batcher.pending)


def test_worker_counts_each_run_apart(worker) -> None:
    """A worker serving run after run (systemd): the old run's totals are sent when the new
    run's crops arrive, and the new run is counted from zero."""
    import numpy as np

    from leukoflow.core import wire

    h = worker
    x = np.random.default_rng(1).normal(0, 1, (2, h.side, h.side)).astype(np.float32)
    for run, first in (("run-1", 100), ("run-2", 200)):
        s = wire.Sender(run, "acquire")
        h.worker._handle(wire.encode(s.message("crops", x, frame=0, ids=[first, first + 1],
                                               bbox=[[0, 0, 1, 1]] * 2, cum=0)), 0)
        h.worker._drain()
    got = _drain_sink(h)
    totals = [m for m in got if m.kind == "control" and m.header["stats"].get("event") == "totals"]
    runs = [m.header["run"] for m in totals]
    assert "run-1" in runs and "run-2" not in runs  # (the run before, too, if there was one)
    assert totals[runs.index("run-1")].header["stats"]["received_cells"] == 2
    assert h.worker.accounting.received_cells == 2  # run-2 only
    assert {m.header["run"] for m in got if m.kind == "results"} == {"run-1", "run-2"}
