"""Reproduce and quantify the seed paper's finding on simulated data.

The seed paper (Röhrl et al. 2023) reported that its classifier tells **monocytes from
eosinophils by the cell interior** and **neutrophils from lymphocytes by size (the rim)**.
In the simulator (:mod:`leukoflow.acquisition.sim.cells`) both pairs differ in size and interior
(mean diameters 14.0 vs 11.8 µm and 11.0 vs 8.0 µm; eosinophils carry coarse refractile
granules and a bilobed nucleus, monocytes a kidney-shaped nucleus and vacuoles, neutrophils
3-5 lobes and fine granules, lymphocytes a large round nucleus); which cue a trained model
uses is an empirical question. Two independent measurements answer it per class pair
(a, b), always on the pair's **contrastive log-odds** ``z_a - z_b`` (temperature-scaled
logits), over the test cells of both classes:

1. **Causal ablations** (no attribution map involved). Regions come from the phase itself:
   the cell mask is the smoothed phase above ``threshold_rad`` (the simulator's feature
   mask, 0.25 rad, close to the true outline), the **rim**
   is the band within ``rim_um`` of the mask boundary (both sides), the **interior** the
   mask eroded by ``rim_um``.

   * ``interior_mean``: the interior is replaced by its mean phase (a flat plateau):
     granules, vacuoles, nucleus and the radial phase profile disappear; the outline,
     the rim and the interior's dry mass (phase sum) are unchanged exactly.
   * ``interior_radial``: every interior pixel is replaced by the mean of the interior
     pixels on its 1-px ring about the cell's phase centroid. Granules, vacuoles, lobes and
     nucleus shape disappear; the outline, the rim and the interior's dry mass (phase sum)
     are unchanged exactly.
   * ``interior_blur``: normalised Gaussian smoothing (``blur_um``) restricted to the
     interior: removes granules and fine texture, keeps the coarse nucleus.
   * ``size``: the cell is rescaled about its centroid by ``size_factor`` towards the
     other class of the pair (the larger class by the simulator's mean diameters shrinks,
     the smaller grows by ``1 / size_factor``); phase values (thickness) are kept, so the
     texture is kept and only the size and the rim position change.
   * ``size_matched``: as ``size`` with the factor that maps one class's mean diameter on
     the other's (a stronger move for neutrophil/lymphocyte, whose sizes differ more).

   For each cell whose pair decision is right (``z_true > z_other``; crops without a cell
   above the threshold are left out and counted) the **flip rate** is
   the share whose decision turns after the ablation, and the **log-odds change** the mean
   of ``m1 - m0`` with ``m = z_true - z_other`` (negative = evidence for the true class
   lost).
2. **Attribution location**: contrastive maps of ``z_a - z_b`` by LIME (fused
   multi-SLIC), Guided Backprop and Integrated Gradients; the share of ``|relevance|`` in
   the interior divided by the interior's share of the (interior + rim) area is the
   **interior enrichment** (1 = uniform, > 1 = concentrated inside).

All intervals are percentile bootstrap 95 % intervals over cells (``n_boot`` resamples);
pair differences are bootstrapped with both pairs resampled independently. The finding is
reproduced (:func:`verdict`) when the interior-mean ablation flips more mono/eos than
neu/lym decisions and the matched size perturbation (each class given the other's mean
size: "would the decision change if the cell had the other class's size?") more neu/lym
than mono/eos decisions, both differences' 95 % intervals excluding 0. The fixed-factor size
perturbation (same relative change for both pairs; no test of the claim, see
:func:`verdict`) and the attribution ratios per method are reported beside the verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi
from torch import nn

from leukoflow.acquisition.sim.cells import leukocyte_model
from leukoflow.core.physics import PIXEL_UM

#: The two class pairs of the seed paper's finding: (interior pair, size pair).
FINDING_PAIRS: tuple[tuple[str, str], ...] = (("monocyte", "eosinophil"),
                                              ("neutrophil", "lymphocyte"))
ABLATIONS: tuple[str, ...] = ("interior_mean", "interior_radial", "interior_blur", "size",
                              "size_matched")
ATTRIBUTION_METHODS: tuple[str, ...] = ("lime", "guided_backprop", "integrated_gradients")


@dataclass(frozen=True)
class FindingConfig:
    """Parameters of :func:`run_finding` (recorded with the result).

    Attributes
    ----------
    pixel_um : float
        Phase pixel size [µm] (the simulator's 0.34 µm).
    rim_um : float
        Rim half-width on each side of the cell boundary [µm].
    threshold_rad : float
        Cell-mask threshold on the smoothed phase [rad].
    blur_um : float
        Gaussian sigma of ``interior_blur`` [µm].
    size_factor : float
        Rescale factor of ``size`` for the larger class of a pair (< 1); the smaller class
        is scaled by its inverse.
    attribution_cells : int
        Cells per class explained for the attribution location (0 = skip).
    lime_samples : int
        LIME perturbations per segmentation.
    ig_steps : int
        Integrated-gradients steps.
    n_boot : int
        Bootstrap resamples.
    seed : int
    """

    pixel_um: float = PIXEL_UM
    rim_um: float = 1.0
    threshold_rad: float = 0.25
    blur_um: float = 1.0
    size_factor: float = 0.85
    attribution_cells: int = 60
    lime_samples: int = 300
    ig_steps: int = 32
    n_boot: int = 2000
    seed: int = 0


# -- regions and ablations ------------------------------------------------------------------

def cell_regions(x: np.ndarray, pixel_um: float = PIXEL_UM, rim_um: float = 1.0,
                 threshold_rad: float = 0.25) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell mask, interior and rim of one phase crop.

    Parameters
    ----------
    x : ndarray (H, W)
        Phase crop [rad], background ~0 rad, cell near the centre.
    pixel_um, rim_um : float
        Pixel size and rim half-width [µm].
    threshold_rad : float
        Threshold on the 1-px Gaussian-smoothed phase [rad].

    Returns
    -------
    mask, interior, rim : ndarray of bool (H, W)
        Filled mask of the component nearest the centre; the mask eroded by ``rim_um``;
        the band within ``rim_um`` of the boundary (inside and outside).
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D crop, got shape {x.shape}")
    m = ndi.binary_fill_holes(ndi.gaussian_filter(x, 1.0) > threshold_rad)
    lab, n = ndi.label(m)
    if n == 0:
        raise ValueError("no cell above the phase threshold in the crop")
    if n > 1:
        h, w = x.shape
        yy, xx = np.mgrid[:h, :w]
        d = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2)
        best = min(range(1, n + 1), key=lambda k: d[lab == k].min())
        m = lab == best
    r = max(1, int(round(rim_um / pixel_um)))
    inner = ndi.binary_erosion(m, iterations=r, border_value=0)
    outer = ndi.binary_dilation(m, iterations=r)
    return m, inner, outer & ~inner


def _centroid(x: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    w = np.where(mask, np.clip(x, 0, None), 0.0)
    s = w.sum()
    yy, xx = np.mgrid[:x.shape[0], :x.shape[1]]
    if s <= 0:
        return (x.shape[0] - 1) / 2, (x.shape[1] - 1) / 2
    return float((w * yy).sum() / s), float((w * xx).sum() / s)


def ablate_interior_mean(x: np.ndarray, interior: np.ndarray) -> np.ndarray:
    """Replace the interior by its mean phase (a flat plateau; dry mass unchanged)."""
    out = np.array(x, np.float64)
    if interior.any():
        out[interior] = out[interior].mean()
    return out.astype(np.float32)


def ablate_interior_radial(x: np.ndarray, mask: np.ndarray, interior: np.ndarray
                           ) -> np.ndarray:
    """Replace the interior by its ring means about the phase centroid (1-px rings).

    The interior's phase sum (dry mass) and everything outside the interior are unchanged.
    """
    out = np.array(x, np.float64)
    if not interior.any():
        return out.astype(np.float32)
    cy, cx = _centroid(out, mask)
    yy, xx = np.mgrid[:out.shape[0], :out.shape[1]]
    ring = np.round(np.hypot(yy - cy, xx - cx)).astype(int)[interior]
    vals = out[interior]
    sums = np.bincount(ring, vals)
    cnt = np.bincount(ring)
    out[interior] = sums[ring] / cnt[ring]
    return out.astype(np.float32)


def ablate_interior_blur(x: np.ndarray, interior: np.ndarray, sigma_px: float) -> np.ndarray:
    """Normalised Gaussian smoothing (``sigma_px`` [px]) inside the interior only."""
    out = np.array(x, np.float64)
    if not interior.any():
        return out.astype(np.float32)
    w = interior.astype(np.float64)
    num = ndi.gaussian_filter(out * w, sigma_px)
    den = ndi.gaussian_filter(w, sigma_px)
    sm = num / np.maximum(den, 1e-9)
    sm_in = sm[interior]
    # keep the interior's phase sum (dry mass) exactly
    sm_in += (out[interior].sum() - sm_in.sum()) / interior.sum()
    out[interior] = sm_in
    return out.astype(np.float32)


def rescale_cell(x: np.ndarray, mask: np.ndarray, factor: float) -> np.ndarray:
    """Rescale the crop about the cell's phase centroid by ``factor`` (linear, 0 rad fill).

    Phase values are kept (the cell keeps its thickness profile and texture; its projected
    area scales by ``factor**2``).
    """
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    x = np.asarray(x, np.float64)
    cy, cx = _centroid(x, mask)
    c = np.array([cy, cx])
    mat = np.eye(2) / factor
    off = c - mat @ c
    return ndi.affine_transform(x, mat, offset=off, order=1, mode="constant",
                                cval=0.0).astype(np.float32)


# -- model outputs --------------------------------------------------------------------------

class PairContrast(nn.Module):
    """Logit differences ``z_a - z_b`` (N, P) of an explainer model for P class pairs."""

    def __init__(self, module: nn.Module, pairs: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        self.model = module
        k = len(pairs)
        n_cls = None
        for m in module.modules():
            if isinstance(m, nn.Linear):
                n_cls = m.out_features
        if n_cls is None:
            raise ValueError("cannot infer the number of classes (no nn.Linear)")
        c = torch.zeros(n_cls, k)
        for j, (a, b) in enumerate(pairs):
            c[a, j] += 1.0
            c[b, j] -= 1.0
        self.register_buffer("contrast", c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.model(x) @ self.contrast


@torch.no_grad()
def logits(bundle, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Temperature-scaled logits (N, K) of crops ``x`` (N, H, W) [rad]."""
    out = []
    for i in range(0, len(x), batch_size):
        xb = torch.as_tensor(np.ascontiguousarray(x[i:i + batch_size]), dtype=torch.float32)
        out.append(bundle.module(xb.unsqueeze(1)).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(bundle.class_names)))


