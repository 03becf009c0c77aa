"""Vectorised LIME: all perturbations of a cell in one (or a few) batched forward passes.

For each segmentation (ids 0..K-1) we draw N binary vectors z ~ Bernoulli(p)^K, build the
perturbed crops (superpixels with z_k = 0 set to the baseline phase, 0 rad by default),
score them with the model in large no-grad batches, weight each sample with the cosine
kernel of the lime package, ``sqrt(exp(-d^2 / w^2))`` with d the cosine distance between z
and the all-ones vector, and fit a weighted ridge regression in closed form (intercept not
penalised, identical to ``sklearn.linear_model.Ridge(alpha).fit(Z, y, sample_weight)``).
The per-superpixel coefficients of each segmentation are painted onto the pixels,
normalised by their largest magnitude, and fused into a mean map and a per-pixel standard
deviation ("stability") map across segmentations.

With a model on a GPU (or ``engine="torch"``) everything runs in torch on the model's
device and :func:`explain_many` puts the perturbations of several cells into one forward
stream. On the CPU the perturbation batches of each (cell, segmentation) are built in small
reused buffers and scored by ONNX Runtime, running the convolutional trunk only on the
window whose outputs a perturbation can change (:mod:`leukoflow.explain.ort_engine`); the scores
equal the full forward to float32 rounding.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from leukoflow.explain.segmentation import SlicParams, border_background, multi_slic

Target = int | tuple[int, int]
"""A class index (explain its calibrated probability) or a pair (a, b) (explain the
temperature-scaled log-odds ``z_a - z_b`` of a against b)."""


@dataclass(frozen=True)
class LimeParams:
    """Every parameter of batched LIME (recorded with the maps).

    Attributes
    ----------
    n_samples : int
        Perturbations per segmentation (N).
    keep_prob : float
        Probability that a superpixel stays on in a perturbation.
    kernel_width : float
        Width w of the cosine-distance kernel (lime package default 0.25).
    ridge_alpha : float
        L2 penalty of the weighted ridge surrogate.
    baseline : float or None
        Value of switched-off superpixels [rad]; 0 = background phase. ``None`` uses the
        crop's border median (non-phase images).
    seed : int
        Seed of the perturbation sampler (combined with the cell id and segmentation).
    batch_size : int
        Perturbed crops per forward pass (16-64 are fastest with ONNX Runtime on one CPU
        thread, measured in ``benchmarks/bench_explain.py``; use thousands on a GPU).
    engine : str
        Forward engine of the perturbation batches: ``torch``, ``onnxruntime`` (CPU; an
        in-memory export of the model, with the windowed trunk of
        :mod:`leukoflow.explain.ort_engine` when the model allows it), ``onnxruntime-full`` (CPU;
        the whole model on every full crop, the reference of the windowed trunk) or
        ``auto`` (onnxruntime when the model is on the CPU and the export works, else
        torch). All give the same scores to float32 rounding (~1e-6).
    slic : SlicParams
        Superpixel parameters.
    """

    n_samples: int = 500
    keep_prob: float = 0.5
    kernel_width: float = 0.25
    ridge_alpha: float = 1.0
    baseline: float | None = 0.0
    seed: int = 0
    batch_size: int = 32
    engine: str = "auto"
    slic: SlicParams = field(default_factory=SlicParams)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON)."""
        d = asdict(self)
        d["kernel"] = "sqrt(exp(-d^2/w^2)), d = cosine distance of z to ones"
        d["surrogate"] = "weighted ridge, closed form, unpenalised intercept"
        d["fusion"] = "coefficients painted to pixels, /max|w| per segmentation, mean and std"
        return d


@dataclass
class LimeResult:
    """Fused LIME explanation of one crop.

    Attributes
    ----------
    map : ndarray float32 (H, W)
        Mean of the normalised per-segmentation maps (in [-1, 1]).
    std : ndarray float32 (H, W)
        Per-pixel standard deviation across segmentations (stability; 0 = stable).
    coefs : list of ndarray
        Ridge coefficients per segmentation (K_m,), in output units.
    intercepts, r2 : list of float
        Surrogate intercept and weighted R^2 per segmentation.
    segments : list of ndarray int64 (H, W)
        Segmentations used (0 = background).
    mask : ndarray bool (H, W)
        Cell mask.
    target : int or tuple
        What was explained.
    """

    map: np.ndarray
    std: np.ndarray
    coefs: list[np.ndarray]
    intercepts: list[float]
    r2: list[float]
    segments: list[np.ndarray]
    mask: np.ndarray
    target: Target


