"""Checks ``leukoflow run`` makes before it starts any service.

:func:`check_model_crop_size` resolves the acquisition pipeline and the inference worker
configuration exactly as the child processes will (defaults < TOML < ``LEUKOFLOW_*``
environment < the run's flags) and refuses a run whose crops the model cannot take: without
it every cell would be rejected one by one with reason ``shape`` and the run would count
nothing.
"""

from __future__ import annotations

from typing import Any

from leukoflow.acquisition.pipeline import SECTION as PIPELINE_SECTION
from leukoflow.acquisition.pipeline import PipelineConfig
from leukoflow.core.config import resolve
from leukoflow.core.physics import check_crop_size
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
