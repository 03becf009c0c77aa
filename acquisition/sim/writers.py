"""Write simulated runs and crop datasets as ``.rtdc`` files (via :mod:`leukoflow.core.rtdc`).

Raw run: events ``qpi_oah`` (uint8 holograms), ``qpi_oah_bg`` (the background hologram,
repeated per event as dclab expects), ``frame``, ``time`` [s], ``index``; ground truth per
object per frame in ``tables/sim_truth``; instrument metadata in ``[qpi]``, ``[imaging]``,
``[experiment]``, ``[setup]``; every simulator parameter as ``user:`` attributes and JSON in
``logs/leukoflow-params``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from leukoflow.acquisition.sim.flow import CellTruth, FlowSimulator
from leukoflow.acquisition.sim.params import SimConfig
from leukoflow.core.rtdc import RtdcWriter, base_meta, write_crop_dataset
from leukoflow.core.vocabulary import CLASS_NAMES, OOD_KINDS

#: Kind codes of the ground-truth table (``kind_code`` indexes this list); ``bead`` is the
#: QC reference particle (:mod:`leukoflow.acquisition.sim.beads`).
KIND_NAMES: tuple[str, ...] = tuple(CLASS_NAMES) + tuple(OOD_KINDS) + ("bead",)

TRUTH_DTYPE = np.dtype([
    ("frame", "<i8"), ("cell_id", "<i8"), ("kind", "S16"), ("kind_code", "<i4"),
    ("label", "<i4"), ("x", "<f8"), ("y", "<f8"), ("diameter_um", "<f8"),
    ("fully_inside", "u1"), ("defocus_um", "<f8"), ("speed_um_s", "<f8"),
])


def truth_table(rows: list[tuple[int, CellTruth]]) -> np.ndarray:
    """Structured ground-truth array from ``(frame index, CellTruth)`` pairs.

    Columns: frame, cell_id, kind (bytes), kind_code (index into :data:`KIND_NAMES`),
    label, x, y [phase px], diameter_um [µm], fully_inside (0/1), defocus_um [µm],
    speed_um_s [µm/s].
    """
    out = np.zeros(len(rows), TRUTH_DTYPE)
    for i, (f, c) in enumerate(rows):
        out[i] = (f, c.cell_id, c.kind.encode(), KIND_NAMES.index(c.kind), c.label, c.x_px,
                  c.y_px, c.diameter_um, int(c.fully_inside), c.defocus_um, c.speed_um_s)
    return out


def instrument_meta(cfg: SimConfig, sample: str) -> dict[str, dict[str, Any]]:
    """dclab metadata sections describing the simulated instrument."""

    o = cfg.optics
    meta = base_meta(o, sample=sample)
    meta["imaging"].update({"pixel size": o.pixel_um, "frame rate": o.frame_rate_hz,
                            "roi size x": o.roi_shape[1], "roi size y": o.roi_shape[0],
                            "flash device": "simulated", "flash duration": 1.0})
    meta["setup"].update({"channel width": o.roi_shape[0] * o.camera_pixel_um,
                          "chip region": "channel", "medium": "other",
                          "flow rate": 0.0, "identifier": "leukoflow-sim"})
    meta["qpi"].update({"wavelength": o.wavelength_um * 1000.0, "medium index": o.medium_index,
                        "pixel size raw": o.camera_pixel_um, "pixel size proc": o.pixel_um,
                        "sideband freq": [float(o.carrier[0]), float(o.carrier[1])],
                        "bg method": "experimental", "invert phase": False})
    return meta


def write_run(path: str | Path, cfg: SimConfig, n_frames: int, chunk: int = 32) -> dict:
    """Simulate ``n_frames`` frames and write the raw run.

    Parameters
    ----------
    path : path-like
        Output ``.rtdc`` file (overwritten).
    cfg : SimConfig
        Simulator parameters.
    n_frames : int
        Number of frames.
    chunk : int
        Frames per write.

    Returns
    -------
    dict
        Summary: path, frames, objects by kind, truth rows, shape, seed.
    """

    if n_frames < 1:
        raise ValueError("n_frames must be >= 1")
    sim = FlowSimulator(cfg)
    rows: list[tuple[int, CellTruth]] = []
    params = {"simulator": "acquisition.sim.FlowSimulator", **sim.metadata()}
    meta = instrument_meta(cfg, sample=f"simulated run seed {cfg.seed}")
    h, w = sim.shape
    with RtdcWriter(path, meta, params=params, swmr=False) as wr:
        bg = np.broadcast_to(sim.background, (chunk, h, w))
        done = 0
        while done < n_frames:
            k = min(chunk, n_frames - done)
            holo = np.empty((k, h, w), np.uint8)
            idx = np.empty(k, np.float64)
            t = np.empty(k, np.float64)
            for j, fr in enumerate(sim.frames(k)):
                holo[j] = fr.hologram
                idx[j], t[j] = fr.index, fr.t_s
                rows.extend((fr.index, c) for c in fr.truth)
            wr.append(qpi_oah=holo, qpi_oah_bg=np.ascontiguousarray(bg[:k]), frame=idx,
                      time=t, index=np.arange(done + 1, done + k + 1, dtype=np.float64))
            done += k
        table = truth_table(rows)
        wr.add_table("sim_truth", table)
        wr.set_meta("user", "kind_names", list(KIND_NAMES))
    seen = {}
    for _, c in rows:
        seen.setdefault(c.cell_id, c.kind)
    by_kind = {k: sum(1 for v in seen.values() if v == k) for k in KIND_NAMES}
    return {"path": str(path), "frames": int(n_frames), "shape": [h, w], "seed": cfg.seed,
            "objects": len(seen), "objects_by_kind": {k: v for k, v in by_kind.items() if v},
            "truth_rows": len(rows)}


def write_crops(path: str | Path, data: dict, cfg: SimConfig | None = None) -> dict:
    """Write a dataset from :func:`acquisition.sim.make_crop_dataset` as ``.rtdc``.

    dclab features ``area_um``, ``deform``, ``qpi_dm``, ``qpi_pha_int`` are events; every
    feature (including ``diameter_um``, ``defocus_um``, ``pha_mean``, ``pha_max``) is also
    stored in ``tables/crop_features``.
    """

    cfg = cfg or SimConfig.from_dict(data["meta"]["sim"])
    meta = instrument_meta(cfg, sample=f"simulated crops seed {data['meta']['seed']}")
    dclab_feats = ("area_um", "deform", "qpi_dm", "qpi_pha_int")
    feats = {k: v for k, v in data["features"].items() if k in dclab_feats}
    write_crop_dataset(path, data["x"], data["y"], data["kind"], feats, meta,
                       params={"dataset": data["meta"]})
    _add_feature_table(path, data["features"])
    y = np.asarray(data["y"])
    counts = {k: data["kind"].count(k) for k in dict.fromkeys(data["kind"])}
    return {"path": str(path), "crops": int(len(y)), "shape": list(data["x"].shape[1:]),
            "by_kind": counts, "seed": data["meta"]["seed"]}


def _add_feature_table(path: str | Path, features: dict[str, np.ndarray]) -> None:
    import h5py

    names = sorted(features)
    n = len(next(iter(features.values()))) if features else 0
    tab = np.zeros(n, np.dtype([(k, "<f8") for k in names]))
    for k in names:
        tab[k] = features[k]
    with h5py.File(path, "a") as h5:
        grp = h5.require_group("tables")
        if "crop_features" in grp:
            del grp["crop_features"]
        grp.create_dataset("crop_features", data=tab)
