"""Configs composed of the stages' own dataclasses (nested sections), resolved like flat ones.

The acquisition's :class:`PipelineConfig` is the real case: its stages are nested sections
(TOML ``[acquire_pipeline.crop]``, ``LEUKOFLOW_ACQUIRE_PIPELINE_CROP_SIZE``, CLI/overrides
``"crop.size"``), unknown names are errors naming the table or variable, and the fields the
pipeline derives from the optics are refused as settings.
"""

from __future__ import annotations

import dataclasses
import tomllib

import pytest

from leukoflow.acquisition.crops import CropConfig
from leukoflow.acquisition.gates import GateConfig
from leukoflow.acquisition.pipeline import SECTION, AcquisitionPipeline, PipelineConfig
from leukoflow.acquisition.prescreen import PrescreenConfig
from leukoflow.acquisition.reconstruct import OffAxisConfig
from leukoflow.acquisition.segment import SegmentConfig, SplitConfig, ThresholdSegmenter
from leukoflow.acquisition.track import TrackConfig
from leukoflow.core.config import ConfigError, build, check_sections, resolve
from leukoflow.core.physics import DEFAULT_OPTICS


def test_every_layer_reaches_a_nested_setting() -> None:
    doc = tomllib.loads("""
[acquire_pipeline]
pixel_um = 0.35
[acquire_pipeline.crop]
size = 48
margin = 6
[acquire_pipeline.segment]
threshold = 0.2
""")
    env = {"LEUKOFLOW_ACQUIRE_PIPELINE_CROP_SIZE": "56",           # env beats TOML
           "LEUKOFLOW_ACQUIRE_PIPELINE_GATES_MAX_AMP_STD": "0.1",
           "LEUKOFLOW_ACQUIRE_PIPELINE_RECONSTRUCT_FILTER_NAME": "smooth disk",
           "LEUKOFLOW_ACQUIRE_PIPELINE_PRESCREEN_ENABLED": "false"}
    cfg = resolve(SECTION, PipelineConfig, {"segment.threshold": 0.3, "crop": {"margin": 9},
                                            "not_a_setting": 1}, toml=doc, env=env)
    assert cfg.pixel_um == 0.35 and cfg.crop.size == 56 and cfg.crop.margin == 9
    assert cfg.segment.threshold == 0.3                                # flag beats TOML
    assert cfg.gates.max_amp_std == 0.1 and cfg.reconstruct.filter_name == "smooth disk"
    assert cfg.prescreen.enabled is False
    # untouched fields keep the composition's defaults (not the stage class's)
    assert cfg.track == TrackConfig(expected_dx_px=0.0)
    assert cfg.crop.isolate_px == CropConfig().isolate_px


@pytest.mark.parametrize(("toml", "env", "match"), [
    ({"acquire_pipeline": {"crop": {"sise": 3}}}, {},
     r"unknown keys in \[acquire_pipeline\.crop\]: sise \(did you mean size\?\)"),
    ({"acquire_pipeline": {"threshold_rad": 0.3}}, {}, r"unknown keys in \[acquire_pipeline\]"),
    ({"acquire_pipeline": {"crop": 64}}, {}, r"crop is a section: set its keys in "
                                             r"\[acquire_pipeline\.crop\]"),
    ({}, {"LEUKOFLOW_ACQUIRE_PIPELINE_CROP_SISE": "3"},
     r"unknown setting LEUKOFLOW_ACQUIRE_PIPELINE_CROP_SISE \(did you mean "
     r"LEUKOFLOW_ACQUIRE_PIPELINE_CROP_SIZE\?\)"),
    ({}, {"LEUKOFLOW_ACQUIRE_PIPELINE_THRESHOLD_RAD": "0.3"},
     r"did you mean LEUKOFLOW_ACQUIRE_PIPELINE_SEGMENT_THRESHOLD"),
    ({}, {"LEUKOFLOW_ACQUIRE_PIPELINE_CROP_PIXEL_UM": "0.3"},
     r"crop\.pixel_um is not a setting, it is derived from pixel_um"),
    ({"acquire_pipeline": {"track": {"frame_width": 100}}}, {}, r"track\.frame_width is not a "
                                                                r"setting"),
    ({}, {"LEUKOFLOW_ACQUIRE_PIPELINE_GATES_MIN_AREA_UM": "nan"},
     r"acquire_pipeline\.gates\.min_area_um = nan: a finite number"),
    ({}, {"LEUKOFLOW_ACQUIRE_PIPELINE_PRESCREEN_AUDIT_EVERY": "1.5"},
     r"bad value for acquire_pipeline\.prescreen\.audit_every"),
    ({}, {"LEUKOFLOW_ACQUIRE_PIPELINE_RECONSTRUCT_MODE": "bogus"},
     r"acquire_pipeline\.reconstruct: mode must be one of"),
])
def test_nonsense_in_a_nested_section_is_refused_by_name(toml, env, match) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve(SECTION, PipelineConfig, toml=toml, env=env)


