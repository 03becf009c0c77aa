"""Read the PromQL that leukoflow's dashboards and rules use, and check its metric names.

Used by the deploy tests and usable by hand::

    python deploy/tools/monitoring_queries.py            # list every query, exit 1 on an
                                                         # unknown metric name
    python deploy/tools/monitoring_queries.py --prometheus http://127.0.0.1:9090
                                                         # also run each query there

Only the standard library plus PyYAML (already a dev dependency) is needed.
"""

from __future__ import annotations

import argparse
import json
import re
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

DEPLOY = Path(__file__).resolve().parents[1]
DASHBOARD_DIR = DEPLOY / "grafana" / "dashboards"
RULES_DIR = DEPLOY / "prometheus" / "rules"

#: Series that Prometheus creates itself for every target (not exported by leukoflow).
PROMETHEUS_SERIES = frozenset({
    "up", "scrape_duration_seconds", "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling", "scrape_series_added",
})
#: Series of Triton Inference Server's own /metrics endpoint (the inference tier, job
#: ``triton``), as Triton 2.51 exposes them; tests/test_infer_triton.py checks the CPU ones
#: against a real server. Durations are cumulative counters in microseconds.
TRITON_SERIES = frozenset({
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
    "nv_inference_exec_count", "nv_inference_pending_request_count",
    "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us", "nv_cpu_utilization",
    "nv_cpu_memory_used_bytes",
})
#: Triton series that exist only on GPU hosts.
TRITON_GPU_SERIES = frozenset({"nv_gpu_utilization", "nv_gpu_memory_used_bytes",
                               "nv_gpu_memory_total_bytes"})
#: PromQL words that look like identifiers but are not metric names.
KEYWORDS = frozenset({
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan", "atan2",
})
#: Substitutions for Grafana's built-in and leukoflow's template variables (regex ".*" for
#: "All"), used to turn a panel query into plain PromQL.
DEFAULT_VARIABLES: dict[str, str] = {
    "__rate_interval": "1m", "__interval": "15s", "__range": "5m",
    "instance": ".*", "run_id": ".*", "stage": ".*",
}


def load_dashboards(folder: Path = DASHBOARD_DIR) -> dict[str, dict[str, Any]]:
    """File name -> parsed dashboard JSON of every ``*.json`` in ``folder``."""
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including panels nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def panel_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(panel title, expr)`` for every Prometheus target of every panel."""
    out = []
    for panel in iter_panels(dashboard):
        for t in panel.get("targets", []):
            if t.get("expr"):
                out.append((panel.get("title", ""), t["expr"]))
    return out


def variable_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(variable name, query)`` of every query variable."""
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var.get("query")
            out.append((var["name"], q.get("query", "") if isinstance(q, dict) else q or ""))
    return out


def substitute(expr: str, values: Mapping[str, str] | None = None) -> str:
    """Replace ``$var`` and ``${var}`` by ``values`` (default :data:`DEFAULT_VARIABLES`)."""
    values = dict(DEFAULT_VARIABLES if values is None else values)

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"no value for template variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


def load_rules(path: Path) -> list[dict[str, Any]]:
    """All rules (recording and alerting) of a Prometheus rule file."""
    import yaml

    doc = yaml.safe_load(path.read_text())
    return [r for g in doc.get("groups", []) for r in g.get("rules", [])]


def recording_rules(path: Path = RULES_DIR / "recording.yml") -> dict[str, str]:
    """Recorded series name -> expression."""
    return {r["record"]: r["expr"] for r in load_rules(path) if "record" in r}


