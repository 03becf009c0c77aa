"""Labelled crop datasets produced by the live acquisition path (simulator -> pipeline).

:func:`acquisition.sim.make_crop_dataset` renders each object alone and demodulates it the
ideal way; the instrument's classifier, however, sees crops that went through the whole
acquisition path: off-axis reconstruction of full frames, background fit, segmentation,
gates, tracking (best-focused, most central instance) and crop isolation. Training on the
former and running on the latter is a domain gap (measured: eosinophils over-counted and
more leukocytes flagged OOD in live runs). This module produces training, calibration and
test crops the way the instrument does: the flow simulator's frames go through
:class:`leukoflow.acquisition.pipeline.AcquisitionPipeline` and every emitted cell is labelled with
the ground truth it was traced to (cells the gates reject never reach the classifier and
so are not in the dataset either).

The work is split into a fixed number of independent *parts* (each its own simulator
seed), so the result is the same for any number of worker processes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from leukoflow.acquisition.pipeline import AcquisitionPipeline, PipelineConfig
from leukoflow.acquisition.sim import SimConfig
from leukoflow.acquisition.sim.dataset import FEATURE_NAMES, crop_features, resolve_kinds
from leukoflow.acquisition.sources import create_source
from leukoflow.core.config import build
from leukoflow.core.physics import CROP_SIZE_PX
from leukoflow.core.vocabulary import CLASS_NAMES, OOD_KINDS

#: Version of the arrays this module produces (part of the dataset cache key of
#: ``leukoflow.models.data``): bump it whenever a change alters the crops or which cells are taken.
#: v1: before touching blobs were split and merged views coasted in the tracker (the shipped
#: simulated-instrument models were trained on v1 arrays); v2: with both.
DATASET_VERSION = 2

#: Objects per field of view used for dataset generation (more cells per reconstructed
#: frame than a sparse default; touching pairs are still rejected by the doublet gate).
GEN_CONCENTRATION = 1.5

#: Frames a part may read per requested cell before it gives up (kinds the gates reject,
#: e.g. most platelets, cannot fill their quota).
MAX_FRAMES_PER_CELL = 40


def _quota(n: int, parts: int, p: int) -> int:
    """Cells of one kind that part ``p`` of ``parts`` collects (sums to ``n``)."""
    return n // parts + (1 if p < n % parts else 0)


def _run_part(args: tuple) -> dict[str, Any]:
    """Collect one part's crops (process-pool worker); returns arrays and counts."""
    (seed, part, kinds, quota, ood, crop, sim_kwargs, pipe_kwargs) = args

    w = {k: 1.0 for k in kinds}
    if ood == "mix":  # the simulator's natural mix (blood + OOD fractions), any kind
        cfg = SimConfig(seed=0, **sim_kwargs)
    elif ood:
        cfg = SimConfig(seed=0, class_fractions={"neutrophil": 1.0},
                        ood_fractions={k: 1.0 / len(kinds) for k in kinds}, **sim_kwargs)
    else:
        cfg = SimConfig(seed=0, class_fractions=w,
                        ood_fractions={k: 0.0 for k in OOD_KINDS}, **sim_kwargs)
    mode = 2 if ood == "mix" else int(bool(ood))  # 0 leukocytes, 1 OOD kinds, 2 natural mix
    sub_seed = int(np.random.SeedSequence([int(seed), int(part), 0x9D5, mode])
                   .generate_state(1)[0])
    src = create_source("sim", seed=sub_seed, config=cfg)
    src.open()
    pc = build(PipelineConfig, pipe_kwargs) if pipe_kwargs else PipelineConfig()
    pipe = AcquisitionPipeline(pc, background=src.background)
    if pipe.config.crop.size != crop:
        raise ValueError(f"pipeline crop size {pipe.config.crop.size} != requested {crop}")
    need = {k: quota[k] for k in kinds}
    got: dict[str, list] = {k: [] for k in kinds}
    max_frames = MAX_FRAMES_PER_CELL * max(1, sum(need.values()))
    frames = 0

    mixed: list = []  # "mix": every traced cell in arrival order, up to quota["*"]
    untraced = 0

    def take(cells: list) -> None:
        nonlocal untraced
        for c in cells:
            if c.truth_id < 0:
                untraced += 1
                continue
            if ood == "mix":
                if len(mixed) < need["*"]:
                    mixed.append(c)
                continue
            if c.kind not in got or len(got[c.kind]) >= need[c.kind]:
                continue
            got[c.kind].append(c)

    def wanting() -> bool:
        if ood == "mix":
            return len(mixed) < need["*"]
        return any(len(got[k]) < need[k] for k in kinds)

    while frames < max_frames and wanting():
        res = pipe.process(src.read())
        frames += 1
        take(res.cells)
    take(pipe.flush(frames).cells)
    pixel_um = float(pipe.pixel_um)
    wavelength_um = float(cfg.optics.wavelength_um)
    rows = mixed if ood == "mix" else [c for k in kinds for c in got[k]]
    x = np.zeros((len(rows), crop, crop), np.float32)
    feats = {f: np.zeros(len(rows), np.float64) for f in FEATURE_NAMES}
    for i, c in enumerate(rows):
        x[i] = c.crop.phase
        for k, v in crop_features(x[i], c.crop.mask, pixel_um, wavelength_um).items():
            feats[k][i] = v
    diam, defocus = _truth_geometry(src, rows)
    feats["diameter_um"][:] = diam
    feats["defocus_um"][:] = defocus
    return {"x": x, "kind": [c.kind for c in rows], "truth_id": [int(c.truth_id) for c in rows],
            "features": feats, "frames": frames, "pixel_um": pixel_um, "untraced": untraced,
            "accounting": pipe.accounting(), "sim": cfg.to_dict(),
            "pipeline": dataclasses.asdict(pipe.config) if dataclasses.is_dataclass(
                pipe.config) else {}}


