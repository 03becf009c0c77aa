"""Datasets cut by the live acquisition path (``leukoflow.acquisition.pipeline_dataset``) and the
``simflow`` spec of ``leukoflow.models.data`` that the shipped simulated-instrument models train
on."""

from __future__ import annotations

import numpy as np
import pytest

from leukoflow.acquisition.pipeline_dataset import _quota, make_flow_sample, make_pipeline_dataset
from leukoflow.core.vocabulary import CLASS_NAMES
from leukoflow.models.data import load_splits


def test_quota_splits_exactly():
    for n in (0, 1, 7, 100):
        for parts in (1, 3, 8):
            assert sum(_quota(n, parts, p) for p in range(parts)) == n


@pytest.fixture(scope="module")
def small():
    return make_pipeline_dataset(3, 1, seed=5, parts=2, ood_kinds=["erythrocyte", "digit"],
                                 pipeline={"gates.max_amp_std": 1e9})


def test_pipeline_dataset_labels_come_from_traced_truth(small):
    d = small
    counts = d["meta"]["counts"]
    assert all(counts[c] == 3 for c in CLASS_NAMES), counts
    assert counts["erythrocyte"] == 1 and counts["digit"] == 1
    assert d["x"].shape == (14, 64, 64) and d["x"].dtype == np.float32
    assert np.isfinite(d["x"]).all()
    label_of = {c: i for i, c in enumerate(CLASS_NAMES)}
    assert [label_of.get(k, -1) for k in d["kind"]] == d["y"].tolist()
    # crops are the pipeline's: centred cell, phase isolated (0 rad far from the cell)
    for x in d["x"]:
        assert x[28:36, 28:36].mean() > 0.3  # the cell is at the centre
        assert (x[:2] == 0).all() and (x[-2:] == 0).all()
    assert d["meta"]["through_pipeline"] and d["meta"]["frames"] > 0
    assert set(d["features"]) >= {"area_um", "qpi_dm", "diameter_um", "defocus_um"}
    assert np.isfinite(d["features"]["diameter_um"]).all()


def test_pipeline_dataset_same_for_any_worker_count(small):
    again = make_pipeline_dataset(3, 1, seed=5, parts=2, ood_kinds=["erythrocyte", "digit"],
                                  pipeline={"gates.max_amp_std": 1e9}, workers=2)
    np.testing.assert_array_equal(again["x"], small["x"])
    assert again["kind"] == small["kind"]


def test_pipeline_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match=">= 0"):
        make_pipeline_dataset(-1)
    with pytest.raises(ValueError, match="unknown class"):
        make_pipeline_dataset(1, classes=["basophil"])
    with pytest.raises(ValueError, match="unknown OOD kind"):
        make_pipeline_dataset(0, 1, ood_kinds=["unicorn"])
    with pytest.raises(ValueError, match="crop size"):
        make_pipeline_dataset(1, crop=48, parts=1)


def test_flow_sample_is_the_natural_mix_with_truth():
    d = make_flow_sample(12, seed=3, parts=2)
    assert len(d["kind"]) == 12 and d["x"].shape == (12, 64, 64)
    assert d["meta"]["untraced"] == 0
    # default blood mix: neutrophils dominate and some OOD objects may appear
    assert sum(k == "neutrophil" for k in d["kind"]) >= 3


def test_simflow_spec_loads_splits(tmp_path, monkeypatch):

    monkeypatch.setenv("LEUKOFLOW_SIM_CACHE", str(tmp_path))
    sp = load_splits("simflow:8:1")
    assert len(sp.train) + len(sp.val) == 32 and len(sp.test) == 4 * round(0.4 * 8)
    assert sp.ood is not None and len(sp.ood) == 7  # gates opened: every kind reaches it
    assert sp.unit == "rad" and sp.source["through_pipeline"] is True
    assert len(list(tmp_path.glob("sim-*.npz"))) == 2  # cached
    again = load_splits("simflow:8:1")  # from the cache: identical arrays
    np.testing.assert_array_equal(again.train.x, sp.train.x)
    bigger = load_splits("simflow:8:1:5")  # test cells per class given explicitly
    assert len(bigger.test) == 4 * 5 and bigger.source["test_fraction"] == 5 / 8
    np.testing.assert_array_equal(bigger.train.x, sp.train.x)  # train part unchanged


@pytest.mark.parametrize("spec", ["simflow:8:1:0", "simflow:x", "simflow:1:2:3:4", "sim:0"])
def test_bad_sim_specs_are_refused(spec):

    with pytest.raises(ValueError):
        load_splits(spec)
