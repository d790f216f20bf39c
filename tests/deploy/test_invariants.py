"""Invariants of the rendered manifests: hardening, shutdown budget, one image, autoscaling keys,
no secrets. Each test reads the output of ``kubectl kustomize`` (what would be applied)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.deploy.conftest import ROOT, SECRET_KEYS, SECRET_NAME, Rendered

IMAGE_UID = 10001
METRICS_PORT = 17300
#: environment variables that carry secrets: only ever from a secretKeyRef
SECRET_ENV = {
    "FAL_KEY",
    "REFRAME_FAL_ACCOUNT_KEYS",
    "REFRAME_REDIS_URL",
    "REFRAME_CALLBACK_SIGNING_KEY",
    "REFRAME_CALLBACK_SECRETS",
    "REFRAME_CALLBACK_TENANT_SECRETS",
    "REFRAME_WEBHOOK_SECRET",
    "REFRAME_OUTPUT_S3_ACCESS_KEY_ID",
    "REFRAME_OUTPUT_S3_SECRET_ACCESS_KEY",
    "REDIS_PASSWORD",
    "REDISCLI_AUTH",
    "REFRAME_REDIS_PASSWORD",
    "REFRAME_REDIS_SENTINEL_PASSWORD",
    "SENTINEL_PASSWORD",
}


def pod_specs(r: Rendered) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{w['kind']}/{w['metadata']['name']}", w["spec"]["template"]["spec"]) for w in r.workloads()]


def containers(r: Rendered) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    out = []
    for where, spec in pod_specs(r):
        for c in spec.get("initContainers", []) + spec["containers"]:
            out.append((f"{where}[{c['name']}]", spec, c))
    return out


def reframe_image(r: Rendered) -> str:
    """The one image of the Reframe containers (the worker's)."""
    worker = r.get("Deployment", "reframe-worker")
    return worker["spec"]["template"]["spec"]["containers"][0]["image"]


def is_reframe(r: Rendered, container: dict[str, Any]) -> bool:
    """A container of one of our images: production's, or the emulator target's (`<name>-emulator`)."""
    name = reframe_image(r).rsplit(":", 1)[0]
    return container["image"].rsplit(":", 1)[0] in {name, f"{name}-emulator"}


def settings_value(r: Rendered, env_name: str) -> float:
    """A numeric setting as the pods see it: the ConfigMap, else the code's default."""
    data = r.settings()
    if env_name in data:
        return float(data[env_name])
    from config.settings import Settings

    field = env_name.removeprefix("REFRAME_").lower()
    return float(Settings.model_fields[field].default)


# --- pod hardening ------------------------------------------------------------------------


def test_pods_are_hardened(overlay: Rendered) -> None:
    for where, spec in pod_specs(overlay):
        sc = spec.get("securityContext", {})
        assert sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
        assert sc.get("runAsUser", 0) >= 1000, f"{where}: runAsUser"
        assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: seccompProfile"
        assert spec.get("automountServiceAccountToken") is False, f"{where}: automountServiceAccountToken"
        assert spec.get("serviceAccountName") == "reframe", f"{where}: serviceAccountName"
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where


def test_containers_are_hardened(overlay: Rendered) -> None:
    for where, pod, c in containers(overlay):
        sc = c.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
        assert sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities.drop"
        assert not sc.get("capabilities", {}).get("add"), f"{where}: capabilities.add"
        assert sc.get("privileged", False) is False, f"{where}: privileged"
        uid = sc.get("runAsUser", pod["securityContext"].get("runAsUser"))
        assert uid and uid != 0, f"{where}: runs as root"
        # /tmp is the one writable path (HOME=/tmp in the image): an emptyDir
        tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        assert tmp, f"{where}: no /tmp mount"
        vol = next(v for v in pod["volumes"] if v["name"] == tmp[0]["name"])
        assert "emptyDir" in vol and vol["emptyDir"].get("sizeLimit"), (
            f"{where}: /tmp must be a bounded emptyDir"
        )


def test_reframe_containers_run_as_the_image_user(overlay: Rendered) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"^USER {IMAGE_UID}(:{IMAGE_UID})?$", dockerfile, re.M), "Dockerfile USER changed?"
    for where, pod, c in containers(overlay):
        if is_reframe(overlay, c):
            uid = c["securityContext"].get("runAsUser", pod["securityContext"]["runAsUser"])
            assert uid == IMAGE_UID, f"{where}: runAsUser {uid} != the image's {IMAGE_UID}"


def test_resources_requests_and_limits(overlay: Rendered) -> None:
    for where, _pod, c in containers(overlay):
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(kind, {})), (
                f"{where}: resources.{kind} needs cpu and memory"
            )


