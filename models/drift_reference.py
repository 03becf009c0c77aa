"""Drift reference distributions of the shipped simulated-instrument models (reproducible).

``python -m leukoflow.models.drift_reference [--cells N] [--seed S] [--models a,b] [--check]``

For each model: ``N`` cells of the nominal instrument and a normal blood sample are cut by
the live acquisition path (:func:`leukoflow.acquisition.live_sample.live_sample`, default
profile), classified through the worker's decision path (backend, temperature, OOD
detector, confidence threshold: :func:`decide`), and summarised by
:meth:`leukoflow.inference.drift.DriftReference.fit` (reference distributions of size, dry
mass, mean phase, focus, the penultimate-layer features projected on their principal
axes, decision rates and the per-class predicted fractions of this reference mix). The
result is stored as ``card["drift"]`` with :func:`leukoflow.models.artifact.update_card`:
weights, temperature, thresholds and every other card value stay as they are.

The same helpers give the drift benchmark its data (:func:`sample_records`, cached).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from leukoflow.acquisition.live_sample import LIVE_SAMPLE_CONCENTRATION, live_sample
from leukoflow.inference.backends import create_backend
from leukoflow.inference.decision import rule_from_artifact
from leukoflow.inference.drift import DriftReference
from leukoflow.models.artifact import load_artifact, read_card, update_card

#: Models whose cards get a drift reference (the simulated-instrument models).
SIM_MODELS = ("lenet5-sim", "alexnet-sim", "lenet5-vi-sim")
#: Reference sample: cells and seed (disjoint from the benchmark seeds, which start at 100).
REFERENCE_CELLS = 20_000
REFERENCE_SEED = 7
#: Independent simulator sessions of the reference sample (between-session spread τ).
REFERENCE_PARTS = 16


def decide(x: np.ndarray, artifact: Any, backend: str = "auto", batch: int = 256
           ) -> dict[str, np.ndarray]:
    """Classify crops through the worker's decision path.

    Returns
    -------
    dict
        ``probs`` (N, K) calibrated, ``pred``, ``code`` (0 counted, 1 uncertain, 2 OOD),
        ``conf``, ``ood`` (detector score), ``pen`` (N, D) penultimate-layer features
        (the learned columns, without the phase descriptors).
    """
    if backend == "auto" and artifact.is_variational:
        backend = "torch-cpu"  # Monte-Carlo sampling: no ONNX export
    be = create_backend(backend, artifact, max_batch=batch, threads=1)
    rule = rule_from_artifact(artifact)
    nd = int((artifact.ood or {}).get("params", {}).get("n_descriptors", 0) or 0)
    outs: dict[str, list] = {k: [] for k in ("probs", "pred", "code", "conf", "ood", "pen")}
    try:
        for i in range(0, len(x), batch):
            o = be.infer(np.ascontiguousarray(x[i:i + batch], dtype=np.float32))
            d = rule(o.logits, o.features, o.ood_score)
            feats = o.features[:, : o.features.shape[1] - nd] if nd else o.features
            for k, v in (("probs", d.probs), ("pred", d.pred), ("code", d.code),
                         ("conf", d.conf), ("ood", d.ood_score), ("pen", feats)):
                outs[k].append(v)
    finally:
        be.close()
    k = len(artifact.class_names)
    empty = {"probs": np.zeros((0, k), np.float32), "pen": np.zeros((0, 0), np.float32)}
    return {n: (np.concatenate(v) if v else empty.get(n, np.zeros(0))) for n, v in outs.items()}


def cache_dir() -> Path | None:
    """``$LEUKOFLOW_DRIFT_CACHE`` (default ``~/.cache/leukoflow/drift``; ``off``: none)."""
    root = os.environ.get("LEUKOFLOW_DRIFT_CACHE",
                          str(Path.home() / ".cache" / "leukoflow" / "drift"))
    return None if root == "off" else Path(root)


def _cache_path(n_cells: int, seed: int, profile: str, concentration: float,
                pipeline: dict[str, Any] | None, parts: int, art: Any) -> Path | None:
    key = json.dumps({"v": 2, "n": n_cells, "seed": seed, "profile": profile,
                      "conc": concentration, "pipeline": pipeline or {}, "parts": parts,
                      "model": art.sha256, "ood": (art.card.get("ood") or {}).get("threshold"),
                      "t": art.temperature, "ct": art.confidence_threshold}, sort_keys=True)
    root = cache_dir()
    h = hashlib.sha256(key.encode()).hexdigest()[:20]
    return root / f"records-{art.name}-{h}.npz" if root else None


def _load(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as z:
        rec = {"feat": {k[5:]: z[k] for k in z.files if k.startswith("feat_")},
               "label": z["label"], "part": z["part"], "kind": [str(k) for k in z["kind"]],
               "meta": json.loads(str(z["meta"]))}
        for k in ("probs", "pred", "code", "conf", "ood", "pen"):
            rec[k] = z[k]
    return rec


def _save(path: Path, rec: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(
        tmp, meta=np.array(json.dumps(rec["meta"], default=str)), label=rec["label"],
        part=rec["part"], kind=np.array(rec["kind"], dtype="U16"),
        **{f"feat_{k}": v for k, v in rec["feat"].items()},
        **{k: rec[k] for k in ("probs", "pred", "code", "conf", "ood", "pen")})
    tmp.replace(path)


def records_for(models: list[str], n_cells: int, seed: int, profile: str = "",
                concentration: float = LIVE_SAMPLE_CONCENTRATION,
                pipeline: dict[str, Any] | None = None, parts: int = 4, workers: int = 1,
                artifacts: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Per-cell records of one live-path sample classified by each of ``models``.

    The sample is generated once (:func:`leukoflow.acquisition.live_sample.live_sample`)
    and each model's records are cached on disk (:func:`cache_dir`), keyed by the sample
    arguments and the model's weights, temperature and thresholds.

    Returns
    -------
    dict
        model -> ``feat`` {name: (N,)}, ``label``, ``kind``, ``part``, the :func:`decide`
        outputs (``pen`` float16) and ``meta``.
    """
    arts = {m: (artifacts or {}).get(m) or load_artifact(m) for m in models}
    paths = {m: _cache_path(n_cells, seed, profile, concentration, pipeline, parts, a)
             for m, a in arts.items()}
    out = {m: _load(p) for m, p in paths.items() if p is not None and p.is_file()}
    missing = [m for m in models if m not in out]
    if missing:
        s = live_sample(n_cells, seed=seed, profile=profile, parts=parts, workers=workers,
                        concentration=concentration, pipeline=pipeline)
        for m in missing:
            art = arts[m]
            rec = {"feat": s["feat"], "label": s["label"], "kind": s["kind"],
                   "part": s["part"],
                   "meta": {**s["meta"], "model": art.name, "model_sha256": art.sha256},
                   **decide(s["x"], art)}
            rec["pen"] = rec["pen"].astype(np.float16)
            if paths[m] is not None:
                _save(paths[m], rec)
            out[m] = rec
    return out


