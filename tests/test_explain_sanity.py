"""Explanation sanity on simulated crops with a small trained LeNet5 (seeded, trained here).

* model-parameter randomisation (Adebayo et al. 2018): LIME maps of a randomised model
  differ from the trained model's;
* deletion: removing pixels in LIME order lowers the calibrated probability faster than a
  random order;
* the seed paper's finding (Röhrl et al. 2023): monocyte vs eosinophil decided by the cell
  interior, neutrophil vs lymphocyte by size (rim), via the relevance-location summary.

The model is trained in the fixture (fixed seed, 200 simulated cells per class, 15 epochs)
rather than taken from the shipped artifact so that the test does not change when the
artifact is retrained.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import sim_crops, train_small

from leukoflow.explain.lime_batched import LimeParams, explain_many
from leukoflow.explain.segmentation import SlicParams
from leukoflow.research.evaluation import deletion_vs_random, map_similarity, randomisation_check
from leukoflow.research.location import interior_and_rim, location_shares, pair_location_summary

LIME = LimeParams(n_samples=200, slic=SlicParams(n_segments=(25, 50)))


@pytest.fixture(scope="module")
def trained():
    x, y = sim_crops(200, seed=0)
    bundle = train_small(x, y, seed=0, epochs=15)
    xt, yt = sim_crops(20, seed=12)
    return bundle, xt, yt


def _lime_maps(bundle, crops, targets):
    return [r.map for r in explain_many(bundle.module, crops, targets, LIME)]


def test_trained_model_is_better_than_chance(trained):
    bundle, xt, yt = trained
    acc = (bundle.predict_proba(xt).argmax(1) == yt).mean()
    assert acc > 0.55


def test_randomised_model_gives_different_lime_maps(trained):
    bundle, xt, _ = trained
    crops = xt[:8]
    targets = [int(t) for t in bundle.predict_proba(crops).argmax(1)]
    sim = randomisation_check(_lime_maps, bundle, crops, targets, seed=1)
    assert sim["spearman"] < 0.5, sim
    # identical model: similarity 1 (the bound is meaningful)
    same = _lime_maps(bundle, crops[:2], targets[:2])
    assert map_similarity(same[0], same[0])["spearman"] == pytest.approx(1.0)


def test_lime_deletion_beats_random_order(trained):
    bundle, xt, _ = trained
    crops = xt[::3][:12]
    targets = [int(t) for t in bundle.predict_proba(crops).argmax(1)]
    res = explain_many(bundle.module, crops, targets, LIME)
    rng = np.random.default_rng(0)
    aucs = np.array([deletion_vs_random(bundle.module, x, r.map, r.mask, t, rng)
                     for x, r, t in zip(crops, res, targets, strict=True)])
    lime_auc, random_auc = aucs.mean(0)
    assert lime_auc < random_auc - 0.05, (lime_auc, random_auc)
    assert (aucs[:, 0] < aucs[:, 1]).mean() >= 0.75


def test_location_shares_on_known_maps():
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    inner, rim = interior_and_rim(mask, 2)
    assert not (inner & rim).any() and inner.sum() == 12 * 12
    edge = np.where(rim, 1.0, 0.0)
    assert location_shares(edge, mask, 2)["interior_share"] == 0.0
    flat = np.ones((32, 32))
    s = location_shares(flat, mask, 2)
    assert s["interior_enrichment"] == pytest.approx(1.0)


def test_seed_paper_finding_interior_vs_rim(trained):
    """Monocyte vs eosinophil relies on the interior more than neutrophil vs lymphocyte.

    Bound: the interior enrichment (interior share of |relevance| / interior share of the
    area) of monocyte-vs-eosinophil exceeds that of neutrophil-vs-lymphocyte by >= 0.05,
    and the latter is below 1 (relevance concentrated at the rim, i.e. size). 40 cells per
    pair, LIME with three segmentations (25, 50, 100 superpixels) x 150 samples; measured
    with this model and seed: 0.98 vs 0.86 (the spread between cells is ~0.3, so the
    bound is kept small; larger runs give 1.12-1.30 vs 0.79, see the report).
    """
    bundle, xt, yt = trained
    res = pair_location_summary(bundle, xt, yt, n_per_class=20, rim_px=3,
                                lime_params=LimeParams(n_samples=150))
    me = res["monocyte_vs_eosinophil"].interior_enrichment_mean
    nl = res["neutrophil_vs_lymphocyte"].interior_enrichment_mean
    assert me - nl >= 0.05, (me, nl)
    assert nl < 1.0, nl
