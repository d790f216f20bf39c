"""observability/grafana/reframe-dashboard.json: generated, schema-valid, parseable PromQL, known metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import yaml

from observability import dashboard as gen
from tests.observability.conftest import (
    DASHBOARD_JSON,
    METRIC_TOKEN,
    SCHEMA,
    dashboard,
    dashboard_targets,
    known_metric_names,
    run_promtool,
    substitute,
)

NS_MATCHER = 'namespace=~"$namespace"'
# a metric name followed by its selector braces (if any)
SELECTOR = re.compile(r"\b(reframe_[a-z0-9_]+)\b(\{[^}]*\})?")


def test_regenerating_is_byte_identical() -> None:
    assert gen.render() == DASHBOARD_JSON.read_text(), (
        "the committed dashboard is stale: run .venv/bin/python -m observability.dashboard"
    )
    assert gen.main(["--check"]) == 0


def test_check_mode_detects_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "d.json"
    stale.write_text("{}\n")
    assert gen.main(["--check", "--output", str(stale)]) == 1
    assert gen.main(["--output", str(stale)]) == 0
    assert gen.main(["--check", "--output", str(stale)]) == 0


def test_validates_against_grafana_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    assert "@grafana/schema@11.6" in schema["$comment"]
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(dashboard())]
    assert errors == []


def test_schema_is_a_real_validator() -> None:
    # The SDK's own model accepts gridPos="nope" (docs/tooling-notes.md §8); the schema must not.
    schema = json.loads(SCHEMA.read_text())
    broken = dashboard()
    broken["panels"][1]["gridPos"] = "nope"  # type: ignore[index]
    broken["refresh"] = 30
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(broken))
    assert len(errors) >= 2


def test_structure() -> None:
    d = dashboard()
    assert d["uid"] == gen.UID and d["title"] == gen.TITLE
    variables = {v["name"]: v for v in d["templating"]["list"]}  # type: ignore[index]
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    assert variables["namespace"]["type"] == "query"
    assert variables["namespace"]["includeAll"] is True and variables["namespace"]["allValue"] == ".*"
    panels = d["panels"]
    ids = [p["id"] for p in panels]  # type: ignore[attr-defined]
    assert len(ids) == len(set(ids))
    for p in panels:  # type: ignore[attr-defined]
        pos = p["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p.get("description"), f"{p['title']}: no description"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        targets = p.get("targets") or []
        assert targets, f"{p['title']}: no queries"
        refs = [t["refId"] for t in targets]
        assert all(refs) and len(refs) == len(set(refs)), p["title"]
        for t in targets:
            assert t["datasource"]["uid"] == "${datasource}"


def test_required_panels() -> None:
    titles = " | ".join(str(p.get("title", "")) for p in dashboard()["panels"]).lower()  # type: ignore[attr-defined]
    for needle in (
        "throughput",
        "success ratio",
        "backlog",
        "oldest waiting",
        "end-to-end",
        "queue wait",
        "fal queue time",
        "fal inference time",
        "status class",
        "429",
        "slot utilisation",
        "breaker",
        "spend vs budget (utc day)",
        "spend vs budget (utc month)",
        "spend by tenant (utc day)",
        "spend by tenant (utc month)",
        "tenant budget headroom",
        "dead letters",
        "callback",
        "result publications",
        "tracked jobs",
        "task outcomes",
        "api request rate by route / status class",
        "api latency p50 / p99 by route",
        "api error ratio",
        "fal webhooks by outcome",
        "completions via webhook vs status",
    ):
        assert needle in titles, needle


def test_every_query_filters_on_namespace() -> None:
    for title, expr in dashboard_targets():
        selectors = SELECTOR.findall(expr)
        assert selectors, f"{title}: no reframe metric in {expr}"
        for name, braces in selectors:
            assert NS_MATCHER in braces, f"{title}: {name} lacks {NS_MATCHER}: {expr}"


def test_dashboard_uses_only_known_metrics() -> None:
    known = known_metric_names()
    used = set(METRIC_TOKEN.findall(DASHBOARD_JSON.read_text()))
    assert used <= known, f"unknown metrics in the dashboard: {sorted(used - known)}"


def test_every_query_parses_in_promtool(promtool: str, tmp_path: Path) -> None:
    targets = list(dashboard_targets())
    rules = [
        {"record": f"dashboard:query_{i}", "expr": substitute(expr)}
        for i, (_title, expr) in enumerate(targets)
    ]
    for rule in rules:
        assert "$" not in rule["expr"], f"unsubstituted variable in {rule['expr']}"
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run_promtool(promtool, "check", "rules", path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout


def test_promtool_rejects_bad_promql(promtool: str, tmp_path: Path) -> None:
    # Guards the test above: a broken expression really fails the check.
    path = tmp_path / "bad.yml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum(rate(x[5m])"}]}]})
    )
    assert run_promtool(promtool, "check", "rules", path).returncode != 0