def sample_masks(n_features: int, n_samples: int, keep_prob: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Binary perturbation vectors (n_samples, n_features) uint8, Bernoulli(keep_prob)."""
    if n_features < 1 or n_samples < 1:
        raise ValueError("need at least one feature and one sample")
    return (rng.random((n_samples, n_features)) < keep_prob).astype(np.uint8)


def cosine_kernel(z: torch.Tensor, kernel_width: float) -> torch.Tensor:
    """LIME similarity of binary vectors z (N, K) to the unperturbed all-ones vector.

    ``d = 1 - cos(z, 1) = 1 - sqrt(|z|_1 / K)``; weight ``sqrt(exp(-d^2 / w^2))``.
    An all-zero z has d = 1.
    """
    k = z.shape[1]
    s = z.to(torch.float64).sum(dim=1)
    d = 1.0 - torch.sqrt(s / k)
    return torch.sqrt(torch.exp(-(d ** 2) / kernel_width ** 2))


def weighted_ridge(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                   alpha: float) -> tuple[torch.Tensor, float, float]:
    """Closed-form weighted ridge with an unpenalised intercept.

    Minimises ``sum_i w_i (y_i - z_i.b - c)^2 + alpha |b|^2`` (sklearn ``Ridge`` with
    ``sample_weight``).

    Returns
    -------
    coef : Tensor float64 (K,)
    intercept : float
    r2 : float
        Weighted coefficient of determination of the fit.
    """
    z = z.to(torch.float64)
    y = y.to(torch.float64)
    w = w.to(torch.float64)
    sw = w.sum()
    zm = (w[:, None] * z).sum(0) / sw
    ym = (w * y).sum() / sw
    zc = z - zm
    yc = y - ym
    a = zc.T @ (w[:, None] * zc)
    a = a + alpha * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    b = zc.T @ (w * yc)
    coef = torch.linalg.solve(a, b)
    intercept = ym - zm @ coef
    res = yc - zc @ coef
    ss_tot = (w * yc ** 2).sum()
    r2 = 1.0 - (w * res ** 2).sum() / ss_tot if ss_tot > 0 else torch.tensor(0.0)
    return coef, float(intercept), float(r2)


def score_outputs(logits: torch.Tensor, target: Target) -> torch.Tensor:
    """Scalar per sample: calibrated probability of ``target`` or the pair's log-odds."""
    if isinstance(target, tuple | list):
        a, b = int(target[0]), int(target[1])
        return logits[:, a] - logits[:, b]
    return torch.softmax(logits, dim=1)[:, int(target)]


def _ort(module: torch.nn.Module, engine: str, device: torch.device,
         shape: tuple[int, ...]) -> Any | None:
    """The cached ONNX Runtime scorer when ``engine`` asks for it (None: use torch)."""
    if engine not in ("auto", "torch", "onnxruntime", "onnxruntime-full"):
        raise ValueError(f"unknown LIME engine {engine!r}")
    if engine == "torch" or device.type != "cpu":
        if engine.startswith("onnxruntime"):
            raise RuntimeError("onnxruntime engine requested for a model not on the CPU")
        return None
    from leukoflow.explain.ort_engine import ort_scorer

    sc = ort_scorer(module, (int(shape[0]), int(shape[1])), window=engine != "onnxruntime-full")
    if sc is None and engine != "auto":
        raise RuntimeError("onnxruntime engine requested but unavailable")
    return sc


@torch.no_grad()
def _forward_scores(module: torch.nn.Module, crops: torch.Tensor, targets: torch.Tensor | None,
                    target: Target | None, batch_size: int, engine: str = "torch"
                    ) -> torch.Tensor:
    sc = _ort(module, engine, crops.device, tuple(crops.shape[1:]))
    out = []
    for i in range(0, crops.shape[0], batch_size):
        if sc is not None:
            z = torch.from_numpy(sc.logits(crops[i:i + batch_size].numpy(), batch_size))
        else:
            z = module(crops[i:i + batch_size].unsqueeze(1))
        if targets is None:
            out.append(score_outputs(z, target))  # type: ignore[arg-type]
        else:
            out.append(_score_rows(z, targets[i:i + batch_size]))
    return torch.cat(out)


def _score_rows(z: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Per-row targets: tgt (n, 2) with b = -1 meaning 'probability of a'."""
    a, b = tgt[:, 0], tgt[:, 1]
    idx = torch.arange(z.shape[0], device=z.device)
    prob = torch.softmax(z, dim=1)[idx, a]
    contrast = z[idx, a] - z[idx, b.clamp(min=0)]
    return torch.where(b < 0, prob, contrast)


def perturb(x: torch.Tensor, seg: torch.Tensor, z: torch.Tensor, baseline: float) -> torch.Tensor:
    """Perturbed crops (N, H, W): pixels of superpixels with z = 0 set to ``baseline``."""
    keep = z[:, seg.reshape(-1)].to(torch.bool)  # (N, H*W)
    flat = x.reshape(1, -1)
    pert = torch.where(keep, flat, torch.as_tensor(baseline, dtype=x.dtype, device=x.device))
    return pert.reshape(z.shape[0], *x.shape)


def _rng(seed: int, cell_key: int, m: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(cell_key) & 0xFFFFFFFF, m])


def lime_coefficients(module: torch.nn.Module, x: np.ndarray, seg: np.ndarray, z: np.ndarray,
                      target: Target, params: LimeParams = LimeParams(),
                      baseline: float = 0.0, engine: str = "torch"
                      ) -> tuple[np.ndarray, float, float, np.ndarray]:
    """LIME for one crop and one segmentation with given perturbations (test oracle entry).

    Parameters
    ----------
    module : nn.Module
        Crops (N, 1, H, W) [rad] -> logits.
    x : ndarray (H, W)
        Crop [rad].
    seg : ndarray int (H, W)
        Segment ids 0..K-1.
    z : ndarray (N, K)
        Binary perturbation vectors.
    target : int or (int, int)
        See :data:`Target`.
    params : LimeParams
        Kernel width, ridge penalty and batch size are used.
    baseline : float
        Value of switched-off superpixels [rad].
    engine : str
        ``torch`` (eager, full crops) or ``onnxruntime``/``auto`` (the CPU scorer of
        :func:`explain_many`, windowed trunk included).

    Returns
    -------
    coef, intercept, r2, y
        Surrogate coefficients (K,), intercept, weighted R^2 and the model scores (N,).
    """
    dev = next(iter(module.parameters()), torch.zeros(())).device
    xt = torch.as_tensor(np.asarray(x, np.float32), device=dev)
    st = torch.as_tensor(np.asarray(seg, np.int64), device=dev)
    zt = torch.as_tensor(np.asarray(z), device=dev)
    sc = _ort(module, engine, dev, xt.shape)
    if sc is not None:
        y = score_outputs(torch.from_numpy(sc.perturbed_logits(
            np.asarray(x, np.float32), np.asarray(seg, np.int64), np.asarray(z), baseline,
            params.batch_size)), target)
    else:
        y = _forward_scores(module, perturb(xt, st, zt, baseline), None, target,
                            params.batch_size)
    w = cosine_kernel(zt, params.kernel_width)
    coef, icpt, r2 = weighted_ridge(zt, y, w, params.ridge_alpha)
    return coef.cpu().numpy(), icpt, r2, y.cpu().numpy()


def fuse(coefs: Sequence[np.ndarray], segs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Paint coefficients onto pixels, normalise each by max|w|, return (mean, std) maps."""
    maps = []
    for c, s in zip(coefs, segs, strict=True):
        m = np.asarray(c, np.float64)[s]
        peak = np.abs(c).max() if len(c) else 0.0
        maps.append(m / peak if peak > 0 else m)
    stack = np.stack(maps)
    return stack.mean(0).astype(np.float32), stack.std(0).astype(np.float32)


def explain_many(module: torch.nn.Module, crops: np.ndarray, targets: Sequence[Target],
                 params: LimeParams = LimeParams(), cell_keys: Sequence[int] | None = None,
                 segments: Sequence[Sequence[np.ndarray]] | None = None,
                 timings: dict[str, float] | None = None) -> list[LimeResult]:
    """Fused multi-SLIC LIME for several crops with one batched forward stream.

    Parameters
    ----------
    module : nn.Module
        Crops (N, 1, H, W) [rad] -> calibrated logits (N, K), in eval mode.
    crops : ndarray (B, H, W)
        Phase crops [rad].
    targets : sequence of Target
        What to explain per crop (class index or contrast pair).
    params : LimeParams
        All parameters.
    cell_keys : sequence of int, optional
        Per-crop sampler keys (e.g. cell ids) so a cell's perturbations are reproducible
        whatever batch it arrives in; default 0..B-1.
    segments : optional
        Precomputed segmentations per crop (skips SLIC), each a list of id maps.
    timings : dict, optional
        Filled with the time per stage [s]: ``segment_s`` (cell mask and SLIC),
        ``sample_s`` (perturbation vectors), ``perturb_s`` (perturbed crops),
        ``forward_s`` (model and scores) and ``fit_s`` (kernel, ridge and fusion).

    Returns
    -------
    list of LimeResult
    """
    crops = np.asarray(crops, np.float32)
    if crops.ndim != 3:
        raise ValueError(f"crops must be (B, H, W), got {crops.shape}")
    if len(targets) != len(crops):
        raise ValueError("one target per crop required")
    keys = list(range(len(crops))) if cell_keys is None else list(cell_keys)
    dev = next(iter(module.parameters()), torch.zeros(())).device
    t0 = time.perf_counter()
    all_segs, masks, baselines = [], [], []
    for i, x in enumerate(crops):
        bl = border_background(x) if params.baseline is None else float(params.baseline)
        baselines.append(bl)
        if segments is None:
            segs, mask = multi_slic(x, params.slic, background=bl)
        else:
            segs = [np.asarray(s, np.int64) for s in segments[i]]
            mask = segs[0] > 0
        all_segs.append(segs)
        masks.append(mask)
    t1 = time.perf_counter()
    stage = {"sample_s": 0.0, "perturb_s": 0.0, "forward_s": 0.0}
    sc = _ort(module, params.engine, dev, crops.shape[1:])
    zs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    if sc is not None:  # CPU: stream each (cell, segmentation) through ONNX Runtime
        for i, x in enumerate(crops):
            for m, s in enumerate(all_segs[i]):
                ta = time.perf_counter()
                z = sample_masks(int(s.max()) + 1, params.n_samples, params.keep_prob,
                                 _rng(params.seed, keys[i], m))
                stage["sample_s"] += time.perf_counter() - ta
                logits = sc.perturbed_logits(x, s, z, baselines[i], params.batch_size, stage)
                ta = time.perf_counter()
                ys.append(score_outputs(torch.from_numpy(logits), targets[i]))
                zs.append(torch.from_numpy(z))
                stage["forward_s"] += time.perf_counter() - ta
    else:  # torch: all perturbations of all cells in one batched stream (GPU path)
        blocks, tgt_rows = [], []
        for i, x in enumerate(crops):
            xt = torch.as_tensor(x, device=dev)
            tgt = targets[i]
            row = (int(tgt[0]), int(tgt[1])) if isinstance(tgt, tuple | list) else (int(tgt), -1)
            for m, s in enumerate(all_segs[i]):
                ta = time.perf_counter()
                z = sample_masks(int(s.max()) + 1, params.n_samples, params.keep_prob,
                                 _rng(params.seed, keys[i], m))
                zt = torch.as_tensor(z, device=dev)
                tb = time.perf_counter()
                zs.append(zt)
                blocks.append(perturb(xt, torch.as_tensor(s, device=dev), zt, baselines[i]))
                tgt_rows.append(torch.tensor([row], device=dev).expand(params.n_samples, 2))
                stage["sample_s"] += tb - ta
                stage["perturb_s"] += time.perf_counter() - tb
        ta = time.perf_counter()
        y_all = _forward_scores(module, torch.cat(blocks), torch.cat(tgt_rows), None,
                                params.batch_size, "torch")
        ys = list(torch.split(y_all, params.n_samples))
        stage["forward_s"] += time.perf_counter() - ta
    t2 = time.perf_counter()
    results = []
    j = 0
    for i in range(len(crops)):
        coefs, icpts, r2s = [], [], []
        for _m in range(len(all_segs[i])):
            zt = zs[j]
            coef, icpt, r2 = weighted_ridge(zt, ys[j], cosine_kernel(zt, params.kernel_width),
                                            params.ridge_alpha)
            coefs.append(coef.cpu().numpy())
            icpts.append(icpt)
            r2s.append(r2)
            j += 1
        mean, std = fuse(coefs, all_segs[i])
        results.append(LimeResult(mean, std, coefs, icpts, r2s, all_segs[i], masks[i],
                                  targets[i]))
    if timings is not None:
        timings.update(segment_s=t1 - t0, **stage, fit_s=time.perf_counter() - t2)
    return results


def explain_one(module: torch.nn.Module, x: np.ndarray, target: Target,
                params: LimeParams = LimeParams(), cell_key: int = 0) -> LimeResult:
    """Fused multi-SLIC LIME for one crop (see :func:`explain_many`)."""
    return explain_many(module, np.asarray(x)[None], [target], params, [cell_key])[0]
