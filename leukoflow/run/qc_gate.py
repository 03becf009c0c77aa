"""The QC gate of a live run: which scale the acquisition uses, and whether the run may start.

:func:`qc_for_run` reads the QC records (``[qc]`` settings,
:class:`leukoflow.acquisition.qc.measure.QCConfig`) and returns the QC status recorded in
the run's parameters (and from there in ``summary.json``, the report, the live view and the
``leukoflow_qc_status`` metric) plus the environment that makes the acquisition use the
last passing QC's pixel size. Under ``policy = "refuse"`` a run without a passing, current
QC raises :class:`leukoflow.acquisition.qc.record.QCError` before any process starts;
under ``"warn"`` it starts and says so loudly. Replays of recorded crops are not gated
(their crops were cut, and scaled, when they were recorded).
"""

from __future__ import annotations

import logging
from typing import Any

from leukoflow.acquisition.qc.measure import QCConfig
from leukoflow.acquisition.qc.record import enforce, qc_status
from leukoflow.acquisition.sim import SimConfig
from leukoflow.acquisition.sim.profiles import apply_profiles, profile_record
from leukoflow.acquisition.sources import parse_source_spec
from leukoflow.core.config import resolve

log = logging.getLogger(__name__)

#: Environment variable that sets ``PipelineConfig.pixel_um`` of the acquisition child.
PIXEL_ENV = "LEUKOFLOW_ACQUIRE_PIPELINE_PIXEL_UM"


def qc_for_run(source: str, config: QCConfig | None = None) -> tuple[dict[str, Any],
                                                                      dict[str, str]]:
    """QC status and acquisition environment for a run reading ``source``.

    Returns
    -------
    status : dict
        :meth:`leukoflow.acquisition.qc.record.QCStatus.to_dict` (``state``, ``ok``,
        ``pixel_um``, ``message``...).
    env : dict
        ``{PIXEL_ENV: pixel}`` when a passing QC's scale is used, else empty.

    Raises
    ------
    leukoflow.acquisition.qc.record.QCError
        The policy refuses the run.
    """
    if source.startswith("replay:"):
        return {"state": "off", "ok": True, "code": 0, "policy": "n/a", "pixel_um": None,
                "message": "replay of recorded crops: scale applied when they were cut"}, {}
    cfg = config or resolve("qc", QCConfig)
    st = enforce(qc_status(cfg))
    if not st.ok:
        log.warning("QC WARNING: %s (policy %s)", st.message, st.policy)
    env = {PIXEL_ENV: repr(float(st.pixel_um))} if st.pixel_um else {}
    return st.to_dict(), env


def sim_params(source: str, seed: int | None = None) -> dict[str, Any]:
    """``{"sim": ...}``: the simulated instrument of a ``sim`` source (profiles, their
    overrides and the resolved configuration), recorded in the run's parameters; ``{}``
    for other sources."""
    if not source.startswith("sim"):
        return {}
    _, kw = parse_source_spec(source)
    cfg = SimConfig(seed=int(seed if seed is not None else kw.get("seed", 0)))
    profile = kw.get("profile", "")
    cfg = apply_profiles(cfg, profile)
    if "concentration" in kw:
        cfg = cfg.replace(concentration=float(kw["concentration"]))
    return {"sim": profile_record(profile, cfg)}
