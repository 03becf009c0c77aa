"""CLI: ``leukoflow simulate run|crops|profiles`` (simulated instrument output as ``.rtdc``).

``--profile NAME[,NAME]`` applies instrument/sample profiles
(:mod:`leukoflow.acquisition.sim.profiles`; ``leukoflow simulate profiles`` lists them);
this command's own settings below are applied on top of the profiles.

Heavy imports (numpy, scipy, h5py, the simulator) happen inside the command bodies.
Configuration precedence: SimConfig defaults < ``[simulate]`` TOML table <
``LEUKOFLOW_SIMULATE_*`` environment < flags (keys: seed, concentration, speed_spread,
lateral_sd_um, frame_rate_hz, flow_speed_um_s, roi_rows, roi_cols).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from leukoflow.core.physics import CROP_SIZE_PX

simulate_app = typer.Typer(
    name="simulate",
    help="Simulated QPI flow instrument: write a raw run or a labeled crop dataset (.rtdc).",
    no_args_is_help=True,
)


@dataclass(frozen=True)
class SimulateSettings:
    """Configurable settings of ``leukoflow simulate`` (section ``[simulate]``)."""

    seed: int = 0
    # recordings default to a dense sample (1.5 objects per field, ~15 % coincidences that
    # the gates reject as doublets); the live simulated source defaults to the dilute 0.03
    # of acquisition.sim.SimConfig (use --source sim:SEED:CONCENTRATION there)
    concentration: float = 1.5
    speed_spread: float = 0.10
    lateral_sd_um: float = 2.5
    frame_rate_hz: float = 500.0
    flow_speed_um_s: float = 10_000.0
    roi_rows: int = 320
    roi_cols: int = 1024


def _settings(**flags: object) -> SimulateSettings:
    from leukoflow.core.config import ConfigError, resolve

    try:
        return resolve("simulate", SimulateSettings, flags)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _sim_config(s: SimulateSettings, ood: dict[str, float] | None = None,
                profile: str | None = None):
    """SimConfig: profiles (instrument/sample) first, this command's settings on top."""
    from dataclasses import replace

    from leukoflow.acquisition.sim import SimConfig
    from leukoflow.acquisition.sim.profiles import ProfileError, apply_profiles

    try:
        base = apply_profiles(SimConfig(seed=s.seed), profile)
        optics = replace(base.optics, frame_rate_hz=s.frame_rate_hz,
                         flow_speed_um_s=s.flow_speed_um_s, roi_shape=(s.roi_rows, s.roi_cols))
        kw = {"seed": s.seed, "optics": optics, "concentration": s.concentration,
              "speed_spread": s.speed_spread, "lateral_sd_um": s.lateral_sd_um}
        if ood is not None:
            kw["ood_fractions"] = {**base.ood_fractions, **ood}
        return base.replace(**kw)
    except (ValueError, ProfileError) as exc:
        raise typer.BadParameter(str(exc)) from exc


def _parse_ood(items: list[str] | None) -> dict[str, float] | None:
    if not items:
        return None
    out: dict[str, float] = {}
    for it in items:
        name, sep, val = it.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(val)
        except ValueError:
            raise typer.BadParameter(f"--ood expects KIND=FRACTION, got {it!r}") from None
    return out


def _echo(summary: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(summary, sort_keys=True))
    else:
        for k, v in summary.items():
            typer.echo(f"{k}: {v}")


