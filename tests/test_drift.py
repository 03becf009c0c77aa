"""Online drift detection (#16): the sequential test, its false-alarm control, the card block,
the worker's projection, the collector's verdict and the wire field.

Synthetic streams with known distributions are the ground truth here; the benchmark
(benchmarks/bench_drift.py) measures the same on cells cut by the live acquisition path.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from leukoflow.core import wire
from leukoflow.inference.drift import (
    DriftConfig,
    DriftMonitor,
    DriftReference,
    PenultimateProjection,
)
from leukoflow.run.collector import RunState
from leukoflow.run.drift_watch import RunWatch

CLASSES = ("neutrophil", "eosinophil", "monocyte", "lymphocyte")
MIX = np.array([0.6, 0.03, 0.07, 0.3])
DIAM = np.array([11.0, 11.8, 14.0, 8.0])  # per-class mean diameter [µm]


def _stream(rng: np.random.Generator, n: int, mix: np.ndarray = MIX, scale: float = 1.0,
            pen_shift: float = 0.0, uncertain: float = 0.09) -> dict:
    """Cells with per-class features (diameter, dry mass, ...) and 6-d 'penultimate'
    features whose class means differ; ``scale`` multiplies every diameter."""
    y = rng.choice(4, n, p=mix)
    d = rng.normal(DIAM[y], 0.8) * scale
    dm = np.exp(rng.normal(np.log(10 * DIAM[y]), 0.25)) * scale**2
    pen = rng.normal(0, 1, (n, 6)) + np.eye(4, 6)[y] * 3 + pen_shift
    code = np.where(rng.uniform(size=n) < uncertain, 1, 0)
    code[rng.uniform(size=n) < 0.03] = 2
    feat = {"diameter_um": d, "dm_pg": dm, "pha_mean": rng.normal(2.0, 0.3, n),
            "focus": np.exp(rng.normal(0, 0.3, n)), "amp_std": np.exp(rng.normal(-4.5, 0.1, n))}
    return {"pred": y, "code": code, "feat": feat, "pen": pen,
            "part": rng.integers(0, 16, n)}


@pytest.fixture(scope="module")
def ref() -> DriftReference:
    return DriftReference.fit(_stream(np.random.default_rng(0), 40_000), CLASSES)


def _run(ref: DriftReference, s: dict, cfg: DriftConfig | None = None, chunk: int = 37
         ) -> DriftMonitor:
    m = DriftMonitor(ref, cfg or DriftConfig())
    for i in range(0, len(s["pred"]), chunk):
        sl = slice(i, i + chunk)
        m.add(s["pred"][sl], s["code"][sl], {k: v[sl] for k, v in s["feat"].items()},
              s["pen"][sl])
    m.finish()
    return m


def test_false_alarm_rate_is_controlled(ref):
    cfg = DriftConfig(alpha=0.05)
    alarms = sum(_run(ref, _stream(np.random.default_rng(100 + r), 3000), cfg).alarm
                 for r in range(60))
    # union bound: P(any alarm in a run) <= 0.05; expected <= 3 of 60 (the test is
    # conservative, so fewer); 8 or more would mean the error control is broken
    assert alarms <= 7


def test_a_different_patient_mix_is_not_drift(ref):
    mix = np.array([0.30, 0.15, 0.15, 0.40])  # eosinophilia and lymphocytosis, same cells
    alarms = [_run(ref, _stream(np.random.default_rng(300 + r), 4000, mix=mix)).alarm
              for r in range(10)]
    assert sum(alarms) <= 1


def test_larger_cells_are_detected_within_1000_cells(ref):
    m = _run(ref, _stream(np.random.default_rng(7), 3000, scale=1.05))
    snap = m.snapshot()
    assert snap["alarm"] and snap["first_alarm_cell"] <= 1000
    moved = {(r["feature"], r["group"]) for r in snap["moved"]}
    assert ("diameter_um", "neutrophil") in moved
    d = next(r for r in snap["moved"] if r["test"] == "diameter_um|neutrophil")
    assert d["live"] > d["ref"] and d["change_pct"] == pytest.approx(5.0, abs=2.0)


def test_penultimate_shift_alone_is_detected(ref):
    m = _run(ref, _stream(np.random.default_rng(8), 3000, pen_shift=0.5))
    assert m.alarm
    assert any(r["feature"].startswith("pen") for r in m.snapshot()["moved"])


def test_thresholds_spend_alpha_over_checkpoints(ref):
    m = DriftMonitor(ref, DriftConfig(alpha=0.01))
    z1, z10 = m.threshold(1), m.threshold(10)
    assert 3.0 < z1 < z10 < 6.5
    # sum of the per-checkpoint error over an unbounded run is alpha
    a = [0.01 * 6 / (np.pi**2 * k * k) for k in range(1, 200_000)]
    assert sum(a) == pytest.approx(0.01, rel=1e-4)


def test_restart_continues_the_same_test(ref):
    s = _stream(np.random.default_rng(9), 2000, scale=1.03)
    full = _run(ref, s, chunk=100).snapshot()
    a = DriftMonitor(ref)
    b = DriftMonitor(ref)
    for i in range(0, 1000, 100):
        sl = slice(i, i + 100)
        a.add(s["pred"][sl], s["code"][sl], {k: v[sl] for k, v in s["feat"].items()},
              s["pen"][sl])
    b.load_state(json.loads(json.dumps(a.state_dict())))
    for i in range(1000, 2000, 100):
        sl = slice(i, i + 100)
        b.add(s["pred"][sl], s["code"][sl], {k: v[sl] for k, v in s["feat"].items()},
              s["pen"][sl])
    b.finish()
    got = b.snapshot()
    assert got["alarm"] == full["alarm"] and got["cells"] == full["cells"] == 2000
    assert got["first_alarm_cell"] == full["first_alarm_cell"]


def test_card_block_round_trip_and_validation(ref):
    card = {"drift": json.loads(json.dumps(ref.to_card())), "ood": {
        "params": {"n_descriptors": 2}}}
    back = DriftReference.from_card(card)
    assert back.features.keys() == ref.features.keys()
    assert back.features["diameter_um"]["neutrophil"]["mean"] == pytest.approx(11.0, abs=0.05)
    assert back.features["diameter_um"]["neutrophil"]["tau"] >= 0
    assert DriftReference.from_card({}) is None
    bad = json.loads(json.dumps(card))
    bad["drift"]["features"]["diameter_um"]["neutrophil"]["sd"] = 0
    with pytest.raises(ValueError, match="bad moments"):
        DriftReference.from_card(bad)
    # the worker's projection drops the trailing descriptor columns
    proj = PenultimateProjection.from_card(card)
    feats = np.c_[np.random.default_rng(1).normal(size=(5, 6)), np.full((5, 2), 99.0)]
    want = ref.projector(feats[:, :6])
    assert np.allclose(proj(feats), want, atol=1e-5)
    assert proj(np.zeros((5, 7))) is None  # wrong width: nothing sent, nothing wrong
    assert set(proj.fields(proj(feats))) == {"pen0", "pen1", "pen2"}


def _header(s: dict, sl: slice, proj: PenultimateProjection, model: str) -> dict:
    n = len(s["pred"][sl])
    feat = {k: v[sl].tolist() for k, v in s["feat"].items()}
    feat.update(proj.fields(proj(s["pen"][sl])))
    return {"ids": list(range(sl.start, sl.start + n)), "classes": list(CLASSES),
            "pred": s["pred"][sl].tolist(),
            "decision": [("counted", "uncertain", "ood")[c] for c in s["code"][sl]],
            "conf": [0.9] * n, "ood_score": [0.0] * n, "feat": feat, "model": model,
            "run": "r1", "t": {}}


def test_collector_marks_the_differential_not_valid(ref, tmp_path, monkeypatch):
    card = {"name": "synthetic", "drift": ref.to_card(), "ood": None}
    monkeypatch.setattr("leukoflow.run.drift_watch.read_card", lambda name: card)
    proj = PenultimateProjection.from_card(card)
    params = {"run": {"model": "synthetic"}, "qc": {"state": "pass", "ok": True, "code": 1}}
    for scale, valid in ((1.0, True), (1.08, False)):
        st = RunState(CLASSES, run_id="r1")
        st.watch = RunWatch(params, DriftConfig())
        s = _stream(np.random.default_rng(11), 2000, scale=scale)
        for i in range(0, 2000, 200):
            h = _header(s, slice(i, i + 200), proj, "synthetic")
            st.ingest_results(h, np.tile([0.7, 0.1, 0.1, 0.1], (200, 1)).astype(np.float32))
        snap = st.snapshot(final=True)
        assert snap["drift"]["enabled"] and snap["drift"]["cells"] == 2000
        assert snap["validity"]["valid"] is valid
        if not valid:
            assert "drift detected" in snap["validity"]["reasons"][0]
            assert "diameter_um" in snap["validity"]["reasons"][0]
        json.dumps(snap)  # summary.json material
    # another model's results are not compared with this card
    st = RunState(CLASSES, run_id="r1")
    st.watch = RunWatch(params, DriftConfig())
    s = _stream(np.random.default_rng(12), 400)
    st.ingest_results(_header(s, slice(0, 400), proj, "other-model"),
                      np.tile([0.7, 0.1, 0.1, 0.1], (400, 1)).astype(np.float32))
    assert st.snapshot()["drift"]["cells_other_model"] == 400


def test_watch_without_reference_says_why(monkeypatch):
    monkeypatch.setattr("leukoflow.run.drift_watch.read_card", lambda name: {"name": "x"})
    w = RunWatch({"run": {"model": "x"}, "qc": {"state": "none", "ok": False, "code": -1,
                                                "message": "no QC record"}}, DriftConfig())
    snap = w.snapshot()
    assert snap["drift"]["enabled"] is False and "no drift reference" in snap["drift"]["reason"]
    assert snap["validity"]["valid"] is True  # not invalid, but not silent either:
    assert any("drift not monitored" in x for x in snap["validity"]["warnings"])
    assert any("QC none" in x for x in snap["validity"]["warnings"])
    w = RunWatch({}, DriftConfig(enabled=False))
    assert "disabled" in w.snapshot()["drift"]["reason"]


def test_results_feat_field_is_validated():
    s = wire.Sender(run="r", role="infer")
    base = {"ids": [1, 2], "pred": [0, 1], "decision": ["counted", "ood"], "conf": [0.9, 0.5],
            "ood_score": [0.1, 2.0], "classes": list(CLASSES), "model": "m"}
    probs = np.full((2, 4), 0.25, np.float32)
    ok = wire.encode(s.message("results", probs, feat={"diameter_um": [10.0, 11.0],
                                                      "pen0": [0.1, -0.2]}, **base))
    assert wire.decode(ok).header["feat"]["pen0"] == [0.1, -0.2]
    for feat, reason in (({"diameter_um": [10.0]}, "count_mismatch"),
                         ({"diameter_um": [10.0, float("nan")]}, "non_finite"),
                         ({"diameter_um": "x"}, "count_mismatch"),
                         (["diameter_um"], "field_type")):
        with pytest.raises(wire.WireError) as e:
            wire.encode(s.message("results", probs, feat=feat, **base))
        assert e.value.reason == reason


def test_live_view_and_metrics_show_the_verdict(ref, monkeypatch):
    from prometheus_client import generate_latest
    from rich.console import Console

    from leukoflow.core.metrics import ServiceMetrics
    from leukoflow.run.liveview import render

    card = {"name": "synthetic", "drift": ref.to_card(), "ood": None}
    monkeypatch.setattr("leukoflow.run.drift_watch.read_card", lambda name: card)
    proj = PenultimateProjection.from_card(card)
    st = RunState(CLASSES, run_id="r1")
    st.watch = RunWatch({"run": {"model": "synthetic"},
                         "qc": {"state": "pass", "ok": True, "code": 1, "magnification": 1.05,
                                "message": "QC passed"}}, DriftConfig())
    s = _stream(np.random.default_rng(13), 1000, scale=1.1)
    st.ingest_results(_header(s, slice(0, 1000), proj, "synthetic"),
                      np.tile([0.7, 0.1, 0.1, 0.1], (1000, 1)).astype(np.float32))
    snap = st.snapshot()
    con = Console(width=200, record=True)
    con.print(render(snap))
    text = con.export_text()
    assert "NOT VALID" in text and "diameter_um" in text
    m = ServiceMetrics("collector", "r1")
    st.watch.export(m, snap)
    prom = generate_latest(m.registry).decode()
    assert "leukoflow_drift_alarm 1.0" in prom
    assert "leukoflow_differential_valid 0.0" in prom
    assert "leukoflow_qc_status 1.0" in prom and "leukoflow_qc_magnification 1.05" in prom
    assert 'leukoflow_drift_score{feature="diameter_um",group="neutrophil"}' in prom
