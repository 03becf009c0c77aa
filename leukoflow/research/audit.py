"""Dataset audit: find mislabeled samples and outliers (``leukoflow audit DATASET``).

Every sample is scored by models that never saw it (stratified k-fold, out-of-fold):

1. each fold trains a fresh network (``leukoflow.models.train.train_model``, early stopping on an
   inner validation split of the training part), fits a temperature on that inner split
   (``leukoflow.models.calibration.fit_temperature``) and predicts calibrated probabilities for the
   held-out fold;
2. **label disagreement** = 1 - p(label) from those out-of-fold calibrated probabilities
   (a confidently wrong model on a sample it never saw points to a wrong label);
   The probabilities come from the CNN, from a logistic regression on rotation-invariant
   phase descriptors (:mod:`leukoflow.research.ring_descriptors`), or a mixture of both whose
   weight is fitted on the inner validation split (default).
3. **OOD score** = distance to the k-th nearest training sample in the penultimate feature
   space (L2-normalised features), divided by the 95th percentile of the same distance on
   the inner validation split (> 1: farther out than 95 % of in-distribution cells).

Suspects are ranked by disagreement (the mislabel ranking) and separately by OOD score
(the outlier ranking); the top suspects are explained with the fold model that held them
out (LIME for the predicted class, Guided Backprop), and an HTML + PNG report is written.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leukoflow.core.stats import softmax_t
from leukoflow.core.vocabulary import CLASS_NAMES
from leukoflow.models.calibration import fit_temperature
from leukoflow.models.train import TrainConfig, train_model
from leukoflow.research.ring_descriptors import fit_predict_descriptors, phase_descriptors

log = logging.getLogger("leukoflow.audit")


@dataclass(frozen=True)
class AuditConfig:
    """Audit parameters (section ``[audit]``; all recorded in ``audit.json``).

    Attributes
    ----------
    folds : int
        Number of stratified folds (k).
    model : str
        ``cnn`` (a network per fold), ``descriptors`` (logistic regression on
        rotation-invariant phase descriptors, :mod:`~leukoflow.research.ring_descriptors`)
        or ``cnn+descriptors``
        (mixture of both calibrated probability vectors, weight fitted per fold on the
        inner validation NLL). Explanations and the feature-space
        OOD score need the CNN (``descriptors`` alone uses descriptor-space distances and
        explains nothing).
    architecture : str
        ``leukoflow.models.architectures.ARCHITECTURES`` name.
    epochs, patience, batch_size : int
        Training per fold (early stopping on the inner validation NLL).
    lr : float
        Peak learning rate.
    inner_val_fraction : float
        Share of each training part used for early stopping, temperature and OOD scale.
    knn_k : int
        Neighbour rank of the feature-space OOD distance.
    top : int
        Suspects listed in the report.
    explain_top : int
        Top suspects explained (0 = none).
    lime_samples : int
        LIME perturbations per segmentation for the suspects.
    seed : int
        Seed of folds, training and LIME.
    threads : int
        Torch CPU threads.
    device : str
        Training device (``cpu``, ``cuda``, ``auto``).
    """

    folds: int = 5
    model: str = "cnn+descriptors"
    architecture: str = "lenet5"
    epochs: int = 25
    patience: int = 5
    batch_size: int = 64
    lr: float = 2e-3
    inner_val_fraction: float = 0.15
    knn_k: int = 10
    top: int = 24
    explain_top: int = 12
    lime_samples: int = 300
    seed: int = 0
    threads: int = 1
    device: str = "cpu"


@dataclass
class OutOfFold:
    """Out-of-fold predictions of the whole dataset."""

    probs: np.ndarray           # (N, K) calibrated
    ood_score: np.ndarray       # (N,)
    fold: np.ndarray            # (N,) fold index that held the sample out
    temperatures: list[float]
    bundles: list[Any]          # ModelBundle per fold (None without a CNN)
    histories: list[dict[str, Any]] = field(default_factory=list)


def flip_labels(y: np.ndarray, fraction: float, n_classes: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flip ``round(fraction * N)`` labels to a different random class.

    Returns
    -------
    y_noisy : ndarray
    flipped : ndarray of int
        Indices of the flipped samples.
    """
    y = np.asarray(y, np.int64).copy()
    n = int(round(fraction * len(y)))
    idx = rng.choice(len(y), size=n, replace=False)
    for i in idx:
        y[i] = (y[i] + rng.integers(1, n_classes)) % n_classes
    return y, np.sort(idx)


