"""Generate the provisioned Grafana dashboards of leukoflow (``deploy/grafana/dashboards/``).

The JSON files are committed (Grafana's file provider reads them); this script is their
source, so that panel ids, grid positions, datasource references and variable filters stay
consistent. Edit here, then regenerate::

    python deploy/grafana/build_dashboards.py          # write the JSON files
    python deploy/grafana/build_dashboards.py --check  # exit 1 if a file is out of date

Conventions (checked by tests/test_deploy_grafana.py):

* stable ``uid`` per dashboard, no ``id`` (Grafana assigns it), ``schemaVersion`` set;
* every datasource reference is ``{"type": "prometheus", "uid": "prometheus"}`` (the uid
  fixed in ``provisioning/datasources/prometheus.yml``);
* variables ``instance`` and ``run_id`` come from ``leukoflow_service_info``; raw-metric
  panels filter by both (the run id is joined on ``instance`` from ``leukoflow_service_info``);
  panels on recording rules show the whole system;
* every metric name is a family of ``leukoflow.core.metrics.METRIC_NAMES``, a recording rule of
  ``deploy/prometheus/rules/recording.yml`` or a series Prometheus makes itself (``up``,
  ``scrape_duration_seconds``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
DS: dict[str, str] = {"type": "prometheus", "uid": "prometheus"}
SCHEMA_VERSION = 39
TAG = "leukoflow"

#: Label filter applied to every raw-metric selector.
INST = 'instance=~"$instance"'
#: Run filter: keep series whose instance reports the selected run id.
RUN = ' and on(instance) leukoflow_service_info{run_id=~"$run_id"}'


def sel(metric: str, extra: str = "") -> str:
    """Selector ``metric{instance=~"$instance", extra}``."""
    inner = INST + (", " + extra if extra else "")
    return f"{metric}{{{inner}}}"


def rate(metric: str, extra: str = "", window: str = "$__rate_interval") -> str:
    """``rate()`` of a counter restricted to the selected instances and run."""
    return f"(rate({sel(metric, extra)}[{window}]){RUN})"


def buckets(metric: str, by: str = "", window: str = "$__rate_interval") -> str:
    """Bucket rates of a histogram summed by ``le`` (and ``by``), filtered by instance/run."""
    labels = f"{by}, le" if by else "le"
    return f"sum by ({labels}) {rate(metric + '_bucket', window=window)}"


def quantile(q: float, metric: str, by: str = "") -> str:
    """``histogram_quantile`` of a histogram over the selected instances and run."""
    return f"histogram_quantile({q}, {buckets(metric, by)})"


def gauge(metric: str, extra: str = "") -> str:
    """A gauge restricted to the selected instances and run."""
    return f"({sel(metric, extra)}{RUN})"


def zero_if_absent(expr: str) -> str:
    """Read 0 instead of "no data" for families that only appear when something happens."""
    return f"{expr} or on() vector(0)"


def target(expr: str, legend: str = "", ref: str = "A", **extra: Any) -> dict[str, Any]:
    """One Prometheus query of a panel."""
    t: dict[str, Any] = {"datasource": DS, "refId": ref, "expr": expr, "range": True}
    if legend:
        t["legendFormat"] = legend
    if extra.get("instant"):
        t["range"] = False
    t.update(extra)
    return t


def _targets(queries: list[tuple[str, str]], **extra: Any) -> list[dict[str, Any]]:
    return [target(e, lg, chr(ord("A") + i), **extra) for i, (e, lg) in enumerate(queries)]


def timeseries(title: str, queries: list[tuple[str, str]], unit: str = "short",
               description: str = "", stack: bool = False, w: int = 12, h: int = 8,
               dashed: str = "", **field: Any) -> dict[str, Any]:
    """A time-series panel; series whose name matches the regex ``dashed`` are drawn dashed
    without fill (interval bounds)."""
    custom: dict[str, Any] = {"lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                              "spanNulls": True}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
        custom["fillOpacity"] = 60
    return {
        "type": "timeseries", "title": title, "description": description, "datasource": DS,
        "targets": _targets(queries),
        "fieldConfig": {"defaults": {"unit": unit, "custom": custom, **field},
                        "overrides": [] if not dashed else [{
                            "matcher": {"id": "byRegexp", "options": dashed},
                            "properties": [
                                {"id": "custom.lineStyle",
                                 "value": {"fill": "dash", "dash": [10, 10]}},
                                {"id": "custom.fillOpacity", "value": 0}]}]},
        "options": {"legend": {"displayMode": "table", "placement": "right",
                               "calcs": ["lastNotNull", "max"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "_w": w, "_h": h,
    }


def stat(title: str, queries: list[tuple[str, str]], unit: str = "short", description: str = "",
         w: int = 6, h: int = 5, thresholds: list[dict[str, Any]] | None = None,
         mappings: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A stat panel showing the last value."""
    steps = thresholds or [{"color": "green", "value": None}]
    return {
        "type": "stat", "title": title, "description": description, "datasource": DS,
        "targets": _targets(queries, instant=True),
        "fieldConfig": {"defaults": {"unit": unit, "mappings": mappings or [],
                                     "thresholds": {"mode": "absolute", "steps": steps}},
                        "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "auto",
                    "orientation": "auto", "justifyMode": "auto"},
        "_w": w, "_h": h,
    }


