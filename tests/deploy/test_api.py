"""The HTTP API (`reframe serve`) in the rendered manifests: probes, shutdown budget, secrets,
scaling, disruption budget, network policy, scraping and the Ingress (k8s/base/api-*.yaml,
k8s/components/{ingress,network-policy,pdb,monitoring}, k8s/overlays/prod/api-hpa.yaml)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from reframe.api.server import GRACEFUL_SHUTDOWN_S
from tests.deploy.conftest import Rendered
from tests.deploy.test_invariants import secret_setting_envs, settings_value

API = "reframe-api"
WEBHOOK_PATH = "/v1/fal/webhook"
UPLOAD_PATH = "/v1/uploads"
#: routes that must never be reachable through the Ingress
INTERNAL_PATHS = ("/metrics", "/healthz", "/readyz", "/openapi.json", "/docs")
QUANTITY = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "": 1}


def _pod(r: Rendered, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = r.get("Deployment", name)["spec"]["template"]
    return spec


def _container(r: Rendered, name: str = API) -> dict[str, Any]:
    c: dict[str, Any] = _pod(r, name)["spec"]["containers"][0]
    return c


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _port(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return int(next(p["containerPort"] for p in c["ports"] if p["name"] == port))


def _bytes(quantity: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|)", quantity)
    assert m, f"unexpected quantity {quantity!r}"
    return int(m.group(1)) * QUANTITY[m.group(2)]


def _nginx_size(value: str) -> int:
    """nginx sizes: ``10m`` = 10 MiB, ``512k`` = 512 KiB, a plain number is bytes."""
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    assert m, f"unexpected nginx size {value!r}"
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]


# --- the pod ----------------------------------------------------------------------------------


def test_api_serves_on_the_configured_port_with_one_process(overlay: Rendered) -> None:
    c = _container(overlay)
    assert c["args"] == ["serve"], "host, port and processes come from the settings ConfigMap"
    port = int(settings_value(overlay, "REFRAME_API_PORT"))
    assert _port(c, "http") == port
    assert overlay.settings().get("REFRAME_API_HOST") == "0.0.0.0", "reachable from the Service"
    # each uvicorn process has its own registry: one per pod, or a scrape sees a random process
    assert settings_value(overlay, "REFRAME_API_WORKERS") == 1
    svc = overlay.get("Service", API)["spec"]
    assert _selects(svc["selector"], _pod(overlay, API)["metadata"]["labels"])
    (sp,) = svc["ports"]
    assert _port(c, sp["targetPort"]) == port and sp["name"] == "http"


def test_api_probes_health_endpoints(overlay: Rendered) -> None:
    c = _container(overlay)
    port = int(settings_value(overlay, "REFRAME_API_PORT"))
    paths = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        http = c[probe]["httpGet"]
        assert _port(c, http["port"]) == port, f"{probe} port"
        paths[probe] = http["path"]
    # liveness never depends on Redis (no crash loop during a Redis outage); readiness does
    assert paths == {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}


def test_api_shutdown_budget_and_rollout(overlay: Rendered) -> None:
    spec = _pod(overlay, API)["spec"]
    c = _container(overlay)
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", "preStop lets endpoints and the ingress controller drop the pod first"
    pause_s = float(command[1])
    grace = spec["terminationGracePeriodSeconds"]
    assert grace >= pause_s + GRACEFUL_SHUTDOWN_S + 10, (
        f"grace {grace} s < preStop {pause_s} s + uvicorn's graceful shutdown {GRACEFUL_SHUTDOWN_S} s + 10 s"
    )
    strategy = overlay.get("Deployment", API)["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_api_gets_the_same_secrets_as_the_worker(overlay: Rendered) -> None:
    def secret_env(c: dict[str, Any]) -> dict[str, tuple[str, bool]]:
        out = {}
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                out[e["name"]] = (ref["key"], bool(ref.get("optional", False)))
        return out

    api, worker = secret_env(_container(overlay)), secret_env(_container(overlay, "reframe-worker"))
    assert api == worker, "the API validates callbacks, signs webhook tokens and uploads like the worker"
    assert secret_setting_envs() <= set(api), "every secret setting reaches the API"


def test_api_tmp_holds_concurrent_uploads(overlay: Rendered) -> None:
    spec = _pod(overlay, API)["spec"]
    (mount,) = [m for m in _container(overlay)["volumeMounts"] if m["mountPath"] == "/tmp"]
    vol = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    limit = _bytes(vol["emptyDir"]["sizeLimit"])
    upload = settings_value(overlay, "REFRAME_MAX_UPLOAD_BYTES")
    assert limit >= 4 * upload, f"/tmp ({limit} bytes) must hold a few uploads of {upload} bytes at once"


def test_api_spreads_like_the_worker(overlay: Rendered) -> None:
    def spread(name: str) -> Any:
        affinity = _pod(overlay, name)["spec"]["affinity"]
        terms = affinity["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        return [(t["weight"], t["podAffinityTerm"]["topologyKey"]) for t in terms], terms

    (api, api_terms), (worker, _) = spread(API), spread("reframe-worker")
    assert api == worker
    labels = _pod(overlay, API)["metadata"]["labels"]
    for t in api_terms:
        assert _selects(t["podAffinityTerm"]["labelSelector"]["matchLabels"], labels), "spreads its own pods"


# --- replicas, disruptions ------------------------------------------------------------------


def test_prod_runs_at_least_two_api_pods(rendered: dict[str, Rendered]) -> None:
    prod = rendered["prod"]
    hpa = prod.get("HorizontalPodAutoscaler", API)["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": API}
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert "replicas" not in prod.get("Deployment", API)["spec"], "the HPA owns the count"
    assert "cpu" in _container(prod)["resources"]["requests"], "CPU utilisation needs a request"


def test_prod_pdb_covers_the_api(rendered: dict[str, Rendered]) -> None:
    prod = rendered["prod"]
    labels = _pod(prod, API)["metadata"]["labels"]
    pdbs = [
        p
        for p in prod.of_kind("PodDisruptionBudget")
        if _selects(p["spec"]["selector"]["matchLabels"], labels)
    ]
    assert [p["metadata"]["name"] for p in pdbs] == [API]
    spec = pdbs[0]["spec"]
    minimum = prod.get("HorizontalPodAutoscaler", API)["spec"]["minReplicas"]
    assert spec.get("maxUnavailable") == 1 and minimum - spec["maxUnavailable"] >= 1, "a drain keeps one pod"
    # and the worker's PDB does not select API pods (nor the reverse)
    worker_labels = _pod(prod, "reframe-worker")["metadata"]["labels"]
    assert not _selects(spec["selector"]["matchLabels"], worker_labels)


# --- network policy ----------------------------------------------------------------------------


def _policies_for(r: Rendered, labels: dict[str, str]) -> list[dict[str, Any]]:
    out = []
    for np in r.of_kind("NetworkPolicy"):
        sel = np["spec"]["podSelector"]
        ok = _selects(sel.get("matchLabels", {}), labels)
        for expr in sel.get("matchExpressions", []):
            assert expr["operator"] == "In", expr
            ok = ok and labels.get(expr["key"]) in expr["values"]
        if ok:
            out.append(np)
    return out


def _ingress_allows(r: Rendered, labels: dict[str, str], port: int, *, namespace: str) -> bool:
    for np in _policies_for(r, labels):
        for rule in np["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            if ports and port not in ports:
                continue
            for peer in rule.get("from", []):
                ns = peer.get("namespaceSelector", {}).get("matchLabels", {})
                if ns.get("kubernetes.io/metadata.name") == namespace and "podSelector" not in peer:
                    return True
    return False


def _egress_ports(r: Rendered, labels: dict[str, str]) -> set[int]:
    """Ports the pods may reach anywhere (rules without a `to`)."""
    return {
        p["port"]
        for np in _policies_for(r, labels)
        for rule in np["spec"].get("egress", [])
        if "to" not in rule
        for p in rule.get("ports", [])
    }


def test_network_policy_lets_prometheus_and_the_ingress_controller_reach_the_api(
    rendered: dict[str, Rendered],
) -> None:
    prod = rendered["prod"]
    labels = _pod(prod, API)["metadata"]["labels"]
    port = int(settings_value(prod, "REFRAME_API_PORT"))
    assert _ingress_allows(prod, labels, port, namespace="monitoring"), "Prometheus scrapes /metrics"
    assert _ingress_allows(prod, labels, port, namespace="ingress-nginx"), "the Ingress reaches the pods"
    assert not _ingress_allows(prod, labels, port, namespace="default"), "nothing else"
    # DNS, Redis (plain and TLS), HTTPS (fal storage, fal's JWKS, guarded fetches of input videos)
    assert {53, 6379, 6380, 443} <= _egress_ports(prod, labels)
    # the default deny still covers the API pods
    deny = prod.get("NetworkPolicy", "reframe-default-deny")["spec"]
    assert _selects(deny["podSelector"]["matchLabels"], labels)
    # and the workers and the exporter are still scraped
    for name in ("reframe-worker", "reframe-exporter"):
        wl = _pod(prod, name)["metadata"]["labels"]
        assert _ingress_allows(prod, wl, 17300, namespace="monitoring"), name


# --- scraping ------------------------------------------------------------------------------------


def test_a_service_monitor_scrapes_every_api_pod(rendered: dict[str, Rendered]) -> None:
    prod = rendered["prod"]
    svc = prod.get("Service", API)
    c = _container(prod)
    scraped = []
    for sm in prod.of_kind("ServiceMonitor"):
        if not _selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]):
            continue
        for ep in sm["spec"]["endpoints"]:
            ports = [p for p in svc["spec"]["ports"] if p["name"] == ep["port"]]
            if ports:
                assert ep["path"] == "/metrics"
                scraped.append(_port(c, ports[0]["targetPort"]))
                assert sm["metadata"]["labels"].get("release"), "Prometheus' serviceMonitorSelector label"
    assert scraped == [int(settings_value(prod, "REFRAME_API_PORT"))]


# --- Ingress -----------------------------------------------------------------------------------


def _paths(ing: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (p["path"], p["pathType"], p["backend"])
        for rule in ing["spec"]["rules"]
        for p in rule["http"]["paths"]
    ]


def _routed(ingresses: list[dict[str, Any]], path: str) -> bool:
    for ing in ingresses:
        for p, kind, _backend in _paths(ing):
            if (kind == "Exact" and path == p) or (
                kind == "Prefix" and (path == p or path.startswith(p + "/"))
            ):
                return True
    return False


def test_ingress_exposes_only_v1_over_tls(rendered: dict[str, Rendered]) -> None:
    prod = rendered["prod"]
    ingresses = prod.of_kind("Ingress")
    assert ingresses, "prod includes the ingress component"
    hosts = set()
    for ing in ingresses:
        spec, name = ing["spec"], ing["metadata"]["name"]
        rule_hosts = {rule["host"] for rule in spec["rules"]}
        tls_hosts = {h for t in spec["tls"] for h in t["hosts"]}
        assert rule_hosts <= tls_hosts and all(t["secretName"] for t in spec["tls"]), (
            f"{name}: TLS for every host"
        )
        assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/force-ssl-redirect"] == "true"
        for path, kind, backend in _paths(ing):
            assert path == "/v1" or path.startswith("/v1/"), f"{name}: {path} is not under /v1"
            assert kind in {"Exact", "Prefix"}, f"{name}: {path}: pathType {kind} is implementation-specific"
            assert backend["service"]["name"] == API and backend["service"]["port"] == {"name": "http"}
        hosts |= rule_hosts
    assert (
        _routed(ingresses, WEBHOOK_PATH)
        and _routed(ingresses, "/v1/jobs")
        and _routed(ingresses, UPLOAD_PATH)
    )
    for path in INTERNAL_PATHS:
        assert not _routed(ingresses, path), f"{path} must stay inside the cluster"
    public_url = prod.settings().get("REFRAME_PUBLIC_URL")
    if public_url:  # webhooks on: fal must reach the webhook path of an Ingress host over https
        parts = urlsplit(public_url)
        assert parts.scheme == "https" and parts.hostname in hosts, public_url


def test_ingress_body_limits_match_the_app(rendered: dict[str, Rendered]) -> None:
    prod = rendered["prod"]
    json_limit = settings_value(prod, "REFRAME_API_MAX_BODY_BYTES")
    upload_limit = settings_value(prod, "REFRAME_MAX_UPLOAD_BYTES")
    for ing in prod.of_kind("Ingress"):
        notes = ing["metadata"]["annotations"]
        limit = _nginx_size(notes["nginx.ingress.kubernetes.io/proxy-body-size"])
        paths = {p for p, _k, _b in _paths(ing)}
        if paths == {UPLOAD_PATH}:
            assert limit == upload_limit, f"uploads: nginx {limit} != REFRAME_MAX_UPLOAD_BYTES {upload_limit}"
            assert notes.get("nginx.ingress.kubernetes.io/proxy-request-buffering") == "off", "stream uploads"
        else:
            assert UPLOAD_PATH not in paths, "the upload path has its own Ingress and limit"
            assert limit == json_limit, f"nginx {limit} != REFRAME_API_MAX_BODY_BYTES {json_limit}"
