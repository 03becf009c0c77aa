"""Pipeline identifier and hash: every parameter in a canonical, parseable string (#13).

The identifier is checked against the configuration it came from (round trip through
:func:`parse_pipeline_id` for the default and for each parameter changed on its own), and
the hash against the sha256 of the identifier computed here.
"""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from leukoflow.acquisition.pipeline import PipelineConfig, identity, parse_identity
from leukoflow.core import config
from leukoflow.core.config import (
    PIPELINE_GENERATION,
    ConfigError,
    build,
    parse_pipeline_id,
    pipeline_hash,
    pipeline_id,
)
from leukoflow.core.physics import DEFAULT_OPTICS, Optics

#: A valid value other than the default for the text and optional settings (the numbers and
#: switches are changed generically).
OTHER: dict[str, object] = {
    "reconstruct.mode": "compatible", "reconstruct.filter_name": "smooth disk",
    "reconstruct.filter_size_interpretation": "frequency index",
    "reconstruct.filter_size": 20.0,
    "reconstruct.sideband": (-0.25, 0.2501), "reconstruct.sideband_source": "hologram",
    "reconstruct.padding": 1.5, "reconstruct.backend": "torch",
    "reconstruct.device": "cpu:0", "reconstruct.precision": "float64",
    "reconstruct.bg_fit": "poly2o", "reconstruct.scale_to_filter": 1.0,
    "segment.name": "thresh", "segment.polarity": "below", "segment.offset": "median",
    "segment.clear_border_edges": "tb",
}
SKIP = {"segment.name", "reconstruct.device"}  # one plugin; "cpu:0" is not a device name


def _settings() -> list[str]:
    return [n for n in config._dotted_names(PipelineConfig)
            if n not in PipelineConfig.DERIVED and n not in SKIP]


def _other(name: str, value: object) -> object:
    if name in OTHER:
        return OTHER[name]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return round(value * 0.9 + 0.01, 6)
    raise AssertionError(f"no other value for {name} = {value!r}")


def test_default_identifier_is_canonical_and_parses_back() -> None:
    c = PipelineConfig()
    text = pipeline_id(c, model="lenet5-sim", model_sha="ab" * 32,
                       extra={"optics": DEFAULT_OPTICS})
    assert text.startswith(f"leukoflow:{PIPELINE_GENERATION}|pipeline:pixel_um=0.0^")
    assert "|crop:size=64^" in text and "|model:name=lenet5-sim^sha=" + "ab" * 32 in text
    assert "pixel_um=0.34" not in text.split("|crop:")[1]  # derived fields are left out
    p = parse_pipeline_id(text, PipelineConfig, {"optics": Optics})
    assert p.config == c and p.extra["optics"] == DEFAULT_OPTICS
    assert (p.model, p.model_sha, p.generation, p.text) == (
        "lenet5-sim", "ab" * 32, PIPELINE_GENERATION, text)
    assert p.hash == pipeline_hash(text) == hashlib.sha256(text.encode()).hexdigest()[:16]
    # the same configuration reached another way gives the same identifier
    assert pipeline_id(build(PipelineConfig, {"crop.size": 64}), model="lenet5-sim",
                       model_sha="ab" * 32, extra={"optics": DEFAULT_OPTICS}) == text


@pytest.mark.parametrize("name", _settings())
def test_every_parameter_is_in_the_identifier_and_parses_back(name) -> None:
    base = PipelineConfig()
    value = base
    for part in name.split("."):
        value = getattr(value, part)
    changed = build(PipelineConfig, {name: _other(name, value)})
    a, b = identity(base), identity(changed)
    assert a["id"] != b["id"] and a["hash"] != b["hash"], name
    back = parse_identity(b["id"])
    assert back.config == changed, name
    assert back.extra["optics"] == DEFAULT_OPTICS


def test_model_optics_and_generation_change_the_hash() -> None:
    c = PipelineConfig()
    ref = identity(c, model="m", model_sha="1" * 64)
    assert identity(c, model="m", model_sha="2" * 64)["hash"] != ref["hash"]
    assert identity(c, dataclasses.replace(DEFAULT_OPTICS, wavelength_um=0.633),
                    model="m", model_sha="1" * 64)["hash"] != ref["hash"]
    bumped = pipeline_id(c, model="m", model_sha="1" * 64, extra={"optics": DEFAULT_OPTICS},
                         generation=PIPELINE_GENERATION + 1)
    assert bumped != ref["id"] and pipeline_hash(bumped) != ref["hash"]
    assert parse_identity(bumped).generation == PIPELINE_GENERATION + 1


@pytest.mark.parametrize(("text", "match"), [
    ("13|hdf:p=0.2645", "not a pipeline identifier"),
    ("leukoflow:1|crop:sise=64", "unknown key 'sise' in \\[crop\\]"),
    ("leukoflow:1|cropp:size=64", "unknown sections"),
    ("leukoflow:1|crop:size=big", "bad value for crop.size"),
    ("leukoflow:1|gates:min_area_um=nan", "a finite number"),
    ("leukoflow:1|reconstruct:mode=slow", "mode must be one of"),
    ("leukoflow:1|model:nmae=x", "unknown keys in \\[model\\]"),
])
def test_nonsense_identifiers_are_refused(text, match) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_identity(text)


def test_a_partial_identifier_fills_in_defaults() -> None:
    p = parse_identity("leukoflow:1|segment:threshold=0.3")
    assert p.config == build(PipelineConfig, {"segment.threshold": 0.3}) and p.model == ""
