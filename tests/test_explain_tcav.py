"""TCAV with simulator concepts (explain.tcav): concept rendering, CAV classifier, tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leukoflow.acquisition.sim import SimConfig, make_crop_dataset
from leukoflow.acquisition.sim.flow import render_context
from leukoflow.core.vocabulary import CLASS_NAMES
from leukoflow.models.artifact import ArtifactError
from leukoflow.research.tcav import (
    EXPECTED_CONCEPTS,
    _cav_classifier,
    _prediction_p,
    concept_model,
    default_layers,
    run_tcav,
    sim_concept_sets,
)


def _batches(x: np.ndarray, y: np.ndarray, bs: int = 16):
    return [(torch.as_tensor(x[i:i + bs]), torch.as_tensor(y[i:i + bs]))
            for i in range(0, len(x), bs)]


def test_cav_classifier_reports_real_accuracy_and_points_to_the_concept():
    rng = np.random.default_rng(0)
    d = 50
    x = np.concatenate([rng.normal(0, 1, (60, d)) + 4.0 * np.eye(d)[0],
                        rng.normal(0, 1, (60, d))]).astype(np.float32)
    y = np.r_[np.full(60, 3), np.full(60, 7)]
    perm = rng.permutation(120)
    clf = _cav_classifier(0)
    acc = float(clf.train_and_eval(_batches(x[perm], y[perm]))["accs"])
    assert acc > 0.8
    w = clf.weights()
    assert clf.classes() == [3, 7] and w.shape == (2, d)
    assert torch.allclose(w.norm(dim=1), torch.ones(2), atol=1e-5)
    assert w[0, 0] > 0.3 and w[1, 0] < -0.3  # row of concept 3 points along +e0
    # two samples of one distribution: chance accuracy (captum's default would report the
    # share of one class in the test split whatever the fit)
    x2 = rng.normal(0, 1, (120, d)).astype(np.float32)
    acc2 = float(_cav_classifier(1).train_and_eval(_batches(x2, y[perm]))["accs"])
    assert 0.25 < acc2 < 0.75


def test_prediction_test():
    null = np.array([0.4, 0.5, 0.6, 0.45, 0.55, 0.5, 0.52, 0.48, 0.47, 0.53])
    assert _prediction_p(0.5, null) > 0.9
    assert _prediction_p(0.9, null) < 0.001
    assert _prediction_p(0.1, null) < 0.001


def test_concept_models_impose_the_property():

    ctx = render_context(SimConfig(seed=0))
    rng = np.random.default_rng(0)
    for kind in CLASS_NAMES:
        big = concept_model(kind, "large_size").render(rng, ctx)
        assert 14.0 <= big.diameter_um <= 16.5
        lobed = concept_model(kind, "lobed_nucleus").render(rng, ctx)
        assert lobed.params["lobes"] in (3, 4, 5)
    # granular interior: lymphocytes (no granules of their own) gain fine structure
    from scipy import ndimage as ndi

    def hp(obj) -> float:
        ph = obj.phase
        return float(np.std((ph - ndi.gaussian_filter(ph, 1.5))[ph > 0.25]))

    lym = type(concept_model("lymphocyte", "granular_interior")).__mro__[1]
    plain = [hp(lym().render(np.random.default_rng(i), ctx)) for i in range(6)]
    gran = [hp(concept_model("lymphocyte", "granular_interior").render(
        np.random.default_rng(i), ctx)) for i in range(6)]
    assert np.mean(gran) > 1.5 * np.mean(plain)
    with pytest.raises(ValueError, match="unknown concept"):
        concept_model("monocyte", "striped")
    sets = sim_concept_sets(["lobed_nucleus"], 8, seed=0, crop=64)
    assert sets["lobed_nucleus"].shape == (8, 64, 64)
    assert set(EXPECTED_CONCEPTS) == {"large_size", "lobed_nucleus", "granular_interior"}


def test_tcav_granular_interior_for_eosinophils_on_shipped_model():
    """Small TCAV setup on the shipped model: one concept, one class, one layer.

    ``granular_interior`` (60 simulator cells of all four classes with the eosinophil's
    coarse granules added) vs 10 random sets of natural crops, 10 random control concepts,
    40 eosinophils scored at the first hidden fc ReLU (``net.head.1``), all from one
    simulated instrument. Granules are what the simulator gives eosinophils and nothing
    else, so the eosinophil logit should rise along this concept. The full run on the
    current model (docs/finding-sim.md: 100 crops per set, 100 cells per class, seeds 0-2)
    gave a positive derivative in 3/3 seeds, significant by the magnitude test in 2/3.
    Asserted: significant by the magnitude test with a positive derivative, and the random
    control concept not significant (a false positive has a 5 % chance per retrained model;
    the fixed seeds make the test deterministic for given weights; a retrained model may
    need the concept re-checked with the full run).
    """
    from leukoflow.explain.model import ModelBundle

    try:
        bundle = ModelBundle.from_artifact("lenet5-sim")
    except ArtifactError as exc:  # pragma: no cover - artifact missing
        pytest.skip(f"lenet5-sim artifact not available: {exc}")
    torch.set_num_threads(1)
    n = 60
    layer = default_layers(bundle.module)[-1]
    assert layer.endswith("head.1")
    inst = 7919  # one instrument (background, noise bank) for every set
    sets = sim_concept_sets(["granular_interior"], n, seed=inst)
    d = make_crop_dataset(-(-20 * n // 4) + 40, 0, inst)
    x, y = d["x"], np.asarray(d["y"])
    eos = np.flatnonzero(y == 1)[:40]
    rest = np.setdiff1d(np.arange(len(y)), eos)
    pool, ctrl, cells = x[rest[:10 * n]], x[rest[10 * n:20 * n]], x[eos]
    r = run_tcav(bundle, {1: cells}, sets, pool, n_random=10, random_size=n, layer=layer,
                 control=ctrl, n_control=10)
    assert r["n_random"] == 10 and r["n_control"] == 10
    s = r["results"]["eosinophil"]
    assert s["granular_interior"]["significant_magnitude"]
    assert s["granular_interior"]["magnitude"] > s["granular_interior"]["magnitude_null_mean"]
    assert s["granular_interior"]["score_mean"] > 0.8
    assert not s["random_control"]["significant_magnitude"]
    assert not s["random_control"]["significant"]
    assert r["cav_accuracy"][layer]["granular_interior"] > 0.6
    assert r["cav_accuracy"][layer]["random_control"] < 0.65
