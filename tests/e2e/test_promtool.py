"""Monitoring as code through promtool: the rules pass its check, their unit tests fire and
stay quiet (and catch a changed alert), and every dashboard query is valid PromQL."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from helpers.monitoring_files import (
    RULE_TESTS,
    dashboard_queries,
    rule_groups,
    rules_by_name,
    write_rule_file,
)


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "promtool is not on PATH: run scripts/setup.sh --test"
    return subprocess.run([binary, *args], capture_output=True, text=True)


def test_rules_pass_promtool_check(tmp_path):
    result = promtool("check", "rules", str(write_rule_file(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules_by_name())} rules found" in result.stdout


def test_rule_unit_tests_pass(tmp_path):
    write_rule_file(tmp_path)
    result = promtool("test", "rules", str(tmp_path / RULE_TESTS.name))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("alert, old, new", [
    ("FlowserveGpuMemoryHigh", "> 0.9", "> 0.95"),
    ("FlowserveTritonQueueTimeHigh", "> 0.05", "> 0.2"),
    ("FlowserveErrorRateHigh", "> 0.05", "> 0.1"),
    ("FlowserveTritonDown", "max by (namespace)", "min by (namespace)"),
    ("FlowserveFlowNotReady", "max by (namespace, model)", "min by (namespace, model)"),
    ("FlowserveNvmlUnavailable", 'resource="nvidia_com_gpu"', 'resource="cpu"'),
])
def test_unit_tests_catch_a_changed_alert(tmp_path, alert, old, new):
    """The unit tests have teeth: changing one alert's condition makes them fail."""
    groups = rule_groups()
    (rule,) = [r for g in groups for r in g["rules"] if r.get("alert") == alert]
    assert old in rule["expr"]
    rule["expr"] = rule["expr"].replace(old, new)
    write_rule_file(tmp_path, groups)
    result = promtool("test", "rules", str(tmp_path / RULE_TESTS.name))
    assert result.returncode != 0
    assert alert in result.stdout + result.stderr


def test_every_dashboard_query_is_valid_promql(tmp_path):
    """promtool parses each query as a recording rule's expression."""
    queries = [q for qs in dashboard_queries("ml").values() for q in qs]
    rules = [{"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(queries)]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