def alert_rules(path: Path = RULES_DIR / "alerts.yml") -> dict[str, dict[str, Any]]:
    """Alert name -> rule."""
    return {r["alert"]: r for r in load_rules(path) if "alert" in r}


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (best effort, no full parser).

    Strings, label matchers, range/subquery brackets and grouping clauses are removed;
    an identifier followed by ``(`` is a function or aggregation; the rest are metric names.
    ``label_values(metric, label)`` (a Grafana variable query) yields ``metric``.
    """
    m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", expr, re.S)
    if m:
        expr = m.group(1)
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"'(?:[^'\\]|\\.)*'", "''", s)
    s = re.sub(r"#[^\n]*", "", s)
    s = re.sub(r"\{[^}]*\}", "", s)
    s = re.sub(r"\[[^\]]*\]", "", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    names = set()
    for tok in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        start = tok.start()
        if start and (s[start - 1].isdigit() or s[start - 1] == "."):
            continue  # exponent of a number such as 1e-9
        if s[tok.end():].lstrip().startswith("("):
            continue  # function or aggregation
        if tok.group(0).lower() in KEYWORDS:
            continue
        names.add(tok.group(0))
    return names


def exposed_names(families: Mapping[str, Any] | None = None) -> set[str]:
    """Series names the services really expose for ``families`` (default ``METRIC_NAMES``).

    Each family is created with :func:`leukoflow.core.metrics.make_metric` in a scratch registry
    and rendered, so that client-library details are honoured exactly: counters end in
    ``_total``; histograms give ``_bucket``/``_count`` and ``_sum`` only when no bucket is
    negative. ``*_created`` series are left out (dashboards must not depend on them).
    """
    import prometheus_client as pc

    from leukoflow.core.metrics import METRIC_NAMES, make_metric

    families = METRIC_NAMES if families is None else families
    names: set[str] = set()
    for name, (_kind, _help, labels, _service) in families.items():
        reg = pc.CollectorRegistry()
        metric = make_metric(reg, name)
        if labels:
            metric.labels(*(["x"] * len(labels)))
        text = pc.generate_latest(reg).decode()
        names |= {line.split("{")[0].split()[0] for line in text.splitlines()
                  if line and not line.startswith("#")}
    return {n for n in names if not n.endswith("_created")}


def unknown_names(names: set[str], exposed: set[str], recorded: set[str]) -> set[str]:
    """Names that are neither exposed by a leukoflow service (:func:`exposed_names`), a
    recording rule, a series Prometheus creates itself, nor a Triton series."""
    return {n for n in names if n not in exposed and n not in recorded
            and n not in PROMETHEUS_SERIES and n not in TRITON_SERIES
            and n not in TRITON_GPU_SERIES}


def all_queries(folder: Path = DASHBOARD_DIR) -> list[tuple[str, str, str]]:
    """``(dashboard file, panel title, expr)`` for every panel query of every dashboard."""
    return [(name, title, expr) for name, d in load_dashboards(folder).items()
            for title, expr in panel_queries(d)]


def query(base_url: str, expr: str, timeout: float = 5.0) -> dict[str, Any]:
    """Run an instant query through Prometheus' HTTP API; returns the ``data`` object."""
    url = base_url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (http only)
        body = json.loads(resp.read())
    if body.get("status") != "success":
        raise RuntimeError(f"query failed: {expr!r}: {body}")
    return body["data"]


def main(argv: list[str] | None = None) -> int:
    """CLI: list queries, flag unknown metric names, optionally run them on Prometheus."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--prometheus", help="base URL of a Prometheus to run the queries on")
    args = ap.parse_args(argv)
    exposed = exposed_names()
    recorded = recording_rules()
    rc = 0
    exprs = [(f"{d} / {t}", substitute(e)) for d, t, e in all_queries()]
    exprs += [(f"recording rule {n}", n) for n in recorded]
    for where, expr in exprs:
        bad = unknown_names(metric_names(expr), exposed, set(recorded))
        status = "unknown: " + ", ".join(sorted(bad)) if bad else "ok"
        if args.prometheus and not bad:
            n = len(query(args.prometheus, expr)["result"])
            status = f"{n} series" if n else "NO DATA"
        rc |= bool(bad) or status == "NO DATA"
        print(f"{status:>12}  {where}: {expr}")
    return int(rc)


if __name__ == "__main__":
    raise SystemExit(main())
