"""Concept activation vectors (Captum TCAV) with concepts from the simulator's ground truth.

A concept is a set of crops sharing a property. Here the simulator makes them (see
:func:`sim_concept_sets`): cells of **all four classes** (equal numbers) are rendered by the
classes' own models in :mod:`leukoflow.acquisition.sim.cells` with one property imposed, and go
through the same hologram/camera path as the training crops:

* ``large_size``: the cell diameter is drawn from U(14, 16.5) µm (the monocyte range);
* ``lobed_nucleus``: the class's nucleus is replaced by the neutrophil's segmented
  nucleus with 3-5 lobes;
* ``granular_interior``: the eosinophil's coarse refractile granules are added to the
  class's own inclusions.

Because every class contributes equally to a concept set, a CAV cannot stand for a class;
it can only encode the imposed property. The counter-examples are random natural crops
(all classes). TCAV (Kim et al. 2018) trains a linear classifier (CAV) on the layer
activations of concept vs random crops and scores the share of a class's cells whose class
logit increases along the CAV, averaged over ``n_random`` (>= 10) random counter-example
sets. Significance (see :func:`run_tcav`): the concept's score is compared with the scores
of >= 10 **random control concepts** (natural crops, disjoint from the random sets, trained
and scored exactly like a concept) by a two-sided t prediction test (p < 0.05, no
multiple-testing correction); Kim et al.'s t-test against random-vs-random CAVs is reported
beside it with the measured false-positive rates of both tests on the control concepts.
Captum caches activations and CAVs on disk; each call uses its own temporary folder and the
model hash as ``model_id`` so nothing stale is reused.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from leukoflow.acquisition.sim import SimConfig, make_crop_dataset
from leukoflow.acquisition.sim.cells import OBJECT_MODELS
from leukoflow.acquisition.sim.dataset import _HologramPath, place
from leukoflow.acquisition.sim.flow import render_context
from leukoflow.core.physics import CROP_SIZE_PX
from leukoflow.core.vocabulary import CLASS_NAMES


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


def default_layers(module) -> list[str]:
    """TCAV layers of a :class:`leukoflow.models.architectures.PhaseCNN` explainer model.

    The last ``nn.Conv2d`` (:func:`default_layer`; LeNet5's second convolution, 16 x 26 x 26
    at 64 px, before its ReLU) and the first hidden fully connected ReLU of ``head`` (when
    the network has one).
    """
    from torch import nn

    mods = dict(module.named_modules())
    head = [n for n in mods if n.rsplit(".", 1)[0].endswith("head") and "." in n
            and isinstance(mods[n], nn.ReLU)]
    return [default_layer(module), *head[:1]]


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


def _cav_classifier(seed: int = 0, c: float = 1.0):
    """Captum ``Classifier``: standardised L2 logistic regression, correct held-out accuracy.

    Captum's default (``SGDClassifier`` on raw activations) reports its accuracy through an
    argmax over a single output column, i.e. the share of one class in the test split
    (~0.5 whatever the fit); this one reports the real accuracy on a stratified held-out
    third. The CAV is the decision normal mapped back to raw activation units (``w / sd``),
    scaled to unit length (so TCAV's ``magnitude`` is the mean directional derivative of the
    class logit along the CAV).
    """
    import torch
    from captum.concept._utils.classifier import Classifier

    class LogisticCAV(Classifier):
        def __init__(self) -> None:
            self.rng = np.random.default_rng(seed)
            self._w: torch.Tensor | None = None
            self._classes: list[int] = []

        def train_and_eval(self, dataloader, test_split_ratio: float = 0.33, **kwargs):
            from sklearn.linear_model import LogisticRegression

            xs, ys = [], []
            for xb, yb in dataloader:
                xs.append(xb.detach().cpu().reshape(len(xb), -1).double().numpy())
                ys.append(yb.detach().cpu().numpy())
            x, y = np.concatenate(xs), np.concatenate(ys).astype(int)
            classes = np.unique(y)
            if len(classes) != 2:
                raise ValueError("a CAV needs exactly two concepts")
            test = np.zeros(len(y), bool)
            for k in classes:
                idx = self.rng.permutation(np.flatnonzero(y == k))
                test[idx[:int(round(test_split_ratio * len(idx)))]] = True
            mu, sd = x[~test].mean(0), x[~test].std(0)
            sd = np.where(sd > 1e-8 * (sd.max() + 1e-30), sd, np.inf)
            clf = LogisticRegression(C=c, max_iter=5000)
            clf.fit((x[~test] - mu) / sd, y[~test])
            acc = float((clf.predict((x[test] - mu) / sd) == y[test]).mean())
            w = clf.coef_[0] / sd
            w = torch.as_tensor(w / max(float(np.linalg.norm(w)), 1e-30), dtype=torch.float32)
            self._w = torch.stack([-w, w])
            self._classes = [int(k) for k in clf.classes_]
            return {"accs": torch.tensor(acc)}

        def weights(self) -> torch.Tensor:
            if self._w is None:
                raise RuntimeError("train the CAV classifier first")
            return self._w

        def classes(self) -> list[int]:
            return self._classes

    return LogisticCAV()


def _prediction_p(value: float, null: np.ndarray) -> float:
    """Two-sided p of one new value against a normal sample ``null`` (t prediction test)."""
    from scipy.stats import t as t_dist

    null = np.asarray(null, np.float64)
    m = len(null)
    sd = null.std(ddof=1) if m > 1 else 0.0
    if m < 2 or sd == 0:
        return 1.0 if np.all(null == value) else 0.0
    z = (value - null.mean()) / (sd * np.sqrt(1 + 1 / m))
    return float(2 * t_dist.sf(abs(z), m - 1))


def run_tcav(bundle, inputs_by_class: Mapping[int, np.ndarray],
             concepts: Mapping[str, np.ndarray], random_pool: np.ndarray, n_random: int = 10,
             random_size: int | None = None, layer: str | Sequence[str] | None = None,
             seed: int = 0, control: np.ndarray | None = None, n_control: int = 10,
             alpha: float = 0.05) -> dict[str, Any]:
    """TCAV scores with significance for each concept and class.

    Every concept is trained against the same ``n_random`` random sets; its TCAV score is
    the mean sign-count score over those CAVs. Two tests are reported:

    * ``p_value`` (decides ``significant``): the concept's score against the scores of
      ``n_control`` (>= 10 recommended) **random control concepts** (natural crops drawn
      from ``control``, disjoint from the random sets) trained and scored exactly like a
      concept, by a two-sided t prediction test (``z = (s - mean) / (sd sqrt(1 + 1/m))``,
      m - 1 degrees of freedom);
    * ``p_value_magnitude``: the same test on the mean directional derivative of the class
      logit along the unit CAV (TCAV's magnitude score; continuous where the sign count
      saturates at 0 or 1 because all cells of a class share one gradient direction);
    * ``p_value_kim`` (Kim et al. 2018): two-sided t-test of the concept's ``n_random``
      scores against random-vs-random scores (random set ``i`` vs ``i + 1``). Its scores
      share the concept set, so they are correlated and the test is anti-conservative; the
      measured false-positive rates of both tests on the control concepts (each tested
      against the others) are reported as ``control_fpr``.

    Parameters
    ----------
    bundle : ModelBundle
        The model.
    inputs_by_class : mapping int -> ndarray (n, H, W)
        Cells of each class to score [rad].
    concepts : mapping str -> ndarray (m, H, W)
        Concept example sets [rad].
    random_pool : ndarray (M, H, W)
        Crops to draw the random (counter-example) sets from [rad].
    n_random : int
        Number of random sets (>= 2).
    random_size : int, optional
        Crops per random set and per control concept (default: median concept size).
    layer : str or sequence of str, optional
        Module name(s) in ``bundle.module`` (default: last Conv2d). The first is the
        primary layer reported under ``results``; all are under ``by_layer``.
    control : ndarray (K, H, W), optional
        Natural crops (not in ``random_pool``) for the control concepts; without it only
        Kim's test is available and ``significant`` follows it.
    n_control : int
        Number of control concepts drawn from ``control``.
    alpha : float
        Significance level.

    Returns
    -------
    dict
        ``{"layer", "layers", "n_random", "n_control", "results": {class: {concept:
        {"score_mean", "score_std", "null_mean", "null_std", "p_value", "significant",
        "random_mean", "random_std", "p_value_kim", "significant_kim"}}}, "by_layer":
        {layer: results}, "control_fpr": {layer: {"control", "kim"}}, "cav_accuracy":
        {layer: {concept: mean}}}``. ``random_control`` (the first control concept, tested
        against the other controls) appears as a row of every class.
    """
    import torch
    from captum.concept import TCAV, Concept
    from scipy.stats import ttest_ind

    if n_random < 2:
        raise ValueError("need at least two random concepts")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    layers = [layer] if isinstance(layer, str) else list(layer or [default_layer(bundle.module)])
    known = dict(bundle.module.named_modules())
    for ly in layers:
        if ly not in known:
            raise ValueError(f"no layer {ly!r} in the model; e.g. {default_layers(bundle.module)}")
    size = random_size or int(np.median([len(v) for v in concepts.values()] or [20]))
    if len(random_pool) < size:
        raise ValueError(f"random pool of {len(random_pool)} crops < random set size {size}")
    if control is not None and n_control >= 3 and len(control) >= size:
        order = rng.permutation(len(control))
        ctrl_sets = []
        for j in range(n_control):
            sel = order[(j * size) % len(order):][:size]
            if len(sel) < size:
                sel = rng.choice(len(control), size=size, replace=False)
            ctrl_sets.append(np.asarray(control)[sel])
    else:
        ctrl_sets = []

    def as_iter(a: np.ndarray) -> list[torch.Tensor]:
        t = torch.as_tensor(np.asarray(a, np.float32)).unsqueeze(1)
        return [t[i:i + 64] for i in range(0, len(t), 64)]

    cid = 0
    cons = {}
    for name, arr in concepts.items():
        cons[name] = Concept(cid, name, as_iter(arr))
        cid += 1
    ctrls = []
    for j, arr in enumerate(ctrl_sets):
        ctrls.append(Concept(cid, f"control_{j}", as_iter(arr)))
        cid += 1
    rand = []
    for i in range(n_random):
        sel = rng.choice(len(random_pool), size=size, replace=False)
        rand.append(Concept(cid, f"random_{i}", as_iter(random_pool[sel])))
        cid += 1
    null_pairs = [(rand[i], rand[(i + 1) % n_random]) for i in range(n_random)]
    sets = ([[c, r] for c in [*cons.values(), *ctrls] for r in rand]
            + [[p, q] for p, q in null_pairs])
    out: dict[str, Any] = {
        "layer": layers[0], "layers": layers, "n_random": n_random,
        "n_control": len(ctrls), "random_size": size, "alpha": alpha,
        "concept_sizes": {k: int(len(v)) for k, v in concepts.items()},
        "inputs_per_class": {bundle.class_names[int(c)]: int(len(v))
                             for c, v in inputs_by_class.items()},
        "method": "captum TCAV (layer gradients), CAV: standardised logistic regression "
                  "(held-out third for the accuracy), sign-count score averaged over the "
                  "random sets; significance: two-sided t prediction test against random "
                  "control concepts (p_value) and Kim et al.'s t-test against "
                  "random-vs-random CAVs (p_value_kim)",
        "results": {}, "by_layer": {ly: {} for ly in layers},
        "control_fpr": {ly: {"control": [], "kim": [], "magnitude": []} for ly in layers},
        "cav_accuracy": {}}

    def kim(sc: list[float], rr: list[float]) -> float:
        if np.std(sc) + np.std(rr) > 0:
            with warnings.catch_warnings():  # near-constant scores: precision warning only
                warnings.simplefilter("ignore", RuntimeWarning)
                return float(ttest_ind(sc, rr).pvalue)
        return 1.0 if np.mean(sc) == np.mean(rr) else 0.0

    with tempfile.TemporaryDirectory(prefix="leukoflow-tcav-") as tmp:
        tcav = TCAV(bundle.module, layers, model_id=f"m{bundle.sha256[:16]}",
                    classifier=_cav_classifier(seed), save_path=tmp)
        for cls, xs in inputs_by_class.items():
            inp = torch.as_tensor(np.asarray(xs, np.float32)).unsqueeze(1)
            res = tcav.interpret(inp, sets, target=int(cls))
            for ly in layers:
                def scores(c, ly=ly, res=res, key="sign_count") -> list[float]:
                    return [float(res[f"{c.id}-{r.id}"][ly][key][0]) for r in rand]

                rr = [float(res[f"{p.id}-{q.id}"][ly]["sign_count"][0]) for p, q in null_pairs]
                ctrl_sc = [scores(c) for c in ctrls]
                ctrl_mean = np.array([np.mean(v) for v in ctrl_sc])
                ctrl_mag = np.array([np.mean(scores(c, key="magnitude")) for c in ctrls])
                cls_out = {}
                rows = [(n, c, ctrl_mean, ctrl_mag) for n, c in cons.items()]
                if ctrls:
                    rows.append(("random_control", ctrls[0], ctrl_mean[1:], ctrl_mag[1:]))
                for name, c, null, null_mag in rows:
                    sc = scores(c)
                    mag = float(np.mean(scores(c, key="magnitude")))
                    pm = _prediction_p(mag, null_mag) if len(null_mag) >= 2 else float("nan")
                    pk = kim(sc, rr)
                    pc = _prediction_p(float(np.mean(sc)), null) if len(null) >= 2 else pk
                    cls_out[name] = {"score_mean": float(np.mean(sc)),
                                     "score_std": float(np.std(sc)),
                                     "null_mean": float(np.mean(null)) if len(null) else None,
                                     "null_std": float(np.std(null, ddof=1))
                                     if len(null) > 1 else None,
                                     "p_value": pc, "significant": bool(pc < alpha),
                                     "magnitude": mag,
                                     "magnitude_null_mean": float(np.mean(null_mag))
                                     if len(null_mag) else None,
                                     "magnitude_null_std": float(np.std(null_mag, ddof=1))
                                     if len(null_mag) > 1 else None,
                                     "p_value_magnitude": pm,
                                     "significant_magnitude": bool(pm < alpha),
                                     "random_mean": float(np.mean(rr)),
                                     "random_std": float(np.std(rr)), "p_value_kim": pk,
                                     "significant_kim": bool(pk < alpha)}
                out["by_layer"][ly][bundle.class_names[int(cls)]] = cls_out
                for j in range(len(ctrls)):
                    others = np.delete(ctrl_mean, j)
                    out["control_fpr"][ly]["control"].append(
                        _prediction_p(float(ctrl_mean[j]), others) < alpha)
                    out["control_fpr"][ly]["magnitude"].append(
                        _prediction_p(float(ctrl_mag[j]), np.delete(ctrl_mag, j)) < alpha)
                    out["control_fpr"][ly]["kim"].append(kim(ctrl_sc[j], rr) < alpha)
        for ly in layers:
            acc = {}
            for name, c in [*cons.items(), *(("control", c) for c in ctrls[:1])]:
                v = []
                for r in rand:
                    cav = tcav.cavs.get(f"{c.id}-{r.id}", {}).get(ly)
                    if cav is not None and cav.stats is not None and "accs" in cav.stats:
                        v.append(float(cav.stats["accs"]))
                acc["random_control" if name == "control" else name] = (
                    float(np.mean(v)) if v else float("nan"))
            out["cav_accuracy"][ly] = acc
            f = out["control_fpr"][ly]
            out["control_fpr"][ly] = {k: float(np.mean(v)) if v else None for k, v in f.items()}
            out["control_fpr"][ly]["n_tests"] = len(f["control"])
    out["results"] = out["by_layer"][layers[0]]
    return out


def tcav_report_lines(result: Mapping[str, Any]) -> Sequence[str]:
    """Human-readable lines of a :func:`run_tcav` result (primary layer)."""
    lines = [f"TCAV layer {result['layer']}, {result['n_random']} random concepts"]
    for cls, d in result["results"].items():
        for name, s in d.items():
            star = "*" if s["significant"] else " "
            ref = (f"controls {s['null_mean']:.2f}" if s.get("null_mean") is not None
                   else f"random {s['random_mean']:.2f}")
            line = (f"{cls:>11} {name:<18} {s['score_mean']:.2f}±{s['score_std']:.2f} "
                    f"({ref}) p={s['p_value']:.3g}{star}")
            if "magnitude" in s:
                line += (f" mag {s['magnitude']:+.3g} p={s['p_value_magnitude']:.3g}"
                         + ("*" if s["significant_magnitude"] else ""))
            lines.append(line)
    return lines


def tcav_markdown(result: Mapping[str, Any], layer: str | None = None) -> str:
    """Markdown table concept x class: TCAV score ± sd, p-value, significance."""
    ly = layer or result["layer"]
    res = result["by_layer"][ly] if "by_layer" in result else result["results"]
    classes = list(res)
    concepts = list(next(iter(res.values()))) if res else []
    fpr = result.get("control_fpr", {}).get(ly, {})
    lines = [f"Layer `{ly}`: {result['n_random']} random sets and "
             f"{result.get('n_control', 0)} random control concepts of "
             f"{result['random_size']} crops. Cells: TCAV sign-count score (mean ± sd over "
             "the random sets) and p of the test against the control concepts (* = p < "
             f"{result.get('alpha', 0.05)}); mean directional derivative along the unit "
             "CAV ('mag', logit per activation unit) and its p against the controls (m); "
             "p of Kim et al.'s t-test vs random-vs-random (k).", "",
             "| concept | " + " | ".join(classes) + " | CAV accuracy |",
             "|---|" + "---|" * (len(classes) + 1)]
    acc = result.get("cav_accuracy", {}).get(ly, {})
    for c in concepts:
        cells = []
        for k in classes:
            s = res[k][c]
            pk = s.get("p_value_kim", s["p_value"])
            cell = (f"{s['score_mean']:.2f} ± {s['score_std']:.2f}, p={s['p_value']:.2g}"
                    + (" *" if s["significant"] else ""))
            if "magnitude" in s:
                cell += (f"; mag {s['magnitude']:+.2g}, p={s['p_value_magnitude']:.2g}"
                         + (" m" if s["significant_magnitude"] else ""))
            cells.append(cell + f"; p_kim={pk:.2g}" + (" k" if s.get("significant_kim") else ""))
        a = acc.get(c, float("nan"))
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {a:.2f} |")
    rnd = [f"{k}: {res[k][concepts[0]]['random_mean']:.2f} ± "
           f"{res[k][concepts[0]]['random_std']:.2f}" for k in classes] if concepts else []
    nul = [f"{k}: {res[k][concepts[0]]['null_mean']:.2f} ± "
           f"{res[k][concepts[0]]['null_std']:.2f}" for k in classes
           if concepts and res[k][concepts[0]].get("null_mean") is not None]
    if nul:
        lines += ["", "Control-concept scores (mean ± sd over controls): " + ", ".join(nul)]
    lines += ["", "Random-vs-random scores (Kim null): " + ", ".join(rnd)]
    if fpr.get("n_tests"):
        lines += ["", f"False-positive rate on the control concepts ({fpr['n_tests']} tests, "
                      f"each control against the others): sign-count control test "
                      f"{fpr['control']:.2f}, magnitude control test "
                      f"{fpr.get('magnitude', float('nan')):.2f}, Kim's test {fpr['kim']:.2f}"]
    return "\n".join(lines)


def tcav_stability_markdown(results: Sequence[Mapping[str, Any]], layer: str | None = None
                            ) -> str:
    """Markdown table over repeated runs (seeds): sign and significance count per cell.

    Each cell gives the sign of the mean directional derivative relative to the control
    concepts in every run (``+``/``-``) and how many runs found it significant by the
    magnitude test and by the sign-count test; the last rows give the CAV accuracies and
    the control false-positive rates.
    """
    if not results:
        return ""
    ly = layer or results[0]["layer"]
    first = results[0]["by_layer"][ly]
    classes = list(first)
    concepts = list(next(iter(first.values())))
    n = len(results)
    lines = [f"Layer `{ly}`, {n} runs (seeds). Cells: sign of the directional derivative "
             "vs the control concepts in each run; magnitude-test significant runs / "
             "sign-count-test significant runs.", "",
             "| concept | " + " | ".join(classes) + " | CAV accuracy |",
             "|---|" + "---|" * (len(classes) + 1)]
    for c in concepts:
        cells = []
        for k in classes:
            v = [r["by_layer"][ly][k][c] for r in results]
            sg = "".join("+" if x["magnitude"] > (x["magnitude_null_mean"] or 0.0) else "-"
                         for x in v)
            nm = sum(bool(x["significant_magnitude"]) for x in v)
            ns = sum(bool(x["significant"]) for x in v)
            cells.append(f"{sg} {nm}/{n}, {ns}/{n}" + (" **" if nm == n else ""))
        acc = [r["cav_accuracy"][ly].get(c, float("nan")) for r in results]
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {np.nanmean(acc):.2f} |")
    fpr = [r["control_fpr"][ly] for r in results]
    lines += ["", "Control false-positive rate per run (magnitude / sign-count / Kim): "
              + "; ".join(f"{f.get('magnitude', float('nan')):.3f} / {f['control']:.3f} / "
                          f"{f['kim']:.3f}" for f in fpr),
              "", "** = significant in every run."]
    return "\n".join(lines)


#: Concept -> class for which the simulator's class definitions make it evidence.
EXPECTED_CONCEPTS: dict[str, str] = {"large_size": "monocyte",
                                     "lobed_nucleus": "neutrophil",
                                     "granular_interior": "eosinophil"}


def concept_model(kind: str, concept: str):
    """The simulator's model of class ``kind`` with ``concept`` imposed (see module doc)."""

    base = OBJECT_MODELS.get(kind)
    if concept == "large_size":
        def draw_diameter(self, rng, p):
            p["large"] = True
            return float(rng.uniform(14.0, 16.5))
        attrs = {"draw_diameter": draw_diameter}
    elif concept == "lobed_nucleus":
        neu = OBJECT_MODELS.get("neutrophil")()
        neu.lobe_counts, neu.lobe_probs = (3, 4, 5), (0.5, 0.35, 0.15)

        def nucleus(self, rng, y, x, a, b, c, p):
            return neu.nucleus(rng, y, x, a, b, c, p)
        attrs = {"nucleus": nucleus}
    elif concept == "granular_interior":
        eos = OBJECT_MODELS.get("eosinophil")()
        orig = base.inclusions

        def inclusions(self, rng, n, ctx, a, b, angle, p):
            extra = eos.granule_map(rng, n, ctx, a, b, angle, {})
            return orig(self, rng, n, ctx, a, b, angle, p) + extra
        attrs = {"inclusions": inclusions}
    else:
        raise ValueError(f"unknown concept {concept!r}; choose from {list(EXPECTED_CONCEPTS)}")
    return type(f"{base.__name__}_{concept}", (base,), attrs)()


