"""``leukoflow export --triton REPO``: a Triton Inference Server model repository for an artifact.

Layout written for artifact ``NAME`` (Triton ignores the non-numeric folders and extra files)::

    REPO/NAME/config.pbtxt          onnxruntime backend, CPU instances (KIND_CPU)
    REPO/NAME/configs/gpu.pbtxt     onnxruntime backend, GPU instances (KIND_GPU)
    REPO/NAME/configs/python.pbtxt  python backend running the same ONNX graph with ONNX
                                    Runtime (servers without the onnxruntime backend, e.g.
                                    the CPU server bundled in the ``nvidia-pytriton`` wheel)
    REPO/NAME/configs/tensorrt.pbtxt  TensorRT plan, GPU (only where TensorRT built one)
    REPO/NAME/1/model.onnx          crops (N, S, S) rad -> logits (N, K), features (N, D)
    REPO/NAME/1/model.py            the python-backend runner of model.onnx
    REPO/NAME/1/model.plan          TensorRT plan (where built)
    REPO/NAME/artifact/             card.json + weights.safetensors: the worker's artifact
    REPO/NAME/leukoflow.json        what was exported, with every parameter

A server picks a configuration with ``--model-config-name=gpu|python|tensorrt`` (Triton falls
back to ``config.pbtxt`` when the named file is missing). The graph is the one the local ONNX
Runtime backend runs (:func:`leukoflow.inference.backends.onnx_cpu.export_onnx`,
normalisation inside), so Triton and the local backends see the same input. Dynamic batching
follows the worker's batching: ``preferred_batch_size`` = the worker's full batch,
``max_queue_delay_microseconds`` = its ``max_delay_ms``, and ``max_batch_size`` leaves room to
merge requests of several workers. Every configuration carries the artifact's model sha256
(:data:`~leukoflow.inference.backends.triton.PARAM_SHA`); the ``triton`` backend refuses a
served model with another hash, so the decision rule of the card beside it stays the one the
network was calibrated with.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leukoflow.inference.backends.onnx_cpu import OPSET, export_onnx
from leukoflow.inference.backends.triton import (
    INPUT,
    OUTPUTS,
    PARAM_INPUT_SIZE,
    PARAM_NORMALISATION,
    PARAM_SHA,
)
from leukoflow.models.export import onnx_session
from leukoflow.models.tensorrt_build import Profile, TensorRTError, build_engine

log = logging.getLogger(__name__)

MANIFEST = "leukoflow.json"
ARTIFACT_DIR = "artifact"
VERSION = "1"
CONFIG_NAMES = ("default", "gpu", "python", "tensorrt")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TritonExportError(RuntimeError):
    """The repository could not be written."""


@dataclass(frozen=True)
class TritonExportConfig:
    """Parameters of ``export --triton`` (recorded in ``leukoflow.json``).

    Attributes
    ----------
    name : str
        Served model name; empty = the artifact's name.
    max_batch : int
        The workers' ``max_batch`` [cells]: Triton's preferred batch size.
    max_delay_ms : float
        The workers' ``max_delay_ms``: Triton's ``max_queue_delay_microseconds`` / 1000 [ms].
    triton_max_batch : int
        Triton's ``max_batch_size`` [cells]; 0 = 2 x ``max_batch`` (room to merge requests
        of two workers).
    cpu_instances, gpu_instances : int
        Model instances per CPU configuration / per GPU.
    threads : int
        ONNX Runtime intra-op threads per CPU instance.
    tensorrt : str
        ``auto`` (build a plan where TensorRT and a GPU are present), ``on`` (fail without),
        ``off``.
    precision : str
        TensorRT plan precision (``fp16`` or ``fp32``).
    """

    name: str = ""
    max_batch: int = 256
    max_delay_ms: float = 2.0
    triton_max_batch: int = 0
    cpu_instances: int = 1
    gpu_instances: int = 1
    threads: int = 1
    tensorrt: str = "auto"
    precision: str = "fp16"

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_delay_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_delay_ms >= 0")
        if self.triton_max_batch and self.triton_max_batch < self.max_batch:
            raise ValueError(f"triton_max_batch {self.triton_max_batch} below the workers' "
                             f"max_batch {self.max_batch}")
        if self.cpu_instances < 1 or self.gpu_instances < 1 or self.threads < 1:
            raise ValueError("instances and threads must be >= 1")
        if self.tensorrt not in ("auto", "on", "off"):
            raise ValueError(f"tensorrt must be auto, on or off, got {self.tensorrt!r}")
        if self.name and not _NAME_RE.match(self.name):
            raise ValueError(f"invalid model name {self.name!r}")

    @property
    def served_max_batch(self) -> int:
        """Triton's ``max_batch_size``."""
        return int(self.triton_max_batch or 2 * self.max_batch)


# ----------------------------------------------------------------------------- pbtxt
class _Enum(str):
    """A protobuf enum value (written without quotes)."""


