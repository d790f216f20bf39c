"""A real Prometheus scrapes a running local cluster (Redis, emulator, two workers, the exporter,
``reframe serve`` taking the jobs over HTTP) while jobs flow: every dashboard query and every alert expression must evaluate without error, and
the key series must carry data that matches what happened.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from producer import JobState, Producer
from reframe.api.keys import KeyStore
from reframe.localcluster import LocalCluster
from reframe.localproc import wait_until
from reframe.prom import PrometheusServer, start_prometheus
from tests.chaos.conftest import redis_of
from tests.cluster.conftest import ClusterFactory, upload, wait_terminal
from tests.observability.conftest import RULES, alert_rules, dashboard_targets, require_tool
from worker.contracts.keys import Keys
from worker.contracts.tenants import TenantLimits, TenantRegistry

pytestmark = pytest.mark.integration

NAMESPACE = "live"

# Panels that stay empty in a healthy run, and why (anything else must have data).
# Series that stay empty in a healthy run, and why; every other panel query must return data.
MAY_BE_EMPTY = {
    "reframe_retries_total": "no job needed a retry (the one refused job is a permanent failure)",
    "reframe_jobs_deferred_total": "nothing was deferred: no backoff, no open breaker, no rate pause",
    "reframe_breaker_transitions_total": "fal stayed healthy (a 403 is not a provider-health failure)",
    "reframe_celery_task_exceptions_total": "no task raised",
}


def substitute(expr: str) -> str:
    """The dashboard's Grafana variables, expanded as Grafana would for this namespace."""
    return expr.replace("$__rate_interval", "30s").replace("$namespace", NAMESPACE)


@pytest.fixture(scope="module")
def observed(
    make_cluster: ClusterFactory, sample_video: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalCluster, PrometheusServer, list[str]]]:
    require_tool("prometheus")
    cluster = make_cluster(
        workers=2,
        emulator_concurrency=3,
        emulator_processing_time_s=1.0,
        env={"REFRAME_MAX_CONCURRENCY": "3"},
    )
    exporter = cluster.start_exporter()
    api_url, _api = cluster.start_api()  # the API row: every wave goes through POST /v1/jobs/batch
    targets = [f"127.0.0.1:{w.metrics_port}" for w in cluster.workers] + [
        f"127.0.0.1:{exporter.metrics_port}",
        api_url.removeprefix("http://"),
    ]
    server = start_prometheus(
        tmp_path_factory.mktemp("prom"),
        targets,
        [RULES],
        scrape_interval_s=1.0,
        labels={"namespace": NAMESPACE},
    )
    try:
        server.wait_targets_up(timeout_s=60)
        url = upload(cluster.settings(), sample_video)
        assert cluster.emulator_control is not None
        cluster.emulator_control.set_faults(
            [
                {
                    "op": "submit",
                    "kind": "http",
                    "status": 403,
                    "times": 1,
                    "json": {"detail": "User is locked."},
                }
            ]
        )
        token, _ = KeyStore(redis_of(cluster), prefix="reframe").create("observed", ["enqueue", "read"])
        # a tenant with caps, so the spend-by-tenant row has headroom to show
        TenantRegistry(redis_of(cluster), Keys("reframe")).set(
            "observed", TenantLimits(daily_budget_usd=100, monthly_budget_usd=1000)
        )
        auth = {"Authorization": f"Bearer {token}"}
        with Producer(cluster.settings()) as p:
            ids: list[str] = []
            # Jobs keep flowing for a while, so rates have several samples.
            for wave in range(6):
                items = [{"video_url": url, "aspect_ratio": r} for r in ("9:16", "1:1", "4:3")]
                answer = httpx.post(
                    f"{api_url}/v1/jobs/batch", json={"items": items}, headers=auth, timeout=30
                )
                assert answer.status_code == 201, answer.text
                ids += [item["id"] for item in answer.json()["items"]]
                wait_until(
                    lambda n=len(ids): sum(1 for j in p.get_many(ids) if j and j.terminal) >= n - 3,
                    timeout_s=60,
                    what=f"wave {wave}",
                )
            wait_terminal(p, ids, timeout_s=60)
            # the dedupe row: a job with dedupe on leads, then an identical one is served its result
            same = {"video_url": url, "aspect_ratio": "21:9", "prompt": "observed dedupe"}
            for _ in range(2):
                ids.append(p.enqueue(same, dedupe=True))
                wait_terminal(p, ids[-1:], timeout_s=60)
        yield cluster, server, ids
    finally:
        server.stop()