def render_crops(models: Sequence[Any], seed: int, crop: int = CROP_SIZE_PX,
                 through_hologram: bool = True, stream: int = 0) -> np.ndarray:
    """Crops (N, crop, crop) [rad] of one object per model, as ``make_crop_dataset`` makes them.

    Each object is rendered, centred on its phase centroid and (by default) sent through
    the simulated hologram, camera and ideal demodulation (``leukoflow.acquisition.sim.dataset``).
    ``seed`` fixes the instrument (background windows and camera-noise bank, exactly as a
    ``make_crop_dataset(..., seed=seed)`` call); ``stream`` selects independent object
    and noise draws, so sets rendered with one seed share the instrument but not the cells.
    """

    cfg = SimConfig(seed=seed)
    ctx = render_context(cfg)
    objs, truth, offs = [], [], []
    for i, m in enumerate(models):
        obj = m.render(np.random.default_rng(np.random.SeedSequence([seed, stream, i, 0xC0C])),
                       ctx)
        ph, off = place(obj, crop)
        objs.append(obj)
        truth.append(ph)
        offs.append(off)
    t = np.asarray(truth, np.float32).reshape(-1, crop, crop)
    if not through_hologram or not objs:
        return t
    path = _HologramPath(cfg, crop, seed)
    out = np.empty_like(t)
    for b0 in range(0, len(objs), 64):
        sl = slice(b0, b0 + 64)
        meas = path.measure(objs[sl], offs[sl], [
            np.random.default_rng(np.random.SeedSequence([seed, stream, i, 0xC0D]))
            for i in range(b0, min(b0 + 64, len(objs)))])
        wrapped = np.angle(meas) - t[sl]
        out[sl] = t[sl] + ((wrapped + np.pi) % (2 * np.pi) - np.pi)
    return out


