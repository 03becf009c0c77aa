"""Simulated instrument: crop datasets, ``leukoflow simulate`` CLI, .rtdc output, determinism.

Runs the real CLI in subprocesses and reads the files back with h5py, dclab and
leukoflow.core.rtdc.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from leukoflow.acquisition.sim import SimConfig, make_crop_dataset
from leukoflow.core.rtdc import read_crop_dataset
from leukoflow.core.vocabulary import CLASS_NAMES, OOD_KINDS

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leukoflow", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _events(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as h5:
        out = {k: h5["events"][k][:] for k in h5["events"]}
        for k in h5.get("tables", {}):
            out["table:" + k] = h5["tables"][k][:]
        out["attrs"] = {k: v for k, v in h5.attrs.items()
                        if not k.startswith("experiment:date")
                        and not k.startswith("experiment:time")}
    return out


@pytest.fixture(scope="module")
def small() -> dict:
    return make_crop_dataset(40, 4, seed=7)


# ----------------------------------------------------------------------- crop datasets

def test_crop_dataset_format_and_labels(small):
    n = 4 * 40 + 4 * len(OOD_KINDS)
    assert small["x"].shape == (n, 64, 64) and small["x"].dtype == np.float32
    assert small["y"].dtype == np.int64 and len(small["kind"]) == n
    for k, y in zip(small["kind"], small["y"], strict=True):
        assert y == (CLASS_NAMES.index(k) if k in CLASS_NAMES else -1)
    assert {k: small["kind"].count(k) for k in CLASS_NAMES} == dict.fromkeys(CLASS_NAMES, 40)
    for name in ("area_um", "deform", "qpi_dm", "qpi_pha_int", "diameter_um", "pha_mean"):
        f = small["features"][name]
        assert f.shape == (n,) and np.isfinite(f).all()
    assert small["meta"]["through_hologram"] is True
    assert small["meta"]["sim"]["optics"]["wavelength_um"] == pytest.approx(0.53)


def test_crops_are_centred_on_the_phase_centroid(small):
    lab = small["y"] >= 0
    for img in small["x"][lab]:
        w = np.clip(img, 0, None)
        w = np.where(w > 0.25, w, 0)
        cy = (w.sum(1) @ np.arange(64)) / w.sum()
        cx = (w.sum(0) @ np.arange(64)) / w.sum()
        assert abs(cy - 32) < 0.9 and abs(cx - 32) < 0.9


def test_crop_noise_and_band_limit_match_hologram_path(small):
    clean = make_crop_dataset(40, 4, seed=7, through_hologram=False)
    assert np.array_equal(clean["y"], small["y"])
    err = small["x"] - clean["x"]
    inside = clean["x"] > 0.3
    # camera noise after demodulation: small but present, similar inside and outside cells
    rms_in = float(np.sqrt(np.mean(err[inside] ** 2)))
    rms_out = float(np.sqrt(np.mean(err[~inside] ** 2)))
    assert 0.003 < rms_in < 0.05 and 0.003 < rms_out < 0.05
    assert 0.5 < rms_in / rms_out < 2.0


def test_classes_overlap_on_simple_features():
    """Area and mean phase alone must not separate the classes (a CNN needs the interior)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    d = make_crop_dataset(120, 0, seed=3)
    x = np.stack([d["features"]["area_um"], d["features"]["pha_mean"]], axis=1)
    acc = cross_val_score(make_pipeline(StandardScaler(), LogisticRegression()), x, d["y"],
                          cv=4).mean()
    assert 0.5 < acc < 0.92, acc


def test_crop_dataset_deterministic_and_seed_dependent(small):
    again = make_crop_dataset(40, 4, seed=7)
    assert again["x"].tobytes() == small["x"].tobytes()
    assert again["kind"] == small["kind"]
    other = make_crop_dataset(40, 4, seed=8)
    assert other["x"].tobytes() != small["x"].tobytes()


def test_crop_dataset_independent_of_batch_and_workers():
    ref = make_crop_dataset(6, 0, seed=9, batch=64)
    par = make_crop_dataset(6, 0, seed=9, batch=4, workers=2)  # spawned processes
    assert par["x"].tobytes() == ref["x"].tobytes()
    assert par["kind"] == ref["kind"]
    assert np.array_equal(par["features"]["area_um"], ref["features"]["area_um"])


def test_crop_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError):
        make_crop_dataset(-1)
    with pytest.raises(ValueError):
        make_crop_dataset(1, crop=63)
    with pytest.raises(ValueError):
        make_crop_dataset(1, classes=["basophil"])


# ------------------------------------------------------------------------- CLI + .rtdc