def test_build_takes_dotted_and_nested_overrides_with_the_same_checks() -> None:
    cfg = build(PipelineConfig, {"gates.max_amp_std": 1.0, "crop": {"with_amplitude": True},
                                 "pixel_um": 0.3})
    assert cfg.gates.max_amp_std == 1.0 and cfg.crop.with_amplitude and cfg.pixel_um == 0.3
    with pytest.raises(ConfigError, match="unknown setting gates.max_amp_sd"):
        build(PipelineConfig, {"gates.max_amp_sd": 1.0})
    with pytest.raises(ConfigError, match="split.min_part_px is not a setting"):
        build(PipelineConfig, {"split.min_part_px": 3})
    with pytest.raises(ConfigError, match="acquire_pipeline.gates.min_area_um = nan"):
        build(PipelineConfig, {"gates": {"min_area_um": float("nan")}}, SECTION)


def test_ambiguous_environment_names_are_a_programming_error() -> None:
    check_sections(PipelineConfig)  # every setting has its own variable

    @dataclasses.dataclass(frozen=True)
    class Bad:
        crop: CropConfig = dataclasses.field(default_factory=CropConfig)
        crop_size: int = 3  # LEUKOFLOW_X_CROP_SIZE would name both

    with pytest.raises(TypeError, match="crop.size and crop_size|crop_size and crop.size"):
        check_sections(Bad)


def test_the_composition_restates_nothing_and_changes_no_default() -> None:
    """The default pipeline gets exactly the stages' defaults (the former flat defaults)."""
    c = PipelineConfig()
    assert (c.reconstruct, c.split, c.gates, c.crop, c.prescreen) == (
        OffAxisConfig(), SplitConfig(), GateConfig(), CropConfig(), PrescreenConfig())
    assert c.track == TrackConfig(expected_dx_px=0.0)  # 0 = from the optics
    # the segmenter config is the plugin's parameters, all of them, with its defaults
    seg = c.segment.create()
    assert isinstance(seg, ThresholdSegmenter) and seg.params == {
        k: v for k, v in dataclasses.asdict(SegmentConfig()).items() if k != "name"}
    assert seg.params == ThresholdSegmenter().params
    # the pipeline derives what DERIVED says, from the optics
    p = AcquisitionPipeline(build(PipelineConfig, {"pixel_um": 0.3, "gates.min_area_um": 9.0}))
    assert p.crops.config.pixel_um == 0.3
    assert p.crops.config.wavelength_um == DEFAULT_OPTICS.wavelength_um
    assert p.crops.config.medium_index == DEFAULT_OPTICS.medium_index
    assert p.tracker.config.frame_width == DEFAULT_OPTICS.roi_shape[1] // 4
    assert p.tracker.config.expected_dx_px == pytest.approx(
        DEFAULT_OPTICS.flow_speed_um_s / DEFAULT_OPTICS.frame_rate_hz / 0.3)
    assert p.split_config.min_part_px == 100  # ceil(9 µm² / 0.09 µm²)
    assert set(PipelineConfig.DERIVED) <= {
        f"{s}.{f.name}" for s in ("reconstruct", "segment", "split", "gates", "track", "crop",
                                  "prescreen")
        for f in dataclasses.fields(getattr(c, s))}