def _features(net, x_norm: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    import torch

    logits, feats = [], []
    with torch.no_grad():
        for i in range(0, len(x_norm), batch):
            xb = torch.from_numpy(np.ascontiguousarray(x_norm[i:i + batch]))
            if hasattr(net, "forward_with_features"):
                z, f = net.forward_with_features(xb)
            else:
                z = net(xb)
                f = z
            logits.append(z.numpy())
            feats.append(f.numpy())
    return np.concatenate(logits), np.concatenate(feats)


def _knn_dist(train: np.ndarray, query: np.ndarray, k: int, exclude_self: bool = False
              ) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    def _l2(f: np.ndarray) -> np.ndarray:
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)

    k = min(k, len(train) - (1 if exclude_self else 0))
    nn_ = NearestNeighbors(n_neighbors=k + (1 if exclude_self else 0)).fit(_l2(train))
    d, _ = nn_.kneighbors(_l2(query))
    return d[:, -1]


def out_of_fold(x: np.ndarray, y: np.ndarray, cfg: AuditConfig = AuditConfig(),
                class_names: tuple[str, ...] | None = None) -> OutOfFold:
    """Train k fold models and return calibrated out-of-fold predictions and OOD scores.

    Parameters
    ----------
    x : ndarray (N, H, W)
        Crops (rad for phase data; any unit works, it is normalised per fold).
    y : ndarray (N,)
        Labels 0..K-1 (as given: possibly wrong).
    cfg : AuditConfig
    class_names : tuple of str, optional
        Class names (default :data:`leukoflow.CLASS_NAMES`).
    """
    import torch
    from sklearn.model_selection import StratifiedKFold, train_test_split

    from leukoflow.explain.model import ModelBundle
    from leukoflow.models.architectures import ARCHITECTURES

    names = tuple(class_names or CLASS_NAMES)
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int64)
    if x.ndim != 3 or len(x) != len(y):
        raise ValueError(f"need x (N, H, W) and y (N,), got {x.shape}, {y.shape}")
    if y.min() < 0 or y.max() >= len(names):
        raise ValueError("audit labels must be class indices 0..K-1 (drop OOD objects first)")
    counts = np.bincount(y, minlength=len(names))
    if counts.min() < cfg.folds:
        raise ValueError(f"every class needs >= {cfg.folds} samples for {cfg.folds} folds; "
                         f"counts {counts.tolist()}")
    if cfg.model not in ("cnn", "descriptors", "cnn+descriptors"):
        raise ValueError(f"unknown audit model {cfg.model!r}")
    use_cnn = "cnn" in cfg.model
    use_desc = "descriptors" in cfg.model
    torch.set_num_threads(max(1, cfg.threads))
    n, k = len(y), len(names)
    probs = np.zeros((n, k), np.float64)
    ood = np.zeros(n, np.float64)
    fold_of = np.full(n, -1, np.int64)
    temps, bundles, hists = [], [], []
    desc = None
    if use_desc:

        desc = phase_descriptors(x)
    skf = StratifiedKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed)
    for f, (tr, te) in enumerate(skf.split(np.zeros(n), y)):
        t0 = time.perf_counter()
        tr_in, va = train_test_split(tr, test_size=cfg.inner_val_fraction,
                                     random_state=cfg.seed + f, stratify=y[tr])
        info: dict[str, Any] = {"fold": f, "n_train": int(len(tr_in)), "n_val": int(len(va)),
                                "n_test": int(len(te))}
        parts, parts_va = [], []
        if use_cnn:
            mean, std = float(x[tr_in].mean()), float(x[tr_in].std()) or 1.0

            def norm(idx: np.ndarray, mean: float = mean, std: float = std) -> np.ndarray:
                return ((x[idx] - mean) / std)[:, None].astype(np.float32)

            net = ARCHITECTURES.create(cfg.architecture, in_size=x.shape[-1], num_classes=k)
            tc = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                             patience=cfg.patience, seed=cfg.seed + f, device=cfg.device,
                             threads=cfg.threads)
            hist = train_model(net, norm(tr_in), y[tr_in], norm(va), y[va], tc, norm_std=std,
                               progress=False)
            net.eval()
            z_va, f_va = _features(net, norm(va))
            t = fit_temperature(z_va, y[va])
            z_te, f_te = _features(net, norm(te))
            _, f_tr = _features(net, norm(tr_in))
            parts.append(softmax_t(z_te, t))
            parts_va.append(softmax_t(z_va, t))
            scale = float(np.percentile(_knn_dist(f_tr, f_va, cfg.knn_k), 95)) or 1.0
            ood[te] = _knn_dist(f_tr, f_te, cfg.knn_k) / scale
            bundles.append(ModelBundle.from_module(net, mean=mean, std=std, temperature=t,
                                                   class_names=names, name=f"audit-fold{f}"))
            info.update(cnn_temperature=float(t), best_epoch=hist.get("best_epoch"),
                        epochs_run=hist.get("epochs_run"),
                        val_acc=hist["val_acc"][-1] if hist.get("val_acc") else None)
            temps.append(float(t))
        else:
            bundles.append(None)
        if desc is not None:
            pv, pd, td = fit_predict_descriptors(desc[tr_in], y[tr_in], desc[va], y[va],
                                                 desc[te], k)
            parts.append(pd)
            parts_va.append(pv)
            info["descriptor_temperature"] = td
            if not use_cnn:
                mu, sd = desc[tr_in].mean(0), desc[tr_in].std(0) + 1e-12
                scale = float(np.percentile(_knn_dist((desc[tr_in] - mu) / sd,
                                                      (desc[va] - mu) / sd, cfg.knn_k), 95))
                ood[te] = _knn_dist((desc[tr_in] - mu) / sd, (desc[te] - mu) / sd,
                                    cfg.knn_k) / (scale or 1.0)
                temps.append(td)
        alpha = 1.0
        if len(parts) == 2:
            alpha = _mixture_weight(parts_va[0], parts_va[1], y[va])
            info["cnn_weight"] = alpha
        probs[te] = alpha * parts[0] + (1 - alpha) * parts[-1]
        fold_of[te] = f
        info["oof_accuracy"] = float((probs[te].argmax(1) == y[te]).mean())
        info["seconds"] = time.perf_counter() - t0
        hists.append(info)
        log.info("fold %d/%d done in %.1f s", f + 1, cfg.folds, info["seconds"])
    return OutOfFold(probs, ood, fold_of, temps, bundles, hists)