def _scalar(v: Any) -> str:
    if isinstance(v, _Enum):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float):
        return repr(v)
    return json.dumps(str(v))


def to_pbtxt(msg: dict[str, Any], indent: int = 0) -> str:
    """Protobuf text format of a nested dict (lists = repeated fields)."""
    pad = "  " * indent
    lines = []
    for key, val in msg.items():
        items = val if isinstance(val, list) else [val]
        if items and all(not isinstance(v, dict) for v in items) and isinstance(val, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in items)} ]")
            continue
        for v in items:
            if isinstance(v, dict):
                lines.append(f"{pad}{key} {{")
                lines.append(to_pbtxt(v, indent + 1))
                lines.append(f"{pad}}}")
            else:
                lines.append(f"{pad}{key}: {_scalar(v)}")
    return "\n".join(line for line in lines if line)


def _parameters(values: dict[str, str]) -> list[dict[str, Any]]:
    return [{"key": k, "value": {"string_value": str(v)}} for k, v in values.items()]


def model_config(name: str, kind: str, *, input_size: int, num_classes: int, feature_dim: int,
                 cfg: TritonExportConfig, sha256: str, normalisation: dict[str, Any]
                 ) -> dict[str, Any]:
    """The ``config.pbtxt`` content (as a dict) of one configuration ``kind``.

    Parameters
    ----------
    kind : {"default", "gpu", "python", "tensorrt"}
        Which backend and instance group.
    """
    if kind not in CONFIG_NAMES:
        raise ValueError(f"unknown configuration {kind!r}")
    s = int(input_size)
    conf: dict[str, Any] = {"name": name}
    if kind == "tensorrt":
        conf["platform"] = "tensorrt_plan"
        conf["default_model_filename"] = "model.plan"
    elif kind == "python":
        conf["backend"] = "python"
    else:
        conf["backend"] = "onnxruntime"
        conf["default_model_filename"] = "model.onnx"
    conf["max_batch_size"] = cfg.served_max_batch
    conf["input"] = [{"name": INPUT, "data_type": _Enum("TYPE_FP32"), "dims": [s, s]}]
    conf["output"] = [
        {"name": OUTPUTS[0], "data_type": _Enum("TYPE_FP32"), "dims": [int(num_classes)]},
        {"name": OUTPUTS[1], "data_type": _Enum("TYPE_FP32"), "dims": [int(feature_dim)]}]
    preferred = sorted({int(cfg.max_batch), cfg.served_max_batch})
    conf["dynamic_batching"] = {
        "preferred_batch_size": preferred,
        "max_queue_delay_microseconds": int(round(cfg.max_delay_ms * 1000)),
    }
    gpu = kind in ("gpu", "tensorrt")
    conf["instance_group"] = [{
        "count": cfg.gpu_instances if gpu else cfg.cpu_instances,
        "kind": _Enum("KIND_GPU" if gpu else "KIND_CPU")}]
    params = {PARAM_SHA: sha256, PARAM_INPUT_SIZE: str(s),
              PARAM_NORMALISATION: json.dumps(normalisation, sort_keys=True)}
    if kind in ("default", "python"):
        params["intra_op_thread_count"] = str(cfg.threads)
        params["inter_op_thread_count"] = "1"
    if kind == "python":
        params["onnx_file"] = "model.onnx"
    conf["parameters"] = _parameters(params)
    return conf


PYTHON_MODEL = '''"""Triton python-backend model written by leukoflow export --triton.

Runs model.onnx (crops (N, S, S) rad -> logits, features) with ONNX Runtime on the CPU.
Needs numpy and onnxruntime in the Python environment of the backend stub. Tensors cross
the stub through DLPack, not as_numpy()/Tensor(name, array): stubs built with an older
pybind11 misread numpy 2 arrays (Triton 2.51 answered "output tensor shape does not match
size of output")."""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(params.get("intra_op_thread_count", "1"))
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        path = os.path.join(os.path.dirname(__file__), params.get("onnx_file", "model.onnx"))
        self.session = ort.InferenceSession(path, sess_options=so,
                                            providers=["CPUExecutionProvider"])

    def execute(self, requests):
        crops = [np.from_dlpack(pb_utils.get_input_tensor_by_name(r, "crops"))
                 for r in requests]
        sizes = [c.shape[0] for c in crops]
        x = np.ascontiguousarray(np.concatenate(crops), dtype=np.float32)
        logits, features = self.session.run(None, {"crops": x})
        responses = []
        start = 0
        for n in sizes:
            sl = slice(start, start + n)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor.from_dlpack("logits", np.ascontiguousarray(logits[sl])),
                pb_utils.Tensor.from_dlpack("features",
                                            np.ascontiguousarray(features[sl]))]))
            start += n
        return responses
'''


def _feature_dim(onnx_file: Path, input_size: int) -> int:
    sess = onnx_session(onnx_file)
    _, f = sess.run(None, {INPUT: np.zeros((1, input_size, input_size), np.float32)})
    return int(f.shape[1])


