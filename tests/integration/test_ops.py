"""The operator kit in ops/: Prometheus alerting rules with their promtool unit
tests, and the Grafana dashboard. Every metric and label they name is one the
processes export (a renamed metric would otherwise silently never alert)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from gateway_edge import metrics as edge_metrics  # noqa: F401  (registers the edge's metrics)
from service import metrics as service_metrics  # noqa: F401  (registers the service's metrics)
from tests.support import ROOT
from tests.support.prometheus import exported, names_and_labels

OPS = ROOT / "ops"
ALERTS = OPS / "prometheus" / "alerts.yml"
ALERT_TESTS = OPS / "prometheus" / "alerts_test.yml"
DASHBOARD = OPS / "grafana" / "refund.json"
PROMTOOL = shutil.which("promtool")


def alert_expressions() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_rules_and_dashboard_use_only_what_the_processes_export(source):
    expressions = alert_expressions() if source == "alerts" else dashboard_expressions()
    assert expressions
    known_names, known_labels = exported()
    for expression in expressions:
        names, labels = names_and_labels(expression)
        assert names, expression
        assert names <= known_names, (names - known_names, expression)
        assert labels <= known_labels, (labels - known_labels, expression)


def test_the_alerts_cover_errors_9001_latency_and_the_database():
    names = {rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]}
    assert {"RefundEdgeErrorRate", "RefundUnavailableAnswersAtEdge", "RefundUnavailableAnswersAtService",
            "RefundLatencyP99High", "RefundDatabaseDown"} <= names
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    assert names <= tested, names - tested  # each alert has a promtool unit test


def test_the_dashboard_is_a_grafana_dashboard_with_a_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    assert {variable["name"] for variable in dashboard["templating"]["list"]} >= {"datasource"}
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]


@pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (Debian: apt-get install prometheus); .ci/run installs it")
def test_promtool_checks_the_rules_and_runs_their_unit_tests():
    check = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout
    tested = subprocess.run([PROMTOOL, "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True,
                            timeout=120)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
