"""CLI: ``leukoflow simulate run|crops`` (simulated instrument output as ``.rtdc``).

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


def _sim_config(s: SimulateSettings, ood: dict[str, float] | None = None):
    from dataclasses import replace

    from leukoflow.acquisition.sim import SimConfig
    from leukoflow.core.physics import DEFAULT_OPTICS

    optics = replace(DEFAULT_OPTICS, frame_rate_hz=s.frame_rate_hz,
                     flow_speed_um_s=s.flow_speed_um_s, roi_shape=(s.roi_rows, s.roi_cols))
    kw = {"seed": s.seed, "optics": optics, "concentration": s.concentration,
          "speed_spread": s.speed_spread, "lateral_sd_um": s.lateral_sd_um}
    if ood is not None:
        from leukoflow.acquisition.sim.params import DEFAULT_OOD_FRACTIONS

        kw["ood_fractions"] = {**DEFAULT_OOD_FRACTIONS, **ood}
    try:
        return SimConfig(**kw)
    except ValueError as exc:
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
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Write a raw simulated run: holograms, background hologram and ground truth."""
    from leukoflow.acquisition.sim.writers import write_run

    s = _settings(seed=seed, concentration=concentration, speed_spread=speed_spread,
                  frame_rate_hz=frame_rate, flow_speed_um_s=flow_speed, roi_rows=roi_rows,
                  roi_cols=roi_cols)
    cfg = _sim_config(s, _parse_ood(ood))
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
    crop: Annotated[int, typer.Option("--crop", min=16, help="Crop side (px).")] = 64,
    no_hologram: Annotated[bool, typer.Option(
        "--no-hologram", help="Noise-free ground-truth phase instead of demodulated "
        "holograms.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Write a labeled crop dataset (qpi_pha + userdef0 labels + features)."""
    from leukoflow.acquisition.sim import make_crop_dataset
    from leukoflow.acquisition.sim.writers import write_crops

    s = _settings(seed=seed)
    cfg = _sim_config(s)
    if per_class + ood_per_kind == 0:
        raise typer.BadParameter("nothing to write: --per-class and --ood-per-kind are 0")
    if crop % 2:
        raise typer.BadParameter("--crop must be even")
    data = make_crop_dataset(per_class, ood_per_kind, seed=s.seed, crop=crop,
                             through_hologram=not no_hologram, cfg=cfg)
    _echo(write_crops(out, data, cfg), as_json)


def register(app: typer.Typer) -> None:
    """Add the ``simulate`` command group to ``app``."""
    app.add_typer(simulate_app, name="simulate")
