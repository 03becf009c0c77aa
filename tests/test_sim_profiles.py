"""Instrument/sample profiles of the simulator (#16): every change checked on ground truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from leukoflow.acquisition.sim import FlowSimulator, SimConfig
from leukoflow.acquisition.sim.profiles import (
    ProfileError,
    apply_profiles,
    list_profiles,
    load_profile,
    profile_record,
)
from leukoflow.acquisition.sources import SourceError, create_source, parse_source_spec
from leukoflow.core.vocabulary import CLASS_NAMES

SHIPPED = ("default", "cells+5", "cells+10", "mag-5", "mag+5", "defocus2um", "beads")


def _objects(cfg: SimConfig, frames: int = 80) -> dict[int, object]:
    """cell id -> first CellTruth seen, and the simulator."""
    sim = FlowSimulator(cfg)
    out: dict[int, object] = {}
    for fr in sim.frames(frames):
        for t in fr.truth:
            out.setdefault(t.cell_id, t)
    return out


def test_shipped_profiles_load_and_validate():
    profs = list_profiles()
    for name in SHIPPED:
        assert name in profs and profs[name], name
        apply_profiles(SimConfig(), name)  # every shipped profile gives a valid config
    assert apply_profiles(SimConfig(seed=4), "default") == SimConfig(seed=4)


def test_cells_scale_every_leukocyte_diameter_exactly():
    base = _objects(SimConfig(seed=2, concentration=0.5))
    big = _objects(apply_profiles(SimConfig(seed=2, concentration=0.5), "cells+10"))
    common = [i for i in base if i in big and base[i].kind in CLASS_NAMES]
    assert len(common) >= 5
    for i in common:  # same object draws, only the diameter scaled
        assert big[i].kind == base[i].kind
        assert big[i].diameter_um == pytest.approx(1.10 * base[i].diameter_um, rel=1e-9)
    ood = [i for i in base if i in big and base[i].kind not in CLASS_NAMES]
    for i in ood:  # erythrocytes, platelets, debris are not leukocytes: unchanged
        assert big[i].diameter_um == pytest.approx(base[i].diameter_um)


@pytest.mark.parametrize("name, factor", [("mag+5", 1.05), ("mag-5", 0.95)])
def test_magnification_scales_the_image_not_the_cell(name, factor):
    cfg0 = SimConfig(seed=5, concentration=0.5)
    cfg1 = apply_profiles(cfg0, name)
    s0, s1 = FlowSimulator(cfg0), FlowSimulator(cfg1)
    assert s1.optics.pixel_um == pytest.approx(cfg0.optics.pixel_um / factor)
    assert cfg1.optics == cfg0.optics  # what the acquisition believes is unchanged
    # the same object's phase area in pixels scales with factor**2
    fo0 = next(fo for fr in s0.frames(60) for fo, *_ in fr.placements
               if fo.obj.kind == "neutrophil")
    fo1 = next(fo for fr in s1.frames(60) for fo, *_ in fr.placements
               if fo.cell_id == fo0.cell_id)
    a0 = (fo0.obj.phase > 0.3).sum()
    a1 = (fo1.obj.phase > 0.3).sum()
    assert fo1.obj.diameter_um == pytest.approx(fo0.obj.diameter_um)
    assert a1 / a0 == pytest.approx(factor**2, rel=0.04)


def test_defocus_profile_puts_every_object_out_of_focus():
    objs = _objects(apply_profiles(SimConfig(seed=1, concentration=0.5), "defocus2um"))
    dz = np.array([t.defocus_um for t in objs.values()])
    assert len(dz) >= 5
    assert np.all(np.abs(dz - 2.0) < 4 * 0.3)
    assert abs(dz.mean() - 2.0) < 0.3


def test_camera_profile_quantises_counts():
    cfg = apply_profiles(SimConfig(seed=0), "camera-aged")
    assert cfg.camera.adc_bits == 7 and cfg.camera.read_noise_counts == 1.5
    fr = next(FlowSimulator(cfg).frames(1))
    assert np.all(fr.hologram % 2 == 0)  # 7 effective bits in an 8-bit frame
    fr0 = next(FlowSimulator(SimConfig(seed=0)).frames(1))
    assert np.any(fr0.hologram % 2 == 1)


def test_beads_profile_gives_only_beads_of_known_size():
    objs = _objects(apply_profiles(SimConfig(seed=3, concentration=0.5), "beads"))
    assert objs and {t.kind for t in objs.values()} == {"bead"}
    d = np.array([t.diameter_um for t in objs.values()])
    assert np.all(np.abs(d - 8.0) < 3 * 0.015 * 8.0 + 1e-9)
    assert all(t.label == -1 for t in objs.values())


def test_profiles_compose_and_record(tmp_path):
    cfg = apply_profiles(SimConfig(), "mag+5,beads")
    assert cfg.magnification == 1.05 and cfg.bead_fraction == 1.0
    rec = profile_record("mag+5,beads", cfg)
    assert rec["profiles"] == ["mag+5", "beads"]
    assert rec["overrides"]["magnification"] == 1.05
    assert rec["config"]["bead"]["diameter_um"] == 8.0
    # a user profile file; per-class table form
    p = tmp_path / "mine.toml"
    p.write_text('description = "x"\nsize_scale = { lymphocyte = 1.2 }\n'
                 '[camera]\nread_noise_counts = 2.0\n')
    cfg = apply_profiles(SimConfig(), str(p))
    assert cfg.size_scale == {"lymphocyte": 1.2} and cfg.camera.read_noise_counts == 2.0
    assert cfg.camera.mean_counts == SimConfig().camera.mean_counts  # nested tables merge


@pytest.mark.parametrize("text, match", [
    ("magnification = 3.0\n", "magnification"),
    ("sizes = 1.1\n", "unknown keys"),
    ("size_scale = { basophil = 1.1 }\n", "unknown classes"),
    ("seed = 3\n", "seed"),
    ("[camera]\nadc_bits = 12\n", "adc_bits"),
    ("magnification = \n", "invalid TOML"),
])
def test_bad_profiles_are_rejected_with_a_reason(tmp_path, text, match):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ProfileError, match=match):
        apply_profiles(SimConfig(), str(p))
    with pytest.raises(ProfileError, match="unknown simulator profile"):
        load_profile("no-such-profile")


def test_sim_source_spec_takes_profiles():
    assert parse_source_spec("sim:7:0.3:cells+5") == (
        "sim", {"seed": 7, "concentration": 0.3, "profile": "cells+5"})
    assert parse_source_spec("sim:7::mag+5,beads") == (
        "sim", {"seed": 7, "profile": "mag+5,beads"})
    src = create_source("sim:7:0.4:mag-5,beads")
    assert src.config.magnification == 0.95 and src.config.concentration == 0.4
    info = src.info
    assert info["profiles"] == ["mag-5", "beads"] and info["sim"]["bead_fraction"] == 1.0
    with pytest.raises(SourceError, match="unknown simulator profile"):
        create_source("sim:7:0.4:nope")


def test_simulate_cli_profile(tmp_path):
    from leukoflow.cli import app

    r = CliRunner().invoke(app, ["simulate", "run", str(tmp_path / "b.rtdc"), "-n", "30",
                                 "--concentration", "0.5", "--profile", "beads", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["objects"] > 0 and set(k for k, v in s["objects_by_kind"].items() if v) == {"bead"}
    r = CliRunner().invoke(app, ["simulate", "profiles", "--json"])
    assert r.exit_code == 0 and "cells+10" in json.loads(r.output)
    r = CliRunner().invoke(app, ["simulate", "run", str(tmp_path / "x.rtdc"), "--profile",
                                 "nope"])
    assert r.exit_code != 0 and "unknown simulator profile" in r.output