def heatmap(title: str, expr: str, unit: str = "s", description: str = "", w: int = 12,
            h: int = 8, repeat: str | None = None) -> dict[str, Any]:
    """A heatmap of pre-computed Prometheus histogram buckets (no Grafana-side bucketing)."""
    p: dict[str, Any] = {
        "type": "heatmap", "title": title, "description": description, "datasource": DS,
        "targets": [target(expr, "{{le}}", format="heatmap")],
        "options": {"calculate": False, "cellGap": 1, "yAxis": {"axisPlacement": "left",
                                                               "unit": unit},
                    "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64,
                              "exponent": 0.5, "fill": "dark-orange", "scale": "exponential"},
                    "rowsFrame": {"layout": "auto"}, "cellValues": {"unit": "short"},
                    "filterValues": {"le": 1e-9}, "legend": {"show": True},
                    "tooltip": {"mode": "single", "yHistogram": True, "showColorScale": True},
                    "exemplars": {"color": "rgba(255,0,255,0.7)"}},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "_w": w, "_h": h,
    }
    if repeat:
        p["repeat"] = repeat
        p["repeatDirection"] = "h"
        p["maxPerRow"] = 2
    return p


def distribution(title: str, metric: str, description: str = "", w: int = 12,
                 h: int = 8) -> dict[str, Any]:
    """Bar gauge of a histogram's bucket counts over the dashboard's time range."""
    expr = f"sum by (le) (increase({sel(metric + '_bucket')}[$__range]){RUN})"
    return {
        "type": "bargauge", "title": title, "description": description, "datasource": DS,
        "targets": [target(expr, "{{le}}", format="heatmap", instant=True)],
        "fieldConfig": {"defaults": {"unit": "short", "min": 0,
                                     "thresholds": {"mode": "absolute",
                                                    "steps": [{"color": "blue", "value": None}]}},
                        "overrides": []},
        "options": {"displayMode": "gradient", "orientation": "vertical", "showUnfilled": True,
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "valueMode": "color", "namePlacement": "auto", "sizing": "auto"},
        "_w": w, "_h": h,
    }


def table(title: str, queries: list[tuple[str, str]], description: str = "", w: int = 12,
          h: int = 8, rename: dict[str, str] | None = None, unit: str = "short",
          exclude: tuple[str, ...] = ("Time", "__name__", "job", "instance")) -> dict[str, Any]:
    """A table of instant queries merged on their labels."""
    return {
        "type": "table", "title": title, "description": description, "datasource": DS,
        "targets": _targets(queries, instant=True, format="table"),
        "transformations": [
            {"id": "merge", "options": {}},
            {"id": "organize", "options": {"excludeByName": {k: True for k in exclude},
                                           "renameByName": rename or {}}},
        ],
        "fieldConfig": {"defaults": {"unit": unit, "decimals": 1}, "overrides": []},
        "options": {"showHeader": True, "cellHeight": "sm"},
        "_w": w, "_h": h,
    }


def row(title: str) -> dict[str, Any]:
    """A (non-collapsible) row header."""
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "_w": 24, "_h": 1}


