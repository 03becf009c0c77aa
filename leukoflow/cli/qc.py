"""CLI: ``leukoflow qc run|status|fit`` - reference-particle quality control.

``qc run`` measures reference beads through the live acquisition path (on the simulated
instrument the ``beads`` sample profile is added to the source spec), checks diameter,
index, dry mass, scale and focus against the ``[qc]`` tolerances and stores a record in the
QC folder; ``leukoflow run`` then uses the last passing QC's scale (or refuses / warns, by
``qc.policy``). ``qc status`` shows what the next run will do. ``qc fit`` fits one phase
image of a sphere (e.g. a real bead image) and prints radius and refractive index.
Configuration precedence: :class:`leukoflow.acquisition.qc.measure.QCConfig` defaults <
``[qc]`` TOML table < ``LEUKOFLOW_QC_*`` environment < flags.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from leukoflow.core.physics import DEFAULT_OPTICS, PIXEL_UM, WAVELENGTH_UM

qc_app = typer.Typer(
    name="qc",
    help="Reference-particle QC: measure beads, set the scale, check focus.",
    no_args_is_help=True,
)


def _settings(**flags: object):
    from leukoflow.acquisition.qc.measure import QCConfig
    from leukoflow.core.config import ConfigError, resolve

    try:
        return resolve("qc", QCConfig, flags)
    except (ConfigError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc


def _qc_source(spec: str) -> str:
    """Simulated sources get the ``beads`` sample profile (the QC sample) appended."""
    if not spec.startswith("sim"):
        return spec
    parts = spec.split(":")
    parts += [""] * (4 - len(parts))
    if not parts[2]:
        parts[2] = "0.3"  # a dense bead suspension: QC in seconds
    profs = [p for p in parts[3].split(",") if p]
    if "beads" not in profs:
        profs.append("beads")
    parts[3] = ",".join(profs)
    return ":".join(parts[:4])


def run_cmd(
    source: Annotated[str, typer.Option(
        "--source", help="QC sample source: sim[:SEED[:CONC[:INSTRUMENT_PROFILE]]] (beads "
        "added), file:PATH (a recorded bead run) or camera:...")] = "sim",
    beads: Annotated[int | None, typer.Option("--beads", min=1,
                                              help="Beads to measure.")] = None,
    folder: Annotated[str | None, typer.Option("--folder", help="QC record folder.")] = None,
    diameter: Annotated[float | None, typer.Option(
        "--bead-diameter", help="Certified bead diameter [µm].")] = None,
    index: Annotated[float | None, typer.Option(
        "--bead-index", help="Certified bead refractive index.")] = None,
    no_save: Annotated[bool, typer.Option("--no-save", help="Do not store a record.")]
    = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Measure reference beads and store a QC record (exit code 1 if the QC fails)."""
    from leukoflow.acquisition.qc.measure import run_qc
    from leukoflow.acquisition.qc.record import write_record
    from leukoflow.acquisition.sources import SourceError, create_source
    from leukoflow.core.jsonutil import json_safe

    cfg = _settings(n_beads=beads, folder=folder, bead_diameter_um=diameter,
                    bead_index=index)
    spec = _qc_source(source)
    try:
        src = create_source(spec)
        res = run_qc(src, cfg)
    except (SourceError, ValueError) as exc:
        typer.echo(f"leukoflow qc: error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    info = getattr(src, "info", {})
    if not no_save:
        res["record"] = str(write_record(res, cfg.folder, source=spec,
                                         extra={"source_info": json_safe(info)}))
    if as_json:
        typer.echo(json.dumps(json_safe({k: v for k, v in res.items() if k != "per_bead"}),
                              sort_keys=True))
    else:
        s, b = res["scale"], res["beads"]
        typer.echo(f"QC {'PASSED' if res['passed'] else 'FAILED'}: {b['measured']} beads, "
                   f"{res['frames']} frames ({spec})")
        typer.echo(f"  pixel {s['pixel_um']:.4f} µm (nominal {s['nominal_pixel_um']:.4f}), "
                   f"magnification {s['magnification']:.4f} ± {100 * s['se_rel']:.2f} %")
        typer.echo(f"  bead diameter {b['diameter_nominal_scale_um']:.3f} µm at the nominal "
                   f"scale, index {b['index']:.4f}, CV {100 * b['diameter_cv']:.2f} %, dry "
                   f"mass {b['dry_mass_pg']:.1f} pg (expected {b['dry_mass_expected_pg']:.1f})")
        typer.echo(f"  focus offset {res['focus_um']:+.2f} µm")
        for name, c in res["checks"].items():
            typer.echo(f"  {'ok  ' if c['passed'] else 'FAIL'} {name}: {c['value']} "
                       f"(limit {c['limit']:g})")
        if "record" in res:
            typer.echo(f"  record: {res['record']}")
    if not res["passed"]:
        raise typer.Exit(code=1)


def status_cmd(
    folder: Annotated[str | None, typer.Option("--folder", help="QC record folder.")] = None,
    policy: Annotated[str | None, typer.Option(
        "--policy", help="refuse, warn or off (default: [qc] policy).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """What the next run will do about QC (exit code 1 if it would refuse to start)."""
    from leukoflow.acquisition.qc.record import qc_status

    st = qc_status(_settings(folder=folder, policy=policy))
    if as_json:
        typer.echo(json.dumps(st.to_dict(), sort_keys=True))
    else:
        typer.echo(f"QC {st.state} (policy {st.policy}): {st.message}")
    if st.refuse:
        raise typer.Exit(code=1)


def fit_cmd(
    image: Annotated[Path, typer.Argument(help="Phase image [rad]: .npy or .npz (first "
                                          "array, or --key).", exists=True, dir_okay=False)],
    pixel_um: Annotated[float, typer.Option("--pixel-um", help="Pixel size [µm].")] = PIXEL_UM,
    wavelength_um: Annotated[float, typer.Option("--wavelength-um",
                                                 help="Vacuum wavelength [µm].")] = WAVELENGTH_UM,
    medium_index: Annotated[float, typer.Option(
        "--medium-index", help="Medium refractive index.")] = DEFAULT_OPTICS.medium_index,
    key: Annotated[str | None, typer.Option("--key", help="Array name in a .npz.")] = None,
    tilt: Annotated[bool, typer.Option(
        "--tilt/--no-tilt", help="Remove a tilt fitted to the 5-px border pixels below a "
        "tenth of the maximum first.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Fit a homogeneous-sphere projection to one phase image: radius and index."""
    import numpy as np

    from leukoflow.acquisition.qc.sphere import fit_sphere_phase, tilt_corrected

    try:
        if image.suffix == ".npz":
            with np.load(image) as z:
                arr = z[key or z.files[0]]
        else:
            arr = np.load(image, allow_pickle=False)
        phase = np.asarray(arr, dtype=np.float64)
        if tilt:
            phase = tilt_corrected(phase)
        fit = fit_sphere_phase(phase, fit_radius=1e9)
    except (OSError, KeyError, ValueError) as exc:
        typer.echo(f"leukoflow qc fit: error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    out = {**fit.to_dict(), "radius_um": fit.radius_um(pixel_um),
           "index": fit.index(pixel_um, wavelength_um, medium_index), "pixel_um": pixel_um,
           "wavelength_um": wavelength_um, "medium_index": medium_index}
    if as_json:
        typer.echo(json.dumps(out, sort_keys=True))
    else:
        typer.echo(f"radius {fit.radius_px:.2f} px = {out['radius_um']:.3f} µm, index "
                   f"{out['index']:.5f}, centre ({fit.cy:.1f}, {fit.cx:.1f}) px, residual "
                   f"{fit.rms_rad:.3f} rad")


qc_app.command("run")(run_cmd)
qc_app.command("status")(status_cmd)
qc_app.command("fit")(fit_cmd)


def register(app: typer.Typer) -> None:
    """Add the ``qc`` command group to ``app``."""
    app.add_typer(qc_app, name="qc")