def sample_records(n_cells: int, seed: int, profile: str = "", model: str = "lenet5-sim",
                   **kw: Any) -> dict[str, Any]:
    """Records of one model (:func:`records_for`)."""
    return records_for([model], n_cells, seed, profile, **kw)[model]


def reference_block(rec: dict[str, Any], art: Any, n_cells: int, seed: int) -> dict[str, Any]:
    """The ``card["drift"]`` block from a model's records of the reference sample."""
    ref = DriftReference.fit(rec, class_names=art.class_names)
    out = ref.to_card()
    out["source"] = {
        "generator": "leukoflow.models.drift_reference",
        "command": f"python -m leukoflow.models.drift_reference --cells {n_cells} "
                   f"--seed {seed}",
        "sample": {k: rec["meta"].get(k) for k in ("generator", "seed", "n_cells",
                                                   "profile", "concentration", "parts")},
        "cells": int(len(rec["label"])), "model_sha256": art.sha256,
    }
    return out


def main(argv: list[str] | None = None) -> int:
    """Compute (or ``--check``) the drift reference of each model and store it in its card."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=REFERENCE_CELLS)
    ap.add_argument("--seed", type=int, default=REFERENCE_SEED)
    ap.add_argument("--models", default=",".join(SIM_MODELS))
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--check", action="store_true",
                    help="recompute and compare with the stored block; do not write")
    a = ap.parse_args(argv)
    rc = 0
    models = [m for m in a.models.split(",") if m]
    arts = {m: load_artifact(m) for m in models}
    recs = records_for(models, a.cells, a.seed, parts=REFERENCE_PARTS, workers=a.workers,
                       artifacts=arts)
    for m in models:
        block = reference_block(recs[m], arts[m], a.cells, a.seed)
        if a.check:
            stored = read_card(m).get("drift")
            same = stored is not None and json.dumps(stored["features"], sort_keys=True) == \
                json.dumps(json.loads(json.dumps(block["features"])), sort_keys=True)
            print(f"{m}: {'reproduced' if same else 'DIFFERS'}")
            rc |= 0 if same else 1
            continue
        update_card(m, {"drift": block})
        print(f"{m}: drift reference from {block['source']['cells']} cells stored")
    return rc


if __name__ == "__main__":
    sys.exit(main())
