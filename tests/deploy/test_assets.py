"""The PrometheusRule and the Grafana dashboard ConfigMap carry exactly the observability sources.

kustomize cannot read observability/ (outside the kustomization root), so scripts/k8s-sync-assets
copies the sources into the components; these tests fail as soon as a copy drifts.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.deploy.conftest import ROOT, Rendered, run, yaml_module

RULES = ROOT / "observability" / "prometheus" / "rules.yml"
DASHBOARD = ROOT / "observability" / "grafana" / "reframe-dashboard.json"
FIX = "run scripts/k8s-sync-assets and commit the result"


def _source(path):  # type: ignore[no-untyped-def]
    if not path.is_file():
        pytest.fail(
            f"{path.relative_to(ROOT)} is missing: the k8s components are built from it", pytrace=False
        )
    return path


def test_sync_script_reports_up_to_date() -> None:
    _source(RULES), _source(DASHBOARD)
    proc = run([sys.executable, str(ROOT / "scripts" / "k8s-sync-assets"), "--check"])
    assert proc.returncode == 0, f"{proc.stderr.strip()}\n{FIX}"


def test_prometheus_rule_equals_rule_file(rendered: dict[str, Rendered]) -> None:
    source = yaml_module().safe_load(_source(RULES).read_text(encoding="utf-8"))
    rule = rendered["prod"].get("PrometheusRule", "reframe")
    assert rule["spec"] == source, f"PrometheusRule differs from {RULES.relative_to(ROOT)}; {FIX}"
    assert rule["metadata"]["labels"].get("release"), "the Prometheus ruleSelector label"


def test_dashboard_configmap_equals_dashboard(rendered: dict[str, Rendered]) -> None:
    source = json.loads(_source(DASHBOARD).read_text(encoding="utf-8"))
    cm = rendered["prod"].get("ConfigMap", "reframe-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1", "Grafana's sidecar selects this label"
    assert list(cm["data"]) == ["reframe-dashboard.json"]
    assert json.loads(cm["data"]["reframe-dashboard.json"]) == source, f"dashboard ConfigMap differs; {FIX}"
    # client-side apply keeps a last-applied copy in an annotation (256 KiB max); docs/deploy.md says
    # to apply server-side, but keep the dashboard well below the 1 MiB object limit either way.
    assert len(cm["data"]["reframe-dashboard.json"].encode()) < 900 * 1024
