"""ONNX export of the shipped artifacts: dynamic batch, agreement with PyTorch, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from leukoflow.models.artifact import load_artifact
from leukoflow.models.export import convert_onnx_fp16, export_onnx, onnx_session, verify_onnx


@pytest.mark.parametrize("name", ["lenet5-sim", "alexnet-sim", "lenet5-vi-sim"])
def test_onnx_matches_pytorch_on_1000_crops(name, tmp_path):
    art = load_artifact(name)
    model = art.build_model()
    path = export_onnx(model, tmp_path / f"{name}.onnx", art.input_size)
    rng = np.random.default_rng(0)
    crops = rng.normal(art.normalisation["mean"], 2 * art.normalisation["std"],
                       (1000, art.input_size, art.input_size)).astype(np.float32)
    x = art.preprocess(crops)
    res = verify_onnx(model, path, x, batch_sizes=(1, 7, 256, 1000))
    assert res["n"] == 1000 and set(res["per_batch_size"]) == {1, 7, 256, 1000}
    assert res["max_abs_logit_diff"] <= 1e-4
    assert res["max_abs_feature_diff"] <= 1e-4
    # the ONNX logits are the artifact's forward() logits (VI: the MC-averaged predictive)
    with torch.no_grad():
        ref = model(torch.from_numpy(x[:50])).numpy()
    got = onnx_session(path).run(["logits"], {"crops": x[:50]})[0]
    assert np.max(np.abs(got - ref)) <= 1e-4


def test_fp16_onnx_keeps_io_types(tmp_path):
    art = load_artifact("lenet5-sim")
    p32 = export_onnx(art.build_model(), tmp_path / "a.onnx", art.input_size)
    p16 = convert_onnx_fp16(p32, tmp_path / "a16.onnx")
    x = art.preprocess(np.random.default_rng(1).normal(0, 1, (64, 64, 64)))
    a = onnx_session(p32).run(["logits"], {"crops": x})[0]
    b = onnx_session(p16).run(["logits"], {"crops": x})[0]
    assert b.dtype == np.float32
    assert np.max(np.abs(a - b)) < 0.02 * max(1.0, float(np.abs(a).max()))
    assert (a.argmax(1) == b.argmax(1)).mean() > 0.95


def test_cli_export_and_tensorrt_error(tmp_path):
    out = tmp_path / "m.onnx"
    r = subprocess.run([sys.executable, "-c", "from leukoflow.cli import main; main()",
                        "export", "--model", "lenet5-sim", "--out", str(out), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert out.is_file() and res["verify"]["max_abs_logit_diff"] <= 1e-4
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        r = subprocess.run([sys.executable, "-c", "from leukoflow.cli import main; main()",
                            "export", "--model", "lenet5-sim", "--out", str(out), "--no-verify",
                            "--tensorrt"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 3
        assert "TensorRT is not installed" in r.stderr or "no CUDA device" in r.stderr
