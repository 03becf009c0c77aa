"""One crop size: the optics define it, the acquisition cuts it, a mismatch with the model
stops ``leukoflow run`` before anything starts (the worker side is checked in
test_infer_service: the mismatch is named once in its log, its hello carries input_size)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from leukoflow.acquisition.crops import CropConfig
from leukoflow.acquisition.pipeline import PipelineConfig
from leukoflow.core.physics import (
    CROP_SIZE_PX,
    DEFAULT_OPTICS,
    CropSizeError,
    check_crop_size,
)
from leukoflow.models.artifact import read_card
from leukoflow.run.preflight import check_model_crop_size

ROOT = Path(__file__).resolve().parents[1]
ENV_CROP = "LEUKOFLOW_ACQUIRE_PIPELINE_CROP_SIZE"


def test_the_optics_crop_size_is_what_acquisition_and_shipped_model_use():
    assert CROP_SIZE_PX == DEFAULT_OPTICS.crop_size
    assert PipelineConfig().crop.size == CROP_SIZE_PX == CropConfig().size
    assert CropConfig().pixel_um == DEFAULT_OPTICS.pixel_um
    assert read_card("lenet5-sim")["input_size"] == CROP_SIZE_PX


def test_check_crop_size_names_both_sizes_and_the_fix():
    check_crop_size(64, 64)  # equal: nothing to say
    with pytest.raises(CropSizeError) as exc:
        check_crop_size(48, 64, "model 'm'")
    msg = str(exc.value)
    assert "48 px crops" in msg and "model 'm' takes 64 px" in msg and ENV_CROP in msg
    assert isinstance(exc.value, ValueError)


def test_preflight_resolves_like_the_services(monkeypatch):
    monkeypatch.delenv(ENV_CROP, raising=False)
    assert check_model_crop_size("sim", "lenet5-sim") == {
        "crop_size": CROP_SIZE_PX, "model": "lenet5-sim", "model_input_size": CROP_SIZE_PX}
    monkeypatch.setenv(ENV_CROP, "48")  # what the acquire child would resolve
    with pytest.raises(CropSizeError, match="48 px crops"):
        check_model_crop_size("sim", "lenet5-sim")
    assert check_model_crop_size("replay:x.rtdc", "lenet5-sim") == {}  # recorded crops


def test_leukoflow_run_refuses_to_start_on_a_crop_size_mismatch(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, ENV_CROP: "48"}
    res = subprocess.run(
        [sys.executable, "-c", "from leukoflow.cli import main; main()", "run", "--source",
         "sim", "--duration", "5", "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert res.returncode != 0
    assert "48 px crops" in res.stderr and "takes 64 px" in res.stderr
    assert not out.exists()  # refused before the run folder or any service
