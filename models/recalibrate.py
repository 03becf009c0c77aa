"""Recalibrate an existing artifact: refit T on validation logits and refit the OOD detector.

Used by ``leukoflow calibrate``. The temperature is fitted on the *validation* split of the
dataset (ID cells only) by minimising the NLL; the OOD detector's statistics are refitted on
the training split and its threshold on the validation split (the threshold depends on T
for MSP, and the rule "refit thresholds after any T change" is applied to every detector).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from leukoflow.core.jsonutil import json_safe
from leukoflow.core.stats import softmax_t
from leukoflow.models.artifact import save_artifact
from leukoflow.models.calibration import (
    calibration_report,
    fit_temperature,
    reliability_diagram,
)
from leukoflow.models.data import load_splits
from leukoflow.models.ood import DETECTORS
from leukoflow.models.train import predict


def recalibrate(artifact, data: str, out: str | Path | None = None, data_seed: int = 0,
                detector: str | None = None, alpha: float = 0.05,
                png: str | Path | None = None, n_boot: int = 1000) -> dict[str, Any]:
    """Refit temperature and OOD threshold of ``artifact`` on ``data``; write the artifact.

    Parameters
    ----------
    artifact : models.artifact.Artifact
        Loaded artifact.
    data : str
        Dataset spec (``leukoflow.models.data.load_splits``); its train split feeds the detector
        statistics and its validation split the temperature and threshold.
    out : path, optional
        Folder for the updated artifact (default: overwrite ``artifact.path``).
    detector : str, optional
        OOD detector name (default: the card's, else ``knn``).
    alpha : float
        Fraction of ID validation cells allowed above the threshold.
    png : path, optional
        Reliability diagram (default ``<out>/reliability_val.png``).

    Returns
    -------
    dict
        ``temperature_old``, ``temperature``, ``before`` (T = 1) and ``after`` calibration
        reports on the validation split, ``ood`` (detector, threshold, ID pass rate),
        ``artifact`` and ``png`` paths.
    """
    splits = load_splits(data, seed=data_seed)
    if tuple(splits.class_names) != artifact.class_names:
        raise ValueError(f"dataset classes {splits.class_names} differ from the model's "
                         f"{artifact.class_names}")
    model = artifact.build_model()
    z_va, f_va = predict(model, artifact.preprocess(splits.val.x))
    z_tr, f_tr = predict(model, artifact.preprocess(splits.train.x))
    t_old = artifact.temperature
    t = fit_temperature(z_va, splits.val.y)
    name = detector or (artifact.ood or {}).get("detector") or "knn"
    params = dict((artifact.ood or {}).get("params", {})) if name == (artifact.ood or {}).get(
        "detector") else {}
    params.pop("alpha", None)
    params.pop("n_samples", None)
    if name == "msp":
        params["temperature"] = t
    det = DETECTORS.create(name, **params)
    det.fit(z_tr, f_tr, splits.train.y, temperature=t, model=model)
    s_va = det.score(z_va, f_va)
    det.fit_threshold(s_va, alpha)
    d = det.to_dict()
    card = dict(artifact.card)
    card["temperature"] = t
    before = calibration_report(softmax_t(z_va, 1.0), splits.val.y, n_boot)
    after = calibration_report(softmax_t(z_va, t), splits.val.y, n_boot)
    card["ood"] = {**(card.get("ood") or {}), "detector": name, "params": d["params"],
                   "threshold": d["threshold"], "alpha": alpha, "arrays": sorted(d["arrays"])}
    card.setdefault("recalibrations", []).append(
        {"data": str(data), "data_seed": data_seed, "temperature_old": t_old,
         "temperature": t, "validation_before_T": before, "validation_after_T": after})
    dest = Path(out) if out is not None else artifact.path
    card["name"] = dest.name
    save_artifact(dest, model, json_safe(card, strict=True), d["arrays"])
    png_path = reliability_diagram(softmax_t(z_va, t), splits.val.y,
                                   png or dest / "reliability_val.png",
                                   title=f"{dest.name}: validation, T = {t:.3f}",
                                   probs_before=softmax_t(z_va, 1.0))
    return json_safe({"temperature_old": t_old, "temperature": t, "n_val": len(splits.val),
                        "before": before, "after": after,
                        "ood": {"detector": name, "threshold": det.threshold,
                                "id_val_pass_rate": float((s_va <= det.threshold).mean())},
                        "artifact": str(dest), "png": str(png_path)})
