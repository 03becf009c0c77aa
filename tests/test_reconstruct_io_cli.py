"""Hologram file loading and the ``leukoflow reconstruct`` command (real files, real
subprocesses for the command line round trip)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from leukoflow.acquisition.reconstruct import (
    HologramIOError,
    OffAxisConfig,
    Reconstructor,
    load_hologram,
)
from leukoflow.acquisition.reconstruct.synth import synthetic_hologram
from leukoflow.cli import app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def holo_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("holo")
    holo, bg, gt = synthetic_hologram((64, 128), n_frames=3, seed=4)
    import h5py
    import hdf5plugin
    import imageio.v3 as iio
    import tifffile

    np.save(d / "h.npy", holo[0])
    np.save(d / "bg.npy", bg)
    np.save(d / "stack.npy", holo)
    np.savez(d / "pair.npz", hologram=holo[0], background=bg)
    tifffile.imwrite(d / "stack.tif", holo)
    tifffile.imwrite(d / "bg.tif", bg)
    iio.imwrite(d / "h.png", holo[0])
    iio.imwrite(d / "h.bmp", holo[0])
    iio.imwrite(d / "rgb.png", np.stack([holo[0]] * 3, axis=-1))
    with h5py.File(d / "run.rtdc", "w") as h5:
        ev = h5.create_group("events")
        ev.create_dataset("qpi_oah", data=holo, **hdf5plugin.Zstd(clevel=5))
        ev.create_dataset("qpi_oah_bg", data=np.stack([bg] * 3), **hdf5plugin.Zstd(clevel=5))
    (d / "corrupt.npy").write_bytes(b"this is not a numpy file")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (d / "h.xyz").write_bytes(b"123")
    np.save(d / "complex.npy", holo[0].astype(np.complex64))
    np.save(d / "vector.npy", np.arange(10))
    np.save(d / "small.npy", bg[:32, :32])
    return d, holo, bg, gt


def test_load_every_format(holo_files):
    d, holo, bg, _ = holo_files
    np.testing.assert_array_equal(load_hologram(d / "h.npy"), holo[0])
    np.testing.assert_array_equal(load_hologram(d / "stack.npy"), holo)
    np.testing.assert_array_equal(load_hologram(d / "pair.npz"), holo[0])  # first array
    np.testing.assert_array_equal(load_hologram(d / "pair.npz", key="background"), bg)
    tif = load_hologram(d / "stack.tif")
    assert tif.shape == (3, 64, 128) and tif.dtype == np.uint8
    np.testing.assert_array_equal(tif, holo)
    for name in ("h.png", "h.bmp", "rgb.png"):
        np.testing.assert_array_equal(load_hologram(d / name), holo[0])
    np.testing.assert_array_equal(load_hologram(d / "run.rtdc"), holo)
    assert load_hologram(d / "run.rtdc", key="qpi_oah_bg").shape == (3, 64, 128)


def test_load_real_jpeg(real_data):
    img = load_hologram(real_data / "qpimage-examples" / "hologram_cell_curved_bg.jpg")
    assert img.shape == (600, 400) and img.dtype == np.uint8


@pytest.mark.parametrize("name, key, match", [
    ("missing.npy", None, "no such file"),
    ("corrupt.npy", None, "cannot read"),
    ("corrupt.png", None, "cannot read"),
    ("h.xyz", None, "unsupported file type"),
    ("pair.npz", "nope", "available: hologram, background"),
    ("run.rtdc", "image", "image features: qpi_oah"),
    ("complex.npy", None, "data type"),
    ("vector.npy", None, "2D image or a 3D stack"),
])
def test_load_errors_are_clear(holo_files, name, key, match):
    d = holo_files[0]
    with pytest.raises(HologramIOError, match=match):
        load_hologram(d / name, key=key)


def test_cli_round_trip_subprocess(holo_files, tmp_path):
    """Real process: npy hologram + npy background, --json, read the phase back."""
    d, holo, bg, _ = holo_files
    out = tmp_path / "phase.npy"
    res = subprocess.run(
        [sys.executable, "-m", "leukoflow", "reconstruct", str(d / "h.npy"),
         "--background", str(d / "bg.npy"), "--out", str(out), "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    phase = np.load(out)
    assert phase.dtype == np.float32 and phase.shape == (16, 32)
    expect = Reconstructor(OffAxisConfig(), background=bg).phase(holo[0])
    np.testing.assert_allclose(phase, expect, atol=1e-6)
    assert rep["params"]["sideband"] == pytest.approx([-0.25, 0.25], abs=0.005)
    assert rep["params"]["mode"] == "fast" and rep["params"]["output_shape"] == [16, 32]
    assert rep["phase"]["max"] == pytest.approx(float(phase.max()))
    assert rep["phase"]["unit"] == "rad"


@pytest.mark.parametrize("src, extra, shape", [
    ("pair.npz", ["--key", "hologram"], (16, 32)),
    ("h.png", [], (16, 32)),
    ("stack.tif", [], (3, 16, 32)),
    ("run.rtdc", [], (3, 16, 32)),
])
def test_cli_formats_and_stacks(holo_files, tmp_path, src, extra, shape):
    d, holo, bg, gt = holo_files
    out = tmp_path / "p.npy"
    args = ["reconstruct", str(d / src), "--out", str(out), "--json", *extra]
    if src != "run.rtdc":  # .rtdc brings its own qpi_oah_bg
        args += ["--background", str(d / "bg.tif")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    phase = np.load(out)
    assert phase.shape == shape
    assert rep["background"] is not None
    truth = gt[..., ::4, ::4] if len(shape) == 3 else gt[0, ::4, ::4]
    err = (phase - truth)[..., 3:-3, 3:-3]
    assert float(np.sqrt(np.mean(err**2))) < 0.1


def test_cli_compatible_mode_on_hl60(real_data, tmp_path):
    out = tmp_path / "hl60.npy"
    res = CliRunner().invoke(app, [
        "reconstruct", str(real_data / "qpretrieve-hl60-hologram" / "hologram_cell.npz"),
        "--key", "data", "--background",
        str(real_data / "qpretrieve-hl60-hologram" / "hologram_cell.npz"),
        "--bg-key", "bg_data", "--mode", "compatible", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["params"]["sideband"] == [-0.203125, -0.12109375]
    assert abs(rep["phase"]["mean"] - 1.0840395) < 1e-4
    assert np.load(out).shape == (200, 210)


@pytest.mark.parametrize("args, match", [
    (["missing.npy"], "no such file"),
    (["corrupt.npy"], "cannot read"),
    (["h.npy", "--mode", "turbo"], "mode"),
    (["h.npy", "--filter", "blob"], "unknown filter"),
    (["h.npy", "--sideband", "0.1"], "two numbers"),
    (["h.npy", "--background", "small.npy"], "does not match"),
])
def test_cli_errors_exit_2_with_message(holo_files, tmp_path, args, match):
    d = holo_files[0]
    argv = ["reconstruct", str(d / args[0]), *args[1:], "--out", str(tmp_path / "x.npy")]
    argv = [str(d / a) if a.endswith((".npy", ".tif")) and a != args[0] else a for a in argv]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2
    assert match in res.output
    assert not (tmp_path / "x.npy").exists()


def test_cli_rejects_non_npy_output(holo_files, tmp_path):
    res = CliRunner().invoke(app, ["reconstruct", str(holo_files[0] / "h.npy"),
                                   "--out", str(tmp_path / "x.txt")])
    assert res.exit_code == 2 and ".npy" in res.output