@pytest.fixture(scope="module")
def run_files(tmp_path_factory) -> tuple[Path, Path, Path, dict]:
    d = tmp_path_factory.mktemp("simrun")
    a, b, c = d / "a.rtdc", d / "b.rtdc", d / "c.rtdc"
    res = _cli("simulate", "run", str(a), "--frames", "24", "--seed", "3", "--concentration",
               "2.5", "--ood", "doublet=0.1", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    for p, seed in ((b, "3"), (c, "4")):
        r = _cli("simulate", "run", str(p), "--frames", "24", "--seed", seed,
                 "--concentration", "2.5", "--ood", "doublet=0.1")
        assert r.returncode == 0, r.stderr
    return a, b, c, summary


def test_cli_run_writes_dclab_readable_raw_run(run_files):
    import dclab

    a, _, _, summary = run_files
    assert summary["frames"] == 24 and summary["shape"] == [320, 1024]
    assert summary["truth_rows"] > 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with dclab.new_dataset(a) as ds:
            assert len(ds) == 24
            for feat in ("qpi_oah", "qpi_oah_bg", "frame", "time"):
                assert feat in ds.features_innate, feat
            assert ds["qpi_oah"][0].shape == (320, 1024)
            assert ds["qpi_oah"][0].dtype == np.uint8
            assert np.array_equal(ds["qpi_oah_bg"][0], ds["qpi_oah_bg"][23])
            assert ds.config["qpi"]["wavelength"] == pytest.approx(530.0)
            assert ds.config["qpi"]["medium index"] == pytest.approx(1.335)
            assert ds.config["imaging"]["pixel size"] == pytest.approx(0.34)
            assert ds.config["qpi"]["pixel size raw"] == pytest.approx(0.085)
            assert ds.config["imaging"]["frame rate"] == pytest.approx(500.0)
            assert np.allclose(ds["time"], np.arange(24) / 500.0)
            tab = ds.tables["sim_truth"]
            for col in ("frame", "cell_id", "kind", "label", "x", "y", "diameter_um",
                        "fully_inside"):
                assert col in tab.keys(), col
            frames = np.asarray(tab["frame"])
            assert frames.min() >= 0 and frames.max() <= 23
            assert set(np.asarray(tab["label"]).tolist()) <= {-1, 0, 1, 2, 3}
    assert not [w for w in caught if "Unknown" in type(w.message).__name__]
    with h5py.File(a, "r") as h5:
        params = json.loads(h5["logs"]["leukoflow-params"][0])
        assert params["config"]["seed"] == 3
        assert params["config"]["concentration"] == pytest.approx(2.5)
        assert params["config"]["ood_fractions"]["doublet"] == pytest.approx(0.1)
        assert params["config"]["optics"]["carrier"] == [-0.25, 0.25]


def test_cli_run_same_seed_same_bytes(run_files):
    a, b, c, _ = run_files
    ea, eb, ec = _events(a), _events(b), _events(c)
    assert set(ea) == set(eb)
    for k in ea:
        if k == "attrs":
            assert {x: str(v) for x, v in ea[k].items()} == {x: str(v) for x, v in eb[k].items()}
        else:
            assert ea[k].tobytes() == eb[k].tobytes(), k
    assert ea["qpi_oah"].tobytes() != ec["qpi_oah"].tobytes()


def test_cli_crops_writes_dataset_readable_by_dclab_and_leukoflow(tmp_path):
    import dclab


    out = tmp_path / "crops.rtdc"
    res = _cli("simulate", "crops", str(out), "--per-class", "6", "--ood-per-kind", "2",
               "--seed", "5", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["crops"] == 4 * 6 + 2 * len(OOD_KINDS)
    with dclab.new_dataset(out) as ds:
        for feat in ("qpi_pha", "userdef0", "userdef1", "area_um", "qpi_dm", "qpi_pha_int"):
            assert feat in ds.features_innate, feat
        assert ds.config["qpi"]["wavelength"] == pytest.approx(530.0)
        assert ds.config["qpi"]["medium index"] == pytest.approx(1.335)
        assert ds.config["imaging"]["pixel size"] == pytest.approx(0.34)
        assert ds["qpi_pha"][0].shape == (64, 64)
    back = read_crop_dataset(out)
    ref = make_crop_dataset(6, 2, seed=5, cfg=SimConfig(seed=5))
    assert back["x"].tobytes() == ref["x"].tobytes()
    assert back["y"].tolist() == ref["y"].tolist()
    assert back["kind"] == ref["kind"]
    assert np.allclose(back["features"]["qpi_dm"], ref["features"]["qpi_dm"])
    with h5py.File(out, "r") as h5:
        tab = h5["tables"]["crop_features"][:]
        assert np.allclose(tab["diameter_um"], ref["features"]["diameter_um"])


def test_cli_rejects_bad_input(tmp_path):
    res = _cli("simulate", "run", str(tmp_path / "x.rtdc"), "--frames", "2", "--ood",
               "unicorn=0.5")
    assert res.returncode != 0
    assert "unknown OOD kinds" in (res.stderr + res.stdout)
    res = _cli("simulate", "run", str(tmp_path / "x.rtdc"), "--frames", "2", "--ood", "bad")
    assert res.returncode != 0 and "KIND=FRACTION" in (res.stderr + res.stdout)
    res = _cli("simulate", "crops", str(tmp_path / "y.rtdc"), "--per-class", "0")
    assert res.returncode != 0