def test_three_probes(overlay: Rendered) -> None:
    for where, _pod, c in containers(overlay):
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert probe in c, f"{where}: no {probe}"


def _port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


@pytest.mark.parametrize("name", ["reframe-worker", "reframe-exporter"])
def test_worker_and_exporter_probe_health_endpoints(overlay: Rendered, name: str) -> None:
    c = overlay.get("Deployment", name)["spec"]["template"]["spec"]["containers"][0]
    paths = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        http = c[probe]["httpGet"]
        assert _port_number(c, http["port"]) == METRICS_PORT, f"{name}: {probe} port"
        paths[probe] = http["path"]
    assert paths == {"startupProbe": "/livez", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
    assert int(overlay.settings().get("REFRAME_METRICS_PORT", METRICS_PORT)) == METRICS_PORT


# --- shutdown budget --------------------------------------------------------------------------


def test_grace_period_covers_celery_shutdown(overlay: Rendered) -> None:
    spec = overlay.get("Deployment", "reframe-worker")["spec"]["template"]["spec"]
    grace = spec["terminationGracePeriodSeconds"]
    soft_shutdown = settings_value(overlay, "REFRAME_WORKER_SOFT_SHUTDOWN_TIMEOUT_S")
    hard_limit = settings_value(overlay, "REFRAME_TASK_TIME_LIMIT_S")
    soft_limit = settings_value(overlay, "REFRAME_TASK_SOFT_TIME_LIMIT_S")
    assert grace > soft_shutdown, f"grace {grace} s must exceed the soft shutdown {soft_shutdown} s"
    assert grace > hard_limit, f"grace {grace} s must exceed the task hard time limit {hard_limit} s"
    # threads pool: the cold shutdown joins running threads, so a task started just before it may
    # still take its whole hard limit after the soft shutdown's fixed wait
    assert grace >= soft_shutdown + hard_limit + 5, (
        f"grace {grace} s < soft shutdown {soft_shutdown} s + task hard limit {hard_limit} s + 5 s margin"
    )
    assert hard_limit >= soft_limit
    env = {e["name"]: e for e in spec["containers"][0]["env"]}
    assert env["REMAP_SIGTERM"].get("value") == "SIGQUIT", "SIGTERM must start Celery's soft shutdown"
    assert settings_value(overlay, "REFRAME_VISIBILITY_TIMEOUT_S") > grace


def test_worker_rollout_keeps_capacity(overlay: Rendered) -> None:
    strategy = overlay.get("Deployment", "reframe-worker")["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_exporter_is_a_singleton(overlay: Rendered) -> None:
    exporter = overlay.get("Deployment", "reframe-exporter")["spec"]
    assert exporter["replicas"] == 1
    assert exporter["strategy"]["type"] == "Recreate", "two exporters at once would double every gauge"


# --- image ----------------------------------------------------------------------------------


def test_one_image_and_tag_throughout(overlay: Rendered) -> None:
    image = reframe_image(overlay)
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest" and "/" not in tag, (
        f"{overlay.overlay}: image {image!r} not pinned"
    )
    emulators = {c["image"] for _w, _p, c in containers(overlay) if c["name"] == "emulator"}
    ours = {
        c["image"]
        for _w, _p, c in containers(overlay)
        if not c["image"].startswith("redis:") and c["name"] != "emulator"
    }
    assert ours == {image}, f"{overlay.overlay}: more than one Reframe image/tag: {sorted(ours)}"
    # the emulator is the Dockerfile's `emulator` target: its own image, the same release tag
    assert emulators <= {f"{name}-emulator:{tag}"}, f"{overlay.overlay}: emulator image {sorted(emulators)}"
    if overlay.overlay == "dev":
        assert emulators, "dev runs the emulator"
    for where, _p, c in containers(overlay):
        assert ":" in c["image"].rsplit("/", 1)[-1] and not c["image"].endswith(":latest"), (
            f"{where}: unpinned"
        )


def test_prod_pulls_always(rendered: dict[str, Rendered]) -> None:
    # compensating control for the checkov skip CKV_K8S_15 (k8s/.checkov.yaml)
    for where, _p, c in containers(rendered["prod"]):
        assert c.get("imagePullPolicy") == "Always", where


def test_reframe_containers_run_a_reframe_command(overlay: Rendered) -> None:
    for where, _p, c in containers(overlay):
        if is_reframe(overlay, c):
            assert "command" not in c, f"{where}: keep the image's ENTRYPOINT (reframe) as PID 1"
            assert c["args"][0] in {"worker", "exporter", "serve", "emulator"}, where


# --- settings and secrets -------------------------------------------------------------------


def test_settings_configmap_is_valid(overlay: Rendered) -> None:
    """The ConfigMap plus placeholder secrets load through the app's own settings validation."""
    from config.settings import load_settings

    env = dict(overlay.settings())
    env |= {"REFRAME_REDIS_URL": "redis://:placeholder@redis:6379/0", "FAL_KEY": "id:placeholder"}
    load_settings(env)  # raises SettingsError naming any unknown or invalid REFRAME_* variable


def secret_setting_envs() -> set[str]:
    """Settings that are secrets (SecretStr) plus the Redis URL (it carries the password)."""
    from config.settings import Settings, env_name

    secret = {env_name(n) for n, f in Settings.model_fields.items() if "SecretStr" in str(f.annotation)}
    return secret | {env_name("redis_url")}


def test_no_secret_values_in_manifests(overlay: Rendered) -> None:
    assert not overlay.of_kind("Secret"), "Secrets are created out of band (docs/deploy.md), never rendered"
    for where, _p, c in containers(overlay):
        for e in c.get("env", []):
            if e["name"] in SECRET_ENV:
                assert "value" not in e, f"{where}: {e['name']} has a literal value"
                ref = e["valueFrom"]["secretKeyRef"]
                assert ref["name"] == SECRET_NAME and ref["key"] in SECRET_KEYS, f"{where}: {ref}"
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == SECRET_NAME and ref["key"] in SECRET_KEYS, f"{where}: {ref}"
    secret_settings = secret_setting_envs()
    assert secret_settings <= SECRET_ENV, "a new secret setting: wire it to the Secret, add it to SECRET_ENV"
    for key in overlay.settings():
        assert key not in secret_settings, f"secret setting {key} in the ConfigMap"
        assert not re.search(r"PASSWORD|SECRET|TOKEN|FAL_KEY", key), f"secret-like {key} in the ConfigMap"
    # nothing that looks like a credential anywhere in the rendered text
    assert not re.search(r"rediss?://[^\s\"']*:[^\s\"'@]+@", overlay.text), "a Redis URL with a password"
    assert not re.search(
        r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}:[0-9a-f]{16,}", overlay.text
    )


