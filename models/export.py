"""ONNX export with a dynamic batch dimension, and verification with ONNX Runtime.

The exported graph takes ``crops`` (N, 1, S, S) float32 *normalised* phase (apply
``Artifact.preprocess`` first) and returns ``logits`` (N, K) and ``features`` (N, D), so that
the engine needs no rebuild when the temperature or the OOD threshold changes
(p = softmax(logits / T) is applied outside). For the variational model the evaluation-time
weight samples are frozen into the graph as constants, so the exported model is
deterministic and equals its PyTorch ``eval()`` output.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

INPUT_NAME = "crops"
OUTPUT_NAMES = ("logits", "features")
DEFAULT_OPSET = 18


class ExportError(RuntimeError):
    """Export or verification failed."""


def _export_module(model):
    """Wrap ``model`` so that ``forward`` returns ``(logits, features)`` with no RNG."""
    import math

    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    if hasattr(model, "mc_logits"):
        class _VI(nn.Module):
            def __init__(self, m) -> None:
                super().__init__()
                self.m = m
                with torch.no_grad():
                    g = m._eval_generator(torch.device("cpu"))
                    w2, b2 = m.fc2.sample(m.n_samples, g)
                    w3, b3 = m.fc_out.sample(m.n_samples, g)
                for k, v in (("w2", w2), ("b2", b2), ("w3", w3), ("b3", b3)):
                    self.register_buffer(k, v.detach().clone())
                self.log_s = math.log(m.n_samples)

            def forward(self, x):
                f = self.m.features(x)
                h = torch.relu(torch.einsum("nd,sod->sno", f, self.w2) + self.b2[:, None, :])
                z = torch.einsum("snd,sod->sno", h, self.w3) + self.b3[:, None, :]
                return (torch.logsumexp(F.log_softmax(z, dim=-1), dim=0) - self.log_s,
                        self.m.with_descriptors(x, f))

        return _VI(model).eval()

    class _Plain(nn.Module):
        def __init__(self, m) -> None:
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.forward_with_features(x)

    return _Plain(model).eval()


def export_onnx(model, path: str | Path, input_size: int, opset: int = DEFAULT_OPSET,
                fp16: bool = False) -> Path:
    """Export ``model`` (eval, CPU, float32) to ONNX with a dynamic batch dimension.

    Parameters
    ----------
    model : torch.nn.Module
        A network with ``forward_with_features`` (``Artifact.build_model()``).
    path : str or Path
        Output ``.onnx`` file (weights embedded, no external data).
    input_size : int
        Crop side length S in px.
    opset : int
        ONNX opset.
    fp16 : bool
        Also convert weights and activations to float16 while keeping float32 inputs and
        outputs (for TensorRT 11, which has no FP16 builder flag). Needs ``onnxconverter_common``.
    """
    import torch

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapped = _export_module(model.eval().cpu().float())
    dummy = torch.zeros(2, 1, input_size, input_size)
    try:
        torch.onnx.export(
            wrapped, (dummy,), str(out), input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES), opset_version=opset, dynamo=False,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAMES[0]: {0: "batch"},
                          OUTPUT_NAMES[1]: {0: "batch"}},
            do_constant_folding=True, external_data=False)
    except Exception as exc:  # torch raises many types here
        raise ExportError(f"ONNX export failed: {exc}") from exc
    import onnx

    m = onnx.load(str(out))
    onnx.checker.check_model(m)
    if fp16:
        try:
            from onnxconverter_common import float16
        except ImportError as exc:
            raise ExportError("fp16 ONNX conversion needs onnxconverter-common "
                              "(pip install onnxconverter-common)") from exc
        m = float16.convert_float_to_float16(m, keep_io_types=True)
        onnx.save(m, str(out))
    return out


def onnx_session(path: str | Path, threads: int = 1):
    """ONNX Runtime CPU session with ``threads`` intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def verify_onnx(model, path: str | Path, x_norm: np.ndarray,
                batch_sizes: tuple[int, ...] = (1, 7, 64, 256, 1000)) -> dict[str, Any]:
    """Compare ONNX Runtime with PyTorch on ``x_norm`` at several batch sizes.

    Returns
    -------
    dict
        ``max_abs_logit_diff`` and ``max_abs_feature_diff`` over all batch sizes, and per
        batch size.
    """
    import torch

    sess = onnx_session(path)
    wrapped = _export_module(model.eval().cpu().float())
    with torch.no_grad():
        z_ref, f_ref = (t.numpy() for t in wrapped(torch.from_numpy(x_norm)))
    per = {}
    for bs in batch_sizes:
        zs, fs = [], []
        for i in range(0, len(x_norm), bs):
            z, f = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: x_norm[i:i + bs]})
            zs.append(z)
            fs.append(f)
        per[int(bs)] = {"logits": float(np.max(np.abs(np.concatenate(zs) - z_ref))),
                        "features": float(np.max(np.abs(np.concatenate(fs) - f_ref)))}
    return {"max_abs_logit_diff": max(v["logits"] for v in per.values()),
            "max_abs_feature_diff": max(v["features"] for v in per.values()),
            "per_batch_size": per, "n": int(len(x_norm))}


