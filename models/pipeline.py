"""Train -> calibrate -> fit OOD detectors -> evaluate -> write an artifact, in one call.

This is what ``leukoflow train`` runs. Data use is strict:

* training split: weights, feature statistics of the OOD detectors (ID cells only);
* validation split (ID only): early stopping, temperature, OOD thresholds (split-conformal,
  >= 95 % of ID validation cells pass);
* test split and OOD objects: only reported, never used to choose anything.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from leukoflow.core.jsonutil import json_safe
from leukoflow.core.stats import softmax_t
from leukoflow.models.artifact import save_artifact
from leukoflow.models.calibration import (
    calibration_report,
    fit_temperature,
    reliability_diagram,
)
from leukoflow.models.data import Splits, load_splits
from leukoflow.models.evaluate import full_report
from leukoflow.models.ood import DETECTORS
from leukoflow.models.train import TrainConfig, normalise, predict, train_model

log = logging.getLogger(__name__)

DEFAULT_DETECTORS: tuple[str, ...] = ("msp", "energy", "mahalanobis", "rmds", "knn")
#: Detectors added when the model carries phase descriptors.
DESCRIPTOR_DETECTORS: tuple[str, ...] = ("descriptors", "combined")


def model_card_text(name: str, arch: str, splits: Splits) -> dict[str, str]:
    """The human part of a card: intended use, data, limitations."""
    gen = splits.source.get("generator")
    side = splits.train.x.shape[-1]  # crop side of the training data [px]
    if gen == "acquisition.pipeline_dataset.make_pipeline_dataset":
        data = (f"Simulated off-axis QPI phase crops ({side} x {side} px at "
                f"{splits.pixel_size_um} µm/px, rad) of the four leukocyte classes, cut by the "
                "live acquisition path (flow simulator frames -> reconstruction -> "
                "segmentation -> quality gates -> tracking -> crop), each labelled by the "
                "ground truth it was traced to; test cells and OOD objects (gates opened) "
                "from an independent simulator seed.")
    elif gen == "acquisition.sim.make_crop_dataset":
        data = (f"Simulated off-axis QPI phase crops ({side} x {side} px at "
                f"{splits.pixel_size_um} µm/px, rad) of the four leukocyte classes, rendered "
                "through the hologram + reconstruction path of acquisition.sim; test cells and "
                "OOD objects from an independent simulator seed.")
    sim = gen in ("acquisition.sim.make_crop_dataset",
                  "acquisition.pipeline_dataset.make_pipeline_dataset")
    if sim:
        use = ("Default classifier of the leukoflow live pipeline on the simulated instrument; "
               "demonstration and integration testing. Not for clinical use.")
        lim = ("Trained on simulated cells only: performance on real instruments is unknown "
               "until validated on labeled recordings (retrain with leukoflow train DATA.rtdc). "
               "Calibration holds for the simulated class mix (balanced); refit T and "
               "thresholds after any change of instrument, model or class prior.")
    else:
        data = (f"{splits.source.get('path', 'dataset')} ({splits.unit}); "
                f"train/val/test {len(splits.train)}/{len(splits.val)}/{len(splits.test)}.")
        use = ("Evidence that the training / calibration / OOD pipeline works on real cells "
               "(PBC: stained brightfield, grayscale). Not a QPI model; not for clinical use.")
        lim = ("Stained brightfield intensities, not phase: the normalisation is in "
               "intensity/255 units and pixel size is unknown, so the model cannot be used on "
               "QPI crops. Single centre, healthy donors, image-level splits.")
    return {"intended_use": use, "data": data, "limitations": lim,
            "architecture": arch, "name": name}


def _attach_descriptors(model, splits: Splits, size: int, mean: float, std: float,
                        enabled: bool | None) -> dict[str, Any] | None:
    """Attach :class:`leukoflow.models.descriptors.PhaseDescriptors` if enabled; card entry or
    None."""
    from leukoflow.models.descriptors import NAMES, DescriptorConfig, PhaseDescriptors

    phase = splits.unit == "rad" and bool(splits.pixel_size_um)
    if enabled is None:
        enabled = phase
    if not enabled:
        return None
    if not phase:
        raise ValueError("phase descriptors need phase crops in rad with a known pixel size "
                         f"(data unit {splits.unit!r}, pixel size {splits.pixel_size_um})")
    cfg = DescriptorConfig()
    model.attach_descriptors(PhaseDescriptors(size, mean, std, splits.pixel_size_um, cfg))
    return {**cfg.to_dict(), "names": list(NAMES)}


def _detectors(names, z_tr, f_tr, y_tr, z_va, f_va, temperature, model, alpha,
               detector_params=None):
    dets = {}
    for name in names:
        kw = dict((detector_params or {}).get(name, {}))
        if name == "msp":
            kw["temperature"] = temperature
        det = DETECTORS.create(name, **kw)
        det.fit(z_tr, f_tr, y_tr, temperature=temperature, model=model)
        det.fit_threshold(det.score(z_va, f_va), alpha)
        dets[name] = det
    return dets


def build_artifact(data: str | Path | Splits, out: str | Path, arch: str = "lenet5",
                   arch_kwargs: dict[str, Any] | None = None, cfg: TrainConfig | None = None,
                   ood_detector: str = "knn", detectors: tuple[str, ...] = DEFAULT_DETECTORS,
                   alpha: float = 0.05, confidence_threshold: float = 0.8,
                   data_seed: int = 0, n_boot: int = 1000, command: str | None = None,
                   name: str | None = None, progress: bool = True,
                   ship_weights: bool = True,
                   detector_params: dict[str, dict[str, Any]] | None = None,
                   descriptors: bool | None = None) -> dict[str, Any]:
    """Train, calibrate, fit OOD, evaluate and save an artifact; returns the card.

    Parameters
    ----------
    data : str, Path or Splits
        Dataset spec for :func:`leukoflow.models.data.load_splits` (or already loaded splits).
    out : str or Path
        Artifact folder to write.
    arch, arch_kwargs : str, dict
        Architecture name (``leukoflow.models.architectures.ARCHITECTURES``) and kwargs.
    cfg : TrainConfig
        Training hyper-parameters.
    ood_detector : str
        Detector stored in the card (chosen a priori, never on test data); all ``detectors``
        are fitted and reported.
    alpha : float
        Fraction of ID validation cells allowed above the OOD threshold.
    confidence_threshold : float
        Calibrated max probability below which a cell is 'uncertain'.
    data_seed : int
        Seed of the data split / simulator.
    command : str, optional
        Command line recorded in the card (default: this process's argv).
    ship_weights : bool
        Write the weights (False: card + metrics only, for results not shipped).
    detector_params : dict, optional
        Per-detector keyword arguments, e.g. ``{"knn": {"bank_size": 1000}}``.
    descriptors : bool, optional
        Append the physical phase descriptors (``leukoflow.models.descriptors``) to the features and
        fit the ``descriptors`` and ``combined`` detectors. Default (None): on for phase
        crops (unit ``rad``) with a known pixel size, off otherwise (e.g. PBC intensities).
    """
    import torch

    from leukoflow.models.architectures import build_model, count_parameters

    cfg = cfg or TrainConfig()
    arch_kwargs = dict(arch_kwargs or {})
    splits = data if isinstance(data, Splits) else load_splits(data, seed=data_seed)
    out = Path(out)
    name = name or out.name
    mean = float(splits.train.x.mean())
    std = float(splits.train.x.std())
    if not np.isfinite(std) or std <= 0:
        raise ValueError("training crops have zero or non-finite variance")
    size = int(splits.train.x.shape[-1])
    if splits.train.x.shape[-2] != size:
        raise ValueError(f"crops must be square, got {splits.train.x.shape[1:]}")
    k = len(splits.class_names)
    torch.manual_seed(cfg.seed)
    model = build_model(arch, in_size=size, num_classes=k, **arch_kwargs)
    x_tr, x_va = normalise(splits.train.x, mean, std), normalise(splits.val.x, mean, std)
    hist = train_model(model, x_tr, splits.train.y, x_va, splits.val.y, cfg, norm_std=std,
                       progress=progress)
    desc_cfg = _attach_descriptors(model, splits, size, mean, std, descriptors)
    if desc_cfg is not None:
        detectors = tuple(dict.fromkeys([*detectors, *DESCRIPTOR_DETECTORS]))
    report, dets, temperature, (z_te, z_va) = evaluate_splits(
        model, splits, mean, std, arch, ood_detector, detectors, alpha, confidence_threshold,
        n_boot, detector_params)
    primary = dets[ood_detector]
    pdict = primary.to_dict()
    card: dict[str, Any] = {
        "name": name,
        "architecture": arch,
        "arch_kwargs": arch_kwargs,
        "parameters": count_parameters(model),
        "input_size": size,
        "pixel_size_um": splits.pixel_size_um,
        "normalisation": {"mean": mean, "std": std, "unit": splits.unit,
                          "rule": "(x - mean) / std on the input crops"},
        "class_names": list(splits.class_names),
        "temperature": temperature,
        "confidence_threshold": float(confidence_threshold),
        "descriptors": desc_cfg,
        "ood": {"detector": ood_detector, "params": pdict["params"],
                "threshold": pdict["threshold"], "alpha": alpha,
                "threshold_rule": "split-conformal: ceil((n+1)(1-alpha))-th smallest ID "
                                  "validation score; flag OOD when score > threshold",
                "arrays": sorted(pdict["arrays"]),
                "fitted_on": "training split features (ID only); threshold on validation"},
        "ood_detectors_reported": {n: {"params": d.params, "threshold": d.threshold}
                                   for n, d in dets.items()},
        "training": {
            "data": dict(splits.source),
            "data_sha256": splits.data_hash(),
            "n_train": len(splits.train), "n_val": len(splits.val), "n_test": len(splits.test),
            "n_ood": 0 if splits.ood is None else len(splits.ood),
            "config": cfg.to_dict(),
            "history": {k2: v for k2, v in hist.items()},
            "command": command or " ".join(shlex.quote(a) for a in
                                           [Path(sys.argv[0]).name, *sys.argv[1:]]),
        },
        "metrics": report,
        "model_card": model_card_text(name, arch, splits),
    }
    out.mkdir(parents=True, exist_ok=True)
    reliability_diagram(softmax_t(z_te, temperature), splits.test.y, out / "reliability.png",
                        title=f"{name}: test set, T = {temperature:.3f}",
                        probs_before=softmax_t(z_te, 1.0))
    card = json_safe(card, strict=True)
    if ship_weights:
        save_artifact(out, model, card, pdict["arrays"])
    else:
        import json

        card["weights_shipped"] = False
        (out / "card.json").write_text(json.dumps(card, indent=2, allow_nan=False) + "\n")
    return card


def evaluate_splits(model, splits: Splits, mean: float, std: float, arch: str,
                    ood_detector: str = "knn", detectors: tuple[str, ...] = DEFAULT_DETECTORS,
                    alpha: float = 0.05, confidence_threshold: float = 0.8, n_boot: int = 1000,
                    detector_params: dict[str, dict[str, Any]] | None = None,
                    temperature: float | None = None):
    """Fit T (unless given) and the OOD detectors, then report on test + validation.

    Returns
    -------
    tuple
        ``(report, detectors, temperature, (test_logits, val_logits))``.
    """
    x_tr, x_va = normalise(splits.train.x, mean, std), normalise(splits.val.x, mean, std)
    z_tr, f_tr = predict(model, x_tr)
    z_va, f_va = predict(model, x_va)
    z_te, f_te = predict(model, normalise(splits.test.x, mean, std))
    if temperature is None:
        temperature = fit_temperature(z_va, splits.val.y)
    names = list(detectors)
    if arch.endswith("_vi") and "mutual_info" not in names:
        names.append("mutual_info")
    if ood_detector not in names:
        names.append(ood_detector)
    dets = _detectors(names, z_tr, f_tr, splits.train.y, z_va, f_va, temperature, model, alpha,
                      detector_params)
    zo = fo = None
    kinds: list[str] | None = None
    if splits.ood is not None and len(splits.ood):
        zo, fo = predict(model, normalise(splits.ood.x, mean, std))
        kinds = splits.ood.kind
    report = full_report(z_te, f_te, splits.test.y, temperature, splits.class_names, dets,
                         zo, fo, kinds, splits.ood_features, ood_detector,
                         confidence_threshold, n_boot)
    report["validation"] = {
        "before_T": calibration_report(softmax_t(z_va, 1.0), splits.val.y, n_boot),
        "after_T": calibration_report(softmax_t(z_va, temperature), splits.val.y, n_boot)}
    if arch.endswith("_vi"):
        report["variational"] = _vi_extra(model, normalise(splits.test.x, mean, std),
                                          splits.test.y, n_boot)
    return report, dets, temperature, (z_te, z_va)


def _vi_extra(model, x_norm: np.ndarray, y: np.ndarray, n_boot: int) -> dict[str, Any]:
    """Calibration of the MC-averaged predictive without T, sample spread, MI stats."""
    import torch

    from leukoflow.models.architectures import predictive_uncertainty

    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x_norm), 512):
            s = model.mc_logits(torch.from_numpy(x_norm[i:i + 512]))
            u = predictive_uncertainty(s)
            outs.append((u["mean"].double().numpy(), u["mutual_info"].double().numpy(),
                         s.std(0).mean().item()))
    mean = np.concatenate([o[0] for o in outs])
    mi = np.concatenate([o[1] for o in outs])
    return {"n_samples": model.n_samples,
            "mc_average_no_T": calibration_report(mean, y, n_boot),
            "mean_mutual_info_nats": float(mi.mean()),
            "mean_logit_std_across_samples": float(np.mean([o[2] for o in outs]))}