def test_secret_keys_are_documented() -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    for key in SECRET_KEYS | {SECRET_NAME}:
        assert key in doc, f"docs/deploy.md does not mention {key}"


# --- autoscaling ----------------------------------------------------------------------------


def expected_list_keys(r: Rendered) -> dict[str, str]:
    """Trigger name -> Redis list, from the kombu/contract constants and the rendered settings."""
    from kombu.transport.redis import PRIORITY_STEPS, Channel

    from worker.contracts.keys import celery_queue_keys

    data = r.settings()
    queue = data.get("REFRAME_QUEUE_NAME", "reframe")
    kombu_keys = [queue if s == 0 else f"{queue}{Channel.sep}{s}" for s in PRIORITY_STEPS]
    assert kombu_keys == celery_queue_keys(queue), "worker.contracts and kombu disagree on the queue keys"
    return {f"q{s}": k for s, k in zip(PRIORITY_STEPS, kombu_keys, strict=True)}


def test_keda_triggers_cover_every_list_key(overlay: Rendered) -> None:
    so = overlay.get("ScaledObject", "reframe-worker")
    lists = {t["name"]: t["metadata"]["listName"] for t in so["spec"]["triggers"] if t["type"] == "redis"}
    assert lists == expected_list_keys(overlay)
    # the exact bytes, independent of any code: kombu's separator is 0x06 0x16
    assert sorted(v.encode() for v in lists.values()) == sorted(
        [
            b"reframe",
            b"reframe\x06\x163",
            b"reframe\x06\x166",
            b"reframe\x06\x169",
        ]
    )