def _mixture_weight(p_a: np.ndarray, p_b: np.ndarray, y: np.ndarray) -> float:
    """Weight a in [0, 1] (step 0.05) of ``a p_a + (1 - a) p_b`` minimising validation NLL."""
    grid = np.linspace(0.0, 1.0, 21)
    idx = np.arange(len(y))
    nll = [-np.mean(np.log(np.clip(a * p_a[idx, y] + (1 - a) * p_b[idx, y], 1e-12, None)))
           for a in grid]
    return float(grid[int(np.argmin(nll))])


def rank_suspects(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, disagreement): indices sorted by decreasing ``1 - p(label)``."""
    dis = 1.0 - np.asarray(probs)[np.arange(len(y)), np.asarray(y)]
    return np.argsort(-dis, kind="stable"), dis


def precision_at_k(order: np.ndarray, truth: np.ndarray, k: int | None = None) -> float:
    """Share of the first ``k`` (default ``len(truth)``) ranked indices that are in ``truth``."""
    k = len(truth) if k is None else k
    if k == 0:
        return float("nan")
    return float(np.isin(order[:k], truth).mean())


def _explain_suspects(oof: OutOfFold, x: np.ndarray, idx: np.ndarray, cfg: AuditConfig
                      ) -> dict[int, dict[str, np.ndarray]]:
    from leukoflow.explain.methods import EXPLAINERS

    out: dict[int, dict[str, np.ndarray]] = {}
    for f in np.unique(oof.fold[idx]):
        sel = idx[oof.fold[idx] == f]
        b = oof.bundles[int(f)]
        if b is None:
            continue
        tg = [int(np.argmax(oof.probs[i])) for i in sel]
        lime = EXPLAINERS.create("lime", bundle=b, n_samples=cfg.lime_samples, seed=cfg.seed,
                                 baseline=None)
        gbp = EXPLAINERS.create("guided_backprop", bundle=b)
        el = lime.explain(x[sel], tg, [int(i) for i in sel])
        eg = gbp.explain(x[sel], tg)
        for i, a, g in zip(sel, el, eg, strict=True):
            out[int(i)] = {"lime": a.map, "guided_backprop": g.map}
    return out


def _suspect_png(path: Path, x: np.ndarray, rows: list[dict[str, Any]],
                 maps: dict[int, dict[str, np.ndarray]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leukoflow.explain.artifacts import overlay_rgb

    n = len(rows)
    if n == 0:
        return
    ncol = 3 if maps else 1
    per_row = 4
    nr = int(np.ceil(n / per_row))
    fig, axes = plt.subplots(nr, per_row * ncol, figsize=(per_row * ncol * 1.25, nr * 1.45),
                             squeeze=False, dpi=72)
    for ax in axes.ravel():
        ax.axis("off")
    for j, r in enumerate(rows):
        i = r["index"]
        rr, cc = divmod(j, per_row)
        ax = axes[rr, cc * ncol]
        ax.imshow(x[i], cmap="gray")
        ax.set_title(f"#{i} {r['label'][:3]}→{r['predicted'][:3]}\n"
                     f"1-p={r['disagreement']:.2f} ood={r['ood_score']:.1f}", fontsize=6)
        if maps and i in maps:
            axes[rr, cc * ncol + 1].imshow(overlay_rgb(x[i], maps[i]["lime"]))
            axes[rr, cc * ncol + 1].set_title("LIME", fontsize=6)
            axes[rr, cc * ncol + 2].imshow(overlay_rgb(x[i], maps[i]["guided_backprop"]))
            axes[rr, cc * ncol + 2].set_title("GBP", fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _html(path: Path, summary: dict[str, Any], rows: list[dict[str, Any]],
          ood_rows: list[dict[str, Any]]) -> None:
    def table(rs: list[dict[str, Any]]) -> str:
        cols = ["rank", "index", "label", "predicted", "p_label", "disagreement", "ood_score",
                "fold"]
        head = "".join(f"<th>{c}</th>" for c in cols)
        body = "".join("<tr>" + "".join(
            f"<td>{html.escape(f'{r[c]:.3f}' if isinstance(r[c], float) else str(r[c]))}</td>"
            for c in cols) + "</tr>" for r in rs)
        return f"<table border=1 cellspacing=0><tr>{head}</tr>{body}</table>"

    cfg = html.escape(json.dumps(summary["config"], indent=1))
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>leukoflow audit</title>
</head><body><h1>Dataset audit: {html.escape(summary['dataset'])}</h1>
<p>{summary['n']} samples, {summary['config']['folds']}-fold out-of-fold calibrated models,
out-of-fold accuracy {summary['oof_accuracy']:.3f}. Temperatures: {summary['temperatures']}.</p>
<h2>Suspected mislabels (by 1 - p(label))</h2><img src="suspects.png"><br>{table(rows)}
<h2>Outliers (by feature-space OOD score)</h2><img src="outliers.png"><br>{table(ood_rows)}
<h2>Parameters</h2><pre>{cfg}</pre></body></html>"""
    path.write_text(doc)


