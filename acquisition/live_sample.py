"""Cells exactly as the live acquisition publishes them, from a (profiled) simulated sample.

:func:`live_sample` runs the flow simulator (any instrument/sample profile,
:mod:`leukoflow.acquisition.sim.profiles`) through :class:`AcquisitionPipeline` and keeps,
for every emitted cell, the crop, the ``feat`` map the publisher puts on the wire
(:data:`leukoflow.acquisition.features.FEATURE_NAMES`) and the ground truth it was traced
to. Drift references, drift benchmarks and QC-corrected accuracy runs use it: the cells
are what a worker receives in a live run, without sockets and pacing.

The work is split into ``parts`` independent simulator runs (own seeds), so the result
does not depend on the number of worker processes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from leukoflow.acquisition.features import FEATURE_NAMES
from leukoflow.acquisition.pipeline import AcquisitionPipeline, PipelineConfig
from leukoflow.acquisition.sources import create_source
from leukoflow.core.config import build

#: Objects per field of view of the generating flow (dense; coincidences are gated as live).
LIVE_SAMPLE_CONCENTRATION = 0.3

#: Frames a part may read per requested cell before it stops.
MAX_FRAMES_PER_CELL = 60


def _part(args: tuple) -> dict[str, Any]:
    seed, part, n, profile, conc, pipe_kwargs, crop_dtype = args
    sub = int(np.random.SeedSequence([int(seed), int(part), 0xD21F]).generate_state(1)[0])
    spec = f"sim:{sub}:{conc}" + (f":{profile}" if profile else "")
    src = create_source(spec)
    src.open()
    pipe = AcquisitionPipeline(build(PipelineConfig, pipe_kwargs or {}))
    pipe.set_background(src.background)
    cells: list = []
    frames = 0
    while len(cells) < n and frames < MAX_FRAMES_PER_CELL * max(n, 1):
        cells += pipe.process(src.read()).cells
        frames += 1
    cells += pipe.flush(frames).cells
    cells = cells[:n]
    m = len(cells)
    x = np.zeros((m, pipe.config.crop.size, pipe.config.crop.size), crop_dtype)
    feat = {k: np.full(m, np.nan) for k in FEATURE_NAMES}
    for i, c in enumerate(cells):
        x[i] = c.crop.phase
        for k in FEATURE_NAMES:
            v = c.crop.features.get(k, math.nan)
            feat[k][i] = float(v) if v is not None else math.nan
    return {"x": x, "feat": feat, "label": np.array([c.label for c in cells], np.int64),
            "kind": [c.kind for c in cells],
            "truth_id": np.array([c.truth_id for c in cells], np.int64),
            "frames": frames, "accounting": pipe.accounting(),
            "sim": src.config.to_dict(), "pixel_um": pipe.pixel_um}


def live_sample(n_cells: int, seed: int = 0, profile: str = "", parts: int = 4,
                workers: int = 1, concentration: float = LIVE_SAMPLE_CONCENTRATION,
                pipeline: dict[str, Any] | None = None,
                crop_dtype: Any = np.float32) -> dict[str, Any]:
    """The first ``n_cells`` cells the live path emits from a simulated sample.

    Parameters
    ----------
    n_cells : int
        Cells wanted (split over ``parts``); all emitted cells are kept, traced or not
        (a live run classifies them all).
    seed : int
        Seed (same arguments, same cells, for any ``workers``).
    profile : str
        Simulator profiles (``"cells+5"``, ``"mag+5"``, comma separated; '' = default).
    parts, workers : int
        Independent simulator runs and the processes sharing them (spawned).
    concentration : float
        Objects per field of view.
    pipeline : dict, optional
        :class:`PipelineConfig` overrides (e.g. ``{"pixel_um": qc_pixel}``).
    crop_dtype : numpy dtype
        dtype of the returned crops.

    Returns
    -------
    dict
        ``x`` (N, S, S) crops [rad], ``feat`` {name: (N,)} published features, ``label``
        (class index, -1 OOD), ``kind``, ``truth_id``, ``part`` (simulator run of each
        cell: an independent session), ``meta`` (frames, accounting per
        part, simulator configuration of part 0, pipeline pixel size).
    """
    if n_cells < 0 or parts < 1:
        raise ValueError("n_cells must be >= 0 and parts >= 1")
    quota = [n_cells // parts + (1 if p < n_cells % parts else 0) for p in range(parts)]
    jobs = [(seed, p, quota[p], profile, float(concentration), dict(pipeline or {}),
             crop_dtype) for p in range(parts) if quota[p] > 0]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(jobs)),
                                 mp_context=mp.get_context("spawn")) as ex:
            out = list(ex.map(_part, jobs))
    else:
        out = [_part(j) for j in jobs]
    size = build(PipelineConfig, pipeline or {}).crop.size
    return {
        "x": np.concatenate([o["x"] for o in out]) if out else np.zeros((0, size, size)),
        "feat": {k: np.concatenate([o["feat"][k] for o in out]) if out else np.zeros(0)
                 for k in FEATURE_NAMES},
        "label": np.concatenate([o["label"] for o in out]) if out else np.zeros(0, np.int64),
        "kind": [k for o in out for k in o["kind"]],
        "truth_id": np.concatenate([o["truth_id"] for o in out]) if out
        else np.zeros(0, np.int64),
        "part": np.concatenate([np.full(len(o["label"]), j, np.int64)
                                for j, o in enumerate(out)]) if out else np.zeros(0, np.int64),
        "meta": {"generator": "acquisition.live_sample.live_sample", "seed": int(seed),
                 "n_cells": int(n_cells), "profile": profile, "parts": int(parts),
                 "concentration": float(concentration), "pipeline": dict(pipeline or {}),
                 "frames": int(sum(o["frames"] for o in out)),
                 "accounting": [o["accounting"] for o in out],
                 "pixel_um": out[0]["pixel_um"] if out else None,
                 "sim": out[0]["sim"] if out else {}},
    }
