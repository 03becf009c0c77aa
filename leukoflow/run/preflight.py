"""Checks ``leukoflow run`` makes before it starts any service.

:func:`check_model_crop_size` resolves the acquisition pipeline and the inference worker
configuration exactly as the child processes will (defaults < TOML < ``LEUKOFLOW_*``
environment < the run's flags) and refuses a run whose crops the model cannot take: without
it every cell would be rejected one by one with reason ``shape`` and the run would count
nothing. :func:`run_pipeline_identity` resolves them the same way for the record of what
ran: the pipeline identifier and hash, every parameter, the model and the software versions
(``run_params.json`` ``pipeline``, and from there the recording and ``summary.json``).
"""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Mapping
from typing import Any

from leukoflow.acquisition.pipeline import SECTION as PIPELINE_SECTION
from leukoflow.acquisition.pipeline import PipelineConfig, identity, parse_identity
from leukoflow.core.config import ConfigError, resolve
from leukoflow.core.physics import DEFAULT_OPTICS, check_crop_size
from leukoflow.core.rtdc import open_rtdc
from leukoflow.inference.worker import SECTION as INFER_SECTION
from leukoflow.inference.worker import InferConfig
from leukoflow.models.artifact import read_card


def check_model_crop_size(source: str, model: str = "") -> dict[str, Any]:
    """Compare the acquisition's crop size with the workers' model input size.

    Parameters
    ----------
    source : str
        The run's source spec; ``replay:PATH`` runs replay recorded crops (not cut by the
        acquisition) and are not checked here.
    model : str
        The run's ``--model`` ('' = the worker's configured default).

    Returns
    -------
    dict
        ``{"crop_size", "model", "model_input_size"}`` (recorded with the run's parameters);
        empty for replay sources.

    Raises
    ------
    leukoflow.core.physics.CropSizeError
        When they differ (a ``ValueError``: ``leukoflow run`` prints it and exits).
    """
    if source.startswith("replay:"):
        return {}
    crop = resolve(PIPELINE_SECTION, PipelineConfig, {}).crop.size
    name = resolve(INFER_SECTION, InferConfig, {"model": model or None}).model
    size = int(read_card(name)["input_size"])
    check_crop_size(crop, size, f"model {name!r}")
    return {"crop_size": int(crop), "model": name, "model_input_size": size}


#: Distributions whose versions a run records (read from their metadata, nothing imported).
VERSIONED: tuple[str, ...] = ("leukoflow", "numpy", "scipy", "torch", "pyzmq", "h5py",
                              "scikit-image", "onnxruntime", "tensorrt")


def software_versions() -> dict[str, str]:
    """Python and the installed versions of :data:`VERSIONED` (those installed)."""
    out = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def run_pipeline_identity(source: str, model: str = "",
                          env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The pipeline a run will use: identifier, hash, configuration, model, versions.

    Resolves the acquisition pipeline with the acquisition child's environment (``env``:
    the run's environment plus what the run adds, e.g. the QC pixel size) and the workers'
    model as the children will, so ``run_params.json`` and the recording carry what ran.

    Parameters
    ----------
    source : str
        The run's source; a ``replay:PATH`` run classifies crops another pipeline cut: its
        identity is the recording's (``user:pipeline id``) with this run's model, or none
        when the recording has none.
    model : str
        The run's ``--model`` ('' = the worker's configured default).
    env : mapping, optional
        Environment of the acquisition child (default: this process's).

    Returns
    -------
    dict
        :func:`leukoflow.acquisition.pipeline.identity` (``id``, ``hash``, ``generation``,
        ``model``, ``model_sha``) plus ``config`` (every parameter, nested by stage),
        ``optics`` and ``versions``; for a replay without identity ``id``/``hash`` are None
        and ``note`` says why.
    """
    name = resolve(INFER_SECTION, InferConfig, {"model": model or None}, env=env).model
    sha = str(read_card(name).get("model_sha256", ""))
    versions = software_versions()
    if source.startswith("replay:"):
        recorded = _recorded_identity(source.split(":", 1)[1])
        if recorded is None:
            return {"id": None, "hash": None, "generation": None, "model": name,
                    "model_sha": sha, "versions": versions,
                    "note": "replayed crops of a recording without a pipeline identifier"}
        cfg, optics = recorded.config, recorded.extra.get("optics", DEFAULT_OPTICS)
    else:
        cfg, optics = resolve(PIPELINE_SECTION, PipelineConfig, {}, env=env), DEFAULT_OPTICS
    out = identity(cfg, optics, model=name, model_sha=sha)
    out.update({"config": cfg.to_dict(), "optics": optics.to_dict(), "versions": versions})
    if source.startswith("replay:"):
        out["replayed"] = source.split(":", 1)[1]
    return out


def _recorded_identity(path: str) -> Any:
    """The parsed ``user:pipeline id`` of a recording, None when it has none."""
    try:
        with open_rtdc(path) as h5:
            text = h5.attrs.get("user:pipeline id")
    except OSError:
        return None
    if isinstance(text, bytes):
        text = text.decode()
    if not text:
        return None
    try:
        return parse_identity(str(text))
    except ConfigError:
        return None


def identity_summary(pipeline: Mapping[str, Any]) -> dict[str, Any]:
    """The short form of a run's pipeline record (``--json`` output, live view)."""
    return {k: pipeline.get(k) for k in ("hash", "generation", "model", "model_sha")}
