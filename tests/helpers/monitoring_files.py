"""The monitoring files of deploy/components/monitoring, read the way their tools read them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "components" / "monitoring"
RULES = MONITORING / "prometheus-rule.yaml"
RULE_TESTS = MONITORING / "tests" / "rules.test.yaml"
ADAPTER_VALUES = MONITORING / "prometheus-adapter-values.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULE_FILE_NAME = "flowserve-rules.yaml"  # what rules.test.yaml loads
QUEUE_TIME_RULE = "namespace_pod:triton_queue_time_per_request:seconds"  # the HPA's signal


def rule_groups() -> list[dict]:
    """The PrometheusRule's ``spec.groups``: a plain Prometheus rule file's groups."""
    return yaml.safe_load(RULES.read_text())["spec"]["groups"]


def write_rule_file(directory: Path, groups: list[dict] | None = None) -> Path:
    """Write ``groups`` (default: the PrometheusRule's) as a Prometheus rule file, with the
    unit tests beside it."""
    path = directory / RULE_FILE_NAME
    path.write_text(yaml.safe_dump({"groups": rule_groups() if groups is None else groups}, sort_keys=False))
    (directory / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    return path


def rules_by_name() -> dict[str, dict]:
    """Every recording rule and alert, by its record or alert name."""
    return {rule.get("record") or rule["alert"]: rule for group in rule_groups() for rule in group["rules"]}


def adapter_rule() -> dict:
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return rule


def render_adapter_query(group_by: str, label_matchers: str) -> str:
    """The adapter's metricsQuery as prometheus-adapter renders its Go template."""
    query = adapter_rule()["metricsQuery"]
    return query.replace("<<.GroupBy>>", group_by).replace("<<.LabelMatchers>>", label_matchers)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries(namespace: str, rate_interval: str = "1m") -> dict[str, list[str]]:
    """Every panel's PromQL, by panel title, with Grafana's variables filled in."""
    def fill(expr: str) -> str:
        return expr.replace("$namespace", namespace).replace("$__rate_interval", rate_interval)
    return {panel["title"]: [fill(t["expr"]) for t in panel["targets"]] for panel in dashboard()["panels"]}


def normalise(promql: str) -> str:
    return re.sub(r"\s+", " ", promql).strip()
