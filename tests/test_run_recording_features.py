"""A live recording keeps every QPI feature under its dclab name and says how it was made (#13).

One real ``leukoflow run --record`` (acquisition on the simulated instrument with every
object 2 ± 0.3 µm out of focus and a non-default focus gate set by environment variable, an
inference worker with the shipped model, the collector and its recorder; real processes,
ZeroMQ and HDF5). dclab opens the recording and reads the QPI features; their values are
checked against the acquisition's own per-cell values (the pipeline re-run in process on the
same simulated frames with the configuration parsed back from the recording's pipeline
identifier, matched by cell id) and the focus distance against the simulator's ground truth.
The run folder and the recording carry the pipeline identifier and hash, and
``leukoflow info`` prints the configuration back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from helpers import run_port_args

from leukoflow.acquisition.pipeline import SECTION, PipelineConfig, parse_identity
from leukoflow.core.config import build, pipeline_hash, resolve
from leukoflow.core.identity import split_ids
from leukoflow.core.physics import PIXEL_UM, WAVELENGTH_UM, dry_mass_pg
from leukoflow.core.vocabulary import FEATURES

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from leukoflow.cli import main; main()"]
SOURCE = "sim:7:1.0:defocus2um"
DEFOCUS_UM = 2.0  # the profile's focus offset (acquisition/sim/profiles/defocus2um.toml)
#: a non-default pipeline parameter for the acquisition child (passes more defocused cells)
GATE_ENV = {"LEUKOFLOW_ACQUIRE_PIPELINE_GATES_MAX_AMP_STD": "0.2"}


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> dict:
    """A short live run with a recording: paths and the run's --json summary."""
    tmp = tmp_path_factory.mktemp("live")
    rec = tmp / "rec.rtdc"
    env = {**os.environ, "LEUKOFLOW_QC_FOLDER": str(tmp / "qc"), **GATE_ENV,
           # every frame taken (no real-time drops), so an in-process re-run sees the same
           "LEUKOFLOW_ACQUIRE_AS_FAST_AS_POSSIBLE": "1"}
    res = subprocess.run([*CLI, "run", "--json", "--no-explain", "--source", SOURCE,
                          "--cells", "60", "--out", str(tmp / "run"), "--record", str(rec),
                          *run_port_args()], capture_output=True, text=True, timeout=600,
                         cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return {"rec": rec, "run": tmp / "run", "summary": json.loads(res.stdout)}


def _acquisition_cells(config: Any, frames: int) -> dict[int, tuple]:
    """The acquisition's own cells (features, truth defocus, label) of the run, re-run in
    process: the same ``frames`` frames, then the open tracks flushed as at the stop."""
    from leukoflow.acquisition.pipeline import AcquisitionPipeline
    from leukoflow.acquisition.sources import create_source

    src = create_source(SOURCE, seed=0)  # as the acquisition service builds it
    src.open()
    pipe = AcquisitionPipeline(config)
    pipe.set_background(src.background)
    defocus: dict[int, float] = {}
    cells: dict[int, tuple] = {}
    last = 0
    for _ in range(frames):
        raw = src.read()
        last = raw.index
        for t in raw.truth:
            defocus[t.cell_id] = t.defocus_um
        for c in pipe.process(raw).cells:
            cells[c.cell_id] = (c.crop.features, defocus.get(c.truth_id, np.nan), c.label)
    for c in pipe.flush(last).cells:
        cells[c.cell_id] = (c.crop.features, defocus.get(c.truth_id, np.nan), c.label)
    src.close()
    return cells


def test_live_recording_has_the_qpi_features_with_the_acquisitions_values(live) -> None:
    import dclab

    s = live["summary"]
    assert s["accounting"]["balanced"] and s["recording"]["events"] >= 5
    with dclab.new_dataset(live["rec"]) as ds:
        pid, phash = ds.config["user"]["pipeline id"], ds.config["user"]["pipeline hash"]
        innate = set(ds.features_innate)
        for name in ("qpi_dm", "qpi_pha_int", "qpi_focus", "area_um", "pos_x", "pos_y",
                     "eccentr_prnc", "area_ratio", "qpi_pha"):
            assert name in innate, name
        assert not any(n.startswith("lf_") for n in innate)  # unregistered: dclab skips them
        extra = json.loads(ds.config["user"]["extra_features"])
        stored = {n: np.asarray(ds[n]) for n in innate if ds[n].ndim == 1}
    assert set(extra) == {f.stored for f in FEATURES if not f.dclab}
    for name, label in extra.items():  # the documented way to read the lf_* features
        dclab.register_temporary_feature(name, label=label)
    try:
        with dclab.new_dataset(live["rec"]) as ds:
            for name in extra:
                stored[name] = np.asarray(ds[name])
    finally:
        for name in extra:
            dclab.rtdc_dataset.feat_temp.deregister_temporary_feature(name)

    epochs, ids = split_ids(stored["userdef6"].astype(np.int64))  # run-unique id -> cell number
    assert len(set(epochs.tolist())) == 1  # one acquisition start
    # the configuration that ran, from the recording's identifier (not assumed here)
    ran = parse_identity(pid)
    assert phash == pipeline_hash(pid) and ran.config.gates.max_amp_std == 0.2
    acq = _acquisition_cells(ran.config, s["camera"]["frames_taken"])
    assert set(ids.tolist()) <= set(acq)
    for k, cid in enumerate(ids):
        feats, truth_defocus, label = acq[cid]
        for f in FEATURES:  # every table feature, under its recording name and unit
            want = f.to_stored(feats[f.name])
            assert stored[f.stored][k] == pytest.approx(want, rel=1e-9, abs=1e-12), \
                (cid, f.name, f.stored)
        assert stored["userdef0"][k] == label
        # ground truth: the object was simulated truth_defocus µm out of focus, so the field
        # must be propagated by -truth_defocus to bring it into focus
        assert stored["qpi_focus"][k] == pytest.approx(-truth_defocus, abs=0.45), cid
    # dclab's units: positions in µm inside the 1024 x 320 px camera ROI (0.085 µm/px)
    assert 0 <= stored["pos_x"].min() and stored["pos_x"].max() <= 1024 * 0.085
    assert 0 <= stored["pos_y"].min() and stored["pos_y"].max() <= 320 * 0.085
    assert np.median(stored["qpi_focus"]) == pytest.approx(-DEFOCUS_UM, abs=0.3)
    # dry mass from the integrated phase: m = λ/(2π·α)·Σφ·A_px at the nominal pixel
    np.testing.assert_allclose(stored["qpi_dm"],
                               dry_mass_pg(1.0, PIXEL_UM, WAVELENGTH_UM) * stored["qpi_pha_int"],
                               rtol=1e-9)


def _info(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "info", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def test_run_folder_and_recording_carry_the_pipeline_and_info_prints_it(live, tmp_path) -> None:
    from leukoflow.models.artifact import read_card

    expected = build(PipelineConfig, {"gates.max_amp_std": 0.2})  # what the child resolved
    params = json.loads((live["run"] / "run_params.json").read_text())
    pipe = params["pipeline"]
    ran = parse_identity(pipe["id"])
    assert ran.config == expected and ran.model == "lenet5-sim"
    assert ran.model_sha == read_card("lenet5-sim")["model_sha256"] == pipe["model_sha"]
    assert pipe["hash"] == pipeline_hash(pipe["id"]) and pipe["generation"] >= 1
    assert pipe["config"]["gates"]["max_amp_std"] == 0.2 and "numpy" in pipe["versions"]
    summary = json.loads((live["run"] / "summary.json").read_text())
    assert summary["params"]["pipeline"]["hash"] == pipe["hash"]
    assert live["summary"]["pipeline"]["hash"] == pipe["hash"]  # the --json output

    # leukoflow info on the recording: the same pipeline, verified, and its parameters
    res = _info(str(live["rec"]), "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["kind"] == "recording" and d["events"] == live["summary"]["recording"]["events"]
    assert d["pipeline"]["hash"] == pipe["hash"] and d["pipeline"]["hash_ok"] is True
    assert d["pipeline"]["model"] == "lenet5-sim" and not d["problems"]
    assert d["config"] == json.loads(json.dumps(expected.to_dict()))
    # ... and on the run folder, as TOML that configures the same pipeline again
    res = _info(str(live["run"]))
    assert res.returncode == 0, res.stderr
    assert f"hash {pipe['hash']} (verified)" in res.stdout and "lenet5-sim" in res.stdout
    toml_text = res.stdout.split("runs with it)\n", 1)[1]
    again = resolve(SECTION, PipelineConfig, toml=tomllib.loads(toml_text), env={})
    assert again == expected

    # a recording whose stored hash was altered is reported (exit code 1)
    bad = tmp_path / "bad.rtdc"
    shutil.copy(live["rec"], bad)
    with h5py.File(bad, "a") as h5:
        logged = json.loads("".join(v.decode() if isinstance(v, bytes) else str(v)
                                    for v in h5["logs"]["leukoflow-params"][:]))
        logged["pipeline"]["hash"] = "0" * 16
        del h5["logs"]["leukoflow-params"]
        h5["logs"].create_dataset("leukoflow-params", data=[json.dumps(logged)],
                                  dtype=h5py.string_dtype())
    res = _info(str(bad))
    assert res.returncode == 1 and "DOES NOT MATCH" in res.stdout
    res = _info(str(tmp_path))
    assert res.returncode == 2 and "not a run folder" in res.stderr
