"""Training: reproducibility, augmentation physics, class balance, CLI train/evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from leukoflow.core.rtdc import write_crop_dataset
from leukoflow.models.architectures import build_model
from leukoflow.models.data import Augment, load_splits, stratified_split
from leukoflow.models.train import TrainConfig, normalise, train_model

CLI = [sys.executable, "-c", "from leukoflow.cli import main; main()"]


def _blobs(n=96, size=32, seed=0):
    """Four classes of Gaussian blobs of different radius (rad), on a zero background."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    yy, xx = np.mgrid[:size, :size] - size / 2
    r = np.array([3.0, 5.0, 7.0, 9.0])[y]
    x = 2.0 * np.exp(-(yy**2 + xx**2)[None] / (2 * r[:, None, None] ** 2))
    x += rng.normal(0, 0.1, x.shape)
    return x.astype(np.float32), y


def _train(seed, epochs=2):
    x, y = _blobs()
    xn = normalise(x, 0.2, 0.5)
    torch.manual_seed(123)  # the caller's RNG state must not matter
    m = build_model("lenet5", in_size=32)
    cfg = TrainConfig(epochs=epochs, batch_size=32, seed=seed, patience=5, device="cpu")
    hist = train_model(m, xn[:64], y[:64], xn[64:], y[64:], cfg, progress=False)
    return m, hist


def test_same_seed_same_weights_different_seed_differs():
    m1, h1 = _train(0)
    torch.manual_seed(999)
    m2, h2 = _train(0)
    m3, _ = _train(1)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert h1["val_nll"] == h2["val_nll"]
    assert any(not torch.equal(a, b) for a, b in zip(m1.state_dict().values(),
                                                     m3.state_dict().values(), strict=True))


def test_training_learns_and_early_stopping_restores_best():
    m, hist = _train(0, epochs=12)
    assert hist["best_val_nll"] == min(hist["val_nll"])
    assert hist["val_acc"][hist["best_epoch"] - 1] >= 0.75
    assert not m.training


def test_augment_respects_physics():
    x = torch.from_numpy(_blobs(8)[0][:, None])
    g = torch.Generator().manual_seed(0)
    out = Augment(noise_rad=0.0, max_shift_px=2)(x, g)
    # rotations, flips and circular shifts only permute pixels: values and sums are kept
    for a, b in zip(x, out, strict=True):
        assert torch.equal(torch.sort(a.flatten()).values, torch.sort(b.flatten()).values)
    assert not torch.equal(out, x)
    noisy = Augment(rot90=False, flip=False, max_shift_px=0, noise_rad=0.05)(x, g, std=0.5)
    d = (noisy - x).flatten()
    assert abs(float(d.std()) - 0.1) < 0.01  # 0.05 rad / std 0.5 = 0.1 normalised units
    assert abs(float(d.mean())) < 0.01  # no offset or rescaling


def test_class_balance_weights_and_sampler():
    x, y = _blobs(120)
    keep = np.r_[np.flatnonzero(y != 3), np.flatnonzero(y == 3)[:5]]  # class 3 rare
    x, y = x[keep], y[keep]
    xn = normalise(x, 0.2, 0.5)
    for balance in ("weights", "sampler", "none"):
        m = build_model("lenet5", in_size=32)
        cfg = TrainConfig(epochs=1, batch_size=32, balance=balance, device="cpu")
        h = train_model(m, xn, y, xn, y, cfg, progress=False)
        assert np.isfinite(h["best_val_nll"])
    with pytest.raises(ValueError, match="every class"):
        train_model(build_model("lenet5", in_size=32), xn[y != 3], y[y != 3], xn, y,
                    TrainConfig(epochs=1), progress=False)


def test_stratified_split_is_seeded_and_disjoint():
    y = np.repeat(np.arange(4), 50)
    a = stratified_split(y, (0.7, 0.15, 0.15), 3)
    b = stratified_split(y, (0.7, 0.15, 0.15), 3)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    allidx = np.concatenate(a)
    assert len(allidx) == 200 and len(np.unique(allidx)) == 200
    assert np.bincount(y[a[0]]).tolist() == [35] * 4


def test_pbc_npz_layout(real_data):
    sp = load_splits(real_data / "pbc-4class-64" / "pbc64.npz")
    assert (len(sp.train), len(sp.val), len(sp.test), len(sp.ood)) == (2800, 600, 600, 800)
    assert sp.train.x.dtype == np.float32 and 0 <= sp.train.x.min() and sp.train.x.max() <= 1
    assert set(sp.ood.kind) == {"platelet", "erythroblast", "basophil", "ig"}
    assert sp.class_names == ("neutrophil", "eosinophil", "monocyte", "lymphocyte")


def test_cli_train_evaluate_calibrate_on_rtdc(tmp_path):
    """Real files and a real subprocess: write a labeled .rtdc, train, evaluate, calibrate."""

    x, y = _blobs(160, size=64)
    rng = np.random.default_rng(0)
    x_ood = rng.normal(0, 1.0, (24, 64, 64)).astype(np.float32)
    xs = np.concatenate([x, x_ood])
    ys = np.concatenate([y, -np.ones(24, np.int64)])
    kinds = [["neutrophil", "eosinophil", "monocyte", "lymphocyte"][i] for i in y] + ["noise"] * 24
    path = tmp_path / "ds.rtdc"
    write_crop_dataset(path, xs, ys, kinds)
    out = tmp_path / "art"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*CLI, "train", "--data", str(path), "--out", str(out), "--epochs", "3",
                        "--n-boot", "50", "--no-progress", "--knn-bank", "60", "--json"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    card = json.loads(r.stdout)
    assert card["training"]["command"].startswith("leukoflow train --data")
    assert (out / "weights.safetensors").is_file() and (out / "reliability.png").is_file()
    r = subprocess.run([*CLI, "evaluate", "--model", str(out), str(path), "--json",
                        "--n-boot", "50"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["n_test"] == 160 and len(rep["classification"]["confusion_matrix"]) == 4
    assert "noise" in rep["ood"]["detectors"]["knn"]["per_kind"]
    assert {"before_T", "after_T"} <= set(rep["calibration"])
    r = subprocess.run([*CLI, "calibrate", "--model", str(out), "--data", str(path),
                        "--n-boot", "50", "--out", str(tmp_path / "recal"), "--json"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    cal = json.loads(r.stdout)
    assert cal["after"]["nll"]["value"] <= cal["before"]["nll"]["value"] + 1e-9
    assert cal["ood"]["id_val_pass_rate"] >= 0.95
    r = subprocess.run([*CLI, "evaluate", "--model", str(tmp_path / "nope"), str(path)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "not found" in r.stderr
