"""Per-cell explanation artifacts: ``<cell_id>.json``, ``<cell_id>.npz`` and ``<cell_id>.png``.

The JSON holds the decision, calibrated probabilities, OOD score, the model description
and every method's parameters and diagnostics; the maps (float32) go to a side ``.npz``
(read back with ``numpy.load(..., allow_pickle=False)``); the PNG shows the phase crop and
one relevance overlay per method (red supports the explained class, blue speaks against).
Files are written to a temporary name and renamed, so readers never see half a file.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from leukoflow.core.jsonutil import atomic_write_bytes, atomic_write_json
from leukoflow.explain.methods.base import Explanation

SCHEMA = "leukoflow-explanation/1"


def overlay_rgb(phase: np.ndarray, relevance: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Blend a relevance map (diverging red/blue, symmetric scale) over a grey phase image.

    Returns
    -------
    ndarray uint8 (H, W, 3)
    """
    ph = np.asarray(phase, np.float64)
    lo, hi = np.percentile(ph, [1, 99.5])
    g = np.clip((ph - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(ph)
    grey = np.repeat(g[..., None], 3, axis=2)
    r = np.asarray(relevance, np.float64)
    peak = np.abs(r).max()
    v = r / peak if peak > 0 else r
    col = np.zeros(r.shape + (3,))
    col[..., 0] = np.clip(v, 0, 1)            # red: positive
    col[..., 2] = np.clip(-v, 0, 1)           # blue: negative
    a = alpha * np.abs(v)[..., None]
    rgb = (1 - a) * grey + a * col
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def render_png(phase: np.ndarray, maps: Mapping[str, np.ndarray], title: str = "",
               scale: int = 3) -> bytes:
    """PNG bytes: the phase crop, then one overlay per method, labelled, side by side."""
    from PIL import Image, ImageDraw

    ph = np.asarray(phase, np.float64)
    lo, hi = np.percentile(ph, [1, 99.5])
    g = (np.clip((ph - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8) if hi > lo else \
        np.zeros(ph.shape, np.uint8)
    panels = [("phase", np.repeat(g[..., None], 3, axis=2))]
    panels += [(name, overlay_rgb(phase, m)) for name, m in maps.items()]
    h, w = ph.shape
    ph_px, pw_px, top = h * scale, w * scale, 14
    canvas = Image.new("RGB", (len(panels) * (pw_px + 4), ph_px + 2 * top), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (name, rgb) in enumerate(panels):
        im = Image.fromarray(rgb).resize((pw_px, ph_px), Image.NEAREST)
        x0 = i * (pw_px + 4)
        canvas.paste(im, (x0, top))
        draw.text((x0 + 2, 1), name[:24], fill="black")
    if title:
        draw.text((2, ph_px + top + 1), title[:120], fill="black")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_cell_artifact(out_dir: str | Path, cell_id: int, phase: np.ndarray,
                        explanations: Sequence[Explanation], record: Mapping[str, Any],
                        png: bool = True) -> dict[str, Path]:
    """Write the JSON, NPZ (and PNG) artifact of one cell.

    Parameters
    ----------
    out_dir : path
        The run's ``explanations/`` folder (created if missing).
    cell_id : int
        Cell id (unique within a run); the file stem.
    phase : ndarray (H, W)
        The crop [rad].
    explanations : sequence of Explanation
        One per method.
    record : mapping
        Cell data: decision, pred, probabilities, ood_score, conf, model, run...

    Returns
    -------
    dict
        ``{"json": path, "npz": path, "png": path?}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{int(cell_id)}"
    arrays: dict[str, np.ndarray] = {"phase": np.asarray(phase, np.float32)}
    methods: dict[str, Any] = {}
    for e in explanations:
        arrays[e.method] = np.asarray(e.map, np.float32)
        for k, v in e.extra.items():
            arrays[f"{e.method}_{k}"] = np.asarray(v)
        methods[e.method] = {"params": e.params, "info": e.info, "duration_s": e.duration_s,
                             "target": list(e.target) if isinstance(e.target, tuple)
                             else int(e.target),
                             "maps": [e.method] + [f"{e.method}_{k}" for k in e.extra]}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    paths = {"npz": out / f"{stem}.npz", "json": out / f"{stem}.json"}
    atomic_write_bytes(paths["npz"], buf.getvalue())
    doc = {"schema": SCHEMA, "cell_id": int(cell_id), **dict(record), "methods": methods,
           "maps_file": paths["npz"].name, "map_shape": list(np.shape(phase))}
    if png:
        paths["png"] = out / f"{stem}.png"
        cls = record.get("pred_class", "")
        title = (f"cell {cell_id}: {record.get('decision', '')} {cls} "
                 f"p={record.get('conf', float('nan')):.2f} "
                 f"ood={record.get('ood_score', float('nan')):.2f}")
        atomic_write_bytes(paths["png"], render_png(phase, {e.method: e.map for e in explanations},
                                               title))
        doc["png_file"] = paths["png"].name
    atomic_write_json(paths["json"], doc)
    return paths


def read_cell_artifact(json_path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read one artifact back: (JSON document, maps dict from the side ``.npz``)."""
    p = Path(json_path)
    doc = json.loads(p.read_text())
    with np.load(p.with_name(doc["maps_file"]), allow_pickle=False) as z:
        maps = {k: z[k] for k in z.files}
    return doc, maps