def test_keda_sums_triggers_with_scaling_modifiers(overlay: Rendered) -> None:
    so = overlay.get("ScaledObject", "reframe-worker")["spec"]
    names = [t["name"] for t in so["triggers"]]
    formula = so["advanced"]["scalingModifiers"]["formula"]
    terms = [t.strip() for t in formula.split("+")]
    assert sorted(terms) == sorted(names), f"formula {formula!r} must be the sum of every trigger {names}"
    assert so["advanced"]["scalingModifiers"]["metricType"] == "AverageValue"
    assert so["scaleTargetRef"]["name"] == "reframe-worker"
    assert so["minReplicaCount"] >= 1, "keep a worker: each runs the completion tracker"
    assert (
        so["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
        >= 60
    )
    worker = overlay.get("Deployment", "reframe-worker")["spec"]
    assert "replicas" not in worker, "KEDA owns the worker's replicas; a replicas field resets it on apply"


def test_keda_auth_comes_from_the_secret(overlay: Rendered) -> None:
    auth = overlay.get("TriggerAuthentication", "reframe-redis")["spec"]["secretTargetRef"]
    assert {(a["parameter"], a["name"], a["key"]) for a in auth} == {
        ("address", SECRET_NAME, "redis-address"),
        ("password", SECRET_NAME, "redis-password"),
    }


def test_prod_scales_on_in_flight_jobs_of_its_own_namespace(rendered: dict[str, Rendered]) -> None:
    prod = rendered["prod"]
    so = prod.get("ScaledObject", "reframe-worker")["spec"]
    prom = [t for t in so["triggers"] if t["type"] == "prometheus"]
    assert [t["name"] for t in prom] == ["waiting", "inflight"]
    expected = {"waiting": "reframe_queue_depth", "inflight": "reframe_slots_in_use"}
    exporter_src = (ROOT / "reframe" / "exporter" / "collector.py").read_text()
    namespace = prod.get("Deployment", "reframe-worker")["metadata"]["namespace"]
    for trigger in prom:
        query = trigger["metadata"]["query"]
        m = re.match(r"sum\((reframe_[a-z_]+)\{", query)
        assert m and m.group(1) == expected[trigger["name"]], f"{trigger['name']}: {query}"
        assert f'"{m.group(1)}"' in exporter_src, (
            f"the exporter (reframe/exporter/collector.py) defines no {m.group(1)}"
        )
        assert f'namespace="{namespace}"' in query, f"the query must select namespace {namespace}"


def test_dev_has_no_prometheus_trigger(rendered: dict[str, Rendered]) -> None:
    so = rendered["dev"].get("ScaledObject", "reframe-worker")["spec"]
    assert all(t["type"] == "redis" for t in so["triggers"]), "dev has no Prometheus"


# --- wiring -----------------------------------------------------------------------------------


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_services_and_pdbs_select_pods(overlay: Rendered) -> None:
    templates = [w["spec"]["template"]["metadata"]["labels"] for w in overlay.workloads()]
    for svc in overlay.of_kind("Service"):
        assert any(_selects(svc["spec"]["selector"], t) for t in templates), (
            f"Service {svc['metadata']['name']}"
        )
    for pdb in overlay.of_kind("PodDisruptionBudget"):
        assert any(_selects(pdb["spec"]["selector"]["matchLabels"], t) for t in templates), pdb["metadata"][
            "name"
        ]
    for w in overlay.workloads():
        sel = w["spec"]["selector"]["matchLabels"]
        assert _selects(sel, w["spec"]["template"]["metadata"]["labels"]), w["metadata"]["name"]


def test_every_object_is_namespaced_by_the_overlay(overlay: Rendered) -> None:
    ns = overlay.get("Namespace", {"dev": "reframe-dev", "prod": "reframe"}[overlay.overlay])
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in overlay.objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == ns["metadata"]["name"], (
                f"{obj['kind']}/{obj['metadata']['name']}"
            )


def test_prod_components(rendered: dict[str, Rendered]) -> None:
    prod = rendered["prod"]
    kinds = {o["kind"] for o in prod.objects}
    assert {
        "ScaledObject",
        "TriggerAuthentication",
        "ServiceMonitor",
        "PrometheusRule",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Ingress",
        "HorizontalPodAutoscaler",
    } <= kinds
    assert not {"StatefulSet"} & kinds, "prod uses a managed Redis, not the in-cluster one"
    assert not [d for d in prod.of_kind("Deployment") if d["metadata"]["name"] == "reframe-emulator"]
    assert "REFRAME_FAL_QUEUE_URL" not in prod.settings(), "prod talks to the real fal"
    sm = prod.get("ServiceMonitor", "reframe")["spec"]
    metric_services = [
        s for s in prod.of_kind("Service") if _selects(sm["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert {s["metadata"]["name"] for s in metric_services} == {"reframe-worker-metrics", "reframe-exporter"}
    for s in metric_services:
        assert [p["port"] for p in s["spec"]["ports"] if p["name"] == sm["endpoints"][0]["port"]] == [
            METRICS_PORT
        ]


def test_dev_components(rendered: dict[str, Rendered]) -> None:
    dev = rendered["dev"]
    redis = dev.get("StatefulSet", "reframe-redis")
    conf = dev.get("ConfigMap", "reframe-redis-config")["data"]["redis.conf"]
    assert re.search(r"^appendonly yes$", conf, re.M) and re.search(
        r"^maxmemory-policy noeviction$", conf, re.M
    )
    assert redis["spec"]["volumeClaimTemplates"], "AOF needs a persistent volume"
    dev.get("Deployment", "reframe-emulator")
    settings = dev.settings()
    for key in ("REFRAME_FAL_QUEUE_URL", "REFRAME_FAL_REST_URL", "REFRAME_FAL_CDN_URL"):
        assert settings[key] == "http://reframe-emulator:8080", key
