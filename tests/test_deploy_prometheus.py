"""Prometheus configuration and rules of deploy/: promtool checks, rule unit tests, runbooks,
metric names and the scrape targets of the port contract.

promtool comes from Debian's ``prometheus`` package (deploy/ci/install-system-deps.sh); the
promtool tests fail when ``CI=true`` and it is missing, and skip on a developer machine.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import sysdeps
import yaml

from leukoflow.core.transport import DEFAULT_METRICS_PORTS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
DEFAULT_PORTS = DEFAULT_METRICS_PORTS  # docs/CONTRACTS.md: acquire 9101 ... collector 9104


def _load_mq():
    spec = importlib.util.spec_from_file_location(
        "monitoring_queries", DEPLOY / "tools" / "monitoring_queries.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mq = _load_mq()


def promtool() -> str:
    """Path of promtool; NOT RUN locally without it, a failure under CI (tests/sysdeps.py)."""
    return sysdeps.binary("promtool", package="prometheus")


def run_promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_promtool_check_config() -> None:
    res = run_promtool("check", "config", "prometheus.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr


def test_promtool_check_rules() -> None:
    res = run_promtool("check", "rules", "rules/recording.yml", "rules/alerts.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    files = sorted(p.name for p in (PROM / "tests").glob("*.yml"))
    assert {"alerts_test.yml", "recording_test.yml"} <= set(files)
    res = run_promtool("test", "rules", *files, cwd=PROM / "tests")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "FAILED" not in res.stdout + res.stderr


@pytest.mark.parametrize(("alert", "pattern", "replacement"), [
    # threshold changed: the firing case must break
    ("LeukoflowOODRateHigh", r"> 0\.30\n", "> 0.50\n"),
    # end-of-run guard removed: the silent case must break
    ("LeukoflowThroughputDrop", r"and on\(\) leukoflow:frames:rate1m > 0", ""),
])
def test_rule_unit_tests_catch_a_changed_alert(tmp_path: Path, alert: str, pattern: str,
                                               replacement: str) -> None:
    """The unit tests are not vacuous: a changed threshold or a removed guard fails them."""
    promtool()
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    shutil.copy(PROM / "rules" / "recording.yml", tmp_path / "rules")
    text = (PROM / "rules" / "alerts.yml").read_text()
    changed, n = re.subn(pattern, replacement, text, count=1)
    assert n == 1
    (tmp_path / "rules" / "alerts.yml").write_text(changed)
    # only the test cases of this alert (keeps promtool quick)
    doc = yaml.safe_load((PROM / "tests" / "alerts_test.yml").read_text())
    doc["tests"] = [t for t in doc["tests"]
                    if any(a["alertname"] == alert for a in t.get("alert_rule_test", []))]
    assert doc["tests"]
    (tmp_path / "tests" / "alerts_test.yml").write_text(yaml.safe_dump(doc))
    ok = run_promtool("test", "rules", "alerts_test.yml", cwd=tmp_path / "tests")
    assert "FAILED" in ok.stdout + ok.stderr and ok.returncode != 0
    # and the unchanged rules pass the same cases (the failure is the change's)
    (tmp_path / "rules" / "alerts.yml").write_text(text)
    res = run_promtool("test", "rules", "alerts_test.yml", cwd=tmp_path / "tests")
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_has_severity_summary_and_a_runbook_section() -> None:
    readme = (DEPLOY / "README.md").read_text()
    headings = set(re.findall(r"^### (\w+)\s*$", readme, re.M))
    alerts = mq.alert_rules()
    assert len(alerts) >= 10
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        ann = rule["annotations"]
        assert ann.get("summary") and ann.get("description"), name
        assert ann.get("runbook") == f"deploy/README.md#{name.lower()}", name
        assert name in headings, f"no '### {name}' runbook section in deploy/README.md"


def test_required_alerts_exist() -> None:
    required = {
        "LeukoflowServiceDown", "LeukoflowThroughputDrop", "LeukoflowOODRateHigh",
        "LeukoflowUncertainRateHigh", "LeukoflowExplainerBacklogGrowing",
        "LeukoflowCellsDropped", "LeukoflowCameraStalled", "LeukoflowLatencyHigh",
    }
    assert required <= set(mq.alert_rules())


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    doc = yaml.safe_load((PROM / "tests" / "alerts_test.yml").read_text())
    fires: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        for t in case.get("alert_rule_test", []):
            (fires if t.get("exp_alerts") else silent).add(t["alertname"])
    alerts = set(mq.alert_rules())
    assert alerts <= fires, f"never shown to fire: {sorted(alerts - fires)}"
    assert alerts <= silent, f"never shown to stay silent: {sorted(alerts - silent)}"


def test_rule_expressions_use_known_metric_names() -> None:
    exposed = mq.exposed_names()
    recorded = set(mq.recording_rules())
    rules = list(mq.recording_rules().items())
    rules += [(n, r["expr"]) for n, r in mq.alert_rules().items()]
    for name, expr in rules:
        bad = mq.unknown_names(mq.metric_names(expr), exposed, recorded)
        assert not bad, f"{name}: unknown metric names {sorted(bad)}"


def test_recording_rule_names_follow_convention_and_are_used() -> None:
    used_text = "\n".join(e for _d, _t, e in mq.all_queries())
    used_text += "\n".join(r["expr"] for r in mq.alert_rules().values())
    used_text += "\n".join(mq.recording_rules().values())
    for name in mq.recording_rules():
        assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", name), name
        assert re.search(re.escape(name) + r"(?![\w:])", used_text), f"{name} unused"


def test_scrape_targets_match_the_port_contract() -> None:
    assert DEFAULT_PORTS == {"acquire": 9101, "infer": 9102, "explain": 9103, "collector": 9104}
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    for service, port in DEFAULT_PORTS.items():
        job = jobs[f"leukoflow-{service}"]
        targets = [t for sc in job["static_configs"] for t in sc["targets"]]
        assert targets == [f"127.0.0.1:{port}"]
        assert job.get("metrics_path", "/metrics") == "/metrics"
        # no target label that would clash with the services' own labels
        assert all("labels" not in sc for sc in job["static_configs"])
    for rf in cfg["rule_files"]:
        assert (PROM / rf).is_file(), rf