# -- statistics -----------------------------------------------------------------------------

def bootstrap_ci(v: np.ndarray, n_boot: int = 2000, seed: int = 0,
                 stat: Callable[[np.ndarray], float] = np.mean) -> tuple[float, float, float]:
    """Statistic of ``v`` and its percentile bootstrap 95 % interval over entries."""
    v = np.asarray(v, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), (n_boot, len(v)))
    bs = np.array([stat(v[i]) for i in idx])
    return float(stat(v)), float(np.percentile(bs, 2.5)), float(np.percentile(bs, 97.5))


def bootstrap_diff_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0,
                      stat: Callable[[np.ndarray], float] = np.mean,
                      ratio: bool = False) -> tuple[float, float, float]:
    """``stat(a) - stat(b)`` (or the ratio) with an independent two-sample bootstrap 95 % CI."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) == 0 or len(b) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, len(a), (n_boot, len(a)))
    ib = rng.integers(0, len(b), (n_boot, len(b)))

    def f(u: np.ndarray, w: np.ndarray) -> float:
        return float(stat(u) / stat(w)) if ratio else float(stat(u) - stat(w))

    bs = np.array([f(a[i], b[j]) for i, j in zip(ia, ib, strict=True)])
    return f(a, b), float(np.percentile(bs, 2.5)), float(np.percentile(bs, 97.5))


def _ci(t: tuple[float, float, float]) -> dict[str, float]:
    return {"value": t[0], "ci95": [t[1], t[2]]}


# -- the analysis ---------------------------------------------------------------------------

def _pair_cells(y: np.ndarray, ia: int, ib: int) -> np.ndarray:
    return np.flatnonzero((y == ia) | (y == ib))


def _size_direction(a: str, b: str) -> tuple[str, float]:
    """(larger class, matched factor = smaller mean diameter / larger) from the simulator."""

    da = leukocyte_model(a).diameter_moments()[0]
    db = leukocyte_model(b).diameter_moments()[0]
    return (a, db / da) if da >= db else (b, da / db)


def ablate(x: np.ndarray, y: np.ndarray, kind: str, pair: tuple[str, str],
           class_names: Sequence[str], cfg: FindingConfig = FindingConfig()) -> np.ndarray:
    """Apply ablation ``kind`` (one of :data:`ABLATIONS`) to every crop of ``x``.

    ``y`` (class indices) sets the direction of the size ablations within ``pair``.
    """
    if kind not in ABLATIONS:
        raise ValueError(f"unknown ablation {kind!r}; choose from {ABLATIONS}")
    larger, matched = _size_direction(*pair)
    il = list(class_names).index(larger)
    out = np.empty_like(np.asarray(x, np.float32))
    for i, xi in enumerate(x):
        m, inner, _rim = cell_regions(xi, cfg.pixel_um, cfg.rim_um, cfg.threshold_rad)
        if kind == "interior_mean":
            out[i] = ablate_interior_mean(xi, inner)
        elif kind == "interior_radial":
            out[i] = ablate_interior_radial(xi, m, inner)
        elif kind == "interior_blur":
            out[i] = ablate_interior_blur(xi, inner, cfg.blur_um / cfg.pixel_um)
        else:
            f = cfg.size_factor if kind == "size" else matched
            out[i] = rescale_cell(xi, m, f if int(y[i]) == il else 1.0 / f)
    return out


def _has_cell(x: np.ndarray, cfg: FindingConfig) -> bool:
    try:
        cell_regions(x, cfg.pixel_um, cfg.rim_um, cfg.threshold_rad)
    except ValueError:
        return False
    return True


def ablation_study(bundle, x: np.ndarray, y: np.ndarray,
                   pairs: Sequence[tuple[str, str]] = FINDING_PAIRS,
                   ablations: Sequence[str] = ABLATIONS,
                   cfg: FindingConfig = FindingConfig()) -> dict[str, Any]:
    """Flip rate and log-odds change of each pair's decision under each ablation.

    Returns
    -------
    dict
        ``{"pairs": {"a_vs_b": {"n_cells", "n_correct", "factors", kind: {"flip_rate",
        "delta_logodds"}}}, "contrasts": {kind: {"flip_rate_diff",
        "delta_logodds_diff"}}}``; each number is ``{"value", "ci95"}``; differences are
        first pair minus second pair.
    """
    names = list(bundle.class_names)
    y = np.asarray(y)
    per_pair: dict[str, Any] = {}
    raw: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for a, b in pairs:
        ia, ib = names.index(a), names.index(b)
        idx = _pair_cells(y, ia, ib)
        xs, ys = np.asarray(x, np.float32)[idx], y[idx]
        z0 = logits(bundle, xs)
        sign = np.where(ys == ia, 1.0, -1.0)
        m0 = sign * (z0[:, ia] - z0[:, ib])
        valid = np.array([_has_cell(xi, cfg) for xi in xs], bool)
        ok = (m0 > 0) & valid
        key = f"{a}_vs_{b}"
        larger, matched = _size_direction(a, b)
        d: dict[str, Any] = {"n_cells": int(len(idx)), "n_correct": int(ok.sum()),
                             "n_no_cell": int((~valid).sum()),
                             "pair_accuracy": float(ok.mean()),
                             "larger_class": larger,
                             "factors": {"size": cfg.size_factor, "size_matched": matched}}
        raw[key] = {}
        for kind in ablations:
            xa = ablate(xs[ok], ys[ok], kind, (a, b), names, cfg)
            z1 = logits(bundle, xa)
            m1 = sign[ok] * (z1[:, ia] - z1[:, ib])
            flip = (m1 < 0).astype(np.float64)
            delta = m1 - m0[ok]
            raw[key][kind] = {"flip": flip, "delta": delta}
            d[kind] = {"flip_rate": _ci(bootstrap_ci(flip, cfg.n_boot, cfg.seed)),
                       "delta_logodds": _ci(bootstrap_ci(delta, cfg.n_boot, cfg.seed))}
        per_pair[key] = d
    contrasts: dict[str, Any] = {}
    keys = list(raw)
    if len(keys) == 2:
        k0, k1 = keys
        for kind in ablations:
            contrasts[kind] = {
                "flip_rate_diff": _ci(bootstrap_diff_ci(raw[k0][kind]["flip"],
                                                        raw[k1][kind]["flip"], cfg.n_boot,
                                                        cfg.seed)),
                "delta_logodds_diff": _ci(bootstrap_diff_ci(raw[k0][kind]["delta"],
                                                            raw[k1][kind]["delta"],
                                                            cfg.n_boot, cfg.seed))}
    return {"pairs": per_pair, "contrasts": contrasts,
            "definition": "flip: pair decision of a correctly ordered cell turns; "
                          "delta_logodds: mean m1 - m0 of m = z_true - z_other (calibrated "
                          "logits; negative = evidence lost); differences: first pair minus "
                          "second"}


def contrastive_maps(bundle, x: np.ndarray, pair_idx: tuple[int, int], method: str,
                     cfg: FindingConfig = FindingConfig(), cell_keys: Sequence[int] | None = None
                     ) -> np.ndarray:
    """Maps (N, H, W) of ``z_a - z_b`` for crops ``x`` [rad] by ``method``.

    ``method`` is one of :data:`ATTRIBUTION_METHODS`; ``cell_keys`` seed LIME per cell.
    """
    import copy

    x = np.asarray(x, np.float32)
    if method == "lime":
        from leukoflow.explain.lime_batched import LimeParams, explain_many

        lp = LimeParams(n_samples=cfg.lime_samples, seed=cfg.seed)
        res = explain_many(bundle.module, x, [tuple(pair_idx)] * len(x), lp,
                           cell_keys=list(cell_keys) if cell_keys is not None else None)
        return np.stack([r.map for r in res])
    model = PairContrast(copy.deepcopy(bundle.module).eval(), [tuple(pair_idx)]).eval()
    inp = torch.as_tensor(x).unsqueeze(1).requires_grad_(True)
    if method == "guided_backprop":
        from captum.attr import GuidedBackprop

        a = GuidedBackprop(model).attribute(inp, target=0)
    elif method == "integrated_gradients":
        from captum.attr import IntegratedGradients

        a = IntegratedGradients(model).attribute(inp, baselines=0.0, target=0,
                                                 n_steps=cfg.ig_steps,
                                                 internal_batch_size=256)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {ATTRIBUTION_METHODS}")
    return a.detach().numpy()[:, 0]


def interior_enrichment(maps: np.ndarray, x: np.ndarray,
                        cfg: FindingConfig = FindingConfig()) -> np.ndarray:
    """Per-cell interior enrichment of ``|map|`` (share in interior / interior area share).

    NaN for crops without a cell above the threshold or with an all-zero map.
    """
    out = np.full(len(maps), np.nan)
    for i, (r, xi) in enumerate(zip(maps, x, strict=True)):
        try:
            _m, inner, rim = cell_regions(xi, cfg.pixel_um, cfg.rim_um, cfg.threshold_rad)
        except ValueError:  # no cell above the threshold: left out (NaN)
            continue
        ra = np.abs(np.asarray(r, np.float64))
        si, sr = ra[inner].sum(), ra[rim].sum()
        ni, nr = inner.sum(), rim.sum()
        if si + sr > 0 and ni > 0:
            out[i] = (si / (si + sr)) / (ni / (ni + nr))
    return out


def attribution_study(bundle, x: np.ndarray, y: np.ndarray,
                      pairs: Sequence[tuple[str, str]] = FINDING_PAIRS,
                      methods: Sequence[str] = ATTRIBUTION_METHODS,
                      cfg: FindingConfig = FindingConfig()) -> dict[str, Any]:
    """Interior enrichment of contrastive maps per method and pair, with bootstrap CIs.

    ``cfg.attribution_cells`` cells per class of each pair are drawn (seeded).
    """
    names = list(bundle.class_names)
    y = np.asarray(y)
    rng = np.random.default_rng(cfg.seed)
    out: dict[str, Any] = {}
    raw: dict[str, dict[str, np.ndarray]] = {}
    for a, b in pairs:
        ia, ib = names.index(a), names.index(b)
        idx = np.concatenate([
            rng.choice(np.flatnonzero(y == c), size=min(cfg.attribution_cells,
                                                        int((y == c).sum())), replace=False)
            for c in (ia, ib)])
        xs = np.asarray(x, np.float32)[idx]
        key = f"{a}_vs_{b}"
        out[key] = {"n_cells": int(len(idx))}
        raw[key] = {}
        for meth in methods:
            maps = contrastive_maps(bundle, xs, (ia, ib), meth, cfg, cell_keys=idx)
            e = interior_enrichment(maps, xs, cfg)
            raw[key][meth] = e
            out[key][meth] = _ci(bootstrap_ci(e, cfg.n_boot, cfg.seed))
    keys = list(raw)
    if len(keys) == 2:
        out["ratio"] = {m: _ci(bootstrap_diff_ci(raw[keys[0]][m], raw[keys[1]][m], cfg.n_boot,
                                                 cfg.seed, ratio=True)) for m in methods}
    return out


def run_finding(bundle, x: np.ndarray, y: np.ndarray, cfg: FindingConfig = FindingConfig(),
                methods: Sequence[str] = ATTRIBUTION_METHODS, source: str = "",
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Ablations and attribution location with the verdict (see module docstring)."""
    import time

    say = progress or (lambda s: None)
    t0 = time.perf_counter()
    say("ablations")
    abl = ablation_study(bundle, x, y, cfg=cfg)
    res: dict[str, Any] = {"schema": "leukoflow-finding/1", "source": source,
                           "model": bundle.describe(), "config": asdict(cfg),
                           "n_cells": int(len(y)), "ablations": abl}
    if cfg.attribution_cells > 0 and methods:
        say("attribution")
        res["attribution"] = attribution_study(bundle, x, y, methods=methods, cfg=cfg)
    res["verdict"] = verdict(res)
    res["seconds"] = time.perf_counter() - t0
    return res