def _run_jobs(jobs: list[tuple], workers: int) -> list[dict[str, Any]]:
    """Run :func:`_run_part` over ``jobs`` (spawned processes when ``workers > 1``)."""
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(jobs)),
                                 mp_context=mp.get_context("spawn")) as ex:
            return list(ex.map(_run_part, jobs))
    return [_run_part(j) for j in jobs]


def _truth_geometry(src: Any, rows: list) -> tuple[np.ndarray, np.ndarray]:
    """Diameter [µm] and defocus [µm] of each emitted cell from its source frame's truth."""
    diam = np.full(len(rows), np.nan)
    defocus = np.full(len(rows), np.nan)
    for i, c in enumerate(rows):
        for t in getattr(c.origin, "truth", []) or []:
            if t.cell_id == c.truth_id:
                diam[i], defocus[i] = t.diameter_um, t.defocus_um
                break
    return diam, defocus


def make_pipeline_dataset(n_per_class: int, ood_per_kind: int = 0, seed: int = 0,
                          crop: int = CROP_SIZE_PX, classes: Sequence[str] | None = None,
                          ood_kinds: Sequence[str] | None = None, parts: int = 8,
                          workers: int = 1, shuffle: bool = True,
                          concentration: float = GEN_CONCENTRATION,
                          pipeline: dict[str, Any] | None = None) -> dict[str, Any]:
    """Labelled phase crops as the acquisition pipeline emits them from simulated flow.

    Parameters
    ----------
    n_per_class : int
        Crops per leukocyte class (class-balanced flow: equal class fractions).
    ood_per_kind : int
        Crops per OOD kind wanted (from a separate OOD-only flow). Kinds that the quality
        gates mostly reject may end with fewer; ``meta["ood_counts"]`` says how many.
    seed : int
        Seed; the same arguments give the same arrays, for any ``workers``.
    crop : int
        Crop side [phase px]; must equal the pipeline's crop size.
    classes, ood_kinds : sequence of str, optional
        Subsets of CLASS_NAMES / OOD_KINDS (default: all).
    parts : int
        Independent simulator runs the quota is split over (fixes the result).
    workers : int
        Processes sharing the parts (spawned: call from under ``if __name__ ==
        "__main__":`` in scripts).
    shuffle : bool
        Random order (else grouped by kind).
    concentration : float
        Objects per field of view of the generating flow.
    pipeline : dict, optional
        :class:`leukoflow.acquisition.pipeline.PipelineConfig` overrides (dotted names such as
        ``"gates.max_amp_std"`` or nested mappings: :func:`leukoflow.core.config.build`).

    Returns
    -------
    dict
        Same layout as :func:`acquisition.sim.make_crop_dataset`: ``x`` float32 (N, crop,
        crop) [rad], ``y`` int64 (N,) (-1 for OOD), ``kind`` list[str], ``features``,
        ``meta`` (all parameters, per-kind counts, frames processed, pipeline accounting).
    """
    if n_per_class < 0 or ood_per_kind < 0:
        raise ValueError("n_per_class and ood_per_kind must be >= 0")
    if parts < 1:
        raise ValueError("parts must be >= 1")
    classes, ood_kinds = resolve_kinds(classes, ood_kinds)
    sim_kwargs = {"concentration": float(concentration)}
    pipe_kwargs = dict(pipeline or {})
    jobs = []
    for p in range(parts):
        if n_per_class and classes:
            jobs.append((seed, p, classes, {k: _quota(n_per_class, parts, p) for k in classes},
                         False, crop, sim_kwargs, pipe_kwargs))
        if ood_per_kind and ood_kinds:
            jobs.append((seed, p, ood_kinds,
                         {k: _quota(ood_per_kind, parts, p) for k in ood_kinds}, True, crop,
                         sim_kwargs, pipe_kwargs))
    out = _run_jobs(jobs, workers)
    xs = [o["x"] for o in out]
    x = np.concatenate(xs) if xs else np.zeros((0, crop, crop), np.float32)
    kinds = [k for o in out for k in o["kind"]]
    feats = {f: (np.concatenate([o["features"][f] for o in out]) if out else np.zeros(0))
             for f in FEATURE_NAMES}
    label_of = {c: i for i, c in enumerate(CLASS_NAMES)}
    y = np.array([label_of.get(k, -1) for k in kinds], np.int64)
    order = np.arange(len(kinds))
    if shuffle:
        order = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC20A])
                                      ).permutation(len(kinds))
    x, y = x[order], y[order]
    kinds = [kinds[i] for i in order]
    feats = {k: v[order] for k, v in feats.items()}
    counts = {k: int(sum(1 for q in kinds if q == k)) for k in classes + ood_kinds}
    meta = {
        "generator": "acquisition.pipeline_dataset.make_pipeline_dataset",
        "seed": int(seed), "n_per_class": int(n_per_class), "ood_per_kind": int(ood_per_kind),
        "crop": int(crop), "parts": int(parts), "classes": classes, "ood_kinds": ood_kinds,
        "class_names": list(CLASS_NAMES), "kind_names": list(CLASS_NAMES) + list(OOD_KINDS),
        "counts": counts,
        "ood_counts": {k: counts[k] for k in ood_kinds} if ood_per_kind else {},
        "frames": int(sum(o["frames"] for o in out)),
        "pixel_um": out[0]["pixel_um"] if out else None,
        "concentration": float(concentration),
        "through_pipeline": True,
        "centring": "pipeline: segmented phase centroid of the best-focused, most central "
                    "instance of each track",
        "feature_mask": "pipeline cell mask; phase features from x",
        "sim": out[0]["sim"] if out else {},
        "pipeline": out[0]["pipeline"] if out else {},
    }
    return {"x": x, "y": y, "kind": kinds, "features": feats, "meta": meta}