def export_artifact(artifact, out: str | Path, opset: int = DEFAULT_OPSET, verify: bool = True,
                    n_verify: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Export a loaded artifact to ONNX and (by default) verify it on random crops.

    Verification crops are Gaussian noise with the training normalisation's statistics
    (N(0, 1) after normalisation): enough to exercise every weight.
    """
    model = artifact.build_model()
    p = export_onnx(model, out, artifact.input_size, opset)
    res: dict[str, Any] = {"onnx": str(p), "model_sha256": artifact.sha256, "opset": opset,
                           "input": INPUT_NAME, "outputs": list(OUTPUT_NAMES)}
    if verify:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n_verify, 1, artifact.input_size, artifact.input_size)
                                ).astype(np.float32)
        res["verify"] = verify_onnx(model, p, x)
    return res


def convert_onnx_fp16(src: str | Path, dst: str | Path) -> Path:
    """Convert an ONNX model to float16 compute, keeping float32 inputs and outputs.

    Float32 initializers and ``Constant`` tensors become float16, each float32 graph input
    gets a ``Cast`` to float16 and each float32 output a ``Cast`` back to float32; value
    infos are re-inferred. This is what TensorRT 11 (no ``BuilderFlag.FP16``) builds as a
    strongly typed FP16 network. Covers the operators of the shipped CNNs (Conv, Relu,
    MaxPool, Gemm, Flatten/Reshape, pooling, Einsum, LogSoftmax, ReduceLogSumExp).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    try:
        m = onnx.load(str(src))
    except Exception as exc:  # onnx raises DecodeError and others
        raise ExportError(f"cannot read ONNX {src}: {exc}") from exc
    g = m.graph
    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16
    for i, init in enumerate(g.initializer):
        if init.data_type == f32:
            arr = numpy_helper.to_array(init).astype(np.float16)
            g.initializer[i].CopyFrom(numpy_helper.from_array(arr, init.name))
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == f32:
                    a.t.CopyFrom(numpy_helper.from_array(
                        numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
        if node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to" and a.i == f32:
                    a.i = f16
    new_nodes = []
    for inp in g.input:
        if inp.type.tensor_type.elem_type != f32:
            continue
        half = inp.name + "_fp16"
        for node in g.node:
            for j, name in enumerate(node.input):
                if name == inp.name:
                    node.input[j] = half
        new_nodes.append(helper.make_node("Cast", [inp.name], [half], to=f16,
                                          name=f"cast_in_{inp.name}"))
    tail = []
    for out in g.output:
        if out.type.tensor_type.elem_type != f32:
            continue
        half = out.name + "_fp16"
        for node in g.node:
            for j, name in enumerate(node.output):
                if name == out.name:
                    node.output[j] = half
            for j, name in enumerate(node.input):
                if name == out.name:
                    node.input[j] = half
        tail.append(helper.make_node("Cast", [half], [out.name], to=f32,
                                     name=f"cast_out_{out.name}"))
    nodes = new_nodes + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    try:
        m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
        onnx.checker.check_model(m)
    except Exception as exc:
        raise ExportError(f"FP16 conversion produced an invalid model: {exc}") from exc
    out_path = Path(dst)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(out_path))
    return out_path