def verdict(res: dict[str, Any]) -> dict[str, Any]:
    """Is the finding reproduced? Each criterion: the pair difference's 95 % CI excludes 0.

    ``reproduced`` uses the two causal criteria (``interior_mean`` and ``size_matched``
    flip-rate differences); the attribution criteria (interior enrichment ratio mono/eos
    over neu/lym with its CI above 1) are reported beside it. The fixed-factor ``size``
    row is no criterion: x0.85 takes a monocyte to an eosinophil's mean size but a
    neutrophil only part-way to a lymphocyte's, so even a pure size classifier would flip
    more mono/eos than neu/lym decisions under it.
    """
    c = res["ablations"]["contrasts"]
    v: dict[str, Any] = {}
    if "interior_mean" in c:
        lo = c["interior_mean"]["flip_rate_diff"]["ci95"][0]
        v["interior_ablation_hurts_mono_eos_more"] = bool(lo > 0)
    if "size_matched" in c:
        hi = c["size_matched"]["flip_rate_diff"]["ci95"][1]
        v["size_perturbation_hurts_neu_lym_more"] = bool(hi < 0)
    v["reproduced"] = bool(v) and all(v.values())
    att = res.get("attribution", {}).get("ratio", {})
    for m, r in att.items():
        v[f"{m}_interior_enrichment_mono_eos_higher"] = bool(r["ci95"][0] > 1)
    return v


