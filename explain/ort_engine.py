"""ONNX Runtime scorer for LIME's perturbation batches on the CPU.

LIME evaluates ~1,500 perturbed crops per cell. On one CPU core ONNX Runtime runs LeNet5
several times faster than eager PyTorch (``benchmarks/bench_explain.py``). The explainer
model is exported in memory (no file, no pickle) once per module and crop shape; if export
or ONNX Runtime is unavailable the caller falls back to PyTorch.

**Windowed trunk.** A LIME perturbation replaces whole superpixels by a constant baseline.
The largest segment (the background, segment 0 of :func:`leukoflow.explain.segmentation.multi_slic`)
has only two states across the samples (kept or switched off), so every output of a
padding-free convolutional trunk whose receptive field lies outside the bounding box of the
*other* segments takes one of two values that are computed once per crop. For models of the
``leukoflow.models.architectures.PhaseCNN`` form (``trunk -> flatten -> head -> fc_out``) whose
trunk is a chain of unpadded convolutions, poolings and point-wise layers, the scorer runs the
trunk only on the input window whose outputs can change (the receptive field R and the
stride S of the trunk give it exactly: output i sees input rows ``[S i, S i + R)``), pastes
the window into the pre-computed outputs and runs the fully connected head on the result.
The input normalisation ``(x - mean) / std`` is folded into the first convolution. Results
equal the full forward to float32 rounding; the split is verified numerically against the
full model when the scorer is built and is not used if the check fails.
"""

from __future__ import annotations

import copy
import io
import logging
import threading
import time
import warnings
import weakref
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger("leukoflow.explain")

_SCORERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()

_POINTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
              nn.Identity, nn.Dropout, nn.Dropout2d, nn.BatchNorm2d)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, tuple | list) else (int(v), int(v))


