"""The run's watch on its own validity: drift monitor, QC status, and the verdict on the
differential (used by the collector; shown by the live view, the report and metrics).

:class:`RunWatch` owns a :class:`leukoflow.inference.drift.DriftMonitor` built from the
model card's reference (``[drift]`` settings, :class:`leukoflow.inference.drift.DriftConfig`)
and the run's QC status (``params["qc"]``, written by the orchestrator from
:func:`leukoflow.acquisition.qc.record.qc_status`). Its :meth:`RunWatch.snapshot` adds three
sections to the collector's live state and ``summary.json``:

* ``drift``: alarm, the cell count at which it fired, the features that moved;
* ``qc``: the QC state and the scale the acquisition used;
* ``validity``: ``valid`` (False once drift was detected, with ``on_drift = "invalidate"``),
  ``reasons`` (why not valid) and ``warnings`` (QC not passed, drift detection off).

A differential under drift is thereby never presented as if its intervals held: the
report and the live view print it as NOT VALID with the reasons.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from leukoflow.core.config import ConfigError, resolve
from leukoflow.core.vocabulary import DECISIONS
from leukoflow.inference.drift import (
    DriftConfig,
    DriftMonitor,
    DriftReference,
    disabled_snapshot,
)
from leukoflow.models.artifact import ArtifactError, read_card

log = logging.getLogger(__name__)

#: Model of a run that names none (the worker's default).
DEFAULT_MODEL = "lenet5-sim"


def _model_of(params: Mapping[str, Any], cfg: DriftConfig) -> str:
    if cfg.model:
        return cfg.model
    run = params.get("run") or {}
    return str(run.get("model") or DEFAULT_MODEL)


class RunWatch:
    """Drift and QC verdicts of one run (see the module docstring).

    Parameters
    ----------
    params : mapping
        The run's parameters (``run.model``, ``qc``).
    config : DriftConfig, optional
        Default: resolved from the ``[drift]`` table / ``LEUKOFLOW_DRIFT_*``.
    """

    def __init__(self, params: Mapping[str, Any], config: DriftConfig | None = None) -> None:
        self.monitor: DriftMonitor | None = None
        self.reason = ""
        self.model = ""
        self.mismatched = 0
        try:
            self.cfg = config or resolve("drift", DriftConfig)
        except (ConfigError, ValueError) as exc:
            self.cfg = DriftConfig(enabled=False)
            self.reason = f"drift configuration invalid: {exc}"
        self.qc = dict(params.get("qc") or {})
        if not self.cfg.enabled:
            self.reason = self.reason or "drift detection disabled ([drift] enabled = false)"
            return
        self.model = _model_of(params, self.cfg)
        try:
            card = read_card(self.model)
            ref = DriftReference.from_card(card)
        except (ArtifactError, ValueError) as exc:
            self.reason = f"no drift reference: {exc}"
            return
        if ref is None:
            self.reason = f"model card {self.model!r} has no drift reference"
            return
        self.card_name = str(card.get("name") or self.model)
        self.monitor = DriftMonitor(ref, self.cfg)

    # -- input -------------------------------------------------------------------------
    def add_results(self, header: Mapping[str, Any], new: np.ndarray) -> None:
        """Feed the newly counted cells of one validated ``results`` message."""
        mon = self.monitor
        if mon is None or not new.any():
            return
        if header.get("model") not in (None, self.card_name, self.model):
            self.mismatched += int(new.sum())  # another model's outputs: not comparable
            return
        if tuple(header.get("classes", ())) != mon.classes:
            self.mismatched += int(new.sum())
            return
        pred = np.asarray(header["pred"], dtype=np.int64)[new]
        code = np.array([DECISIONS.index(d) for d in header["decision"]], np.int64)[new]
        feat = {k: np.asarray(v, dtype=np.float64)[new]
                for k, v in (header.get("feat") or {}).items()}
        mon.add(pred, code, feat)

    # -- output ------------------------------------------------------------------------
    def drift(self, final: bool = False) -> dict[str, Any]:
        """The ``drift`` section."""
        if self.monitor is None:
            return disabled_snapshot(self.reason)
        if final:
            self.monitor.finish()
        out = self.monitor.snapshot()
        out["model"] = self.model
        out["cells_other_model"] = self.mismatched
        return out

    def validity(self, drift: Mapping[str, Any]) -> dict[str, Any]:
        """The ``validity`` section from the drift section and the QC status."""
        reasons, warnings = [], []
        if drift.get("alarm"):
            moved = ", ".join(f"{m['feature']} ({m['group']}, {m['shift_sd']:+.2f} sd)"
                              for m in drift.get("moved", [])[:6])
            msg = (f"instrument or sample drift detected at cell {drift.get('first_alarm_cell')}"
                   f": {moved}; the differential's intervals assume the reference "
                   "instrument and may exclude the true values")
            (reasons if self.cfg.on_drift == "invalidate" else warnings).append(msg)
        elif not drift.get("enabled", False):
            warnings.append(f"drift not monitored: {drift.get('reason', '')}")
        qc = self.qc
        if qc and not qc.get("ok", True):
            warnings.append(f"QC {qc.get('state')}: {qc.get('message', '')}")
        return {"valid": not reasons, "reasons": reasons, "warnings": warnings,
                "on_drift": self.cfg.on_drift}

    def snapshot(self, final: bool = False) -> dict[str, Any]:
        """``{"drift", "qc", "validity"}`` for the collector's snapshot / summary."""
        d = self.drift(final)
        return {"drift": d, "qc": self.qc or {"state": "unknown"}, "validity": self.validity(d)}

    def state_dict(self) -> dict[str, Any]:
        """Monitor state to survive a collector restart."""
        return {"monitor": self.monitor.state_dict() if self.monitor else None,
                "mismatched": self.mismatched}

    def load_state(self, st: Mapping[str, Any] | None) -> None:
        """Continue from :meth:`state_dict`."""
        if not st:
            return
        self.mismatched = int(st.get("mismatched", 0))
        if self.monitor is not None and st.get("monitor"):
            self.monitor.load_state(st["monitor"])

    # -- metrics -----------------------------------------------------------------------
    def export(self, m: Any, snap: Mapping[str, Any]) -> None:
        """Set the drift, validity and QC gauges of the collector's registry ``m``."""
        d, v, qc = snap.get("drift") or {}, snap.get("validity") or {}, snap.get("qc") or {}
        m["leukoflow_drift_alarm"].set(1.0 if d.get("alarm") else 0.0)
        m["leukoflow_drift_enabled"].set(1.0 if d.get("enabled") else 0.0)
        m["leukoflow_drift_max_score"].set(float(d.get("max_score") or 0.0))
        for t in d.get("top", []):
            m["leukoflow_drift_score"].labels(t["feature"], t["group"]).set(t["score"])
        m["leukoflow_differential_valid"].set(1.0 if v.get("valid", True) else 0.0)
        code = qc.get("code")
        if isinstance(code, int | float):
            m["leukoflow_qc_status"].set(float(code))
        mag = qc.get("magnification")
        if isinstance(mag, int | float):
            m["leukoflow_qc_magnification"].set(float(mag))

