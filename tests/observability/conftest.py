"""Shared helpers of the observability tests: promtool, the metric catalogue, PromQL extraction."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from reframe.api.middleware import ApiMetrics
from reframe.exporter.collector import metric_names as cluster_metric_names
from worker.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
OBS = ROOT / "observability"
DASHBOARD_JSON = OBS / "grafana" / "reframe-dashboard.json"
RULES = OBS / "prometheus" / "rules.yml"
RULES_TEST = OBS / "prometheus" / "rules_test.yml"
SCHEMA = OBS / "schema" / "dashboard.schema.json"

METRIC_TOKEN = re.compile(r"\breframe_[a-z0-9_]+\b")

#: Grafana variables replaced by concrete values so promtool/Prometheus can parse the expressions.
GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$namespace": ".*",
}


def require_tool(name: str) -> str:
    """The path of ``name``, or FAIL (never skip) with how to install it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: run scripts/ensure-prometheus (installs Debian's 'prometheus' "
            "package, which ships promtool and prometheus). These checks must not be skipped."
        )
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of promtool (fails the test when missing)."""
    return require_tool("promtool")


def run_promtool(promtool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run promtool and return the completed process (text output)."""
    return subprocess.run(
        [promtool, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def known_metric_names() -> set[str]:
    """Every series name our code can export (workers, ``reframe serve``, the exporter), with the
    suffixes Prometheus adds."""
    names: set[str] = set()
    registry = CollectorRegistry()
    Metrics(registry)
    ApiMetrics(registry)
    for family in registry.collect():
        if not family.name.startswith("reframe_"):
            continue
        for sample in family.samples:
            names.add(sample.name)
        base = family.name
        if family.type == "counter":
            names.add(base + "_total")
        if family.type == "histogram":
            names.update({base + "_bucket", base + "_sum", base + "_count"})
        names.add(base)
    names.update(cluster_metric_names())
    return names


def dashboard() -> dict[str, object]:
    """The committed dashboard JSON."""
    data: dict[str, object] = json.loads(DASHBOARD_JSON.read_text())
    return data


def dashboard_targets() -> Iterator[tuple[str, str]]:
    """(panel title, expr) of every query in the committed dashboard."""
    for panel in dashboard()["panels"]:  # type: ignore[attr-defined]
        for target in panel.get("targets", []):
            yield panel.get("title", "?"), target["expr"]


def substitute(expr: str) -> str:
    """A dashboard expression with Grafana variables replaced (longest names first)."""
    for var in sorted(GRAFANA_SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(var, GRAFANA_SUBSTITUTIONS[var])
    return expr


def alert_rules() -> list[dict[str, object]]:
    """Every alerting rule of rules.yml."""
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]
