"""The certificate-expiry alert rules (ops/prometheus/tls_alerts.yml) load, pass
their promtool unit tests, and watch the gauge the processes export."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.support import ROOT

RULES = ROOT / "ops" / "prometheus" / "tls_alerts.yml"
RULE_TESTS = ROOT / "ops" / "prometheus" / "tls_alerts_test.yml"


def test_the_alert_rules_watch_the_gauge_the_processes_export():
    from service import tls

    exported = tls.EXPIRY._name
    text = RULES.read_text()
    assert text.count(f"expr: {exported} ") == 3, text


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: apt-get install prometheus)")
def test_the_alert_rules_pass_their_promtool_unit_tests():
    checked = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(["promtool", "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                            timeout=60)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
