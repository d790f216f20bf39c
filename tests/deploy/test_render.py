"""Every overlay renders, and every rendered object is a valid Kubernetes object.

Built-in kinds are validated with kubernetes-validate in strict mode (unknown fields fail) against
Kubernetes 1.30; the CRD kinds (KEDA, Prometheus Operator), which it has no schema for, are checked
structurally here.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.conftest import INSTALL_HINT, K8S, OVERLAYS, Rendered, render

K8S_VERSION = "1.30.0"
CRD_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}


def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate as kv
    except ImportError:
        pytest.fail(f"kubernetes-validate is not installed; {INSTALL_HINT}", pytrace=False)
    return kv


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_renders(name: str) -> None:
    out = render(name)
    assert out.objects, f"k8s/overlays/{name} rendered no objects"
    ids = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in out.objects]
    assert len(ids) == len(set(ids)), f"{name}: duplicate objects {ids}"


def test_every_overlay_is_tested() -> None:
    on_disk = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
    assert on_disk == sorted(OVERLAYS), "add new overlays to tests/deploy/conftest.py OVERLAYS"


def test_builtin_kinds_validate_strict(overlay: Rendered) -> None:
    kv = kubernetes_validate()
    errors = []
    for obj in overlay.objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        try:
            kv.validate(obj, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            path = "/".join(str(p) for p in getattr(exc, "path", []))
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
        except kv.SchemaNotFoundError:
            errors.append(f"{obj['kind']} {obj['apiVersion']}: no schema (a CRD? add it to CRD_KINDS)")
    assert not errors, f"{overlay.overlay}:\n" + "\n".join(errors)


def test_only_known_crds(overlay: Rendered) -> None:
    for obj in overlay.objects:
        group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
        if "." in group and not group.endswith(".k8s.io"):
            assert (obj["apiVersion"], obj["kind"]) in CRD_KINDS, (
                f"unchecked CRD {obj['apiVersion']} {obj['kind']}"
            )


def _assert_keys(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = set(obj) - allowed
    assert not extra, f"{where}: unknown field(s) {sorted(extra)}"


def test_crd_objects_are_well_formed(overlay: Rendered) -> None:
    """A hand-written structural check of the fields we use (a typo would be ignored by the CRD)."""
    deployments = {d["metadata"]["name"] for d in overlay.of_kind("Deployment")}
    secrets_used = {"reframe-secrets"}
    for obj in overlay.objects:
        kind, name = obj["kind"], obj["metadata"]["name"]
        where = f"{overlay.overlay}: {kind}/{name}"
        if (obj["apiVersion"], kind) not in CRD_KINDS:
            continue
        _assert_keys(obj, {"apiVersion", "kind", "metadata", "spec"}, where)
        spec = obj["spec"]
        if kind == "ScaledObject":
            _assert_keys(
                spec,
                {
                    "scaleTargetRef",
                    "minReplicaCount",
                    "maxReplicaCount",
                    "pollingInterval",
                    "cooldownPeriod",
                    "idleReplicaCount",
                    "fallback",
                    "advanced",
                    "triggers",
                    "initialCooldownPeriod",
                },
                where,
            )
            ref = spec["scaleTargetRef"]
            assert ref.get("kind", "Deployment") == "Deployment" and ref["name"] in deployments, where
            assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], where
            assert spec["fallback"]["replicas"] <= spec["maxReplicaCount"], where
            _assert_keys(
                spec["advanced"],
                {"restoreToOriginalReplicaCount", "scalingModifiers", "horizontalPodAutoscalerConfig"},
                where,
            )
            mods = spec["advanced"]["scalingModifiers"]
            _assert_keys(mods, {"formula", "target", "activationTarget", "metricType"}, where)
            assert mods["metricType"] in {"AverageValue", "Value"}, where
            assert float(mods["target"]) > 0, where
            for trig in spec["triggers"]:
                _assert_keys(
                    trig,
                    {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"},
                    where,
                )
                assert isinstance(trig["name"], str) and trig["name"].isidentifier(), where
                assert all(isinstance(v, str) for v in trig["metadata"].values()), (
                    f"{where}: metadata must be strings"
                )
                if trig["type"] == "redis":
                    assert {"listName", "listLength"} <= set(trig["metadata"]), where
                    assert int(trig["metadata"]["listLength"]) > 0, where
                    auth = trig["authenticationRef"]["name"]
                    overlay.get("TriggerAuthentication", auth)
                elif trig["type"] == "prometheus":
                    assert {"serverAddress", "query", "threshold"} <= set(trig["metadata"]), where
                else:
                    pytest.fail(f"{where}: unexpected trigger type {trig['type']}")
        elif kind == "TriggerAuthentication":
            _assert_keys(spec, {"secretTargetRef"}, where)
            for ref in spec["secretTargetRef"]:
                _assert_keys(ref, {"parameter", "name", "key"}, where)
                assert ref["name"] in secrets_used, where
        elif kind in {"ServiceMonitor", "PodMonitor"}:
            assert spec["selector"]["matchLabels"], where
            eps = spec.get("endpoints") or spec.get("podMetricsEndpoints")
            assert eps and all("port" in e for e in eps), where
        elif kind == "PrometheusRule":
            _assert_keys(spec, {"groups"}, where)
            assert isinstance(spec["groups"], list) and spec["groups"], f"{where}: no rule groups"
            for group in spec["groups"]:
                assert group["name"] and group["rules"], where
                for rule in group["rules"]:
                    assert ("alert" in rule) != ("record" in rule), f"{where}: {rule}"
                    assert rule["expr"], where
