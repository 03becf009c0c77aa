"""QC records on disk and the decision a live run takes from them.

Each QC run writes one JSON record ``<folder>/qc-<UTC time>-<id>.json`` (never
overwritten). :func:`qc_status` reads the folder and tells a run what to do:

* ``pass``: the newest record passed and is current: use its scale;
* ``failed``: the newest record failed (the last *passing* one's scale is used, if any);
* ``expired``: the newest record passed but is older than ``max_age_h``;
* ``none``: no record at all (nominal scale).

Anything but ``pass`` makes the run refuse to start under ``policy = "refuse"`` and warn
loudly under ``"warn"`` (the summary, report, live view and the ``leukoflow_qc_status``
metric say so); ``"off"`` skips QC entirely (nominal scale, status ``off``).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from leukoflow.acquisition.qc.measure import QCConfig
from leukoflow.core.jsonutil import atomic_write_json

FORMAT = "leukoflow-qc/1"
#: Status codes of :class:`QCStatus` (and values of the ``leukoflow_qc_status`` gauge).
STATUS_CODES: dict[str, int] = {"pass": 1, "off": 0, "none": -1, "expired": -2, "failed": -3}


class QCError(RuntimeError):
    """The run must not start: no passing, current QC under ``policy = "refuse"``."""


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def write_record(result: dict[str, Any], folder: str | Path, source: str = "",
                 extra: dict[str, Any] | None = None) -> Path:
    """Store a QC result (:func:`leukoflow.acquisition.qc.measure.run_qc`) as a new record.

    Returns
    -------
    Path
        The record file (written atomically).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t = _now()
    rec = {"format": FORMAT, "created": t.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
           "source": source, **(extra or {}), **result}
    name = f"qc-{t.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:6]}.json"
    atomic_write_json(folder / name, rec)  # NaN/inf -> null, numpy -> numbers
    return folder / name


def read_records(folder: str | Path) -> list[dict[str, Any]]:
    """Valid QC records in ``folder``, oldest first (unreadable files are skipped and
    listed under ``_invalid`` of the first element's caller via :func:`qc_status`)."""
    out = []
    for p in sorted(Path(folder).glob("qc-*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(rec, dict) or rec.get("format") != FORMAT or \
                not isinstance(rec.get("passed"), bool) or "created" not in rec:
            continue
        rec["_path"] = str(p)
        out.append(rec)
    out.sort(key=lambda r: (str(r["created"]), r["_path"]))
    return out


def _pixel(rec: dict[str, Any] | None) -> float | None:
    try:
        v = float(rec["scale"]["pixel_um"]) if rec else None
    except (KeyError, TypeError, ValueError):
        return None
    return v if v is not None and math.isfinite(v) and v > 0 else None


@dataclass
class QCStatus:
    """What a run does about QC (see the module docstring).

    Attributes
    ----------
    state : str
        ``pass``, ``failed``, ``expired``, ``none`` or ``off``.
    policy : str
        The configured policy.
    pixel_um : float or None
        Phase-grid pixel size to use [µm] (None: nominal).
    record : str
        Path of the record the scale comes from ('' if none).
    latest : str
        Path of the newest record ('' if none).
    age_h : float or None
        Age of the newest record [h].
    message : str
        One line for the operator.
    magnification : float or None
        Magnification relative to nominal of the record used.
    failed_checks : list of str
        Failed checks of the newest record.
    """

    state: str
    policy: str
    pixel_um: float | None = None
    record: str = ""
    latest: str = ""
    age_h: float | None = None
    message: str = ""
    magnification: float | None = None
    failed_checks: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the run may present results without a QC warning."""
        return self.state in ("pass", "off")

    @property
    def refuse(self) -> bool:
        """True when the run must not start."""
        return self.policy == "refuse" and not self.ok

    @property
    def code(self) -> int:
        """Numeric state (``leukoflow_qc_status``)."""
        return STATUS_CODES[self.state]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (recorded in the run parameters and summary)."""
        return {**asdict(self), "ok": self.ok, "code": self.code}


def qc_status(cfg: QCConfig, now: _dt.datetime | None = None) -> QCStatus:
    """Decide from the records in ``cfg.folder`` (see the module docstring)."""
    if cfg.policy == "off":
        return QCStatus("off", cfg.policy, message="QC disabled (policy off): nominal scale")
    recs = read_records(cfg.folder)
    if not recs:
        return QCStatus("none", cfg.policy, message=f"no QC record in {cfg.folder}: "
                        "nominal scale, not verified — run 'leukoflow qc run'")
    latest = recs[-1]
    passing = [r for r in recs if r["passed"]]
    use = passing[-1] if passing else None
    now = now or _now()
    try:
        created = _dt.datetime.strptime(latest["created"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=_dt.UTC)
        age_h = (now - created).total_seconds() / 3600.0
    except ValueError:
        age_h = None
    mag = (use or {}).get("scale", {}).get("magnification") if use else None
    st = QCStatus("pass", cfg.policy, pixel_um=_pixel(use), record=(use or {}).get("_path", ""),
                  latest=latest["_path"], age_h=age_h, magnification=mag,
                  failed_checks=list(latest.get("failed_checks", [])))
    if not latest["passed"]:
        st.state = "failed"
        st.message = (f"last QC failed ({', '.join(st.failed_checks) or 'checks'}): "
                      + (f"using the previous passing QC's scale ({st.record})"
                         if use else "nominal scale, not verified"))
    elif cfg.max_age_h > 0 and (age_h is None or age_h > cfg.max_age_h):
        st.state = "expired"
        st.message = (f"last QC is {age_h:.1f} h old (limit {cfg.max_age_h:g} h): "
                      "using its scale, re-run 'leukoflow qc run'"
                      if age_h is not None else "last QC has no valid date")
    else:
        st.message = (f"QC passed {age_h:.1f} h ago: pixel {st.pixel_um:.4f} µm "
                      f"(magnification {mag:.4f})")
    return st


def enforce(status: QCStatus) -> QCStatus:
    """Raise :class:`QCError` when the policy refuses the run; return ``status`` otherwise."""
    if status.refuse:
        raise QCError(f"run refused by QC policy 'refuse': {status.message}")
    return status
