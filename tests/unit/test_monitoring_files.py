"""Monitoring as code, read as files: every alert has a case that fires and one that stays
quiet, the prometheus-adapter rule is the recording rule, and the dashboard has the panels
operators need. promtool checks them in tests/e2e/test_promtool.py, a live Prometheus in
tests/e2e/test_prometheus.py."""

from __future__ import annotations

import yaml
from helpers.monitoring_files import (
    QUEUE_TIME_RULE,
    RULE_TESTS,
    dashboard,
    dashboard_queries,
    normalise,
    render_adapter_query,
    rules_by_name,
)


def test_every_alert_has_a_case_that_fires_and_one_that_stays_quiet():
    alerts = {name for name, rule in rules_by_name().items() if "alert" in rule}
    assert alerts == {"FlowserveGpuMemoryHigh", "FlowserveTritonQueueTimeHigh", "FlowserveErrorRateHigh",
                      "FlowserveTritonDown", "FlowserveNvmlUnavailable", "FlowserveFlowNotReady"}
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", [])]
    assert {c["alertname"] for c in cases if c.get("exp_alerts")} == alerts
    assert {c["alertname"] for c in cases if not c.get("exp_alerts")} == alerts


def test_adapter_query_is_the_recording_rule_and_feeds_the_hpa():
    """prometheus-adapter serves the HPA the same ratio of rates that the rules record."""
    rendered = render_adapter_query("namespace, pod", "")
    recorded = rules_by_name()[QUEUE_TIME_RULE]["expr"]
    assert normalise(rendered.replace("{}", "")) == normalise(recorded)


def test_dashboard_has_the_panels_operators_need():
    titles = set(dashboard_queries("ml"))
    assert {"Throughput", "Gateway latency percentiles", "Triton queue time per request", "Triton batch size",
            "GPU memory per GPU", "Errors by code"} <= titles
    latency = dashboard_queries("ml")["Gateway latency percentiles"]
    assert [q.split(",")[0] for q in latency] == [f"histogram_quantile({q}" for q in ("0.5", "0.9", "0.99")]
    assert len({panel["id"] for panel in dashboard()["panels"]}) == len(dashboard()["panels"])
