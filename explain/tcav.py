"""Concept activation vectors (Captum TCAV) with concepts from the simulator's ground truth.

A concept is a set of crops sharing a property (e.g. large size, lobed nucleus, granular
interior), chosen from the simulated instrument's recorded morphology parameters. TCAV
trains a linear classifier (CAV) separating the layer activations of the concept from those
of a random set, and scores the share of a class's cells whose class logit increases along
the CAV. Significance: each concept is tested against ``n_random`` (>= 10) random sets, and
its scores are compared with random-vs-random scores by a two-sided t-test (Kim et al. 2018).
Captum caches activations and CAVs on disk; each call uses its own temporary folder and the
model hash as ``model_id`` so nothing stale is reused.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def default_layer(module) -> str:
    """Name of the last ``nn.Conv2d`` in the explainer model (TCAV layer)."""
    from torch import nn

    name = ""
    for n, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            name = n
    if not name:
        raise ValueError("no Conv2d layer for TCAV")
    return name


def concepts_from_truth(x: np.ndarray, truth: Mapping[str, np.ndarray], n: int,
                        rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Concept crop sets from ground-truth morphology (simulator features).

    Recognised ``truth`` keys (arrays aligned with ``x``): ``diameter_um`` (concept
    ``large_size``: top quartile), ``lobes`` (``lobed_nucleus``: >= 3 lobes), ``granules``
    or ``granule_phase_rad`` (``granular_interior``: top quartile). Missing keys are skipped.
    """
    sets: dict[str, np.ndarray] = {}

    def pick(sel: np.ndarray) -> np.ndarray | None:
        idx = np.flatnonzero(sel)
        if len(idx) < 8:
            return None
        return x[rng.choice(idx, size=min(n, len(idx)), replace=False)]

    if "diameter_um" in truth:
        d = np.asarray(truth["diameter_um"], float)
        s = pick(d >= np.nanpercentile(d, 75))
        if s is not None:
            sets["large_size"] = s
    if "lobes" in truth:
        s = pick(np.asarray(truth["lobes"], float) >= 3)
        if s is not None:
            sets["lobed_nucleus"] = s
    for key in ("granules", "granule_phase_rad"):
        if key in truth:
            g = np.nan_to_num(np.asarray(truth[key], float), nan=0.0)
            s = pick(g >= np.percentile(g, 75))
            if s is not None:
                sets["granular_interior"] = s
            break
    return sets


def run_tcav(bundle, inputs_by_class: Mapping[int, np.ndarray],
             concepts: Mapping[str, np.ndarray], random_pool: np.ndarray, n_random: int = 10,
             random_size: int | None = None, layer: str | None = None, seed: int = 0,
             ) -> dict[str, Any]:
    """TCAV scores with significance for each concept and class.

    Parameters
    ----------
    bundle : ModelBundle
        The model.
    inputs_by_class : mapping int -> ndarray (n, H, W)
        Cells of each class to score [rad].
    concepts : mapping str -> ndarray (m, H, W)
        Concept example sets.
    random_pool : ndarray (M, H, W)
        Crops to draw the random sets from.
    n_random : int
        Number of random sets (>= 10 for the test).
    layer : str, optional
        Module name in ``bundle.module`` (default: last Conv2d).

    Returns
    -------
    dict
        ``{"layer", "n_random", "results": {class: {concept: {"score_mean", "score_std",
        "random_mean", "p_value", "significant"}}}}``.
    """
    import torch
    from captum.concept import TCAV, Concept
    from scipy.stats import ttest_ind

    if n_random < 2:
        raise ValueError("need at least two random concepts")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    layer = layer or default_layer(bundle.module)
    size = random_size or int(np.median([len(v) for v in concepts.values()] or [20]))

    def as_iter(a: np.ndarray) -> list[torch.Tensor]:
        t = torch.as_tensor(np.asarray(a, np.float32)).unsqueeze(1)
        return [t[i:i + 64] for i in range(0, len(t), 64)]

    cid = 0
    cons = {}
    for name, arr in concepts.items():
        cons[name] = Concept(cid, name, as_iter(arr))
        cid += 1
    rand = []
    for i in range(n_random):
        sel = rng.choice(len(random_pool), size=min(size, len(random_pool)), replace=False)
        rand.append(Concept(cid, f"random_{i}", as_iter(random_pool[sel])))
        cid += 1
    sets = [[c, r] for c in cons.values() for r in rand]
    sets += [[rand[0], r] for r in rand[1:]]
    out: dict[str, Any] = {"layer": layer, "n_random": n_random, "random_size": size,
                           "concept_sizes": {k: int(len(v)) for k, v in concepts.items()},
                           "method": "captum TCAV, LayerGradientXActivation, SGD CAV; "
                                     "t-test vs random-vs-random", "results": {}}
    with tempfile.TemporaryDirectory(prefix="leukoflow-tcav-") as tmp:
        tcav = TCAV(bundle.module, [layer], model_id=f"m{bundle.sha256[:16]}",
                    save_path=tmp)
        for cls, xs in inputs_by_class.items():
            inp = torch.as_tensor(np.asarray(xs, np.float32)).unsqueeze(1)
            res = tcav.interpret(inp, sets, target=int(cls))
            rr = [float(res[f"{rand[0].id}-{r.id}"][layer]["sign_count"][0]) for r in rand[1:]]
            cls_out = {}
            for name, c in cons.items():
                sc = [float(res[f"{c.id}-{r.id}"][layer]["sign_count"][0]) for r in rand]
                p = float(ttest_ind(sc, rr).pvalue) if np.std(sc) + np.std(rr) > 0 else 1.0
                cls_out[name] = {"score_mean": float(np.mean(sc)), "score_std": float(np.std(sc)),
                                 "random_mean": float(np.mean(rr)), "p_value": p,
                                 "significant": bool(p < 0.05)}
            out["results"][bundle.class_names[int(cls)]] = cls_out
    return out


