"""A reference-bead QC run: beads through the live acquisition path, fitted one by one.

The QC sample (beads of certified diameter D and index n_b) flows through the same
reconstruction, segmentation, tracking and crop code as the cells, at the *nominal* scale.
Each emitted bead crop is measured:

* a sphere projection fit (:func:`leukoflow.acquisition.qc.sphere.fit_sphere_phase`) gives
  its radius r [px] and peak phase A [rad];
* the integrated phase within 1.3 r gives the dry-mass equivalent [pg] (Barer's
  α = 0.18 µm³/pg, as for the cells);
* a focus figure: the crop's complex field (amplitude and phase) is propagated over
  ``focus_range_um`` (angular spectrum) and the distance at which the amplitude inside the
  bead is most uniform (a pure phase object in focus has none of the defocus fringes) is the
  bead's distance from the focal plane, with the opposite sign.

From all beads (:func:`evaluate`): effective pixel size p = D / (2·mean r) [µm] (the scale the
live acquisition must use), magnification relative to nominal, bead index with that scale,
diameter CV, dry-mass ratio to the certified value, focus offset; each is checked against
a tolerance of :class:`QCConfig` and the QC passes only if all checks pass.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from leukoflow.acquisition.pipeline import AcquisitionPipeline, PipelineConfig
from leukoflow.acquisition.qc.sphere import fit_sphere_phase
from leukoflow.acquisition.sim.optics import angular_spectrum
from leukoflow.acquisition.sources import EndOfStream
from leukoflow.core.config import build
from leukoflow.core.physics import ALPHA_UM3_PER_PG, DEFAULT_OPTICS, Optics

SECTION = "qc"
POLICIES = ("refuse", "warn", "off")


@dataclass(frozen=True)
class QCConfig:
    """Reference-particle QC (section ``[qc]``, env ``LEUKOFLOW_QC_*``).

    Attributes
    ----------
    folder : str
        Folder of the QC records (``qc-<UTC time>.json``).
    policy : str
        What a live run does without a passing, current QC: ``refuse`` to start, ``warn``
        loudly (run at the last passing QC's scale, or the nominal one, marked in the
        summary, report, live view and metrics), or ``off``.
    max_age_h : float
        A QC older than this is out of date [h] (0: never).
    bead_diameter_um, bead_index : float
        Certified diameter [µm] and refractive index of the beads.
    n_beads : int
        Beads to measure.
    max_frames : int
        Give up after this many frames.
    min_beads : int
        Fewer measured beads fail the QC.
    tol_index : float
        Largest |measured − certified| bead index.
    tol_diameter_cv : float
        Largest coefficient of variation of the fitted bead diameters.
    max_scale_change : float
        Largest |magnification − 1| accepted and corrected (larger: the optics are wrong).
    tol_scale_se : float
        Largest relative standard error of the measured scale.
    tol_focus_um : float
        Largest |focus offset| [µm].
    tol_dry_mass : float
        Largest relative deviation of the mean dry mass from the certified bead's.
    max_rms_rad : float
        Largest median RMS residual of the sphere fits [rad].
    focus_range_um : float
        Half-range of the refocusing search [µm] (step ``focus_step_um``).
    focus_step_um : float
        Step of the refocusing search [µm].
    """

    folder: str = "qc"
    policy: str = "warn"
    max_age_h: float = 24.0
    bead_diameter_um: float = 8.0
    bead_index: float = 1.370
    n_beads: int = 150
    max_frames: int = 30_000
    min_beads: int = 30
    tol_index: float = 0.003
    tol_diameter_cv: float = 0.04
    max_scale_change: float = 0.15
    tol_scale_se: float = 0.005
    tol_focus_um: float = 1.0
    tol_dry_mass: float = 0.08
    max_rms_rad: float = 0.15
    focus_range_um: float = 4.0
    focus_step_um: float = 0.25

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"qc.policy must be one of {POLICIES}, got {self.policy!r}")
        if self.n_beads < 1 or self.min_beads < 1 or self.bead_diameter_um <= 0:
            raise ValueError("qc: n_beads, min_beads >= 1 and bead_diameter_um > 0 required")


def focus_offset_um(phase: np.ndarray, amplitude: np.ndarray | None, centre: tuple[float, float],
                    radius_px: float, pixel_um: float, optics: Optics, half_range_um: float,
                    step_um: float) -> float:
    """Distance of a bead from the focal plane [µm] by refocusing its field.

    The field ``amplitude·exp(i·phase)`` is propagated by each z of the search grid; the z
    with the most uniform amplitude inside 1.2 radii is where the bead is in focus, so the
    bead sits at −z. NaN without an amplitude crop.
    """
    if amplitude is None:
        return float("nan")
    f0 = amplitude.astype(np.float64) * np.exp(1j * phase.astype(np.float64))
    pad = 16
    f0 = np.pad(f0, pad, constant_values=1.0)
    yy, xx = np.indices(f0.shape)
    inside = (yy - centre[0] - pad) ** 2 + (xx - centre[1] - pad) ** 2 <= (1.2 * radius_px) ** 2
    zs = np.arange(-half_range_um, half_range_um + 0.5 * step_um, step_um)
    cost = [float(np.abs(angular_spectrum(f0, float(z), pixel_um, optics.wavelength_um,
                                          optics.medium_index))[inside].std()) for z in zs]
    k = int(np.argmin(cost))
    z = float(zs[k])
    if 0 < k < len(zs) - 1:  # parabolic refinement between grid points
        c0, c1, c2 = cost[k - 1], cost[k], cost[k + 1]
        den = c0 - 2 * c1 + c2
        if den > 0:
            z += 0.5 * step_um * (c0 - c2) / den
    return -z


def measure_bead(phase: np.ndarray, amplitude: np.ndarray | None, pixel_um: float,
                 optics: Optics = DEFAULT_OPTICS, cfg: QCConfig | None = None
                 ) -> dict[str, float]:
    """Measure one bead crop at the nominal ``pixel_um`` [µm].

    Returns
    -------
    dict
        ``radius_px``, ``peak_rad``, ``rms_rad``, ``cy``, ``cx``, ``phase_int_rad`` (sum
        within 1.3 r), ``focus_um`` and ``ok`` (fit converged).
    """
    cfg = cfg or QCConfig()
    fit = fit_sphere_phase(phase)
    yy, xx = np.indices(phase.shape)
    near = (yy - fit.cy) ** 2 + (xx - fit.cx) ** 2 <= (1.3 * fit.radius_px) ** 2
    focus = focus_offset_um(phase, amplitude, (fit.cy, fit.cx), fit.radius_px, pixel_um,
                            optics, cfg.focus_range_um, cfg.focus_step_um)
    return {"radius_px": fit.radius_px, "peak_rad": fit.peak_rad, "rms_rad": fit.rms_rad,
            "cy": fit.cy, "cx": fit.cx,
            "phase_int_rad": float((phase[near] - fit.offset_rad).sum(dtype=np.float64)),
            "focus_um": focus, "ok": float(fit.success)}


def _check(value: float, limit: float, ok: bool, unit: str = "") -> dict[str, Any]:
    return {"value": None if not math.isfinite(value) else float(value), "limit": float(limit),
            "unit": unit, "passed": bool(ok and math.isfinite(value))}


def evaluate(beads: list[dict[str, float]], cfg: QCConfig, nominal_pixel_um: float,
             optics: Optics = DEFAULT_OPTICS) -> dict[str, Any]:
    """QC result from the per-bead measurements (see the module docstring).

    Returns
    -------
    dict
        ``passed``, ``checks`` (name -> value, limit, passed), ``scale`` (``pixel_um``
        effective phase-grid pixel [µm], ``nominal_pixel_um``, ``magnification``,
        ``se_rel``), ``beads`` (count, mean radius, index, diameter, CV, dry mass) and
        ``focus_um``.
    """
    good = [b for b in beads if b.get("ok")]
    n = len(good)
    r = np.array([b["radius_px"] for b in good]) if n else np.zeros(0)
    if n:  # robust to the odd mis-segmented bead: median ± 5 MAD
        med = float(np.median(r))
        mad = float(np.median(np.abs(r - med))) or 1e-9
        keep = np.abs(r - med) <= 5 * 1.4826 * mad
        good = [b for b, k in zip(good, keep, strict=True) if k]
        r = r[keep]
        n = len(good)
    nan = float("nan")
    if n == 0:
        mean_r = se_rel = cv = nan
    else:
        mean_r = float(r.mean())
        sd = float(r.std(ddof=1)) if n > 1 else nan
        se_rel = sd / math.sqrt(n) / mean_r if n > 1 else nan
        cv = sd / mean_r if n > 1 else nan
    radius_um = 0.5 * cfg.bead_diameter_um
    pixel = radius_um / mean_r if n else nan
    mag = nominal_pixel_um / pixel if n else nan
    lam, nm = optics.wavelength_um, optics.medium_index
    idx = np.array([nm + b["peak_rad"] * lam / (4 * math.pi * b["radius_px"] * pixel)
                    for b in good]) if n else np.zeros(0)
    index = float(np.median(idx)) if n else nan
    dm = np.array([lam / (2 * math.pi * ALPHA_UM3_PER_PG) * b["phase_int_rad"] * pixel**2
                   for b in good]) if n else np.zeros(0)
    dm_expected = (cfg.bead_index - nm) * (4.0 / 3.0) * math.pi * radius_um**3 \
        / ALPHA_UM3_PER_PG
    dm_ratio = float(dm.mean()) / dm_expected if n else nan
    foc = np.array([b["focus_um"] for b in good]) if n else np.zeros(0)
    foc = foc[np.isfinite(foc)]
    focus = float(np.median(foc)) if foc.size else nan
    rms = float(np.median([b["rms_rad"] for b in good])) if n else nan
    checks = {
        "beads": _check(float(n), cfg.min_beads, n >= cfg.min_beads, "beads"),
        "scale_change": _check(abs(mag - 1.0), cfg.max_scale_change,
                               abs(mag - 1.0) <= cfg.max_scale_change),
        "scale_se": _check(se_rel, cfg.tol_scale_se, se_rel <= cfg.tol_scale_se),
        "index": _check(abs(index - cfg.bead_index), cfg.tol_index,
                        abs(index - cfg.bead_index) <= cfg.tol_index),
        "diameter_cv": _check(cv, cfg.tol_diameter_cv, cv <= cfg.tol_diameter_cv),
        "dry_mass": _check(abs(dm_ratio - 1.0), cfg.tol_dry_mass,
                           abs(dm_ratio - 1.0) <= cfg.tol_dry_mass),
        "focus": _check(abs(focus), cfg.tol_focus_um, abs(focus) <= cfg.tol_focus_um, "µm"),
        "fit_rms": _check(rms, cfg.max_rms_rad, rms <= cfg.max_rms_rad, "rad"),
    }
    passed = all(c["passed"] for c in checks.values())
    return {
        "passed": passed,
        "failed_checks": [k for k, c in checks.items() if not c["passed"]],
        "checks": checks,
        "scale": {"pixel_um": pixel, "nominal_pixel_um": nominal_pixel_um,
                  "magnification": mag, "se_rel": se_rel},
        "beads": {"measured": n, "fitted": len(beads), "mean_radius_px": mean_r,
                  "diameter_um": 2 * mean_r * pixel if n else nan,
                  "diameter_nominal_scale_um": 2 * mean_r * nominal_pixel_um if n else nan,
                  "diameter_cv": cv, "index": index, "index_sd": float(idx.std()) if n else nan,
                  "peak_phase_rad": float(np.median([b["peak_rad"] for b in good]))
                  if n else nan,
                  "dry_mass_pg": float(dm.mean()) if n else nan,
                  "dry_mass_expected_pg": dm_expected, "fit_rms_rad": rms},
        "focus_um": focus,
        "certified": {"diameter_um": cfg.bead_diameter_um, "index": cfg.bead_index},
    }


def run_qc(source: Any, cfg: QCConfig | None = None, pipeline_overrides: dict | None = None,
           optics: Optics = DEFAULT_OPTICS) -> dict[str, Any]:
    """Measure ``cfg.n_beads`` beads from an open-able ``source`` and evaluate them.

    Parameters
    ----------
    source : leukoflow.acquisition.sources.Source
        Frames of the QC sample (e.g. ``create_source("sim:0:0.3:beads")``).
    cfg : QCConfig
        Procedure and tolerances.
    pipeline_overrides : dict, optional
        :class:`~leukoflow.acquisition.pipeline.PipelineConfig` overrides (dotted names such
        as ``"segment.threshold"``, :func:`leukoflow.core.config.build`); QC always runs at
        the nominal scale, keeps the amplitude crop and does not isolate the crop.

    Returns
    -------
    dict
        :func:`evaluate` plus ``frames``, ``pipeline`` (accounting) and ``per_bead`` (the
        radius [px] of each measured bead, truth ids where the source has them).
    """
    cfg = cfg or QCConfig()
    # the focus gate is open: the QC measures (and judges) the focus itself
    kw = {"gates.max_amp_std": 1.0, **(pipeline_overrides or {}), "crop.with_amplitude": True,
          "crop.isolate_px": 0, "pixel_um": 0.0}
    pipe = AcquisitionPipeline(build(PipelineConfig, kw), optics=optics)
    source.open()
    try:
        bg = source.background
        if bg is None:
            raise ValueError("the QC source has no background hologram")
        pipe.set_background(bg)
        beads: list[dict[str, float]] = []
        truth: list[int] = []
        frames = 0

        def take(cells: list) -> None:
            for c in cells:
                if len(beads) >= cfg.n_beads:
                    return
                try:
                    m = measure_bead(c.crop.phase, c.crop.amplitude, pipe.pixel_um, optics, cfg)
                except ValueError:
                    continue
                beads.append(m)
                truth.append(int(c.truth_id))

        while len(beads) < cfg.n_beads and frames < cfg.max_frames:
            try:
                raw = source.read(timeout_s=1.0)
            except EndOfStream:
                break
            if raw is None:
                continue
            frames += 1
            take(pipe.process(raw).cells)
        take(pipe.flush(frames).cells)
    finally:
        source.close()
    out = evaluate(beads, cfg, pipe.pixel_um, optics)
    out["frames"] = frames
    out["pipeline"] = pipe.accounting()
    out["per_bead"] = {"radius_px": [b["radius_px"] for b in beads],
                       "focus_um": [b["focus_um"] for b in beads], "truth_id": truth}
    out["config"] = asdict(cfg)
    return out
