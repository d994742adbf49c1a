"""Alert rules, their promtool unit tests, the Grafana dashboard and its provisioning files."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from schemas import metrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERT_TESTS = PROMETHEUS / "alerts.test.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "sluice.json"
OPERATIONS = ROOT / "docs" / "operations.md"

_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_GROUPINGS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_RANGES = re.compile(r"\[[^\]]*\]")
_IDENTIFIER = re.compile(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Names of the series a PromQL expression selects (functions, labels, keywords left out)."""
    bare = _RANGES.sub("", _GROUPINGS.sub("", _MATCHERS.sub("", _STRINGS.sub('""', expr))))
    return {m.group() for m in _IDENTIFIER.finditer(bare)
            if not bare[m.end():].lstrip().startswith("(") and m.group().lower() not in _KEYWORDS}


def exported_series() -> set[str]:
    """Every series name schemas.metrics exports (counters end in _total, histograms in three)."""
    names = set()
    for collector in vars(metrics).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        family = collector.describe()[0]
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        names.update(family.name + s for s in suffixes.get(family.type, [""]))
    return names


def rule_groups() -> dict[str, list[dict]]:
    return {g["name"]: g["rules"] for g in yaml.safe_load(ALERTS.read_text())["groups"]}


def alerts() -> list[dict]:
    return [r for r in rule_groups()["sluice"] if "alert" in r]


def known_series() -> set[str]:
    recorded = {r["record"] for rules in rule_groups().values() for r in rules if "record" in r}
    return exported_series() | recorded | {"up"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    """Every panel that shows data (rows are containers), including panels inside rows."""
    panels = []
    for panel in dashboard()["panels"]:
        panels.extend(panel.get("panels", []) if panel["type"] == "row" else [panel])
    return panels


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel."""
    return [(p["title"], t["expr"]) for p in dashboard_panels() for t in p.get("targets", [])]


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is missing: `make system-deps` installs Debian's prometheus package")
    return subprocess.run([binary, *args], cwd=PROMETHEUS, capture_output=True, text=True,
                          timeout=60)


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


# --- alert rules ----------------------------------------------------------------------------

def test_promtool_check_rules():
    result = promtool("check", "rules", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_pass():
    result = promtool("test", "rules", ALERT_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_alerts_asked_for_are_there():
    names = {a["alert"] for a in alerts()}
    assert names >= {"SluiceHigh5xxRatio", "SluiceHighP99Latency", "SluiceConsumerLagGrowing",
                     "SluiceDeadLettersHigh", "SluiceWorkerNotCommitting",
                     "SluiceGatewayNotReady"}


def test_recording_rules_come_before_the_alerts_in_one_group():
    """Rules of one group run in order, so an alert reads what was recorded in the same round."""
    assert list(rule_groups()) == ["sluice"]
    kinds = ["record" if "record" in r else "alert" for r in rule_groups()["sluice"]]
    assert kinds == sorted(kinds, reverse=True), kinds


def test_every_alert_has_severity_summary_description_and_a_runbook_section():
    sections = anchors(OPERATIONS.read_text())
    for alert in alerts():
        name = alert["alert"]
        assert alert["labels"]["severity"] in ("critical", "warning"), name
        notes = alert["annotations"]
        assert notes["summary"].strip() and notes["description"].strip(), name
        assert notes["runbook"] == f"docs/operations.md#{name.lower()}", name
        assert name.lower() in sections, f"docs/operations.md has no section for {name}"


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    cases: dict[str, set[bool]] = {}
    for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in test.get("alert_rule_test", []):
            cases.setdefault(check["alertname"], set()).add(bool(check.get("exp_alerts")))
    for alert in alerts():
        assert cases.get(alert["alert"]) == {True, False}, alert["alert"]


def test_rules_use_only_exported_metrics():
    known = known_series()
    for rules in rule_groups().values():
        for rule in rules:
            unknown = metric_names(rule["expr"]) - known
            assert not unknown, f"{rule.get('alert') or rule['record']} uses {unknown}"


def test_metric_names_are_found_in_promql():
    expr = ('histogram_quantile(0.99, sum by (route, le) (rate(a_bucket{route!~"x|y"}[5m]))) '
            '> 1 and on (job) time() - max by (job) (b_seconds) > 300 or up{job="z"} == 0')
    assert metric_names(expr) == {"a_bucket", "b_seconds", "up"}
    assert "sluice_worker_records_written_total" in exported_series()
    assert "sluice_gateway_ready" in exported_series()
    assert "sluice_http_request_duration_seconds_bucket" in exported_series()


# --- dashboard ------------------------------------------------------------------------------

def test_dashboard_variables():
    board = dashboard()
    assert board["schemaVersion"] >= 39
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    dataset = variables["dataset"]
    assert dataset["type"] == "query"
    found = re.fullmatch(r"label_values\((\w+), *dataset\)", dataset["query"]["query"])
    assert found and found.group(1) in known_series()
    assert dataset["includeAll"] and dataset["allValue"] == ".*"


def test_every_panel_has_a_query_on_known_metrics():
    panels = dashboard_panels()
    assert len(panels) >= 14
    known = known_series()
    for panel in panels:
        targets = panel.get("targets", [])
        assert targets and all(t.get("expr", "").strip() for t in targets), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in targets:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            unknown = metric_names(target["expr"]) - known
            assert not unknown, f"{panel['title']}: {unknown}"


def test_rate_windows_follow_the_scrape_interval():
    for title, expr in dashboard_queries():
        windows = set(re.findall(r"\[([^\]]+)\]", expr))
        assert windows <= {"$__rate_interval"}, f"{title}: {windows}"


def test_the_dashboard_shows_what_the_issue_asks_for():
    used = set().union(*(metric_names(expr) for _, expr in dashboard_queries()))
    assert used >= {
        "sluice_events_total", "sluice_http_requests_total",
        "sluice_http_request_duration_seconds_bucket",
        "sluice_kafka_publish_duration_seconds_bucket",
        "sluice_kafka_publish_errors_total", "sluice_worker_consumer_lag",
        "sluice_worker_records_written_total", "sluice_worker_dead_lettered_total",
        "sluice_rate_limited_total", "sluice_idempotent_replays_total",
        "sluice_worker_batch_duration_seconds_bucket",
        "sluice_worker_storage_write_duration_seconds_bucket", "sluice_gateway_ready",
        "sluice_worker_last_commit_timestamp_seconds"}
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_provisioning():
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
                             .read_text())["datasources"]
    assert [(s["type"], s["url"]) for s in sources] == [("prometheus", "http://prometheus:9090")]
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "sluice.yml")
                               .read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == ["/var/lib/grafana/dashboards"]