#: Objects per field of view of :func:`make_flow_sample` (a dense sample: the simulator's
#: sparse default would need ~50 frames per cell; coincidences are gated as in a live run).
FLOW_SAMPLE_CONCENTRATION = 0.3


def make_flow_sample(n_cells: int, seed: int = 0, parts: int = 8, workers: int = 1,
                     concentration: float = FLOW_SAMPLE_CONCENTRATION) -> dict[str, Any]:
    """The first ``n_cells`` traced cells the live path emits from the natural sample mix.

    The simulator's default class and OOD fractions (blood), default pipeline and gates:
    what the classifier receives in a live run (at ``concentration``), with ground truth.
    Used to check the live differential against truth (``bench_e2e.py --accuracy``).

    Parameters
    ----------
    n_cells : int
        Cells wanted (split over ``parts`` independent simulator runs).
    seed : int
        Seed (same arguments, same arrays, for any ``workers``).
    parts, workers : int
        Independent runs and the processes sharing them.
    concentration : float
        Objects per field of view (:data:`FLOW_SAMPLE_CONCENTRATION`).

    Returns
    -------
    dict
        Layout of :func:`make_pipeline_dataset` (``y`` = -1 for OOD objects).
    """
    if n_cells < 0 or parts < 1:
        raise ValueError("n_cells must be >= 0 and parts >= 1")
    conc = float(concentration)
    jobs = [(seed, p, ["*"], {"*": _quota(n_cells, parts, p)}, "mix", CROP_SIZE_PX,
             {"concentration": conc}, {}) for p in range(parts)]
    out = _run_jobs(jobs, workers)
    kinds = [k for o in out for k in o["kind"]]
    label_of = {c: i for i, c in enumerate(CLASS_NAMES)}
    empty = np.zeros((0, CROP_SIZE_PX, CROP_SIZE_PX))
    return {"x": np.concatenate([o["x"] for o in out]) if out else empty,
            "y": np.array([label_of.get(k, -1) for k in kinds], np.int64), "kind": kinds,
            "features": {f: np.concatenate([o["features"][f] for o in out])
                         for f in FEATURE_NAMES},
            "meta": {"generator": "acquisition.pipeline_dataset.make_flow_sample",
                     "seed": int(seed), "n_cells": int(n_cells), "parts": int(parts),
                     "concentration": conc, "frames": int(sum(o["frames"] for o in out)),
                     "untraced": int(sum(o["untraced"] for o in out)),
                     "sim": out[0]["sim"] if out else {}}}