def sim_concept_sets(concepts: Sequence[str], n: int, seed: int = 0, crop: int = CROP_SIZE_PX
                     ) -> dict[str, np.ndarray]:
    """Concept crop sets: ``n`` cells each, classes in equal shares, property imposed.

    All sets share the instrument of ``make_crop_dataset(..., seed=seed)`` (same background
    and noise bank), so a CAV cannot pick up an instrument difference.
    """

    out = {}
    for j, c in enumerate(concepts):
        models = [concept_model(CLASS_NAMES[i % len(CLASS_NAMES)], c) for i in range(n)]
        out[c] = render_crops(models, seed, crop, stream=1 + list(EXPECTED_CONCEPTS).index(c)
                              if c in EXPECTED_CONCEPTS else 100 + j)
    return out


def tcav_sim(bundle, concepts: Sequence[str] = tuple(EXPECTED_CONCEPTS), n_concept: int = 60,
             n_inputs: int = 60, n_random: int = 10, layer: str | Sequence[str] | None = None,
             seed: int = 0, crop: int = CROP_SIZE_PX, n_control: int = 10) -> dict[str, Any]:
    """TCAV of ``bundle`` with simulator concepts, natural random sets and a random control.

    Parameters
    ----------
    n_concept : int
        Crops per concept set and per random set.
    n_inputs : int
        Simulated test cells per class scored.
    n_random : int
        Random sets (>= 10).
    n_control : int
        Random control concepts (natural crops, disjoint from the random sets) forming the
        null distribution of the significance test (>= 10).
    layer : str or sequence of str, optional
        Layers (default :func:`default_layers`; the first is the primary layer).

    Returns
    -------
    dict
        :func:`run_tcav`'s result plus ``"expected"`` (concept -> class) and
        ``"expected_significant"`` (concept -> layer -> ``{"score_test",
        "magnitude_test"}``: significant in the expected direction, above the controls).
    """

    # one instrument for every set: concept sets are rendered with the seed of the natural
    # crops, which are split into random sets, control concepts and scored inputs
    inst = seed + 7919
    sets = sim_concept_sets(concepts, n_concept, inst, crop)
    n_pool = n_random * n_concept
    n_ctrl = n_control * n_concept
    d = make_crop_dataset(-(-(n_pool + n_ctrl) // 4) + n_inputs, 0, inst, crop)
    x, y = d["x"], np.asarray(d["y"])
    rng = np.random.default_rng([seed, 0x7CA7])
    test_idx = np.concatenate([rng.choice(np.flatnonzero(y == c), n_inputs, replace=False)
                               for c in np.unique(y)])
    rest = rng.permutation(np.setdiff1d(np.arange(len(y)), test_idx))
    pool, control = x[rest[:n_pool]], x[rest[n_pool:n_pool + n_ctrl]]
    inputs = {int(c): x[test_idx[y[test_idx] == c]] for c in np.unique(y)}
    res = run_tcav(bundle, inputs, sets, pool, n_random=n_random, random_size=n_concept,
                   layer=layer or default_layers(bundle.module), seed=seed, control=control,
                   n_control=n_control)
    res["concepts"] = {c: "all four classes in equal shares with the property imposed "
                          "(explain.tcav.concept_model)" for c in concepts}
    res["random_sets"] = ("natural simulated crops, all classes (make_crop_dataset seed "
                          f"{inst}, the concept sets' instrument); disjoint from the control "
                          "concepts and the scored cells")
    res["expected"] = {c: EXPECTED_CONCEPTS[c] for c in concepts if c in EXPECTED_CONCEPTS}
    res["expected_significant"] = {
        c: {ly: {"score_test": bool(d[k][c]["significant"]
                                    and d[k][c]["score_mean"] > d[k][c]["null_mean"]),
                 "magnitude_test": bool(d[k][c]["significant_magnitude"]
                                        and d[k][c]["magnitude"]
                                        > d[k][c]["magnitude_null_mean"])}
            for ly, d in res["by_layer"].items()}
        for c, k in res["expected"].items() if k in res["results"]}
    return res
