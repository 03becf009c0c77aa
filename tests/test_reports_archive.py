"""Archive validation on a real Dask cluster: several small labelled recordings, one task each,
pooled numbers checked against sums recomputed here from the files, the report opened in a
real headless Chromium.

The recordings are written by the real :class:`~leukoflow.run.recorder.Recorder` from
simulated labelled crops (four leukocyte classes in different proportions per recording plus
OOD objects) classified by the shipped ``lenet5-sim`` through ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_report_browser import _open

from leukoflow.acquisition.sim.dataset import make_crop_dataset
from leukoflow.core import stats
from leukoflow.core.vocabulary import CLASS_NAMES
from leukoflow.inference.backends import create_backend
from leukoflow.inference.decision import rule_from_artifact
from leukoflow.models.artifact import load_artifact
from leukoflow.reports.archive import validate_archive, write_archive_report
from leukoflow.reports.validate import validate_recording
from leukoflow.run.recorder import Recorder, read_recording

#: class proportions (neutrophil, eosinophil, monocyte, lymphocyte) per recording
MIXES = [(0.6, 0.05, 0.05, 0.3), (0.3, 0.3, 0.1, 0.3), (0.1, 0.1, 0.6, 0.2), (0.4, 0.0, 0.2, 0.4)]
CELLS = 60


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    data = make_crop_dataset(CELLS, ood_per_kind=4, seed=7, through_hologram=False,
                             ood_kinds=("erythrocyte", "debris"))
    art = load_artifact("lenet5-sim")
    be = create_backend("onnxruntime", art, max_batch=256)
    rule = rule_from_artifact(art)
    rng = np.random.default_rng(1)
    y = data["y"]
    paths = []
    next_id = 0
    for r, mix in enumerate(MIXES):
        pick = []
        for c, frac in enumerate(mix):
            pool_c = np.flatnonzero(y == c)
            pick += rng.choice(pool_c, int(round(frac * 40)), replace=False).tolist()
        pick += rng.choice(np.flatnonzero(y == -1), 3, replace=False).tolist()
        pick = np.array(pick)
        x = data["x"][pick]
        out = be.infer(x)
        d = rule(out.logits, out.features, out.ood_score)
        ids = list(range(next_id, next_id + len(pick)))
        next_id += len(pick)
        path = root / f"rec{r}.rtdc"
        rec = Recorder(path, params={"test": {"recording": r}})
        rec.add_crops({"ids": ids, "frame": r, "feat": {},
                       "labels": y[pick].tolist(),
                       "kinds": [data["kind"][i] for i in pick],
                       "t_acq": [1_000_000 * (i + 1) for i in range(len(pick))]}, x)
        rec.add_results({"ids": ids, "pred": d.pred.tolist(), "decision": d.names(),
                         "conf": d.conf.tolist(), "ood_score": d.ood_score.tolist()}, d.probs)
        rec.close()
        paths.append(path)
    be.close()
    return root, paths


def _independent(paths):
    """Pooled numbers recomputed here from the recordings (not through the report code)."""
    k = len(CLASS_NAMES)
    cm = np.zeros((k, k), int)
    true = np.zeros(k)
    est_counts = np.zeros(k)
    not_ood = 0
    probs_id, labels_id = [], []
    for p in paths:
        r = read_recording(p)
        lab, probs = r["label"], r["probs"]
        dec = np.asarray(r["decision"])
        idd = lab >= 0
        for t, q in zip(lab[idd], probs[idd].argmax(1), strict=True):
            cm[t, q] += 1
        true += np.bincount(lab[idd], minlength=k)
        keep = dec != "ood"
        est_counts += stats.em_prior_shift(probs[keep]) * keep.sum()
        not_ood += keep.sum()
        probs_id.append(probs[idd])
        labels_id.append(lab[idd])
    return {"cm": cm, "true": true / true.sum(), "est": est_counts / not_ood,
            "ece": stats.ece(np.concatenate(probs_id), np.concatenate(labels_id), 15)}


def test_validate_many_recordings_on_a_local_dask_cluster(recordings, tmp_path):
    root, paths = recordings
    bad = tmp_path / "broken.rtdc"
    bad.write_bytes(b"not an hdf5 file")
    res = validate_archive([str(root / "rec*.rtdc"), str(bad)], scheduler=None, n_workers=2,
                           n_boot=500)
    assert res["cluster"]["workers"] == 2 and res["cluster"]["tasks"] == 5
    # each recording one task, spread over the cluster's worker processes
    pids = {r["worker_pid"] for r in res["results"] if r["status"] == "ok"}
    assert len(pids) == 2
    rows = {r["file"]: r for r in res["recordings"]}
    assert rows[str(bad.resolve())]["status"] == "error" and res["failed"] == 1
    # per-recording rows are the single-recording validation
    for p in paths:
        single = validate_recording(p)
        row = rows[str(p.resolve())]
        assert row["accuracy"] == pytest.approx(single["classification"]["accuracy"])
        assert row["max_abs_error_pp"] == pytest.approx(
            single["differential"]["max_abs_error_pp"])
    pooled = res["pooled"]
    ind = _independent(paths)
    assert pooled["recordings"] == 4
    np.testing.assert_array_equal(pooled["classification"]["confusion_matrix"], ind["cm"])
    acc = np.trace(ind["cm"]) / ind["cm"].sum()
    assert pooled["classification"]["accuracy"] == pytest.approx(acc)
    lo, hi = pooled["classification"]["accuracy_ci95"]
    assert lo < acc < hi
    for i, name in enumerate(CLASS_NAMES):
        v = pooled["differential"]["classes"][name]
        assert v["true"] == pytest.approx(ind["true"][i])
        assert v["estimate"] == pytest.approx(ind["est"][i], abs=1e-9)
        assert v["error_pp"] == pytest.approx(100 * (ind["est"][i] - ind["true"][i]), abs=1e-7)
        a, b = v["error_pp_ci95"]
        assert a <= b
    # the recordings differ in composition, so the pooled truth is none of theirs
    per_true = [validate_recording(p)["differential"]["classes"]["monocyte"]["true"]
                for p in paths]
    assert min(per_true) < pooled["differential"]["classes"]["monocyte"]["true"] < max(per_true)
    assert pooled["calibration"]["ece"] == pytest.approx(ind["ece"], abs=1e-12)
    # the report opens in a real browser like the other reports
    index = write_archive_report(res, tmp_path / "report")
    probe, _ = _open(index, tmp_path)
    assert probe["errors"] == [] and probe["bad"] == [] and probe["images"] >= 2, probe
    assert "broken.rtdc" in index.read_text()


def test_fast_replay_on_an_existing_cluster_reproduces_the_recorded_decisions(recordings):
    from distributed import LocalCluster

    root, paths = recordings
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tcp://")
        res = validate_archive([str(p) for p in paths], scheduler=address, mode="fast-replay",
                               model="lenet5-sim", n_boot=200)
    assert res["failed"] == 0 and res["cluster"]["address"] == address
    for row, p in zip(res["recordings"], paths, strict=True):
        n = read_recording(p)["n"]
        assert row["compared"] == n and row["identical_decisions"] == n  # same model, same run
    ref = validate_archive([str(p) for p in paths], scheduler=None, n_workers=1, n_boot=200)
    np.testing.assert_array_equal(res["pooled"]["classification"]["confusion_matrix"],
                                  ref["pooled"]["classification"]["confusion_matrix"])


def test_cli_validate_and_fast_replay_many(recordings, tmp_path):
    import json

    from typer.testing import CliRunner

    from leukoflow.cli import app

    root, paths = recordings
    runner = CliRunner()
    r = runner.invoke(app, ["replay", "--fast", str(root / "rec*.rtdc"), "--model",
                            "lenet5-sim", "--json", "--html", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["mode"] == "fast-replay" and res["failed"] == 0
    assert [row["identical_decisions"] == row["compared"] for row in res["recordings"]] == \
        [True] * len(paths)
    assert (tmp_path / "rep" / "index.html").is_file()
    r = runner.invoke(app, ["validate", str(paths[0]), str(tmp_path / "missing.rtdc")])
    assert r.exit_code == 2 and "not found" in r.output
    r = runner.invoke(app, ["replay", str(paths[0]), str(paths[1])])
    assert r.exit_code == 2 and "--fast" in r.output
