"""Run-report sections on validity: the drift test, the QC status and the verdict on the
differential (from the ``drift``, ``qc`` and ``validity`` sections of ``summary.json``,
written by :mod:`leukoflow.run.drift_watch`)."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return html.escape(str(v))


def is_valid(summary: Mapping[str, Any]) -> bool:
    """True unless the run's differential was marked not valid."""
    return bool((summary.get("validity") or {}).get("valid", True))


def validity_banner(summary: Mapping[str, Any]) -> list[str]:
    """A banner above the differential: NOT VALID with the reasons, or the warnings."""
    v = summary.get("validity")
    if not v:
        return []
    out = []
    if not v.get("valid", True):
        out.append('<div class="alert" style="border:3px solid #c00;padding:0.6em;'
                   'background:#fee"><b>DIFFERENTIAL NOT VALID.</b> '
                   + " ".join(html.escape(r) for r in v.get("reasons", []))
                   + " Do not report these percentages; fix the instrument (QC) and "
                   "measure again.</div>")
    for w in v.get("warnings", []):
        out.append('<div class="warn" style="border:2px solid #d80;padding:0.4em;'
                   f'background:#fff4e0"><b>Warning:</b> {html.escape(w)}</div>')
    return out


def drift_section(summary: Mapping[str, Any]) -> list[str]:
    """HTML of the "Instrument drift and QC" section."""
    d = summary.get("drift")
    qc = summary.get("qc")
    if d is None and qc is None:
        return []
    body = ["<h2>Instrument drift and QC</h2>"]
    if qc:
        body.append("<p>QC (reference beads): <b>" + html.escape(str(qc.get("state")))
                    + "</b> (policy " + html.escape(str(qc.get("policy", "—"))) + "). "
                    + html.escape(str(qc.get("message", ""))) + "</p>")
    if not d:
        return body
    if not d.get("enabled"):
        body.append("<p>Drift detection was not active: "
                    + html.escape(str(d.get("reason", ""))) + "</p>")
        return body
    state = ("<b style='color:#c00'>DRIFT DETECTED</b> at cell "
             f"{_f(d.get('first_alarm_cell'))} (checkpoint {_f(d.get('first_alarm_checkpoint'))})"
             if d.get("alarm") else "<b>no drift detected</b>")
    body.append(f"<p>Sequential test against the model card's reference distributions: "
                f"{state}; {_f(d.get('cells'))} cells in {_f(d.get('checkpoints'))} "
                f"checkpoints, {_f(d.get('n_tests'))} tests. Method: "
                f"{html.escape(str(d.get('method', '')))}.</p>")
    rows = d.get("moved") if d.get("alarm") else d.get("top")
    if rows:
        body.append("<p>" + ("Features that moved (first checkpoint at which each test "
                             "fired):" if d.get("alarm") else
                             "Largest test statistics at the last checkpoint (score >= 1 "
                             "would be drift):") + "</p>")
        trs = "".join(
            f"<tr><td>{_f(r['feature'])}</td><td>{_f(r['group'])}</td>"
            f"<td>{_f(r.get('ref'), 4)}</td><td>{_f(r.get('live'), 4)}</td>"
            f"<td>{_f(r.get('change_pct'), 3)}</td><td>{r['shift_sd']:+.2f}</td>"
            f"<td>{_f(r['z'])}</td><td>{_f(r['score'])}</td><td>{_f(r.get('cell'))}</td>"
            f"<td>{_f(r.get('variant'))}</td><td>{_f(r.get('doc'))}</td></tr>"
            for r in rows)
        body.append("<table><tr><th>feature</th><th>class</th><th>reference</th>"
                    "<th>this run</th><th>change %</th><th>shift [sd]</th><th>z</th>"
                    "<th>score</th><th>at cell</th><th>window</th><th>meaning</th></tr>"
                    + trs + "</table>")
    return body
