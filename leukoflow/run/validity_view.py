"""Text of the live view's validity lines (drift, QC, verdict on the differential); no
heavy imports, so the live view stays light."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def live_lines(state: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Lines (text, rich style) for the live view: validity, drift, QC."""
    out: list[tuple[str, str]] = []
    v = state.get("validity") or {}
    d = state.get("drift") or {}
    qc = state.get("qc") or {}
    if v and not v.get("valid", True):
        out.append(("DIFFERENTIAL NOT VALID: " + "; ".join(v.get("reasons", [])),
                    "bold white on red"))
    elif d.get("alarm"):
        out.append(("drift detected (flagged only, on_drift = warn)", "bold red"))
    if d.get("enabled"):
        if not d.get("alarm"):
            out.append((f"drift: none detected ({d.get('cells', 0)} cells, largest score "
                        f"{float(d.get('max_score') or 0.0):.2f} of 1)", "green"))
    elif d:
        out.append((f"drift: not monitored ({d.get('reason', '')})", "yellow"))
    if qc and qc.get("state") not in (None, "pass", "off", "unknown"):
        out.append((f"QC {qc.get('state')}: {qc.get('message', '')}", "bold yellow"))
    elif qc.get("state") == "pass":
        out.append((f"QC: {qc.get('message', 'passed')}", "green"))
    return out
