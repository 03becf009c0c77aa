"""Meta-explanations (``leukoflow explain meta RUN_DIR_OR_DATASET``).

From a run folder (the service's ``explanations/`` artifacts) or a labeled dataset (maps
computed here with the model), this writes into ``out_dir``:

* mean and spread of the maps per predicted class x calibrated-confidence bin
  ([0, .5), [.5, .8), [.8, .95), [.95, 1]) x correct/incorrect (when labels are known),
  after centring every map on its cell's phase centroid (``meta_maps.npz``,
  ``class_confidence.png``);
* SpRAy clustering per predicted class (kNN graph, eigengap, k-means) with a 2-D spectral
  embedding plot (``spray.png``);
* dataset mode only: the relevance-location summary per class pair
  (:mod:`leukoflow.research.location`) and TCAV with concepts from the simulator's ground truth
  (:mod:`leukoflow.research.tcav`: concept sets rendered by the simulator for ``sim`` sources, or
  per-cell truth when the dataset carries it), with its table in ``tcav.md``;
* ``meta.json`` with every number and parameter.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leukoflow.core.vocabulary import CLASS_NAMES
from leukoflow.research.location import pair_location_summary
from leukoflow.research.spray import spray
from leukoflow.research.tcav import concepts_from_truth, run_tcav, tcav_markdown, tcav_sim

CONF_BINS: tuple[float, ...] = (0.0, 0.5, 0.8, 0.95, 1.0)


@dataclass(frozen=True)
class MetaConfig:
    """Meta-explanation parameters (recorded in ``meta.json``).

    Attributes
    ----------
    method : str
        Explanation method whose maps are analysed.
    max_cells : int
        Cells taken from a dataset (stratified, seeded).
    lime_samples : int
        LIME perturbations per segmentation (dataset mode).
    spray_knn, spray_pool : int
        SpRAy kNN graph degree and sum-pooling size [px].
    location_cells : int
        Cells per class for the relevance-location summary (0 = skip).
    rim_px : int
        Rim half-width of the location summary [px].
    tcav : bool
        Run TCAV when ground-truth concepts are available.
    tcav_random : int
        Number of random concepts (>= 10).
    tcav_concept_size, tcav_inputs : int
        Examples per concept (and per random set) / cells per class scored.
    tcav_layers : tuple of str
        TCAV layers (module names of the explainer model; the first is the primary one;
        empty = :func:`leukoflow.research.tcav.default_layers`). Used with simulator concepts;
        truth-derived concepts use the last Conv2d.
    seed : int
    """

    method: str = "lime"
    max_cells: int = 400
    lime_samples: int = 300
    spray_knn: int = 10
    spray_pool: int = 4
    location_cells: int = 20
    rim_px: int = 3
    tcav: bool = True
    tcav_random: int = 10
    tcav_concept_size: int = 60
    tcav_inputs: int = 60
    tcav_layers: tuple[str, ...] = ()
    seed: int = 0


@dataclass
class MapSet:
    """Maps with their cells' predictions."""

    maps: np.ndarray
    phase: np.ndarray
    pred: np.ndarray
    conf: np.ndarray
    label: np.ndarray
    ids: list[int]
    method: str
    class_names: tuple[str, ...]
    truth: dict[str, np.ndarray] = field(default_factory=dict)


def load_run(run_dir: str | Path, method: str = "lime") -> MapSet:
    """Read every explanation artifact of a run folder (``<run_dir>/explanations``)."""
    from leukoflow.explain.artifacts import read_cell_artifact

    root = Path(run_dir)
    folder = root / "explanations" if (root / "explanations").is_dir() else root
    files = sorted(folder.glob("*.json"), key=lambda p: (len(p.stem), p.stem))
    maps, phase, pred, conf, label, ids = [], [], [], [], [], []
    names: tuple[str, ...] = ()
    for f in files:
        doc, m = read_cell_artifact(f)
        if method not in m:
            continue
        maps.append(m[method])
        phase.append(m["phase"])
        pred.append(doc["pred"])
        conf.append(doc["conf"])
        lab = doc.get("label")
        label.append(-1 if lab is None else int(lab))
        ids.append(int(doc["cell_id"]))
        names = tuple(doc.get("classes") or names)
    if not maps:
        raise ValueError(f"no {method!r} explanations in {folder}")

    return MapSet(np.stack(maps), np.stack(phase), np.asarray(pred), np.asarray(conf),
                  np.asarray(label), ids, method, names or CLASS_NAMES)