@simulate_app.command("run")
def run_cmd(
    out: Annotated[Path, typer.Argument(help="Output .rtdc file (overwritten).",
                                        dir_okay=False)],
    frames: Annotated[int, typer.Option("--frames", "-n", min=1, help="Number of frames.")]
    = 500,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    concentration: Annotated[float | None, typer.Option(
        "--concentration", help="Mean number of objects in the field of view.")] = None,
    speed_spread: Annotated[float | None, typer.Option(
        "--speed-spread", help="Per-object speed spread (fraction of the mean).")] = None,
    frame_rate: Annotated[float | None, typer.Option("--frame-rate",
                                                     help="Frames per second [1/s].")] = None,
    flow_speed: Annotated[float | None, typer.Option(
        "--flow-speed", help="Mean flow speed [µm/s].")] = None,
    roi_rows: Annotated[int | None, typer.Option(
        "--roi-rows", help="Camera ROI rows (across the channel) (px), multiple of 4.")] = None,
    roi_cols: Annotated[int | None, typer.Option(
        "--roi-cols", help="Camera ROI columns (along the flow) (px), multiple of 4.")] = None,
    ood: Annotated[list[str] | None, typer.Option(
        "--ood", help="OOD fraction of all objects, KIND=FRACTION (repeatable).")] = None,
    profile: Annotated[str | None, typer.Option(
        "--profile", help="Instrument/sample profiles, comma separated (names or .toml "
        "paths; see 'leukoflow simulate profiles').")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Write a raw simulated run: holograms, background hologram and ground truth."""
    from leukoflow.acquisition.sim.writers import write_run

    s = _settings(seed=seed, concentration=concentration, speed_spread=speed_spread,
                  frame_rate_hz=frame_rate, flow_speed_um_s=flow_speed, roi_rows=roi_rows,
                  roi_cols=roi_cols)
    cfg = _sim_config(s, _parse_ood(ood), profile)
    _echo(write_run(out, cfg, frames), as_json)


@simulate_app.command("crops")
def crops_cmd(
    out: Annotated[Path, typer.Argument(help="Output .rtdc file (overwritten).",
                                        dir_okay=False)],
    per_class: Annotated[int, typer.Option("--per-class", min=0,
                                           help="Crops per leukocyte class.")] = 1000,
    ood_per_kind: Annotated[int, typer.Option("--ood-per-kind", min=0,
                                              help="Crops per OOD kind.")] = 0,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    crop: Annotated[int, typer.Option("--crop", min=16, help="Crop side (px).")] = CROP_SIZE_PX,
    no_hologram: Annotated[bool, typer.Option(
        "--no-hologram", help="Noise-free ground-truth phase instead of demodulated "
        "holograms.")] = False,
    profile: Annotated[str | None, typer.Option(
        "--profile", help="Instrument/sample profiles, comma separated (sizes, indices, "
        "magnification and camera apply to the crops).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Write a labeled crop dataset (qpi_pha + userdef0 labels + features)."""
    from leukoflow.acquisition.sim import make_crop_dataset
    from leukoflow.acquisition.sim.writers import write_crops

    s = _settings(seed=seed)
    cfg = _sim_config(s, profile=profile)
    if per_class + ood_per_kind == 0:
        raise typer.BadParameter("nothing to write: --per-class and --ood-per-kind are 0")
    if crop % 2:
        raise typer.BadParameter("--crop must be even")
    data = make_crop_dataset(per_class, ood_per_kind, seed=s.seed, crop=crop,
                             through_hologram=not no_hologram, cfg=cfg)
    _echo(write_crops(out, data, cfg), as_json)


@simulate_app.command("profiles")
def profiles_cmd(
    show: Annotated[str | None, typer.Argument(
        help="Print the resolved configuration of these profiles (comma separated).")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the shipped instrument/sample profiles, or show one resolved."""
    from leukoflow.acquisition.sim import SimConfig
    from leukoflow.acquisition.sim.profiles import (
        ProfileError,
        apply_profiles,
        list_profiles,
        profile_record,
    )

    if show is None:
        profs = list_profiles()
        if as_json:
            typer.echo(json.dumps(profs, sort_keys=True))
        else:
            for name, desc in profs.items():
                typer.echo(f"{name:14s} {desc}")
        return
    try:
        cfg = apply_profiles(SimConfig(), show)
        rec = profile_record(show, cfg)
    except ProfileError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(json.dumps(rec, sort_keys=True, indent=None if as_json else 1))


def register(app: typer.Typer) -> None:
    """Add the ``simulate`` command group to ``app``."""
    app.add_typer(simulate_app, name="simulate")
