"""Meta-explanations: aggregation, SpRAy clustering, TCAV plumbing, run-folder CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from leukoflow.benchmarks.workload_explain import toy_crops
from leukoflow.explain.artifacts import write_cell_artifact
from leukoflow.explain.methods.base import Explanation
from leukoflow.explain.model import ModelBundle
from leukoflow.research.meta import (
    MapSet,
    MetaConfig,
    aggregate,
    centre_on_phase,
    compute_maps,
    load_run,
    run_meta,
)
from leukoflow.research.spray import eigengap_k, spray
from leukoflow.research.tcav import concepts_from_truth, run_tcav


def _blob_maps(n: int, centre: tuple[int, int], rng) -> np.ndarray:
    yy, xx = np.mgrid[:32, :32]
    base = np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / 20.0)
    return base[None] + 0.05 * rng.random((n, 32, 32))


def test_spray_finds_planted_clusters():
    rng = np.random.default_rng(0)
    maps = np.concatenate([_blob_maps(20, (8, 8), rng), _blob_maps(20, (24, 24), rng),
                           _blob_maps(20, (8, 24), rng)])
    r = spray(maps, k_nn=5, pool=2)
    assert r.n_clusters == 3
    for blk in range(3):
        assert len(set(r.labels[blk * 20:(blk + 1) * 20])) == 1
    assert len(set(r.labels)) == 3 and r.embedding.shape == (60, 2)
    assert eigengap_k(np.array([0, 0, 0.01, 0.9, 0.95]), 2, 4) == 3


def test_centring_and_aggregation():
    phase = np.zeros((2, 16, 16))
    phase[0, 2:5, 2:5] = 1.0
    phase[1, 10:13, 10:13] = 1.0
    maps = phase.copy()
    c = centre_on_phase(maps, phase)
    assert np.allclose(c[0], c[1])

    ms = MapSet(maps, phase, np.array([0, 0]), np.array([0.99, 0.6]), np.array([0, 1]),
                [1, 2], "lime", ("a", "b"))
    groups = aggregate(ms)
    assert {(g["conf_bin"][0], g["correct"]) for g in groups} == {(0.95, True), (0.5, False)}
    assert all(g["n"] == 1 for g in groups)


def test_concepts_from_truth_selects_by_property():
    rng = np.random.default_rng(0)
    x = np.arange(40, dtype=np.float32)[:, None, None] * np.ones((1, 4, 4), np.float32)
    truth = {"diameter_um": np.arange(40.0), "lobes": np.r_[np.zeros(20), np.full(20, 4)],
             "granules": np.zeros(40)}
    c = concepts_from_truth(x, truth, 8, rng)
    assert (c["large_size"][:, 0, 0] >= 29).all() and (c["lobed_nucleus"][:, 0, 0] >= 20).all()
    assert "granular_interior" in c and len(c["large_size"]) == 8


def test_tcav_runs_with_ten_random_concepts():
    from leukoflow.models.architectures import LeNet5

    torch.manual_seed(0)
    bundle = ModelBundle.from_module(LeNet5(), mean=0.5, std=0.5, name="tcav-test")
    x, y = toy_crops(12, seed=3)
    concepts = {"large_size": x[y == 0], "granular_interior": x[y == 1]}
    res = run_tcav(bundle, {0: x[y == 0][:6]}, concepts, x, n_random=10, random_size=8)
    assert res["n_random"] == 10 and res["layer"].endswith("trunk.3")
    for s in res["results"]["neutrophil"].values():
        assert 0.0 <= s["score_mean"] <= 1.0 and 0.0 <= s["p_value"] <= 1.0


def test_meta_on_dataset_and_run_folder_cli(tmp_path):
    from leukoflow.models.architectures import LeNet5

    torch.manual_seed(0)
    bundle = ModelBundle.from_module(LeNet5(), mean=0.5, std=0.5)
    x, y = toy_crops(5, seed=4)
    cfg = MetaConfig(method="gradcam", location_cells=0, tcav=False, spray_knn=4)
    ms = compute_maps(bundle, x, y, cfg)
    s = run_meta(ms, tmp_path / "ds", cfg, source="toy")
    assert s["n_maps"] == 20 and (tmp_path / "ds" / "class_confidence.png").exists()
    with np.load(tmp_path / "ds" / "meta_maps.npz", allow_pickle=False) as z:
        assert len(z.files) == 2 * len(s["groups"])
    # a run folder written by the service's artifact writer, analysed by the CLI
    run = tmp_path / "run"
    for i in range(10):
        e = Explanation("lime", ms.maps[i], int(ms.pred[i]), {"n_samples": 1})
        write_cell_artifact(run / "explanations", i, x[i], [e],
                            {"decision": "uncertain", "pred": int(ms.pred[i]),
                             "conf": float(ms.conf[i]), "ood_score": 0.0, "label": int(y[i]),
                             "classes": list(bundle.class_names)}, png=False)
    assert len(load_run(run).maps) == 10
    r = subprocess.run([sys.executable, "-m", "leukoflow.cli", "explain", "meta", str(run),
                        "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["n_maps"] == 10 and (run / "meta" / "meta.json").exists()
    bad = subprocess.run([sys.executable, "-m", "leukoflow.cli", "explain", "meta",
                          str(tmp_path / "missing.rtdc")], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "not found" in bad.stderr


@pytest.mark.parametrize("args", [["explain", "--help"], ["explain", "meta", "--help"],
                                  ["audit", "--help"]])
def test_cli_help(args):
    r = subprocess.run([sys.executable, "-m", "leukoflow.cli", *args], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "Usage" in r.stdout


def test_meta_runs_tcav_with_simulator_concepts(tmp_path):
    """Dataset mode with ``sim_concepts``: TCAV table in meta.json and tcav.md (plumbing)."""
    from leukoflow.models.architectures import LeNet5

    torch.manual_seed(0)
    bundle = ModelBundle.from_module(LeNet5(), mean=0.5, std=0.5, name="meta-tcav")
    x, y = toy_crops(4, seed=5)
    cfg = MetaConfig(method="gradcam", location_cells=0, spray_knn=4, tcav_concept_size=8,
                     tcav_inputs=4, tcav_random=3)
    ms = compute_maps(bundle, x, y, cfg)
    s = run_meta(ms, tmp_path / "m", cfg, bundle=bundle, x=x, y=y, sim_concepts=True)
    t = s["tcav"]
    assert t["n_random"] == 3 and t["n_control"] == 10 and t["layers"][0].endswith("trunk.3")
    assert set(t["results"]["neutrophil"]) == {"large_size", "lobed_nucleus",
                                               "granular_interior", "random_control"}
    md = (tmp_path / "m" / "tcav.md").read_text()
    assert "| lobed_nucleus |" in md and "net.head.1" in md
