"""Evaluate a model artifact on a labeled dataset: classification, calibration, OOD.

``evaluate_artifact(artifact, dataset)`` returns a JSON-able dict with

* ``classification``: accuracy (bootstrap 95 % CI), per-class recall (Wilson 95 % CI),
  confusion matrix (rows = true class, columns = predicted, class order of the card);
* ``calibration``: ``before_T`` and ``after_T`` reports (ECE 15 equal-width bins top-label,
  adaptive ECE, MCE, NLL, Brier, accuracy; each with a bootstrap 95 % CI);
* ``ood``: per detector and per OOD kind present: AUROC and FPR at 95 % TPR (classic
  convention: ID positive), plus the ID pass rate and OOD flag rate at the card threshold
  for the card's detector; defocused objects additionally per focus distance when the
  dataset carries a ``defocus_um`` feature;
* ``decision``: fractions counted / uncertain / ood on the ID test cells.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from leukoflow.core.stats import softmax_t, wilson_interval
from leukoflow.models.calibration import calibration_report
from leukoflow.models.data import load_eval_set
from leukoflow.models.ood import DETECTORS, FPR_CONVENTION, ood_report
from leukoflow.models.train import predict

DEFOCUS_FEATURES = ("defocus_um", "focus_um", "defocus")


def classification_report(probs: np.ndarray, labels: np.ndarray,
                          class_names: tuple[str, ...]) -> dict[str, Any]:
    """Per-class recall with Wilson intervals and the confusion matrix."""
    k = len(class_names)
    pred = probs.argmax(1)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    recall = {}
    for c, name in enumerate(class_names):
        n = int(cm[c].sum())
        recall[name] = {"value": float(cm[c, c] / n) if n else float("nan"),
                        "ci95": list(wilson_interval(int(cm[c, c]), n)) if n
                        else [float("nan")] * 2, "n": n}
    return {"per_class_recall": recall, "confusion_matrix": cm.tolist(),
            "confusion_axes": "rows = true class, columns = predicted class",
            "class_names": list(class_names)}


def ood_evaluation(detectors: dict[str, Any], id_logits: np.ndarray, id_feats: np.ndarray,
                   ood_logits: np.ndarray, ood_feats: np.ndarray, ood_kinds: list[str],
                   ood_extra: dict[str, np.ndarray] | None = None,
                   primary: str | None = None, n_boot: int = 200) -> dict[str, Any]:
    """AUROC (bootstrap 95 % CI) / FPR@95 per detector and OOD kind (and defocus distance)."""
    out: dict[str, Any] = {"convention": FPR_CONVENTION, "score": "larger = more OOD",
                           "detectors": {}}
    kinds = np.asarray(ood_kinds)
    for name, det in detectors.items():
        sid = det.score(id_logits, id_feats)
        sood = det.score(ood_logits, ood_feats) if len(kinds) else np.zeros(0)
        per: dict[str, Any] = {}
        for kind in sorted(set(kinds.tolist())):
            m = kinds == kind
            per[kind] = ood_report(sid, sood[m], det.threshold, n_boot)
        if len(kinds):
            per["all"] = ood_report(sid, sood, det.threshold, n_boot)
        curve = _defocus_curve(sid, sood, kinds, ood_extra or {}, det.threshold)
        if curve:
            per["defocus_vs_distance"] = curve
        out["detectors"][name] = {"per_kind": per, "threshold": det.threshold,
                                  "id_pass_rate": float(np.mean(sid <= det.threshold))
                                  if det.threshold is not None else None}
    if primary is not None:
        out["primary"] = primary
    return out


DEFOCUS_BIN_EDGES_UM = (0.0, 2.5, 5.0, 7.5, 10.0, 12.5, 15.0, 20.0, 30.0, 50.0, 1e9)


def _defocus_curve(sid, sood, kinds, extra, threshold) -> list[dict[str, float]]:
    """AUROC of defocused objects per |focus distance| bin (µm)."""
    key = next((k for k in DEFOCUS_FEATURES if k in extra), None)
    m = kinds == "defocus"
    if key is None or not m.any():
        return []
    dist = np.abs(np.asarray(extra[key], np.float64)[m])
    s = sood[m]
    res = []
    edges = DEFOCUS_BIN_EDGES_UM
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (dist >= lo) & (dist < hi)
        if sel.sum() >= 5:
            res.append({"distance_um_lo": lo, "distance_um_hi": hi,
                        "distance_um_mean": float(dist[sel].mean()),
                        **ood_report(sid, s[sel], threshold)})
    return res


def decision_fractions(probs: np.ndarray, ood_scores: np.ndarray | None, ood_threshold,
                       conf_threshold: float) -> dict[str, float]:
    """Fractions of cells decided ``ood`` / ``uncertain`` / ``counted`` (DESIGN.md rule)."""
    n = len(probs)
    ood = (ood_scores > ood_threshold) if (ood_scores is not None and ood_threshold is not None
                                           ) else np.zeros(n, bool)
    unc = ~ood & (probs.max(1) < conf_threshold)
    return {"ood": float(ood.mean()), "uncertain": float(unc.mean()),
            "counted": float((~ood & ~unc).mean()), "n": n}


def full_report(logits: np.ndarray, feats: np.ndarray, labels: np.ndarray, temperature: float,
                class_names: tuple[str, ...], detectors: dict[str, Any],
                ood_logits: np.ndarray | None = None, ood_feats: np.ndarray | None = None,
                ood_kinds: list[str] | None = None, ood_extra: dict | None = None,
                primary: str | None = None, conf_threshold: float = 0.8,
                n_boot: int = 1000) -> dict[str, Any]:
    """Classification + calibration (before/after T) + OOD report on one test set."""
    p0 = softmax_t(logits, 1.0)
    p1 = softmax_t(logits, temperature)
    rep: dict[str, Any] = {
        "n_test": int(len(labels)),
        "temperature": float(temperature),
        "classification": classification_report(p1, labels, class_names),
        "calibration": {"before_T": calibration_report(p0, labels, n_boot),
                        "after_T": calibration_report(p1, labels, n_boot),
                        "ece_bins": "15 equal-width, top label; values are fractions"},
    }
    rep["classification"]["accuracy"] = rep["calibration"]["after_T"]["accuracy"]
    if detectors:
        ok = ood_logits is not None and ood_kinds is not None and len(ood_kinds) > 0
        rep["ood"] = ood_evaluation(
            detectors, logits, feats,
            ood_logits if ok else np.zeros((0, logits.shape[1])),
            ood_feats if ok else np.zeros((0, feats.shape[1])),
            list(ood_kinds) if ok else [], ood_extra, primary, min(n_boot, 200))
    if primary is not None and primary in detectors:
        det = detectors[primary]
        rep["decision_id_test"] = decision_fractions(p1, det.score(logits, feats),
                                                     det.threshold, conf_threshold)
    return rep


def evaluate_artifact(artifact, dataset: str, n_boot: int = 1000, batch_size: int = 512,
                      seed: int = 0, all_detectors: bool = True) -> dict[str, Any]:
    """Evaluate a loaded artifact on a labeled dataset (``.rtdc``, ``.npz`` or ``sim``).

    Parameters
    ----------
    artifact : models.artifact.Artifact
        The model to evaluate.
    dataset : str
        Path (``.rtdc``/``.npz``; PBC layout: test split + ``x_ood``) or ``sim[:n]``.
    n_boot : int
        Bootstrap resamples for the intervals.
    all_detectors : bool
        Besides the card's (fitted) detector, also report MSP and energy (need no fitting).
    """

    test, ood, source = load_eval_set(dataset, seed)
    if len(test) == 0:
        raise ValueError(f"{dataset}: no labeled in-distribution cells to evaluate")
    k = len(artifact.class_names)
    if test.y.max() >= k:
        raise ValueError(f"{dataset}: labels go up to {test.y.max()}, model has {k} classes")
    model = artifact.build_model()
    z, f = predict(model, artifact.preprocess(test.x), batch_size)
    dets: dict[str, Any] = {}
    primary = None
    card_det = artifact.ood_detector()
    if card_det is not None:
        primary = card_det.name
        dets[primary] = card_det
    if all_detectors:
        for name in ("msp", "energy"):
            if name not in dets:
                dets[name] = DETECTORS.create(name, temperature=artifact.temperature
                                              if name == "msp" else 1.0)
    zo = fo = None
    kinds = None
    if ood is not None and len(ood):
        zo, fo = predict(model, artifact.preprocess(ood.x), batch_size)
        kinds = ood.kind
    rep = full_report(z, f, test.y, artifact.temperature, artifact.class_names, dets, zo, fo,
                      kinds, source.get("ood_features"), primary,
                      artifact.confidence_threshold, n_boot)
    rep["dataset"] = {"spec": str(dataset), **{k2: v for k2, v in source.items()
                                               if isinstance(v, str | int | float)}}
    rep["model"] = {"name": artifact.name, "sha256": artifact.sha256,
                    "architecture": artifact.architecture}
    return rep