def wait_for_data(server: PrometheusServer, expr: str, timeout_s: float = 60.0) -> list[float]:
    """Poll Prometheus (deadline) until ``expr`` returns numbers."""
    found: list[float] = []

    def ready() -> bool:
        found[:] = server.values(substitute(expr))
        return bool(found) and all(v == v for v in found)

    wait_until(ready, timeout_s=timeout_s, interval_s=0.5, what=f"data for {expr}")
    return found


def test_every_dashboard_query_evaluates_and_key_panels_have_data(
    observed: tuple[LocalCluster, PrometheusServer, list[str]],
) -> None:
    cluster, server, ids = observed
    ns = 'namespace=~"$namespace"'
    wait_for_data(server, f'sum(increase(reframe_jobs_finished_total{{outcome="succeeded", {ns}}}[5m])) > 0')
    wait_for_data(server, f"reframe_cluster_scrape_success{{{ns}}} == 1")
    # each target is scraped on its own schedule: the API's rates need two of its own samples
    wait_for_data(server, f"sum(rate(reframe_api_requests_total{{{ns}}}[$__rate_interval])) > 0")
    empty: list[str] = []
    for title, expr in dashboard_targets():
        data = server.query(substitute(expr))  # raises on a query Prometheus rejects
        if not data["result"] and not any(metric in expr for metric in MAY_BE_EMPTY):
            empty.append(f"{title}: {expr}")
    assert empty == [], "dashboard panels without data in a real run:\n" + "\n".join(empty)

    def total(expr: str) -> float:
        return sum(server.values(substitute(expr)))

    succeeded = sum(
        1 for j in Producer(cluster.settings()).get_many(ids) if j and j.state is JobState.SUCCEEDED
    )
    assert succeeded == len(ids) - 1  # the one job fal refused with 403
    # The last jobs finished a moment ago: wait (with a deadline) for a scrape that includes them.
    wait_until(
        lambda: total(f'sum(reframe_jobs_finished_total{{outcome="succeeded", {ns}}})') == succeeded,
        timeout_s=30,
        what="a scrape with every finished job",
    )
    assert total(f'sum(reframe_jobs_finished_total{{outcome="succeeded", {ns}}})') == succeeded
    assert total(f'sum(reframe_jobs_finished_total{{outcome="dead_lettered", {ns}}})') == 1
    # the served job made no fal request and cost nothing; the dedupe counters say what it saved
    assert total(f'sum(reframe_fal_requests_total{{op="submit", status_class="2xx", {ns}}})') == succeeded - 1
    assert total(f'sum(reframe_dedup_jobs_total{{outcome="served", {ns}}})') == 1
    assert total(f"sum(reframe_dedup_saved_usd_total{{{ns}}})") == pytest.approx(3 * 0.06)
    assert total(f"count(reframe_worker_info{{{ns}}})") == 2
    assert total(f"sum(reframe_slots_capacity{{{ns}}})") == 3
    assert total(f"sum(reframe_dead_letter_jobs{{{ns}}})") == 1
    assert total(f'max(reframe_breaker_state{{state="closed", {ns}}})') == 1
    # The exporter is its own scrape target: wait for a scrape of it after the last settlement too.
    expected_usd = (succeeded - 1) * 3 * 0.06  # 2.5 s clips, billed in whole seconds; one served
    wait_until(
        lambda: (
            total(f'sum(reframe_budget_spent_usd{{period="day", {ns}}})')
            == pytest.approx(expected_usd, rel=0.02)
        ),
        timeout_s=30,
        what=f"the exporter reporting ${expected_usd:.2f} spent",
    )


def test_every_alert_rule_evaluates_without_error(
    observed: tuple[LocalCluster, PrometheusServer, list[str]],
) -> None:
    _cluster, server, _ids = observed
    for rule in alert_rules():
        server.query(str(rule["expr"]))
    deadline = time.monotonic() + 30
    while True:
        loaded = server.rules()
        if len(loaded) == len(alert_rules()) and all(
            r.get("lastEvaluation", "").startswith("20") for r in loaded
        ):
            break
        assert time.monotonic() < deadline, "Prometheus did not evaluate every rule"
        time.sleep(0.5)
    assert [(r["name"], r.get("lastError")) for r in server.rules() if r.get("health") != "ok"] == []
    firing = {a["labels"]["alertname"] for a in server.alerts() if a.get("state") == "firing"}
    # A healthy run with one refused job: nothing critical may fire.
    assert not firing & {
        "ReframeNoWorkers",
        "ReframeConsumersStuck",
        "ReframeExporterRedisUnreachable",
        "ReframeBudgetExhausted",
        "ReframeBreakerOpen",
    }, firing