def compute_maps(bundle, x: np.ndarray, y: np.ndarray, cfg: MetaConfig = MetaConfig(),
                 truth: dict[str, np.ndarray] | None = None) -> MapSet:
    """Explain (a stratified subset of) a labeled dataset for its predicted classes."""
    from leukoflow.explain.methods import EXPLAINERS

    rng = np.random.default_rng(cfg.seed)
    y = np.asarray(y)
    idx = np.arange(len(y))
    if len(y) > cfg.max_cells:
        per = max(1, cfg.max_cells // max(1, len(np.unique(y))))
        idx = np.concatenate([rng.choice(np.flatnonzero(y == c),
                                         size=min(per, int((y == c).sum())), replace=False)
                              for c in np.unique(y)])
    xs = np.asarray(x, np.float32)[idx]
    p = bundle.predict_proba(xs)
    pred = p.argmax(1)
    kw = {"n_samples": cfg.lime_samples, "seed": cfg.seed} if cfg.method == "lime" else {}
    ex = EXPLAINERS.create(cfg.method, bundle=bundle, **kw)
    maps = np.stack([e.map for e in ex.explain(xs, [int(t) for t in pred],
                                               [int(i) for i in idx])])
    tr = {k: np.asarray(v)[idx] for k, v in (truth or {}).items()}
    return MapSet(maps, xs, pred, p.max(1), y[idx], [int(i) for i in idx], cfg.method,
                  tuple(bundle.class_names), tr)


def centre_on_phase(maps: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Shift each map so its cell's positive-phase centroid sits at the crop centre."""
    out = np.empty_like(maps)
    h, w = phase.shape[-2:]
    yy, xx = np.mgrid[:h, :w]
    for i, (m, ph) in enumerate(zip(maps, phase, strict=True)):
        wgt = np.clip(ph - np.median(ph), 0, None)
        s = wgt.sum()
        cy, cx = ((wgt * yy).sum() / s, (wgt * xx).sum() / s) if s > 0 else (h / 2, w / 2)
        out[i] = np.roll(m, (int(round((h - 1) / 2 - cy)), int(round((w - 1) / 2 - cx))),
                         axis=(0, 1))
    return out


def _normalise(maps: np.ndarray) -> np.ndarray:
    peak = np.abs(maps).reshape(len(maps), -1).max(1)
    return maps / np.where(peak > 0, peak, 1.0)[:, None, None]


def aggregate(ms: MapSet) -> list[dict[str, Any]]:
    """Mean and std of normalised, centred maps per class x confidence bin x correctness."""
    maps = centre_on_phase(_normalise(ms.maps), ms.phase)
    groups = []
    bins = np.digitize(ms.conf, CONF_BINS[1:-1])
    has_label = (ms.label >= 0).any()
    for c in range(len(ms.class_names)):
        for b in range(len(CONF_BINS) - 1):
            for corr in ((True, False) if has_label else (None,)):
                sel = (ms.pred == c) & (bins == b)
                if corr is not None:
                    sel &= (ms.label == ms.pred) == corr
                if not sel.any():
                    continue
                groups.append({"class": ms.class_names[c],
                               "conf_bin": [CONF_BINS[b], CONF_BINS[b + 1]],
                               "correct": corr, "n": int(sel.sum()),
                               "mean": maps[sel].mean(0), "std": maps[sel].std(0)})
    return groups


def _plot_groups(path: Path, ms: MapSet, groups: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nb = len(CONF_BINS) - 1
    k = len(ms.class_names)
    fig, axes = plt.subplots(k, nb, figsize=(nb * 1.6, k * 1.7), squeeze=False, dpi=80)
    for ax in axes.ravel():
        ax.axis("off")
    for c, name in enumerate(ms.class_names):
        for b in range(nb):
            sel = [g for g in groups if g["class"] == name and g["conf_bin"][0] == CONF_BINS[b]]
            if not sel:
                continue
            n = sum(g["n"] for g in sel)
            mean = sum(g["mean"] * g["n"] for g in sel) / n
            v = np.abs(mean).max() or 1.0
            axes[c, b].imshow(mean, cmap="bwr", vmin=-v, vmax=v)
            axes[c, b].set_title(f"{name[:4]} p∈[{CONF_BINS[b]:.2f},{CONF_BINS[b + 1]:.2f}]"
                                 f" n={n}", fontsize=6)
    fig.suptitle(f"mean {ms.method} map per predicted class and confidence", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_spray(path: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.6), squeeze=False,
                             dpi=80)
    for ax, name in zip(axes[0], names, strict=True):
        r = results[name]
        ax.scatter(r.embedding[:, 0], r.embedding[:, 1], c=r.labels, s=6, cmap="tab10")
        ax.set_title(f"{name}: k={r.n_clusters} (eigengap)", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_meta(ms: MapSet, out_dir: str | Path, cfg: MetaConfig = MetaConfig(), bundle=None,
             x: np.ndarray | None = None, y: np.ndarray | None = None,
             truth: dict[str, np.ndarray] | None = None, source: str = "",
             sim_concepts: bool = False) -> dict[str, Any]:
    """Write the meta-explanation report for ``ms`` (see module docstring).

    ``bundle``, ``x``, ``y`` enable the location summary; TCAV runs with concepts from
    ``truth`` (per-cell morphology) or, with ``sim_concepts``, with concept sets rendered
    by the simulator (:func:`leukoflow.research.tcav.tcav_sim`); its table goes to ``tcav.md``.
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    groups = aggregate(ms)
    np.savez_compressed(out / "meta_maps.npz", **{
        f"{g['class']}_{g['conf_bin'][0]:.2f}_{g['correct']}_{s}": g[s]
        for g in groups for s in ("mean", "std")})
    _plot_groups(out / "class_confidence.png", ms, groups)
    spray_res = {}
    for c, name in enumerate(ms.class_names):
        sel = ms.pred == c
        if sel.sum() >= 8:
            spray_res[name] = spray(centre_on_phase(ms.maps[sel], ms.phase[sel]),
                                    k_nn=cfg.spray_knn, pool=cfg.spray_pool, seed=cfg.seed)
    _plot_spray(out / "spray.png", spray_res)
    summary: dict[str, Any] = {
        "schema": "leukoflow-meta/1", "source": source, "method": ms.method,
        "n_maps": int(len(ms.maps)), "config": asdict(cfg), "conf_bins": list(CONF_BINS),
        "groups": [{k: v for k, v in g.items() if k not in ("mean", "std")} for g in groups],
        "spray": {n: {"n_clusters": r.n_clusters, "sizes": np.bincount(r.labels).tolist(),
                      "eigenvalues": r.eigenvalues[:10].round(5).tolist(),
                      "cell_ids": [ms.ids[i] for i in np.flatnonzero(ms.pred == c)],
                      "labels": r.labels.tolist()}
                  for c, n in enumerate(ms.class_names) if n in spray_res
                  for r in [spray_res[n]]}}
    if bundle is not None and x is not None and y is not None:
        if cfg.location_cells > 0:
            from leukoflow.explain.lime_batched import LimeParams

            loc = pair_location_summary(bundle, x, y, n_per_class=cfg.location_cells,
                                        rim_px=cfg.rim_px, seed=cfg.seed,
                                        lime_params=LimeParams(n_samples=cfg.lime_samples,
                                                               seed=cfg.seed))
            summary["relevance_location"] = {k: v.to_dict() for k, v in loc.items()}
        if cfg.tcav and sim_concepts:

            summary["tcav"] = tcav_sim(bundle, n_concept=cfg.tcav_concept_size,
                                       n_inputs=cfg.tcav_inputs, n_random=cfg.tcav_random,
                                       layer=list(cfg.tcav_layers) or None, seed=cfg.seed)
        elif cfg.tcav and truth:
            summary["tcav"] = tcav_from_truth(bundle, x, y, truth, cfg)
        if "by_layer" in summary.get("tcav", {}):

            (out / "tcav.md").write_text("\n\n".join(
                tcav_markdown(summary["tcav"], ly) for ly in summary["tcav"]["layers"]) + "\n")
    summary["seconds"] = time.perf_counter() - t0
    (out / "meta.json").write_text(json.dumps(summary, indent=1, default=float))
    return summary


def tcav_from_truth(bundle, x: np.ndarray, y: np.ndarray, truth: dict[str, np.ndarray],
                    cfg: MetaConfig = MetaConfig()) -> dict[str, Any]:
    """TCAV for every class with concepts derived from the ground truth (see explain.tcav)."""

    rng = np.random.default_rng(cfg.seed)
    concepts = concepts_from_truth(x, truth, cfg.tcav_concept_size, rng)
    if not concepts:
        return {"skipped": "no ground-truth concept features in the dataset"}
    inputs = {}
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        inputs[int(c)] = x[rng.choice(idx, size=min(cfg.tcav_inputs, len(idx)), replace=False)]
    return run_tcav(bundle, inputs, concepts, x, n_random=cfg.tcav_random,
                    random_size=cfg.tcav_concept_size, seed=cfg.seed)