def _build_plan(artifact: Any, onnx_file: Path, out: Path, cfg: TritonExportConfig,
                cache_dir: Path | None) -> dict[str, Any]:
    """Build a TensorRT plan of the raw-crops graph; ``{"built": False, "why": ...}`` when
    TensorRT or a GPU is missing (and ``tensorrt`` is not ``on``)."""
    try:
        res = build_engine(onnx_file, artifact.sha256, artifact.input_size,
                           precision=cfg.precision,
                           profile=Profile(1, cfg.max_batch, cfg.served_max_batch),
                           cache_dir=(cache_dir or onnx_file.parent) / "engines",
                           channel_dim=False)
    except (TensorRTError, ImportError) as exc:
        if cfg.tensorrt == "on":
            raise TritonExportError(f"TensorRT plan: {exc}") from exc
        return {"built": False, "why": str(exc)}
    shutil.copyfile(res.engine, out)
    return {"built": True, **res.to_dict()}


def export_triton(artifact: Any, repo: str | Path, config: TritonExportConfig | None = None,
                  cache_dir: str | Path | None = None, overwrite: bool = True
                  ) -> dict[str, Any]:
    """Write (or replace) the Triton model repository entry of ``artifact`` under ``repo``.

    Parameters
    ----------
    artifact : leukoflow.models.artifact.Artifact
        Loaded model artifact (with its folder: card and weights are copied).
    repo : str or Path
        Model repository root (created if missing; other models in it are left alone).
    config : TritonExportConfig, optional
        Batching, instances, TensorRT.
    cache_dir : path, optional
        ONNX export cache (``$LEUKOFLOW_CACHE_DIR`` by default).
    overwrite : bool
        Replace an existing entry of the same name (default); else fail.

    Returns
    -------
    dict
        The manifest written to ``REPO/NAME/leukoflow.json``.
    """
    cfg = config or TritonExportConfig()
    name = cfg.name or str(getattr(artifact, "name", ""))
    if not _NAME_RE.match(name):
        raise TritonExportError(f"invalid model name {name!r}")
    root = Path(repo)
    model_dir = root / name
    if model_dir.exists():
        if not overwrite:
            raise TritonExportError(f"{model_dir} exists")
        if not (model_dir / MANIFEST).is_file():
            raise TritonExportError(f"{model_dir} exists and was not written by leukoflow: "
                                    "not replacing it")
    root.mkdir(parents=True, exist_ok=True)
    # written next to the final place and renamed: a failed export leaves no half entry, and
    # a server polling the repository never sees one
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        manifest = _write_entry(artifact, tmp, name, cfg, cache_dir)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        tmp.rename(model_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("Triton repository entry %s written (%s)", model_dir,
             ", ".join(manifest["configs"]))
    return manifest


def _write_entry(artifact: Any, model_dir: Path, name: str, cfg: TritonExportConfig,
                 cache_dir: str | Path | None) -> dict[str, Any]:
    vdir = model_dir / VERSION
    vdir.mkdir(parents=True)
    onnx_src = export_onnx(artifact, cache_dir)
    onnx_file = vdir / "model.onnx"
    shutil.copyfile(onnx_src, onnx_file)
    (vdir / "model.py").write_text(PYTHON_MODEL)
    s = int(artifact.input_size)
    k = len(artifact.class_names)
    d = _feature_dim(onnx_file, s)
    common = {"input_size": s, "num_classes": k, "feature_dim": d, "cfg": cfg,
              "sha256": artifact.sha256, "normalisation": dict(artifact.normalisation)}
    plan: dict[str, Any] = {"built": False, "why": "tensorrt=off"}
    if cfg.tensorrt != "off":
        plan = _build_plan(artifact, onnx_src, vdir / "model.plan", cfg,
                           Path(cache_dir) if cache_dir else None)
    configs = {"default": "config.pbtxt", "gpu": "configs/gpu.pbtxt",
               "python": "configs/python.pbtxt"}
    if plan.get("built"):
        configs["tensorrt"] = "configs/tensorrt.pbtxt"
    for kind, rel in configs.items():
        path = model_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_pbtxt(model_config(name, kind, **common)) + "\n")
    art_dir = model_dir / ARTIFACT_DIR
    art_dir.mkdir()
    src = Path(artifact.path)
    for fname in ("card.json", "weights.safetensors"):
        shutil.copyfile(src / fname, art_dir / fname)
    manifest = {
        "format": 1, "model": name, "artifact": str(getattr(artifact, "name", name)),
        "model_sha256": artifact.sha256, "input": {INPUT: [s, s]},
        "outputs": {OUTPUTS[0]: [k], OUTPUTS[1]: [d]}, "class_names": list(artifact.class_names),
        "onnx_opset": OPSET, "configs": configs, "tensorrt": plan,
        "export": {**asdict(cfg), "served_max_batch": cfg.served_max_batch},
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "worker_artifact": f"{name}/{ARTIFACT_DIR}",
    }
    (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
