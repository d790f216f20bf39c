"""observability/prometheus/rules.yml: promtool check + unit tests, conventions, metric names."""

from __future__ import annotations

import yaml

from tests.observability.conftest import (
    METRIC_TOKEN,
    RULES,
    RULES_TEST,
    alert_rules,
    known_metric_names,
    run_promtool,
)

REQUIRED_ALERTS = {
    "ReframeOldestWaitingJobSLO",
    "ReframeConsumersStuck",
    "ReframeDispatchStalled",
    "ReframeNoWorkers",
    "ReframeHighFailureRatio",
    "ReframeFalErrorRatio",
    "ReframeFal429Ratio",
    "ReframeBreakerOpen",
    "ReframeFalAccountDrained",
    "ReframeRedisNotReplicated",
    "ReframeBudgetNearlyExhausted",
    "ReframeBudgetExhausted",
    "ReframeDeadLettersGrowing",
    "ReframeUnackedNearVisibilityTimeout",
    "ReframeJobsStuckAtFal",
    "ReframeExpiredSlotLeases",
    "ReframeExporterRedisUnreachable",
    "ReframeExporterMetricsAbsent",
    "ReframeWorkerMetricsAbsent",
    "ReframeApiErrorRatio",
    "ReframeFalWebhooksNotArriving",
}


def test_promtool_check_rules(promtool: str) -> None:
    out = run_promtool(promtool, "check", "rules", RULES)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in out.stdout


def test_promtool_unit_tests(promtool: str) -> None:
    out = run_promtool(promtool, "test", "rules", RULES_TEST)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_required_alerts_present() -> None:
    names = [str(rule["alert"]) for rule in alert_rules()]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert REQUIRED_ALERTS <= set(names), REQUIRED_ALERTS - set(names)


def test_every_alert_has_for_severity_and_annotations() -> None:
    for rule in alert_rules():
        name = rule["alert"]
        assert rule.get("for"), f"{name}: no for:"
        labels = rule.get("labels") or {}
        assert labels.get("severity") in {"info", "warning", "critical"}, name  # type: ignore[union-attr]
        annotations = rule.get("annotations") or {}
        for key in ("summary", "description", "runbook"):
            assert str(annotations.get(key, "")).strip(), f"{name}: no {key} annotation"  # type: ignore[union-attr]


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    doc = yaml.safe_load(RULES_TEST.read_text())
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in doc["tests"]:
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {str(rule["alert"]) for rule in alert_rules()}
    assert names - firing == set(), f"never shown firing: {names - firing}"
    assert names - quiet == set(), f"never shown quiet: {names - quiet}"


def test_rules_use_only_known_metrics() -> None:
    known = known_metric_names()
    used = set(METRIC_TOKEN.findall(RULES.read_text()))
    assert used, "no reframe_ metric found in rules.yml"
    assert used <= known, f"unknown metrics in rules.yml: {sorted(used - known)}"


def test_rules_aggregate_by_namespace() -> None:
    # absent() cannot keep labels; every other alert must carry the namespace for routing.
    for rule in alert_rules():
        expr = str(rule["expr"])
        if expr.strip().startswith("absent("):
            continue
        assert "namespace" in expr, f"{rule['alert']} does not aggregate by namespace"
