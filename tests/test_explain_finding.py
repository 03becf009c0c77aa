"""Seed-paper finding on simulated cells (explain.finding): regions, ablations, direction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leukoflow.acquisition.sim import make_crop_dataset
from leukoflow.models.artifact import ArtifactError
from leukoflow.research.finding import (
    FindingConfig,
    PairContrast,
    ablate_interior_blur,
    ablate_interior_mean,
    ablate_interior_radial,
    ablation_study,
    bootstrap_ci,
    bootstrap_diff_ci,
    cell_regions,
    interior_enrichment,
    rescale_cell,
    verdict,
)


def _cell(r: float = 12.0, granules: bool = True) -> np.ndarray:
    """A dome of radius r px (2 rad peak) with a few bright granules [rad]."""
    yy, xx = np.mgrid[:64, :64]
    d2 = ((yy - 31.5) ** 2 + (xx - 31.5) ** 2) / r**2
    x = 2.0 * np.sqrt(np.clip(1 - d2, 0, None))
    if granules:
        for cy, cx in [(28, 30), (35, 36), (30, 38), (36, 27)]:
            x += 0.4 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 2.0) * (d2 < 1)
    return x.astype(np.float32)


def test_regions_follow_the_outline_and_rim_width():
    x = _cell(12.0)
    m, inner, rim = cell_regions(x, pixel_um=0.5, rim_um=1.5)  # 3 px
    area = m.sum()
    assert abs(area - np.pi * 12**2) / (np.pi * 12**2) < 0.12
    assert not (inner & rim).any() and (inner | rim).sum() > area
    assert inner.sum() == pytest.approx(np.pi * 9**2, rel=0.2)
    with pytest.raises(ValueError, match="no cell"):
        cell_regions(np.zeros((32, 32)))


def test_interior_ablations_keep_outside_and_dry_mass():
    x = _cell()
    m, inner, _ = cell_regions(x)
    for a in (ablate_interior_mean(x, inner), ablate_interior_radial(x, m, inner),
              ablate_interior_blur(x, inner, 3.0)):
        assert np.array_equal(a[~inner], x[~inner])
        assert a[inner].sum() == pytest.approx(float(x[inner].sum()), rel=1e-5)
        assert not np.allclose(a, x)
    flat = ablate_interior_mean(x, inner)
    assert np.ptp(flat[inner]) < 1e-5
    # the radial ablation removes the granules: a granule-free dome is almost unchanged
    plain = _cell(granules=False)
    rad = ablate_interior_radial(plain, *cell_regions(plain)[:2])
    assert np.abs(rad - plain).max() < 0.1
    assert np.abs(ablate_interior_radial(x, m, inner) - x).max() > 0.2


def test_rescale_changes_area_not_height():
    x = _cell(granules=False)
    m = cell_regions(x)[0]
    for f in (0.8, 1.25):
        y = rescale_cell(x, m, f)
        m2 = cell_regions(y)[0]
        assert m2.sum() / m.sum() == pytest.approx(f**2, rel=0.08)
        assert y.max() == pytest.approx(x.max(), abs=0.05)
    with pytest.raises(ValueError):
        rescale_cell(x, m, 0.0)


def test_pair_contrast_and_bootstrap():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    pc = PairContrast(net, [(2, 1), (0, 3)])
    x = torch.randn(5, 1, 4, 4)
    z = net(x)
    assert torch.allclose(pc(x), torch.stack([z[:, 2] - z[:, 1], z[:, 0] - z[:, 3]], 1))
    v = np.r_[np.zeros(50), np.ones(50)]
    m, lo, hi = bootstrap_ci(v, 500)
    assert m == 0.5 and lo < 0.5 < hi and hi - lo < 0.3
    d, lo, hi = bootstrap_diff_ci(np.ones(30), v, 500)
    assert d == 0.5 and 0.3 < lo < 0.5 < hi


def test_interior_enrichment_of_planted_maps():
    x = np.stack([_cell()] * 2)
    m, inner, rim = cell_regions(x[0])
    maps = np.stack([inner.astype(float), rim.astype(float)])
    e = interior_enrichment(maps, x, FindingConfig())
    assert e[0] > 1.0 > e[1]
    assert e[1] == 0.0


def test_seed_paper_direction_on_shipped_model():
    """Direction of the finding on a small simulated test set with the shipped model.

    n = 80 cells per class (seed 1000), interior-mean and matched-size ablations only;
    about 10 s on one core. Flip-rate differences (mono/eos - neu/lym) measured:

    * lenet5-sim trained on simulator crops (weights ea7abe19, 2026-11-26 16:33): full run
      (300 per class, docs/finding-sim.md "previous model") +0.30 [0.25, 0.34] interior_mean,
      -0.62 [-0.66, -0.57] size_matched; n = 40, seeds 1000-1002: +0.25..+0.30 and
      -0.65..-0.75;
    * lenet5-sim retrained on pipeline crops (2026-11-26 19:01): n = 80, seeds 1000-1002:
      +0.16..+0.21 and -0.35..-0.41 (full run: docs/finding-sim.md).

    The margins (+0.05 and -0.15) assert the direction with room for another retraining;
    they do not pin the current weights' numbers.
    """
    from leukoflow.explain.model import ModelBundle

    try:
        bundle = ModelBundle.from_artifact("lenet5-sim")
    except ArtifactError as exc:  # pragma: no cover - artifact missing
        pytest.skip(f"lenet5-sim artifact not available: {exc}")
    torch.set_num_threads(1)
    d = make_crop_dataset(80, 0, 1000)
    cfg = FindingConfig(pixel_um=float(d["meta"]["pixel_um"]), n_boot=300)
    r = ablation_study(bundle, d["x"], d["y"], ablations=("interior_mean", "size_matched"),
                       cfg=cfg)
    pairs = r["pairs"]
    assert set(pairs) == {"monocyte_vs_eosinophil", "neutrophil_vs_lymphocyte"}
    assert all(p["n_correct"] >= 0.8 * p["n_cells"] for p in pairs.values())
    c = r["contrasts"]
    assert c["interior_mean"]["flip_rate_diff"]["value"] > 0.05
    assert c["size_matched"]["flip_rate_diff"]["value"] < -0.15
    mono, neu = pairs["monocyte_vs_eosinophil"], pairs["neutrophil_vs_lymphocyte"]
    assert (neu["size_matched"]["delta_logodds"]["value"]
            < mono["size_matched"]["delta_logodds"]["value"])
    v = verdict({"ablations": r})
    assert set(v) >= {"interior_ablation_hurts_mono_eos_more",
                      "size_perturbation_hurts_neu_lym_more", "reproduced"}


def test_finding_cli_writes_report(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "f"
    r = subprocess.run([sys.executable, "-m", "leukoflow.cli", "explain", "finding",
                        "--n-per-class", "12", "--attribution-cells", "4", "--methods",
                        "guided_backprop", "--no-tcav", "--n-boot", "50", "--out", str(out)],
                       capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "finding.json").read_text())
    assert doc["schema"] == "leukoflow-finding/1" and "verdict" in doc
    assert set(doc["ablations"]["contrasts"]) >= {"interior_mean", "size_matched"}
    assert "guided_backprop" in doc["attribution"]["ratio"]
    assert "| interior_mean |" in (out / "finding.md").read_text()
    bad = subprocess.run([sys.executable, "-m", "leukoflow.cli", "explain", "finding",
                          "--model", str(tmp_path / "nope"), "--no-tcav", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "leukoflow explain finding" in bad.stderr


def test_blank_crops_are_counted_not_ablated():
    from leukoflow.explain.model import ModelBundle
    from leukoflow.models.architectures import LeNet5

    torch.manual_seed(0)
    bundle = ModelBundle.from_module(LeNet5(), mean=0.5, std=0.5)
    x = np.stack([_cell(12), _cell(9), np.zeros((64, 64), np.float32), _cell(10),
                  _cell(14), _cell(8)])
    y = np.array([0, 3, 0, 3, 2, 1])
    r = ablation_study(bundle, x, y, ablations=("interior_mean", "size"),
                       cfg=FindingConfig(n_boot=50))
    nl = r["pairs"]["neutrophil_vs_lymphocyte"]
    assert nl["n_cells"] == 4 and nl["n_no_cell"] == 1 and nl["n_correct"] <= 3
    assert 0.0 <= nl["size"]["flip_rate"]["value"] <= 1.0