def variables(stage: bool = False) -> dict[str, Any]:
    """Template variables: instance, run id (and stage for per-stage heatmaps)."""

    def query_var(name: str, label: str, query: str, multi: bool = True) -> dict[str, Any]:
        return {
            "name": name, "label": label, "type": "query", "datasource": DS,
            "definition": query, "query": {"query": query, "refId": f"{name}-var"},
            "refresh": 2, "sort": 1, "includeAll": True, "multi": multi, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "options": [], "hide": 0, "regex": "",
        }

    lst = [
        query_var("instance", "Instance",
                  "label_values(leukoflow_service_info, instance)"),
        query_var("run_id", "Run id",
                  'label_values(leukoflow_service_info{instance=~"$instance"}, run_id)'),
    ]
    if stage:
        lst.append(query_var("stage", "Stage",
                             "label_values(leukoflow_stage_duration_seconds_bucket, stage)"))
    return {"list": lst}


def layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assign ids (1..n) and grid positions left to right, top to bottom (24 columns)."""
    x = y = row_h = 0
    out = []
    for pid, p in enumerate(panels, start=1):
        w, h = p.pop("_w"), p.pop("_h")
        if x + w > 24 or p["type"] == "row":
            x, y, row_h = 0, y + row_h, 0
        p["id"] = pid
        p["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
        x += w
        row_h = max(row_h, h)
        if p["type"] == "row":
            x, y, row_h = 0, y + h, 0
        out.append(p)
    return out


def dashboard(uid: str, title: str, description: str, panels: list[dict[str, Any]],
              stage: bool = False, refresh: str = "5s", span: str = "now-15m") -> dict[str, Any]:
    """A complete dashboard document (schema version :data:`SCHEMA_VERSION`, no ``id``)."""
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": [TAG],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": refresh,
        "time": {"from": span, "to": "now"},
        "timepicker": {"refresh_intervals": ["1s", "5s", "10s", "30s", "1m", "5m"]},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [{"type": "dashboards", "tags": [TAG], "asDropdown": True,
                   "title": "leukoflow", "includeVars": True, "keepTime": True,
                   "icon": "external link", "targetBlank": False, "tooltip": "",
                   "url": ""}],
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard",
        }]},
        "templating": variables(stage),
        "panels": layout(panels),
    }


# --------------------------------------------------------------------------- dashboards
PCT_RANGE = {"min": 0, "max": 100}


def live_differential() -> dict[str, Any]:
    """Counts and percentages per class with 95 % intervals, and run accounting."""
    cls = "{{class}}"
    return dashboard(
        "leukoflow-differential", "leukoflow / Live differential",
        "Four-part differential of the current run: counts, percentages with 95 % intervals "
        "(collector) and the sliding 5-minute differential (inference).",
        [
            row("Differential of the run (collector)"),
            table("Differential with 95 % intervals", [
                (gauge("leukoflow_differential_cells"), ""),
                (f"100 * {gauge('leukoflow_differential_ratio')}", ""),
                (f"100 * {gauge('leukoflow_differential_ratio_lower')}", ""),
                (f"100 * {gauge('leukoflow_differential_ratio_upper')}", ""),
            ], "Counted cells per class, percentage of counted leukocytes and its 95 % "
               "interval.", w=10,
               rename={"Value #A": "cells", "Value #B": "%", "Value #C": "95 % lower",
                       "Value #D": "95 % upper", "class": "class"}),
            stat("Counted cells per class", [(gauge("leukoflow_differential_cells"), cls)],
                 w=14, h=8),
            timeseries("Percentage per class with 95 % interval", [
                ("class:leukoflow_differential_ratio:percent", cls),
                ("class:leukoflow_differential_ratio_lower:percent", cls + " lower"),
                ("class:leukoflow_differential_ratio_upper:percent", cls + " upper"),
            ], unit="percent", description="Run differential (recording rules on the collector "
               "gauges); dashed: 95 % interval.", w=12, dashed=".* (lower|upper)$", **PCT_RANGE),
            timeseries("Sliding differential (last 5 min)", [
                ("class:leukoflow_cells_classified:percent_rate5m", cls),
            ], unit="percent", description="What the sample does now: share of counted cells "
               "per class over the last 5 min.", w=12, **PCT_RANGE),
            timeseries("Probabilistic differential (sum of calibrated probabilities)", [
                (gauge("leukoflow_differential_probabilistic_cells"), cls),
            ], description="Expected counts per class from calibrated probabilities; close to "
               "the counts when the model is calibrated.", w=12),
            timeseries("Run accounting by outcome", [
                (f"sum by (outcome) ({gauge('leukoflow_run_cells_total')})", "{{outcome}}"),
            ], description="Every cell emitted by acquisition ends counted, rejected or dropped.",
               w=12),
            row("Validity: instrument drift and reference-bead QC"),
            stat("Differential valid", [(gauge("leukoflow_differential_valid"), "")],
                 description="0 once drift was detected: the run's differential is marked "
                 "not valid (runbook LeukoflowDriftDetected).", w=5,
                 thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}],
                 mappings=[{"type": "value", "options": {
                     "0": {"text": "NOT VALID"}, "1": {"text": "valid"}}}]),
            stat("Drift", [(gauge("leukoflow_drift_alarm"), ""),
                           (gauge("leukoflow_drift_enabled"), "monitored")],
                 description="Drift alarm of the run (1 = detected) and whether the run is "
                 "monitored at all.", w=5,
                 thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 1}]),
            stat("QC state", [(gauge("leukoflow_qc_status"), "")],
                 description="1 passed, 0 off, -1 no QC, -2 out of date, -3 failed.", w=5,
                 thresholds=[{"color": "orange", "value": None}, {"color": "green", "value": 0}],
                 mappings=[{"type": "value", "options": {
                     "1": {"text": "passed"}, "0": {"text": "off"}, "-1": {"text": "none"},
                     "-2": {"text": "expired"}, "-3": {"text": "failed"}}}]),
            stat("Magnification (QC)", [(gauge("leukoflow_qc_magnification"), "")],
                 description="Magnification relative to nominal measured by the QC whose "
                 "scale the acquisition uses.", w=9),
            timeseries("Drift test statistic per feature (>= 1: drift)", [
                (gauge("leukoflow_drift_score"), "{{feature}} {{group}}"),
                (gauge("leukoflow_drift_max_score"), "largest"),
            ], description="Each test's z statistic over its alarm threshold at the last "
               "checkpoint (alpha spent over the run, Bonferroni over the tests).", w=24),
            row("Decisions"),
            stat("Cells by decision (run)", [
                (f"sum by (decision) ({gauge('leukoflow_decisions_total')})", "{{decision}}"),
            ], w=12),
            stat("Dropped cells (run)", [
                (zero_if_absent(f"sum({gauge('leukoflow_dropped_total')})"), "dropped"),
            ], w=12, thresholds=[{"color": "green", "value": None},
                                 {"color": "red", "value": 1}]),
        ],
    )


def decisions_and_drops() -> dict[str, Any]:
    """Decision rates and fractions, drops and rejections by reason."""
    return dashboard(
        "leukoflow-decisions", "leukoflow / Decisions and drops",
        "Per-cell decisions (counted / uncertain / OOD), routing to the explainer, and every "
        "place a cell or message can be lost, by reason.",
        [
            timeseries("Decisions per second", [
                (f"sum by (decision) {rate('leukoflow_decisions_total')}", "{{decision}}"),
                ("decision:leukoflow_decisions:rate1m", "all instances {{decision}}"),
            ], unit="cps"),
            timeseries("Decision fractions (5 min)", [
                ("decision:leukoflow_decisions:ratio_rate5m", "{{decision}}"),
            ], unit="percentunit", description="Alerts: OOD > 30 %, uncertain > 20 %.",
               min=0, max=1),
            timeseries("Drops per second by stage and reason", [
                (zero_if_absent(f"sum by (stage, reason) {rate('leukoflow_dropped_total')}"),
                 "{{stage}} {{reason}}"),
                ("stage_reason:leukoflow_dropped:rate1m", "all instances {{stage}} {{reason}}"),
            ], unit="cps"),
            timeseries("Cells lost and in flight (completeness per source)", [
                (zero_if_absent(f"sum by (stage, reason) ({gauge('leukoflow_run_cells_lost')})"),
                 "lost {{stage}} {{reason}}"),
                (f"sum({gauge('leukoflow_run_cells_in_flight')})", "in flight"),
            ], unit="short", description="Cells of crop messages that never came back, by "
               "stage and reason (alert LeukoflowCellsLost), and cells published but not yet "
               "resolved. A late arrival takes its cells off the lost count."),
            timeseries("Cells routed to the explainer", [
                (zero_if_absent(f"sum by (reason) {rate('leukoflow_explainer_routed_total')}"),
                 "{{reason}}"),
                ("reason:leukoflow_explainer_routed:rate1m", "all instances {{reason}}"),
            ], unit="cps"),
            timeseries("Wire messages rejected and sequence gaps", [
                (zero_if_absent(
                    f"sum by (reason) {rate('leukoflow_messages_rejected_total')}"),
                 "rejected {{reason}}"),
                ("reason:leukoflow_messages_rejected:rate1m", "all instances {{reason}}"),
                (f"sum by (job) {rate('leukoflow_sequence_gaps_total')}", "gaps {{job}}"),
            ], unit="short", description="Per second. Rejections usually mean a protocol "
               "version mismatch; gaps mean lost messages."),
            timeseries("Rejected frames, cells and failed inference requests", [
                (zero_if_absent(f"sum by (reason) {rate('leukoflow_frames_rejected_total')}"),
                 "frames {{reason}}"),
                (zero_if_absent(f"sum by (reason) {rate('leukoflow_cells_rejected_total')}"),
                 "cells {{reason}}"),
                (zero_if_absent(
                    f"sum by (reason) {rate('leukoflow_inference_request_failure_total')}"),
                 "inference {{reason}}"),
            ], unit="short", description="Per second, by reason (quality gates, decode errors)."),
        ],
    )


def throughput_and_latency() -> dict[str, Any]:
    """Rates per stage, latency quantiles and heatmaps per stage."""
    return dashboard(
        "leukoflow-throughput", "leukoflow / Throughput and latency",
        "Frames and cells per second through each stage; latency quantiles and heatmaps from "
        "the services' histograms (sub-millisecond buckets).",
        [
            timeseries("Throughput per stage", [
                ("leukoflow:frames:rate1m", "frames/s"),
                ("leukoflow:cells_detected:rate1m", "objects detected/s"),
                ("leukoflow:cells_emitted:rate1m", "cells emitted/s"),
                ("leukoflow:inference_count:rate1m", "cells inferred/s"),
                ("leukoflow:cells_classified:rate1m", "cells counted/s"),
                ("leukoflow:dropped:rate1m", "cells dropped/s"),
            ], unit="short"),
            timeseries("Keeping up with the camera", [
                (f"max by (instance) {gauge('leukoflow_frame_rate_nominal_hertz')}",
                 "nominal frames/s {{instance}}"),
                (f"max by (instance) {gauge('leukoflow_frame_rate_achieved_hertz')}",
                 "achieved frames/s {{instance}}"),
                (zero_if_absent(f"sum by (instance, reason) "
                                f"{rate('leukoflow_frames_dropped_total')}"),
                 "dropped/s {{reason}} {{instance}}"),
                (zero_if_absent(f"sum by (instance) {rate('leukoflow_frames_skipped_total')}"),
                 "skipped empty/s {{instance}}"),
            ], unit="short", description="Frames the camera delivers (nominal, 0 in unpaced "
               "runs) and the acquisition takes (achieved, 5 s window; alert below 95 % after "
               "the warm-up), frames dropped before processing, empty frames not "
               "reconstructed."),
            timeseries("Camera backlog, warm-up and losses", [
                (f"max by (instance) {gauge('leukoflow_frame_backlog')}",
                 "backlog [frames] {{instance}}"),
                (f"max by (instance) {gauge('leukoflow_cells_in_dropped_frames')}",
                 "cells in dropped frames (est.) {{instance}}"),
                (f"max by (instance) {gauge('leukoflow_warming_up')}",
                 "warming up {{instance}}"),
                (zero_if_absent(f"sum by (instance, outcome) (increase("
                                f"{sel('leukoflow_prescreen_audits_total')}[1h]){RUN})"),
                 "prescreen audits (1 h) {{outcome}} {{instance}}"),
            ], unit="short", description="Frames waiting in the camera's ring buffer, the "
               "estimated cells lost with dropped frames, the warm-up flag, and the audits "
               "of the empty-frame prescreen (missed: an object in a skipped frame)."),
            timeseries("Counted cells per second per class", [
                ("class:leukoflow_cells_classified:rate1m", "{{class}}"),
            ], unit="cps", stack=True),
            timeseries("Inference throughput per worker", [
                ("instance:leukoflow_inference_count:rate1m", "{{instance}}"),
                (f"sum by (instance) {rate('leukoflow_inference_request_success_total')}",
                 "messages/s {{instance}}"),
            ], unit="short"),
            timeseries("Run accounting rates", [
                ("outcome:leukoflow_run_cells:rate1m", "{{outcome}}"),
            ], unit="cps"),
            timeseries("Stage latency p50 / p99", [
                ("stage:leukoflow_stage_duration_seconds:p50_1m", "p50 {{stage}}"),
                ("stage:leukoflow_stage_duration_seconds:p99_1m", "p99 {{stage}}"),
            ], unit="s"),
            timeseries("Acquisition-to-result latency", [
                ("leukoflow:e2e_latency_seconds:p50_1m", "p50"),
                ("leukoflow:e2e_latency_seconds:p99_1m", "p99"),
                ("leukoflow:e2e_latency_seconds:p99_5m", "p99 (5 min, alert > 1 s)"),
                (quantile(0.99, "leukoflow_e2e_latency_seconds", "instance"),
                 "p99 {{instance}}"),
            ], unit="s"),
            timeseries("Inference timings", [
                ("leukoflow:inference_queue_duration_seconds:p99_1m", "queue p99"),
                ("leukoflow:inference_compute_infer_duration_seconds:p50_1m", "compute p50"),
                ("leukoflow:inference_compute_infer_duration_seconds:p99_1m", "compute p99"),
                ("leukoflow:inference_request_duration_seconds:p99_1m", "request p99"),
            ], unit="s", w=24),
            heatmap("Acquisition-to-result latency", buckets("leukoflow_e2e_latency_seconds")),
            heatmap("Inference queue time per cell",
                    buckets("leukoflow_inference_queue_duration_seconds")),
            heatmap("Model execution time per batch",
                    buckets("leukoflow_inference_compute_infer_duration_seconds")),
            heatmap("Inference receive-to-send time per batch",
                    buckets("leukoflow_inference_request_duration_seconds")),
            row("Stages"),
            heatmap("Stage $stage", "sum by (le) (rate(" + sel(
                "leukoflow_stage_duration_seconds_bucket", 'stage=~"$stage"')
                + "[$__rate_interval])" + RUN + ")", repeat="stage"),
        ],
        stage=True,
    )


def queues_and_batching() -> dict[str, Any]:
    """Queue depths, pending cells, batch sizes."""
    return dashboard(
        "leukoflow-queues", "leukoflow / Queues and batching",
        "Queue depths per service, cells waiting for a batch and the batch sizes the dynamic "
        "batcher runs (average = cells per second / batches per second).",
        [
            timeseries("Queue depth", [
                (f"max by (job, queue) {gauge('leukoflow_queue_depth')}", "{{job}} {{queue}}"),
            ]),
            timeseries("Cells waiting for a batch", [
                (f"sum by (instance) {gauge('leukoflow_inference_pending_requests')}",
                 "{{instance}}"),
            ]),
            timeseries("Average batch size", [
                ("instance:leukoflow_inference_batch_size:avg_rate1m", "{{instance}}"),
                ("leukoflow:inference_batch_size:avg_rate1m", "all workers"),
            ], unit="short", description="rate(inference_count) / rate(inference_exec_count)."),
            timeseries("Batches per second", [
                (f"sum by (instance) {rate('leukoflow_inference_exec_count_total')}",
                 "{{instance}}"),
            ], unit="short"),
            heatmap("Batch size distribution", buckets("leukoflow_batch_size"), unit="short"),
            timeseries("Batch size p50 / p99", [
                (quantile(0.5, "leukoflow_batch_size"), "p50"),
                (quantile(0.99, "leukoflow_batch_size"), "p99"),
            ]),
            timeseries("Open tracks", [
                (f"sum by (instance) {gauge('leukoflow_tracks_active')}", "{{instance}}"),
            ]),
            timeseries("Explainer backlog", [
                (f"sum by (instance) {gauge('leukoflow_explainer_backlog')}", "{{instance}}"),
            ]),
            *triton_row(),
        ],
    )


#: Selector of the Triton inference tier's own metrics (job ``triton`` in prometheus.yml).
TRITON = 'job="triton"'


def triton_rate(metric: str) -> str:
    """Per-model rate of a Triton counter."""
    return f"sum by (model) (rate({metric}{{{TRITON}}}[$__rate_interval]))"


def triton_row() -> list[dict[str, Any]]:
    """The shared Triton tier: requests per model, queue and compute time, batch sizes.

    Triton's metrics carry no leukoflow run id or instance variable: they describe the tier
    all instruments share, per served model.
    """
    ok = triton_rate("nv_inference_request_success")
    return [
        row("Triton inference tier"),
        timeseries("Triton requests per model", [
            (ok, "{{model}}"),
            (zero_if_absent("sum by (model, reason) (rate(nv_inference_request_failure{"
                            f"{TRITON}}}[$__rate_interval]))"), "failed {{model}} {{reason}}"),
        ], unit="reqps", description="Requests answered per second (all workers) and "
           "failed requests by reason (alert LeukoflowTritonRequestFailures)."),
        timeseries("Triton queue and compute time per request", [
            (f"{triton_rate('nv_inference_queue_duration_us')} / {ok} / 1e6", "queue {{model}}"),
            (f"{triton_rate('nv_inference_compute_infer_duration_us')} / {ok} / 1e6",
             "compute {{model}}"),
            (f"({triton_rate('nv_inference_compute_input_duration_us')} + "
             f"{triton_rate('nv_inference_compute_output_duration_us')}) / {ok} / 1e6",
             "input+output {{model}}"),
        ], unit="s", description="Mean time a request waited in Triton's dynamic-batching "
           "queue and the mean compute time of the execution it was part of."),
        timeseries("Triton cells per execution", [
            (f"{triton_rate('nv_inference_count')} / {triton_rate('nv_inference_exec_count')}",
             "{{model}}"),
        ], description="Batch size Triton executed: requests of all workers merged by its "
           "dynamic batcher (preferred size = the workers' max_batch)."),
        timeseries("Triton pending requests and utilization", [
            (f"sum by (model) (nv_inference_pending_request_count{{{TRITON}}})",
             "pending {{model}}"),
            (f"avg by (instance) (nv_cpu_utilization{{{TRITON}}})", "CPU {{instance}}"),
            (zero_if_absent(f"avg by (instance) (nv_gpu_utilization{{{TRITON}}})"),
             "GPU {{instance}}"),
        ], description="Requests waiting in Triton; CPU and GPU utilization (0-1) of its "
           "host."),
    ]


def confidence_and_ood() -> dict[str, Any]:
    """Distributions of calibrated confidence and OOD scores."""
    return dashboard(
        "leukoflow-confidence", "leukoflow / Confidence and OOD scores",
        "Distributions of the max calibrated probability and of the OOD score (shifted so "
        "the detector's threshold is 0: positive = out of distribution).",
        [
            distribution("Confidence distribution (time range)", "leukoflow_confidence"),
            distribution("OOD score distribution (time range)", "leukoflow_ood_score"),
            heatmap("Confidence over time", buckets("leukoflow_confidence"), unit="percentunit"),
            heatmap("OOD score over time", buckets("leukoflow_ood_score"), unit="short"),
            timeseries("Confidence quantiles", [
                (quantile(0.05, "leukoflow_confidence"), "p5"),
                (quantile(0.5, "leukoflow_confidence"), "p50"),
                (f"sum {rate('leukoflow_confidence_sum')} / sum "
                 f"{rate('leukoflow_confidence_count')}", "mean"),
            ], unit="percentunit", min=0, max=1),
            timeseries("OOD score quantiles", [
                (quantile(0.05, "leukoflow_ood_score"), "p5"),
                (quantile(0.5, "leukoflow_ood_score"), "p50"),
                (quantile(0.95, "leukoflow_ood_score"), "p95"),
            ], unit="short", description="Score minus threshold; above 0 = OOD. (No mean: "
               "the histogram has negative buckets, so prometheus_client exports no _sum.)"),
            table("Loaded model", [(gauge("leukoflow_model_info"), "")], w=24, h=5,
                  exclude=("Time", "__name__", "job", "Value", "run_id", "service", "version")),
        ],
        span="now-30m",
    )


def explainer() -> dict[str, Any]:
    """Explainer backlog, latency and output."""
    explain_drops = rate("leukoflow_dropped_total", 'job="leukoflow-explain"')
    return dashboard(
        "leukoflow-explainer", "leukoflow / Explainer",
        "The asynchronous explainer: backlog of flagged cells, flag-to-artifact latency, "
        "compute time per method and explanations written.",
        [
            timeseries("Backlog", [
                (f"sum by (instance) {gauge('leukoflow_explainer_backlog')}", "{{instance}}"),
                ("leukoflow:explainer_backlog:deriv5m", "growth (cells/s, 5 min)"),
            ], description="Alert when above 50 and growing for 5 min."),
            timeseries("Flag-to-artifact latency", [
                ("leukoflow:explainer_latency_seconds:p50_1m", "p50"),
                ("leukoflow:explainer_latency_seconds:p99_1m", "p99"),
            ], unit="s"),
            heatmap("Flag-to-artifact latency", buckets("leukoflow_explainer_latency_seconds")),
            timeseries("Compute time per method (p50)", [
                (quantile(0.5, "leukoflow_explainer_duration_seconds", "method"), "{{method}}"),
            ], unit="s"),
            timeseries("Explanations per second", [
                ("method:leukoflow_explanations:rate1m", "{{method}}"),
                (zero_if_absent(f"sum by (method) {rate('leukoflow_explanations_total')}"),
                 "{{instance}} {{method}}"),
            ], unit="short"),
            timeseries("Cells routed to the explainer", [
                ("reason:leukoflow_explainer_routed:rate1m", "{{reason}}"),
                (zero_if_absent(f"sum by (stage, reason) {explain_drops}"), "dropped {{reason}}"),
            ], unit="cps"),
        ],
    )


def process_health() -> dict[str, Any]:
    """Up, ready, versions, restarts, camera, scrape health."""
    up_map = [{"type": "value", "options": {"0": {"text": "DOWN", "color": "red"},
                                            "1": {"text": "UP", "color": "green"}}}]
    return dashboard(
        "leukoflow-health", "leukoflow / Process health",
        "Is every service up and ready, which versions and run ids they report, supervised "
        "restarts, camera health and scrape health.",
        [
            stat("Up", [(f'up{{job=~"leukoflow-.+", {INST}}}', "{{job}}")], w=12,
                 mappings=up_map, thresholds=[{"color": "red", "value": None},
                                              {"color": "green", "value": 1}]),
            stat("Ready", [(gauge("leukoflow_ready"), "{{job}}")], w=12, mappings=up_map,
                 thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}]),
            table("Services", [(gauge("leukoflow_service_info"), "")], w=24, h=6,
                  exclude=("Time", "__name__", "Value")),
            timeseries("Supervised child restarts (1 h)", [
                (zero_if_absent(
                    f"sum by (child) (increase({sel('leukoflow_child_restarts_total')}[1h]){RUN})"),
                 "{{child}}"),
            ]),
            timeseries("Camera", [
                (f"max by (instance) {gauge('leukoflow_camera_frame_age_seconds')}",
                 "frame age {{instance}}"),
                (f"sum by (instance) {rate('leukoflow_camera_stalls_total')}",
                 "stalls/s {{instance}}"),
                (f"sum by (instance) {rate('leukoflow_frames_total')}", "frames/s {{instance}}"),
            ], unit="short", description="Frame age [s] (alert > 2 s), stalls and frame rate."),
            timeseries("Recorder events written per second", [
                (f"sum by (instance) {rate('leukoflow_recorder_events_total')}", "{{instance}}"),
            ], unit="short"),
            timeseries("Scrape duration", [
                (f'scrape_duration_seconds{{job=~"leukoflow-.+", {INST}}}', "{{job}}"),
            ], unit="s", description="Time Prometheus needs to read /metrics."),
        ],
        refresh="10s",
    )


DASHBOARDS = {
    "live-differential.json": live_differential,
    "decisions-and-drops.json": decisions_and_drops,
    "throughput-and-latency.json": throughput_and_latency,
    "queues-and-batching.json": queues_and_batching,
    "confidence-and-ood.json": confidence_and_ood,
    "explainer.json": explainer,
    "process-health.json": process_health,
}


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {name: json.dumps(fn(), indent=2, ensure_ascii=False) + "\n"
            for name, fn in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check`` verify) the dashboard files; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--check", action="store_true", help="fail if a file differs")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    args = ap.parse_args(argv)
    stale = []
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        path = args.out / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print("out of date (run deploy/grafana/build_dashboards.py):", ", ".join(stale),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
