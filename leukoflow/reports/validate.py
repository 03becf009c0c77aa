"""Validate a labelled recording: compare its predictions with the ground truth.

``validate_recording(path)`` reads a leukoflow ``.rtdc`` recording (predictions in
``ml_score_*`` and ``userdef2..5``, ground truth in ``userdef0``; see
:mod:`leukoflow.run.recorder`) and reports

* ``classification``: arg-max accuracy over every labelled in-distribution cell, the
  confusion matrix (rows = true class, columns = predicted class) and per-class precision,
  recall and F1; the same restricted to *counted* cells (``counted``) with the coverage;
* ``decisions``: rows = true class (and ``ood`` objects), columns = class / uncertain / ood;
* ``differential``: live differential (fraction of counted cells per predicted class) vs the
  true differential of the labelled in-distribution cells, error in percentage points;
* ``calibration``: ECE (15 equal-width bins, top label; :mod:`leukoflow.core.stats`),
  adaptive ECE, MCE, NLL, Brier and the reliability-diagram bins;
* ``ood``: rejection rate of OOD objects (decided ``ood``), per object kind, and the false
  rejection rate of in-distribution cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from leukoflow.core.stats import (
    N_BINS,
    adaptive_ece,
    ece,
    em_prior_shift,
    mce,
    reliability_bins,
)
from leukoflow.core.vocabulary import CLASS_NAMES
from leukoflow.models import calibration
from leukoflow.run.recorder import read_recording


def _prf(cm: np.ndarray, names: Sequence[str]) -> dict[str, dict[str, float | int | None]]:
    out = {}
    for i, name in enumerate(names):
        tp = int(cm[i, i])
        fp = int(cm[:, i].sum() - tp)
        fn = int(cm[i, :].sum() - tp)
        p = tp / (tp + fp) if tp + fp else None
        r = tp / (tp + fn) if tp + fn else None
        f1 = 2 * p * r / (p + r) if p is not None and r is not None and p + r > 0 else None
        out[name] = {"precision": p, "recall": r, "f1": f1, "support": int(cm[i, :].sum())}
    return out


def evaluate_predictions(probs: np.ndarray, labels: np.ndarray, decisions: Sequence[str],
                         kinds: Sequence[str] | None = None,
                         classes: Sequence[str] = CLASS_NAMES) -> dict[str, Any]:
    """Compare predictions with labels (the core of :func:`validate_recording`).

    Parameters
    ----------
    probs : ndarray (N, K)
        Calibrated probabilities.
    labels : ndarray (N,)
        Class index, -1 for OOD objects, -2 (or < -1) for unknown.
    decisions : sequence of str
        ``counted``, ``uncertain`` or ``ood`` per cell.
    kinds : sequence of str, optional
        Object kind per cell (for per-kind OOD rejection rates).
    classes : sequence of str
        Class names in column order.
    """

    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    dec = np.asarray(list(decisions))
    k = len(classes)
    pred = probs.argmax(1)
    idd = labels >= 0
    ood_obj = labels == -1
    if not (idd.any() or ood_obj.any()):
        raise ValueError("the recording has no ground-truth labels (userdef0)")
    out: dict[str, Any] = {"n": int(len(labels)), "labelled_in_distribution": int(idd.sum()),
                           "ood_objects": int(ood_obj.sum()), "classes": list(classes)}
    # classification over all labelled in-distribution cells (arg max)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (labels[idd], pred[idd]), 1)
    cnt = idd & (dec == "counted")
    cm_c = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm_c, (labels[cnt], pred[cnt]), 1)
    out["classification"] = {
        "accuracy": float((pred[idd] == labels[idd]).mean()) if idd.any() else None,
        "confusion_matrix": cm.tolist(),
        "confusion_axes": "rows = true class, columns = predicted class",
        "per_class": _prf(cm, classes),
        "counted": {
            "accuracy": float((pred[cnt] == labels[cnt]).mean()) if cnt.any() else None,
            "coverage": float(cnt.sum() / idd.sum()) if idd.any() else None,
            "confusion_matrix": cm_c.tolist(),
            "per_class": _prf(cm_c, classes),
        },
    }
    # decisions per true class (+ OOD objects)
    cols = [*classes, "uncertain", "ood"]
    rows = {}
    for name, mask in [*((c, labels == i) for i, c in enumerate(classes)), ("ood", ood_obj)]:
        row = [int(((dec == "counted") & mask & (pred == j)).sum()) for j in range(k)]
        row += [int(((dec == "uncertain") & mask).sum()), int(((dec == "ood") & mask).sum())]
        rows[name] = row
    out["decisions"] = {"columns": cols, "rows": rows}
    # differential error (pp): live fraction among all counted cells vs truth among ID cells
    all_counted = dec == "counted"
    n_cnt = int(all_counted.sum())
    n_true = int(idd.sum())
    # the reported differential: prior-shift corrected estimate over in-distribution cells

    in_dist = dec != "ood"
    est = em_prior_shift(probs[in_dist]) if in_dist.any() else np.full(k, np.nan)

    def pp(a: float | None, b: float | None) -> float | None:
        return 100.0 * (a - b) if a is not None and b is not None else None

    diff = {}
    for i, name in enumerate(classes):
        live = float((pred[all_counted] == i).sum() / n_cnt) if n_cnt else None
        true = float((labels[idd] == i).sum() / n_true) if n_true else None
        e = float(est[i]) if in_dist.any() else None
        diff[name] = {"estimate": e, "live": live, "true": true, "error_pp": pp(e, true),
                      "counted_error_pp": pp(live, true)}
    out["differential"] = {"classes": diff, "counted": n_cnt,
                           "method": "EM prior-shift correction (Saerens 2002)",
                           "max_abs_error_pp": max((abs(v["error_pp"]) for v in diff.values()
                                                    if v["error_pp"] is not None), default=None)}
    # calibration on labelled in-distribution cells
    if idd.any():
        p, y = probs[idd], labels[idd]
        out["calibration"] = {
            "ece": ece(p, y, N_BINS), "adaptive_ece": adaptive_ece(p, y, N_BINS),
            "mce": mce(p, y, N_BINS), "nll": calibration.nll(p, y),
            "brier": calibration.brier(p, y), "n_bins": N_BINS,
            "reliability": reliability_bins(p, y, N_BINS),
        }
    # OOD rejection
    ood: dict[str, Any] = {
        "rejection_rate": float((dec[ood_obj] == "ood").mean()) if ood_obj.any() else None,
        "counted_rate": float((dec[ood_obj] == "counted").mean()) if ood_obj.any() else None,
        "false_rejection_rate": float((dec[idd] == "ood").mean()) if idd.any() else None,
        "per_kind": {},
    }
    if kinds is not None and ood_obj.any():
        kk = np.asarray(list(kinds))
        for kind in sorted(set(kk[ood_obj].tolist())):
            m = ood_obj & (kk == kind)
            ood["per_kind"][kind or "unknown"] = {
                "n": int(m.sum()), "rejection_rate": float((dec[m] == "ood").mean())}
    out["ood"] = ood
    return out


def validate_recording(path: str | Path) -> dict[str, Any]:
    """Validate one labelled recording (see the module docstring).

    Raises
    ------
    ValueError
        When the file has no predictions or no labels.
    """

    rec = read_recording(path)
    if "probs" not in rec or "decision" not in rec:
        raise ValueError(f"{path}: no predictions (ml_score_*/userdef2): not a run recording")
    out = evaluate_predictions(rec["probs"], rec["label"], rec["decision"], rec["kind"],
                               rec["classes"])
    out["file"] = str(path)
    out["model"] = rec["meta"].get("user:model", None)
    return out