def tcav_report_lines(result: Mapping[str, Any]) -> Sequence[str]:
    """Human-readable lines of a :func:`run_tcav` result."""
    lines = [f"TCAV layer {result['layer']}, {result['n_random']} random concepts"]
    for cls, d in result["results"].items():
        for name, s in d.items():
            star = "*" if s["significant"] else " "
            lines.append(f"{cls:>11} {name:<18} {s['score_mean']:.2f}±{s['score_std']:.2f} "
                         f"(random {s['random_mean']:.2f}) p={s['p_value']:.3g}{star}")
    return lines


def sim_truth_crops(n_per_class: int, seed: int = 0, crop: int = 64, noise_rad: float = 0.02
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Crops rendered by the simulated instrument's cell models with their ground truth.

    Each leukocyte is drawn by ``acquisition.sim.OBJECT_MODELS`` and placed in a crop
    (noise-free phase plus white noise of ``noise_rad`` [rad]); the drawn morphology comes
    back as truth arrays: ``diameter_um`` [µm], ``lobes`` (nuclear lobes, 0 = round or
    kidney-shaped), ``granules`` (count), ``granule_phase_rad`` (peak phase per granule).

    Returns
    -------
    x : ndarray float32 (N, crop, crop) [rad]
    y : ndarray int64 (N,)
    truth : dict of ndarray (N,)
    """
    from acquisition.sim import OBJECT_MODELS, SimConfig
    from acquisition.sim.dataset import place, render_context
    from leukoflow import CLASS_NAMES

    ctx = render_context(SimConfig(seed=seed))
    rng = np.random.default_rng([seed, 0x7CA5])
    xs, ys = [], []
    truth: dict[str, list[float]] = {"diameter_um": [], "lobes": [], "granules": [],
                                     "granule_phase_rad": []}
    for c, name in enumerate(CLASS_NAMES):
        model = OBJECT_MODELS.get(name)()
        for _ in range(n_per_class):
            obj = model.render(rng, ctx)
            ph, _amp = place(obj, crop)
            xs.append(ph + rng.normal(0, noise_rad, ph.shape))
            ys.append(c)
            p = obj.params
            truth["diameter_um"].append(float(obj.diameter_um))
            truth["lobes"].append(float(p.get("lobes", 0)))
            truth["granules"].append(float(p.get("granules", 0)))
            truth["granule_phase_rad"].append(float(p.get("granule_phase_rad", 0.0))
                                              if p.get("granules", 0) else 0.0)
    return (np.asarray(xs, np.float32), np.asarray(ys, np.int64),
            {k: np.asarray(v) for k, v in truth.items()})