def trunk_geometry(trunk: nn.Sequential) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Receptive field and stride [px] (per axis) of an unpadded conv/pool chain.

    Output index i of the chain depends on input rows ``[S i, S i + R)``. Returns None
    when a layer is not an unpadded ``Conv2d``/``MaxPool2d``/``AvgPool2d`` (dilation 1,
    floor mode) or a point-wise layer, i.e. when the window argument does not hold.
    """
    rf, st = [1, 1], [1, 1]
    for layer in trunk:
        if isinstance(layer, _POINTWISE):
            continue
        if isinstance(layer, nn.Conv2d):
            if (_pair(layer.padding) != (0, 0) or _pair(layer.dilation) != (1, 1)
                    or layer.padding_mode != "zeros"):
                return None
        elif isinstance(layer, nn.MaxPool2d | nn.AvgPool2d):
            if (_pair(layer.padding) != (0, 0) or layer.ceil_mode
                    or _pair(getattr(layer, "dilation", 1)) != (1, 1)):
                return None
        else:
            return None
        k = _pair(layer.kernel_size)
        s = _pair(layer.stride if layer.stride is not None else layer.kernel_size)
        for a in (0, 1):
            rf[a] += (k[a] - 1) * st[a]
            st[a] *= s[a]
    return (rf[0], rf[1]), (st[0], st[1])


class _Trunk(nn.Module):
    """Normalisation (folded into the first convolution when exact) and the conv trunk."""

    def __init__(self, em: nn.Module) -> None:
        super().__init__()
        self.trunk = copy.deepcopy(em.net.trunk).float().eval()
        self.mean, self.std = float(em.mean), float(em.std)
        first = self.trunk[0]
        self.folded = (isinstance(first, nn.Conv2d) and first.in_channels == 1
                       and first.groups == 1 and _pair(first.padding) == (0, 0))
        if self.folded:
            with torch.no_grad():
                w = first.weight
                if first.bias is None:
                    first.bias = nn.Parameter(torch.zeros(w.shape[0]), requires_grad=False)
                first.bias -= self.mean / self.std * w.sum(dim=(1, 2, 3))
                w /= self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not self.folded:
            x = (x - self.mean) / self.std
        return self.trunk(x)


class _Head(nn.Module):
    """flatten -> head -> fc_out -> / temperature."""

    def __init__(self, em: nn.Module) -> None:
        super().__init__()
        self.head = copy.deepcopy(em.net.head).float().eval()
        self.fc_out = copy.deepcopy(em.net.fc_out).float().eval()
        self.temperature = float(em.temperature)

    def forward(self, f: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fc_out(self.head(torch.flatten(f, 1))) / self.temperature


def _session(module: nn.Module, example: torch.Tensor, dynamic: dict[int, str]) -> Any:
    """Single-threaded ONNX Runtime session of an in-memory export of ``module``."""
    import onnxruntime as ort

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, buf, input_names=["x"], output_names=["z"],
                          dynamic_axes={"x": dynamic, "z": {0: "n"}}, dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])


def _splittable(module: nn.Module, shape: tuple[int, int]) -> bool:
    """Whether ``module`` is an ExplainModel around a PhaseCNN whose trunk allows windows."""
    try:
        from leukoflow.models.architectures import PhaseCNN
    except ImportError:  # pragma: no cover
        return False
    net = getattr(module, "net", None)
    if not isinstance(net, PhaseCNN) or not isinstance(getattr(net, "trunk", None), nn.Sequential):
        return False
    cls = type(net)
    if (cls.forward is not PhaseCNN.forward or cls.features is not PhaseCNN.features
            or cls.forward_with_features is not PhaseCNN.forward_with_features):
        return False
    size = getattr(module, "input_size", None)
    if size is not None and tuple(shape) != (size, size):
        return False
    return all(hasattr(module, a) for a in ("mean", "std", "temperature")) and \
        trunk_geometry(net.trunk) is not None


class OrtScorer:
    """Logits of (perturbed) crops of one shape through ONNX Runtime (see module doc).

    Parameters
    ----------
    module : nn.Module
        Crops (N, 1, H, W) [rad] -> calibrated logits (N, K), eval mode.
    shape : tuple of int
        Crop shape (H, W) [px].
    window : bool
        Use the windowed trunk when the model allows it (default); False always runs the
        full model (reference path).
    """

    def __init__(self, module: nn.Module, shape: tuple[int, int], window: bool = True) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.full = _session(module, torch.zeros(2, 1, *self.shape), {0: "n"})
        self.trunk = self.head = None
        self.rf = self.stride = (0, 0)
        self.out_hw = (0, 0)
        if window and _splittable(module, self.shape):
            try:
                self._build_split(module)
            except Exception as exc:  # noqa: BLE001  (any failure: full model only)
                log.warning("windowed LIME trunk unavailable, using the full model: %s", exc)
                self.trunk = self.head = None

    @property
    def windowed(self) -> bool:
        """True when the windowed trunk is in use."""
        return self.trunk is not None

    def _build_split(self, module: nn.Module) -> None:
        geom = trunk_geometry(module.net.trunk)
        assert geom is not None
        self.rf, self.stride = geom
        tm, hm = _Trunk(module), _Head(module)
        with torch.no_grad():
            f = tm(torch.zeros(2, 1, *self.shape))
        self.out_hw = (int(f.shape[2]), int(f.shape[3]))
        self.trunk = _session(tm, torch.zeros(2, 1, *self.shape), {0: "n", 2: "h", 3: "w"})
        self.head = _session(hm, f, {0: "n"})
        # verify: split == full, and a window pastes back exactly where it belongs
        rng = np.random.default_rng(0)
        x = (rng.normal(0.0, 1.0, (3, 1, *self.shape)) * module.std + module.mean)
        x = x.astype(np.float32)
        ref = self.full.run(None, {"x": x})[0]
        tf = self.trunk.run(None, {"x": x})[0]
        got = self.head.run(None, {"x": tf})[0]
        tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
        if not np.abs(got - ref).max() <= tol:
            raise RuntimeError(f"split model differs from the full model by "
                               f"{np.abs(got - ref).max():.3g}")
        oh, ow = self.out_hw
        i0, i1, j0, j1 = oh // 4, max(oh // 4, oh - 1 - oh // 3), ow // 3, max(ow // 3, ow - 2)
        r0, r1, c0, c1 = self._input_window(i0, i1, j0, j1)
        tw = self.trunk.run(None, {"x": np.ascontiguousarray(x[:, :, r0:r1, c0:c1])})[0]
        sub = tf[:, :, i0:i1 + 1, j0:j1 + 1]
        if tw.shape != sub.shape or not np.abs(tw - sub).max() <= 1e-4 * max(
                1.0, float(np.abs(sub).max())):
            raise RuntimeError("windowed trunk does not reproduce the full trunk")

    def _input_window(self, i0: int, i1: int, j0: int, j1: int) -> tuple[int, int, int, int]:
        (ry, rx), (sy, sx) = self.rf, self.stride
        return sy * i0, sy * i1 + ry, sx * j0, sx * j1 + rx

    def logits(self, crops: np.ndarray, batch_size: int) -> np.ndarray:
        """Logits (N, K) of crops (N, H, W) [rad] through the full model."""
        crops = np.asarray(crops, np.float32)
        out = [self.full.run(None, {"x": np.ascontiguousarray(crops[i:i + batch_size, None])})[0]
               for i in range(0, len(crops), batch_size)]
        return np.concatenate(out)

    def perturbed_logits(self, x: np.ndarray, seg: np.ndarray, z: np.ndarray, baseline: float,
                         batch_size: int, timings: dict[str, float] | None = None) -> np.ndarray:
        """Logits (N, K) of the LIME perturbations of one crop.

        Parameters
        ----------
        x : ndarray (H, W)
            Crop [rad].
        seg : ndarray int (H, W)
            Segment ids 0..K-1.
        z : ndarray (N, K)
            Binary perturbation vectors (1 = superpixel kept).
        baseline : float
            Value of switched-off pixels [rad].
        batch_size : int
            Perturbed crops per ONNX Runtime call.
        timings : dict, optional
            ``perturb_s`` and ``forward_s`` [s] are added to it.

        Returns
        -------
        ndarray float32 (N, K)
        """
        x = np.asarray(x, np.float32)
        seg = np.asarray(seg)
        zb = (np.asarray(z) != 0).view(np.uint8)
        if x.shape != self.shape or seg.shape != self.shape:
            raise ValueError(f"crop and segments must be {self.shape}, got {x.shape}, {seg.shape}")
        if zb.ndim != 2 or zb.shape[1] <= int(seg.max()) or seg.min() < 0:
            raise ValueError("z must be (N, K) with K > max segment id >= 0")
        bl = np.float32(baseline)
        tp = tf = 0.0
        n = len(zb)
        win = self._window(seg) if self.windowed else None
        if win is None:  # full model on full crops
            buf = np.empty((min(batch_size, n), 1, *self.shape), np.float32)
            out = []
            for i in range(0, n, batch_size):
                t0 = time.perf_counter()
                b = buf[:min(batch_size, n - i)]
                _fill(b, zb[i:i + batch_size], seg, x, bl)
                t1 = time.perf_counter()
                out.append(self.full.run(None, {"x": b})[0])
                tp += t1 - t0
                tf += time.perf_counter() - t1
            res = np.concatenate(out)
        else:
            t0 = time.perf_counter()
            fixed, (i0, i1, j0, j1) = win
            r0, r1, c0, c1 = self._input_window(i0, i1, j0, j1)
            refs = np.stack([np.where(seg == fixed, bl, x), x]).astype(np.float32)[:, None]
            t1 = time.perf_counter()
            base = self.trunk.run(None, {"x": refs})[0]  # (2, C, oh, ow): fixed off / kept
            tf += time.perf_counter() - t1
            xw = np.ascontiguousarray(x[r0:r1, c0:c1])
            sw = np.ascontiguousarray(seg[r0:r1, c0:c1])
            m = min(batch_size, n)
            buf = np.empty((m, 1, r1 - r0, c1 - c0), np.float32)
            fbuf = np.empty((m, *base.shape[1:]), np.float32)
            fixed_on = zb[:, fixed].astype(np.intp)
            out = []
            tp += time.perf_counter() - t0
            for i in range(0, n, batch_size):
                t0 = time.perf_counter()
                b = buf[:min(batch_size, n - i)]
                f = fbuf[:len(b)]
                _fill(b, zb[i:i + batch_size], sw, xw, bl)
                np.take(base, fixed_on[i:i + batch_size], axis=0, out=f, mode="clip")
                t1 = time.perf_counter()
                f[:, :, i0:i1 + 1, j0:j1 + 1] = self.trunk.run(None, {"x": b})[0]
                out.append(self.head.run(None, {"x": f})[0])
                tp += t1 - t0
                tf += time.perf_counter() - t1
            res = np.concatenate(out)
        if timings is not None:
            timings["perturb_s"] = timings.get("perturb_s", 0.0) + tp
            timings["forward_s"] = timings.get("forward_s", 0.0) + tf
        return res

    def _window(self, seg: np.ndarray) -> tuple[int, tuple[int, int, int, int]]:
        """(fixed segment, output window i0, i1, j0, j1), inclusive trunk-output indices.

        The fixed segment is the largest one; the window holds every trunk output whose
        receptive field meets a pixel of another segment (all outputs at worst).
        """
        counts = np.bincount(seg.ravel())
        fixed = int(np.argmax(counts))
        var = seg != fixed
        oh, ow = self.out_hw
        if not var.any():
            return fixed, (0, oh - 1, 0, ow - 1)
        rows = np.flatnonzero(var.any(axis=1))
        cols = np.flatnonzero(var.any(axis=0))
        (ry, rx), (sy, sx) = self.rf, self.stride
        i0 = max(0, -(-(int(rows[0]) - ry + 1) // sy))
        i1 = min(oh - 1, int(rows[-1]) // sy)
        j0 = max(0, -(-(int(cols[0]) - rx + 1) // sx))
        j1 = min(ow - 1, int(cols[-1]) // sx)
        return fixed, (i0, i1, j0, j1)


def _fill(out: np.ndarray, keep: np.ndarray, seg: np.ndarray, x: np.ndarray,
          baseline: np.float32) -> None:
    """Write perturbed crops into ``out`` (n, 1, h, w): x where ``keep[:, seg]``, else baseline.

    ``keep`` is (n, K) uint8 in {0, 1}. Products with exact 0/1 factors keep the result
    bit-identical to a select (``1 * x + 0 * b == x``).
    """
    n = len(out)
    k = np.take(keep, seg.ravel(), axis=1).reshape(n, *seg.shape)  # (n, h, w) uint8
    o = out[:, 0]
    np.multiply(k, x, out=o)
    if baseline != 0:
        o += (1 - k) * baseline


def ort_scorer(module: nn.Module, shape: tuple[int, int], window: bool = True
               ) -> OrtScorer | None:
    """Cached :class:`OrtScorer` of ``module`` for crops ``shape`` [px].

    ``window=False`` gives a scorer that always runs the full model (reference path).
    Returns None when the export or ONNX Runtime fails (the reason is logged once).
    """
    key = (int(shape[0]), int(shape[1]), bool(window))
    with _LOCK:
        per = _SCORERS.setdefault(module, {})
        if key in per:
            return per[key]
        sc = None
        try:
            sc = OrtScorer(module, key[:2], window=window)
        except Exception as exc:  # noqa: BLE001  (any failure: use PyTorch instead)
            log.warning("ONNX Runtime scorer unavailable, using PyTorch: %s", exc)
        per[key] = sc
        return sc
