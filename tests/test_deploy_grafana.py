"""Grafana provisioning and dashboards of deploy/: valid dashboard JSON, stable uids, unique
panel ids, datasource uid references, template variables, and PromQL that only uses metric
names the services export (or recording rules)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from leukoflow.core.metrics import METRIC_NAMES

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
GRAFANA = DEPLOY / "grafana"
EXPECTED_UIDS = {
    "leukoflow-differential", "leukoflow-decisions", "leukoflow-throughput",
    "leukoflow-queues", "leukoflow-confidence", "leukoflow-explainer", "leukoflow-health",
}
PANEL_TYPES = {"timeseries", "stat", "heatmap", "bargauge", "table", "row"}
BUILTIN_VARS = {"__rate_interval", "__interval", "__range", "__all"}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mq = _load("monitoring_queries", DEPLOY / "tools" / "monitoring_queries.py")
DASHBOARDS = mq.load_dashboards()


def _walk(node: Any, key: str) -> list[Any]:
    """Every value stored under ``key`` anywhere in a JSON tree."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                found.append(v)
            found.extend(_walk(v, key))
    elif isinstance(node, list):
        for v in node:
            found.extend(_walk(v, key))
    return found


def test_dashboard_files_are_generated_and_up_to_date(tmp_path: Path) -> None:
    builder = _load("build_dashboards", GRAFANA / "build_dashboards.py")
    assert builder.main(["--check"]) == 0, "run python deploy/grafana/build_dashboards.py"
    # and --check really compares: a stale file is reported
    assert builder.main(["--out", str(tmp_path)]) == 0
    (tmp_path / "explainer.json").write_text("{}")
    assert builder.main(["--check", "--out", str(tmp_path)]) == 1


