"""The Redis Sentinel deployment that docs/deploy.md shows (component ``redis-sentinel``): rendered
from the very block in the document and held to the invariants of the shipped overlays."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.deploy import test_invariants as inv
from tests.deploy import test_render
from tests.deploy.conftest import K8S, ROOT, Rendered, kubectl, run, yaml_module
from tests.deploy.test_checkov import checkov


def _documented_overlay() -> str:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    section = doc.split("## Redis Sentinel", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "docs/deploy.md, Redis Sentinel: expected one kustomization block"
    return str(blocks[0])


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    overlay = tmp_path_factory.mktemp("prod-sentinel")
    # the block's paths are relative to k8s/overlays/<name>; point them at this checkout
    text = _documented_overlay().replace("../../", os.path.relpath(K8S, overlay) + "/")
    (overlay / "kustomization.yaml").write_text(text)
    proc = run([kubectl(), "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(overlay)])
    assert proc.returncode == 0, proc.stderr
    objects = [d for d in yaml_module().safe_load_all(proc.stdout) if d]
    return Rendered(overlay="prod-sentinel", text=proc.stdout, objects=objects)


@pytest.mark.parametrize(
    "check",
    [
        inv.test_pods_are_hardened,
        inv.test_containers_are_hardened,
        inv.test_reframe_containers_run_as_the_image_user,
        inv.test_resources_requests_and_limits,
        inv.test_three_probes,
        inv.test_one_image_and_tag_throughout,
        inv.test_reframe_containers_run_a_reframe_command,
        inv.test_settings_configmap_is_valid,
        inv.test_no_secret_values_in_manifests,
        inv.test_services_and_pdbs_select_pods,
        test_render.test_builtin_kinds_validate_strict,
        test_render.test_only_known_crds,
    ],
    ids=lambda f: f.__name__,
)
def test_documented_sentinel_overlay_keeps_the_invariants(sentinel: Rendered, check: object) -> None:
    assert callable(check)
    check(sentinel)


def test_every_reframe_process_follows_the_sentinels(sentinel: Rendered) -> None:
    from config.settings import load_settings

    env = dict(sentinel.settings())
    settings = load_settings({**env, "REFRAME_REDIS_URL": "redis://reframe-redis-sentinel:6379/0"})
    nodes = sentinel.get("StatefulSet", "reframe-redis-sentinel")
    hosts = {f"reframe-redis-sentinel-{i}.reframe-redis-sentinel" for i in range(nodes["spec"]["replicas"])}
    assert {h for h, _port in settings.sentinel_addresses} == hosts
    assert {p for _h, p in settings.sentinel_addresses} == {26379}
    assert settings.redis_min_replicas == 1 and settings.production
    # the name the Sentinels monitor is the one the clients ask for
    conf = sentinel.get("ConfigMap", "reframe-redis-sentinel-config")["data"]
    assert f"sentinel monitor {settings.redis_master_name} " in conf["start-sentinel.sh"]
    assert "appendonly yes" in conf["redis.conf"]
    # every Reframe pod gets the passwords from the Secret
    for name in ("reframe-worker", "reframe-api", "reframe-exporter"):
        env_names = {
            e["name"]
            for e in sentinel.get("Deployment", name)["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert {"REFRAME_REDIS_PASSWORD", "REFRAME_REDIS_SENTINEL_PASSWORD"} <= env_names, name


def test_the_redis_nodes_are_spread_over_machines(sentinel: Rendered) -> None:
    spec = sentinel.get("StatefulSet", "reframe-redis-sentinel")["spec"]
    assert spec["replicas"] == 3
    rule = spec["template"]["spec"]["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert rule[0]["topologyKey"] == "kubernetes.io/hostname"
    assert sentinel.get("PodDisruptionBudget", "reframe-redis-sentinel")["spec"]["maxUnavailable"] == 1


def test_checkov_passes_the_documented_sentinel_overlay(sentinel: Rendered, tmp_path: Path) -> None:
    rendered = tmp_path / "prod-sentinel.yaml"
    rendered.write_text(sentinel.text)
    out = checkov("-f", str(rendered), "--framework", "kubernetes")
    m = re.search(r"Passed checks: (\d+), Failed checks: (\d+)", out)
    assert m and int(m.group(1)) > 100 and m.group(2) == "0", out