def _fmt(d: dict[str, Any], pct: bool = False, digits: int = 2) -> str:
    s = 100.0 if pct else 1.0
    u = " %" if pct else ""
    return (f"{d['value'] * s:.{digits if not pct else 0}f}{u} "
            f"[{d['ci95'][0] * s:.{digits if not pct else 0}f}, "
            f"{d['ci95'][1] * s:.{digits if not pct else 0}f}]")


def finding_markdown(res: dict[str, Any]) -> str:
    """Markdown tables of a :func:`run_finding` result (numbers with bootstrap 95 % CIs)."""
    ab = res["ablations"]
    keys = list(ab["pairs"])
    lines = ["| ablation | " + " | ".join(f"{k.replace('_vs_', ' vs ')}: flip rate, "
                                          "mean change of log-odds" for k in keys)
             + " | flip-rate difference (1st - 2nd) |",
             "|---|" + "---|" * (len(keys) + 1)]
    kinds = [k for k in ABLATIONS if k in ab["pairs"][keys[0]]]
    for kind in kinds:
        cells = []
        for k in keys:
            d = ab["pairs"][k][kind]
            f = (f" (x{ab['pairs'][k]['factors'][kind]:.3f} for the larger class)"
                 if kind.startswith("size") else "")
            cells.append(f"{_fmt(d['flip_rate'], pct=True)}, {_fmt(d['delta_logodds'])}{f}")
        diff = ab["contrasts"].get(kind, {}).get("flip_rate_diff")
        lines.append(f"| {kind} | " + " | ".join(cells) + " | "
                     + (_fmt(diff, pct=True) if diff else "") + " |")
    lines.append("")
    lines.append("Cells: " + ", ".join(f"{k}: {ab['pairs'][k]['n_correct']} of "
                                       f"{ab['pairs'][k]['n_cells']} correctly ordered"
                                       for k in keys))
    att = res.get("attribution")
    if att:
        lines += ["", "| method | " + " | ".join(f"{k.replace('_vs_', ' vs ')} interior "
                                                  "enrichment" for k in keys)
                  + " | ratio (1st / 2nd) |", "|---|" + "---|" * (len(keys) + 1)]
        for m in [m for m in ATTRIBUTION_METHODS if m in att[keys[0]]]:
            lines.append(f"| {m} | " + " | ".join(_fmt(att[k][m]) for k in keys) + " | "
                         + (_fmt(att["ratio"][m]) if "ratio" in att else "") + " |")
        lines.append("")
        lines.append("Cells explained: " + ", ".join(f"{k}: {att[k]['n_cells']}" for k in keys))
    lines += ["", "Verdict: " + ", ".join(f"{k} = {v}" for k, v in res["verdict"].items())]
    return "\n".join(lines)
