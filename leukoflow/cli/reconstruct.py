"""CLI: ``leukoflow reconstruct`` - off-axis phase retrieval of one hologram or a stack.

The retrieval options are generated from
:class:`leukoflow.acquisition.reconstruct.config.OffAxisConfig` (section ``[reconstruct]``,
``LEUKOFLOW_RECONSTRUCT_*``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from leukoflow.cli.options import ConfigOptions


def _parse_sideband(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p]
    if len(parts) != 2:
        raise ValueError(f"--sideband needs two numbers 'f_rows,f_cols' [cycles/px], got {text!r}")
    return float(parts[0]), float(parts[1])


def _fail(msg: str) -> None:
    typer.echo(f"leukoflow reconstruct: error: {msg}", err=True)
    raise typer.Exit(code=2)


RECONSTRUCT = ConfigOptions(
    "leukoflow.acquisition.reconstruct.config:OffAxisConfig", "reconstruct",
    exclude=("sideband",),
    flags={"filter_name": "--filter", "filter_size_interpretation": "--filter-size-unit",
           "bg_border_px": "--border-px", "invert_phase": "--invert-phase/--no-invert-phase"})


def reconstruct(
    ctx: typer.Context,
    holo: Annotated[Path, typer.Argument(help="Hologram file: .npy, .npz, .tif, .png, "
                                         ".bmp, .jpg, .rtdc (qpi_oah); 2D or a stack.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .npy: unwrapped, "
                                      "background-corrected phase in rad, float32.")],
    background: Annotated[Path | None, typer.Option(
        "--background", "-b", help="Background hologram (no cells); .rtdc inputs use "
        "their qpi_oah_bg when this is not given.")] = None,
    sideband: Annotated[str | None, typer.Option(
        help="Sideband 'f_rows,f_cols' in cycles/px; default: detect.")] = None,
    key: Annotated[str | None, typer.Option(
        help="Array name in .npz / image feature in .rtdc (default: first array / "
        "qpi_oah).")] = None,
    bg_key: Annotated[str | None, typer.Option(
        "--bg-key", help="Array name / feature for the background file.")] = None,
    unwrap: Annotated[bool, typer.Option(
        "--unwrap/--no-unwrap", help="Unwrap the phase (default on).")] = True,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print resolved parameters and phase statistics as JSON.")] = False,
) -> None:
    """Off-axis phase retrieval: write the unwrapped, background-corrected phase (rad)."""
    import json
    import time

    import numpy as np

    from leukoflow.acquisition.reconstruct import HologramIOError, Reconstructor, load_hologram
    from leukoflow.core.registry import RegistryError

    if out.suffix.lower() != ".npy":
        _fail(f"--out must name a .npy file, got {out}")
    t0 = time.perf_counter()
    try:
        sb = _parse_sideband(sideband)
    except ValueError as exc:
        _fail(str(exc))
    cfg = RECONSTRUCT.resolve(ctx, sideband=sb)
    try:
        data = load_hologram(holo, key=key)
        bg = None
        bg_src = None
        if background is not None:
            bg = load_hologram(background, key=bg_key)
            bg_src = str(background)
        elif holo.suffix.lower() == ".rtdc":
            try:
                bg = load_hologram(holo, key=bg_key or "qpi_oah_bg")
                bg_src = f"{holo}:{bg_key or 'qpi_oah_bg'}"
            except HologramIOError:
                bg = None
        rec = Reconstructor(cfg, background=bg)
        phase = rec.phase(data, unwrap=unwrap)
    except (HologramIOError, RegistryError, ValueError, RuntimeError) as exc:
        _fail(str(exc))
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, phase, allow_pickle=False)
    except OSError as exc:
        _fail(f"cannot write {out}: {exc}")
    if json_out:
        fin = phase[np.isfinite(phase)]
        report = {
            "input": str(holo),
            "input_shape": list(data.shape),
            "input_dtype": str(data.dtype),
            "n_frames": 1 if data.ndim == 2 else int(data.shape[0]),
            "background": bg_src,
            "out": str(out),
            "unwrapped": unwrap,
            "params": rec.params,
            "phase": {
                "shape": list(phase.shape),
                "unit": "rad",
                "min": float(fin.min()),
                "max": float(fin.max()),
                "mean": float(fin.mean()),
                "std": float(fin.std()),
            },
            "elapsed_s": round(time.perf_counter() - t0, 4),
        }
        typer.echo(json.dumps(report, indent=2))


def register(app: typer.Typer) -> None:
    """Add ``reconstruct`` to ``app``."""
    app.command("reconstruct", cls=RECONSTRUCT.command_class())(reconstruct)