def test_all_dashboards_present_with_stable_unique_uids() -> None:
    uids = [d.get("uid") for d in DASHBOARDS.values()]
    assert sorted(uids) == sorted(EXPECTED_UIDS)
    titles = [d["title"] for d in DASHBOARDS.values()]
    assert len(set(titles)) == len(titles)


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_is_valid_grafana_json(name: str) -> None:
    text = (GRAFANA / "dashboards" / name).read_text()
    d = json.loads(text)
    assert isinstance(d.get("schemaVersion"), int) and d["schemaVersion"] >= 36
    assert "id" not in d or d["id"] is None, "provisioned dashboards carry no id"
    assert re.fullmatch(r"[a-z0-9-]{1,40}", d["uid"])
    assert d["title"] and isinstance(d["panels"], list) and d["panels"]
    ids = [p["id"] for p in mq.iter_panels(d)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {name}"
    for p in mq.iter_panels(d):
        assert p["type"] in PANEL_TYPES, p["type"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
        if p["type"] != "row":
            assert p["title"] and p["targets"], p.get("title")
            assert all(t["refId"] for t in p["targets"])
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_every_datasource_reference_uses_the_provisioned_uid(name: str) -> None:
    d = DASHBOARDS[name]
    refs = _walk(d, "datasource")
    assert refs
    for ref in refs:
        if ref == {"type": "grafana", "uid": "-- Grafana --"}:
            continue  # Grafana's built-in annotation source
        assert ref == {"type": "prometheus", "uid": "prometheus"}, ref
    for p in mq.iter_panels(d):
        for t in p.get("targets", []):
            assert t.get("datasource") == {"type": "prometheus", "uid": "prometheus"}


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_template_variables_run_id_and_instance(name: str) -> None:
    d = DASHBOARDS[name]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert {"instance", "run_id"} <= set(variables)
    for var_name, query in mq.variable_queries(d):
        assert query.startswith("label_values("), query
        assert mq.metric_names(query) <= mq.exposed_names(), query
        assert variables[var_name]["datasource"]["uid"] == "prometheus"
    # every variable a query uses is defined (or built in)
    for _title, expr in mq.panel_queries(d):
        for used in re.findall(r"\$\{?(\w+)", expr):
            assert used in variables or used in BUILTIN_VARS, f"${used} undefined in {name}"


def test_raw_metric_panels_follow_the_run_and_instance_variables() -> None:
    recorded = set(mq.recording_rules())
    triton = mq.TRITON_SERIES | mq.TRITON_GPU_SERIES
    for name, title, expr in mq.all_queries():
        names = mq.metric_names(expr) - recorded - {"leukoflow_service_info"}
        if names & triton:  # the shared Triton tier: its own job, no run id or instance
            assert 'job="triton"' in expr, f"{name}/{title}: {expr}"
            names -= triton
        if names:
            assert 'instance=~"$instance"' in expr, f"{name}/{title}: {expr}"
        if names - mq.PROMETHEUS_SERIES:
            assert 'run_id=~"$run_id"' in expr, f"{name}/{title}: {expr}"


def test_every_promql_metric_name_exists() -> None:
    exposed = mq.exposed_names()
    recorded = set(mq.recording_rules())
    for name, title, expr in mq.all_queries():
        bad = mq.unknown_names(mq.metric_names(mq.substitute(expr)), exposed, recorded)
        assert not bad, f"{name} / {title}: unknown metric names {sorted(bad)}"


def test_metric_name_extraction() -> None:
    """The PromQL name scanner the checks above rely on."""
    expr = ('histogram_quantile(0.99, sum by (le, stage) (rate(a_bucket{stage=~"x|y", '
            'le!="1e-3"}[5m] offset 1m))) / ignoring(class) group_left b:c:d '
            'and on(instance) up{job=~"leukoflow-.+"} > 1e-9 or on() vector(0)')
    assert mq.metric_names(expr) == {"a_bucket", "b:c:d", "up"}
    assert mq.metric_names("label_values(leukoflow_service_info, run_id)") == {
        "leukoflow_service_info"}
    exposed = mq.exposed_names()
    assert "leukoflow_frames_total" in exposed and "leukoflow_batch_size_bucket" in exposed
    # the OOD-score histogram has negative buckets: prometheus_client exports no _sum
    assert "leukoflow_ood_score_count" in exposed and "leukoflow_ood_score_sum" not in exposed
    assert mq.unknown_names({"leukoflow_nope", "up"}, exposed, set()) == {"leukoflow_nope"}


def test_every_metric_family_is_on_a_dashboard() -> None:
    used = set()
    for _name, _title, expr in mq.all_queries():
        used |= mq.metric_names(expr)
    for rule in mq.recording_rules().values():
        used |= mq.metric_names(rule)
    families = set()
    for n in used:
        for suffix in ("_bucket", "_sum", "_count"):
            if n.endswith(suffix) and n[: -len(suffix)] in METRIC_NAMES:
                n = n[: -len(suffix)]
        families.add(n)
    assert set(METRIC_NAMES) <= families, sorted(set(METRIC_NAMES) - families)


def test_heatmaps_read_prometheus_buckets() -> None:
    n = 0
    for d in DASHBOARDS.values():
        for p in mq.iter_panels(d):
            if p["type"] != "heatmap":
                continue
            n += 1
            assert p["options"]["calculate"] is False
            for t in p["targets"]:
                assert t["format"] == "heatmap"
                assert re.search(r"sum by \((\w+, )?le\)", t["expr"])
                assert "_bucket" in t["expr"]
    assert n >= 8


def test_provisioning_files() -> None:
    ds_doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
                            .read_text())
    assert ds_doc["apiVersion"] == 1
    (ds,) = ds_doc["datasources"]
    assert ds["uid"] == "prometheus" and ds["type"] == "prometheus"
    assert ds["url"] == "http://127.0.0.1:9090"
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert ds["jsonData"]["timeInterval"] == prom["global"]["scrape_interval"]

    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "leukoflow.yml")
                          .read_text())
    assert prov["apiVersion"] == 1
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    env = compose["services"]["grafana"]["environment"]
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (GRAFANA / "dashboards" / Path(home).name).is_file()
    assert home.startswith(provider["options"]["path"] + "/")