def run_audit(x: np.ndarray, y: np.ndarray, out_dir: str | Path,
              cfg: AuditConfig = AuditConfig(), class_names: tuple[str, ...] | None = None,
              dataset: str = "", truth_flipped: np.ndarray | None = None) -> dict[str, Any]:
    """Audit a labeled dataset and write ``audit.json``, ``report.html`` and PNGs.

    Parameters
    ----------
    x, y : ndarray
        Crops (N, H, W) and labels (N,).
    out_dir : path
        Report folder (created).
    cfg : AuditConfig
    class_names : tuple of str, optional
    dataset : str
        Name recorded in the report.
    truth_flipped : ndarray, optional
        Known mislabeled indices (simulation): precision at k is reported.

    Returns
    -------
    dict
        The ``audit.json`` summary.
    """

    names = tuple(class_names or CLASS_NAMES)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int64)
    oof = out_of_fold(x, y, cfg, names)
    order, dis = rank_suspects(oof.probs, y)
    pred = oof.probs.argmax(1)

    def row(rank: int, i: int) -> dict[str, Any]:
        return {"rank": rank, "index": int(i), "label": names[y[i]], "predicted": names[pred[i]],
                "p_label": float(oof.probs[i, y[i]]), "disagreement": float(dis[i]),
                "ood_score": float(oof.ood_score[i]), "fold": int(oof.fold[i]),
                "probabilities": [float(p) for p in oof.probs[i]]}

    rows = [row(r + 1, i) for r, i in enumerate(order[: cfg.top])]
    ood_order = np.argsort(-oof.ood_score, kind="stable")
    ood_rows = [row(r + 1, i) for r, i in enumerate(ood_order[: cfg.top])]
    to_explain = np.unique(np.concatenate([order[: cfg.explain_top],
                                           ood_order[: min(cfg.explain_top, 4)]]))
    maps = (_explain_suspects(oof, x, to_explain, cfg)
            if cfg.explain_top > 0 and "cnn" in cfg.model else {})
    np.savez_compressed(out / "audit_arrays.npz", probs=oof.probs.astype(np.float32),
                        ood_score=oof.ood_score.astype(np.float32), fold=oof.fold,
                        labels=y, disagreement=dis.astype(np.float32),
                        **{f"lime_{i}": m["lime"] for i, m in maps.items()},
                        **{f"gbp_{i}": m["guided_backprop"] for i, m in maps.items()})
    _suspect_png(out / "suspects.png", x, rows[: cfg.explain_top or 16], maps,
                 f"top suspected mislabels: {dataset}")
    _suspect_png(out / "outliers.png", x, ood_rows[:8], maps, f"top outliers: {dataset}")
    summary: dict[str, Any] = {
        "schema": "leukoflow-audit/1", "dataset": dataset, "n": int(len(y)),
        "class_names": list(names), "config": dataclasses.asdict(cfg),
        "oof_accuracy": float((pred == y).mean()), "temperatures": oof.temperatures,
        "folds": oof.histories, "suspects": rows, "outliers": ood_rows,
        "disagreement_definition": "1 - out-of-fold calibrated p(label)"
                                   + (" (NLL-weighted mixture of CNN and descriptor model)"
                                      if cfg.model == "cnn+descriptors" else ""),
        "ood_definition": f"k={cfg.knn_k} NN distance in L2-normalised penultimate features "
                          "(descriptor model alone: standardised descriptors) / its 95th "
                          "percentile on the fold's inner validation split",
        "seconds": 0.0}
    if truth_flipped is not None:
        truth = np.asarray(truth_flipped)
        summary["flipped"] = {"n": int(len(truth)), "precision_at_k": precision_at_k(order, truth),
                              "indices": truth.tolist()}
    summary["seconds"] = time.perf_counter() - t0
    (out / "audit.json").write_text(json.dumps(summary, indent=1))
    _html(out / "report.html", summary, rows, ood_rows)
    return summary
