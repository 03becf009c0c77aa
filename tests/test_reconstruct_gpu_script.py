"""The device-check script ``benchmarks/gpu_reconstruct.py``: its CPU path runs here in a
real subprocess (small frames); the CUDA path runs only where CUDA exists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_reconstruct.py"


def _run(*args: str) -> dict:
    res = subprocess.run([sys.executable, str(SCRIPT), *args, "--json"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_gpu_script_cpu_path():
    rep = _run("--device", "cpu", "--size", "64", "--batch", "3", "--iters", "1")
    assert rep["correct"] is True
    assert rep["frame_shape"] == [64, 64] and rep["output_shape"] == [16, 16]
    assert rep["max_phase_err_rad"] < 1e-3
    assert rep["frames_per_s"] > 0 and rep["frames_per_s_e2e"] > 0
    assert rep["params"]["backend"] == "torch" and rep["params"]["device"] == "cpu"


@pytest.mark.gpu
def test_gpu_script_cuda_path():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available (device check runs on a lent GPU)")
    rep = _run("--device", "cuda", "--iters", "5")
    assert rep["correct"] is True and rep["output_shape"] == [256, 256]
