"""A real Prometheus scrapes a worker-style, an API-style and an exporter-style endpoint; every
dashboard query and every alert expression must evaluate there without error, and the key series
must have data.

The targets are in-process: HealthServers exposing a worker Metrics registry and an API
(``reframe serve``) ApiMetrics registry that a background thread keeps feeding (so rates are
non-zero), and a HealthServer exposing a ClusterCollector over a populated Redis. All get
``namespace="test"`` as a target label, like a ServiceMonitor would add.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry

from config import Settings
from reframe.api.middleware import ApiMetrics
from reframe.exporter.collector import ClusterCollector, exporter_redis_client
from reframe.prom import PrometheusError, PrometheusServer, render_config, start_prometheus
from tests.observability.conftest import RULES, alert_rules, dashboard_targets, require_tool
from worker.contracts.keys import Keys
from worker.contracts.tenants import TenantLimits, TenantRegistry
from worker.contracts.wire import SUBMIT_TASK, task_message
from worker.flow import FlowControl
from worker.health import HealthServer
from worker.metrics import Metrics

pytestmark = pytest.mark.integration

NAMESPACE = "test"

# Queries that may legitimately have no series in this synthetic setup (none so far: the feeder
# below exercises every helper). Keep this list short and explained.
MAY_BE_EMPTY: set[str] = set()


def populate(r: redis.Redis, settings: Settings) -> None:
    """Some state in every structure the exporter reads."""
    k = Keys(settings.key_prefix)
    secs, usecs = r.time()
    now = int(secs) * 1000 + int(usecs) // 1000
    r.hset(k.job("q1"), mapping={"state": "QUEUED", "ts_QUEUED": now - 120_000})
    r.lpush(settings.queue_name, task_message(SUBMIT_TASK, ["q1"], queue=settings.queue_name, priority=0))
    r.hset(k.job("w1"), mapping={"state": "WAITING", "ts_QUEUED": now - 60_000})
    r.zadd(k.wait_queue, {f"default|2|{1:016d}|w1": 0})  # as worker/contracts/lua/slots_lib.lua queues
    r.hincrby(k.fair, "depth:2", 1)
    # a tenant with caps: the spend-by-tenant row shows its headroom
    TenantRegistry(r, k).set("acme", TenantLimits(daily_budget_usd=10, monthly_budget_usd=100))
    day, month = (
        time.strftime("%Y-%m-%d", time.gmtime(now / 1000)),
        time.strftime("%Y-%m", time.gmtime(now / 1000)),
    )
    for key in k.budget_periods(day, month, "acme")[2:]:  # named tenants are those that spent
        r.hset(key, mapping={"spent": 180_000, "reserved": 0})
    r.zadd(k.slots, {"s1": now - 5_000})  # an expired lease
    r.hset(k.job("s1"), mapping={"state": "IN_PROGRESS", "ts_SUBMITTING": now - 90_000})
    r.zadd(k.track, {"s1": now + 1_000})
    r.zadd(k.dlq, {"x1": now})
    r.xadd(k.events, {"job_id": "done"})
    flow = FlowControl.from_settings(r, settings)
    flow.breaker.force_open_until(now + 600_000)
    assert flow.budget.reserve("s1", 1_000_000).ok


def feed(m: Metrics, api: ApiMetrics, stop: threading.Event) -> None:
    """Keep every worker and API metric moving so rate() and histogram_quantile() have data."""
    i = 0
    while not stop.is_set():
        i += 1
        api.requests.labels("/v1/jobs", "POST", "2xx" if i % 10 else "5xx").inc()
        api.latency.labels("/v1/jobs", "POST").observe(0.004 + (i % 5) / 1000)
        api.requests.labels("/v1/fal/webhook", "POST", "2xx").inc()
        api.latency.labels("/v1/fal/webhook", "POST").observe(0.002)
        api.fal_webhook("accepted")
        if i % 7 == 0:
            api.fal_webhook("rejected_signature")
        m.job_completion("webhook")
        if i % 9 == 0:
            m.job_completion("status")
        m.job_enqueued("high")
        m.job_finished("succeeded", "high", 40.0 + i % 7)
        if i % 5 == 0:
            m.job_finished("failed", "normal", 12.0)
            m.dead_letter("retries_exhausted")
        m.job_queue_wait("high", 0.5 + i % 3)
        m.job_deferred("breaker_open")
        m.fal_request("submit", "2xx", 0.2)
        m.fal_request("status", "429" if i % 4 == 0 else "2xx", 0.05)
        m.fal_queued(3.0)
        m.fal_inference(25.0)
        m.retry("http_429")
        m.ambiguous_submit("dead_letter")
        m.spent(0.5)
        m.dedup("led")
        m.dedup("served", 0.18)
        m.rate_limit_waited(0.01)
        m.rate_limit_paused(5.0)
        m.breaker_transition("closed", "open")
        m.budget_rejection("day")
        m.result_published()
        m.callback_delivery("delivered", 0.1)
        m.output_copy("copied", 0.15, 4096)
        m.output_verified("ok")
        m.tracker_load(3, capacity=2000)
        m.tracker_stream_reconnect()
        m.tracker_poll("ok")
        m.celery_task_started("reframe.submit")
        m.celery_task_exception("reframe.submit", "TimeoutError")
        m.celery_task_finished("reframe.submit", "succeeded", 0.3)
        stop.wait(0.2)


@pytest.fixture
def live(
    rclient: redis.Redis, make_settings: Callable[..., Settings], workdir: Path
) -> Iterator[PrometheusServer]:
    require_tool("prometheus")
    settings = make_settings(max_concurrency=4)
    populate(rclient, settings)

    worker_reg = CollectorRegistry()
    metrics = Metrics(worker_reg)
    api_metrics = ApiMetrics(CollectorRegistry(), webhooks_on=True)
    exporter_reg = CollectorRegistry()
    exporter_client = exporter_redis_client(settings)
    exporter_reg.register(ClusterCollector(exporter_client, settings))
    worker = HealthServer("127.0.0.1", 0, worker_reg, readiness=lambda: True)
    exporter = HealthServer("127.0.0.1", 0, exporter_reg, readiness=lambda: True)
    api = HealthServer("127.0.0.1", 0, api_metrics.registry, readiness=lambda: True)
    stop = threading.Event()
    feeder = threading.Thread(target=feed, args=(metrics, api_metrics, stop), daemon=True)
    worker.start()
    exporter.start()
    api.start()
    feeder.start()
    server = None
    try:
        server = start_prometheus(
            workdir,
            [f"127.0.0.1:{worker.port}", f"127.0.0.1:{exporter.port}", f"127.0.0.1:{api.port}"],
            [RULES],
            scrape_interval_s=1.0,
            labels={"namespace": NAMESPACE},
        )
        server.wait_targets_up(timeout_s=60)
        yield server
    finally:
        if server is not None:
            server.stop()
        stop.set()
        feeder.join(5)
        worker.stop()
        exporter.stop()
        api.stop()
        exporter_client.close()


def live_substitute(expr: str) -> str:
    # The dashboard's variables as Grafana would expand them for this namespace.
    return expr.replace("$__rate_interval", "30s").replace("$namespace", NAMESPACE)


def wait_for_data(server: PrometheusServer, expr: str, timeout_s: float = 40.0) -> list[float]:
    deadline = time.monotonic() + timeout_s
    while True:
        values = server.values(expr)
        if values and all(v == v for v in values):  # present and not NaN
            return values
        if time.monotonic() > deadline:
            raise AssertionError(f"no data for {expr} after {timeout_s}s")
        time.sleep(0.5)


def test_dashboard_and_alerts_in_real_prometheus(live: PrometheusServer) -> None:
    server = live
    # Rates need two samples in the window; wait until the busiest series has a rate.
    wait_for_data(server, f'sum(rate(reframe_jobs_finished_total{{namespace="{NAMESPACE}"}}[30s])) > 0')
    wait_for_data(server, f'reframe_cluster_scrape_success{{namespace="{NAMESPACE}"}} == 1')
    # every target is scraped on its own schedule: the API's rates need two of its own samples too
    wait_for_data(server, f'sum(rate(reframe_api_requests_total{{namespace="{NAMESPACE}"}}[30s])) > 0')
    wait_for_data(server, f'sum(rate(reframe_api_fal_webhooks_total{{namespace="{NAMESPACE}"}}[30s])) > 0')
    wait_for_data(
        server,
        "histogram_quantile(0.95, sum by (le) "
        f'(rate(reframe_job_end_to_end_seconds_bucket{{namespace="{NAMESPACE}"}}[30s])))',
    )

    empty: list[str] = []
    for title, expr in dashboard_targets():
        data = server.query(live_substitute(expr))  # raises PrometheusError on a bad query
        if not data["result"] and title not in MAY_BE_EMPTY:
            empty.append(f"{title}: {expr}")
    assert empty == [], "dashboard queries without data:\n" + "\n".join(empty)

    # Key numbers match what was set up.
    def one(expr: str) -> float:
        values = server.values(live_substitute(expr))
        assert len(values) == 1, (expr, values)
        return values[0]

    ns = 'namespace=~"$namespace"'
    assert one(f"count(reframe_worker_info{{{ns}}})") == 1
    assert one(f'max(reframe_breaker_state{{state="open", {ns}}})') == 1
    assert one(f"sum(reframe_slots_in_use{{{ns}}})") == 1
    assert one(f"sum(reframe_slot_leases_expired{{{ns}}})") == 1
    assert one(f"sum(reframe_slots_capacity{{{ns}}})") == 4
    assert one(f'sum(reframe_queue_depth{{where="celery", {ns}}})') == 1
    assert one(f'max(reframe_queue_oldest_age_seconds{{where="celery", {ns}}})') >= 120
    assert one(f'sum(reframe_budget_reserved_usd{{period="day", {ns}}})') == pytest.approx(1.0)
    assert one(f'sum(rate(reframe_jobs_finished_total{{outcome="succeeded", {ns}}}[$__rate_interval]))') > 0
    assert one(f"max(reframe_api_fal_webhooks_enabled{{{ns}}})") == 1
    assert one(f'sum(rate(reframe_api_fal_webhooks_total{{outcome="accepted", {ns}}}[$__rate_interval]))') > 0
    assert one(f'sum(rate(reframe_job_completions_total{{via="webhook", {ns}}}[$__rate_interval]))') > 0

    # Every alert expression evaluates, and Prometheus evaluated every rule without error.
    for rule in alert_rules():
        server.query(str(rule["expr"]))

    def rules_evaluated() -> bool:
        loaded = server.rules()
        return len(loaded) == len(alert_rules()) and all(
            r.get("lastEvaluation", "").startswith("20") for r in loaded
        )

    deadline = time.monotonic() + 20
    while not rules_evaluated():
        assert time.monotonic() < deadline, "rules were not evaluated"
        time.sleep(0.5)
    unhealthy = [(r["name"], r.get("lastError")) for r in server.rules() if r.get("health") != "ok"]
    assert unhealthy == []

    # The open breaker and the expired lease are noticed (pending: their for: is minutes long).
    deadline = time.monotonic() + 20
    while True:
        active = {
            (a["labels"]["alertname"], a["labels"].get("namespace"), a["state"]) for a in server.alerts()
        }
        if {
            ("ReframeBreakerOpen", NAMESPACE, "pending"),
            ("ReframeExpiredSlotLeases", NAMESPACE, "pending"),
        } <= active:
            break
        assert time.monotonic() < deadline, f"expected pending alerts, got {sorted(active)}"
        time.sleep(0.5)
    names = {a[0] for a in active}
    assert "ReframeWorkerMetricsAbsent" not in names and "ReframeExporterMetricsAbsent" not in names


def test_bad_query_raises_and_stop(workdir: Path) -> None:
    require_tool("prometheus")
    server = start_prometheus(workdir, [], [])
    try:
        server.wait_targets_up(timeout_s=10)  # no targets: trivially up
        assert server.values("vector(1)") == [1.0]
        with pytest.raises(PrometheusError, match=r"bad_data"):
            server.query("sum(rate(x[5m])")
    finally:
        server.stop()
    assert not server.process.alive()
    assert not server.ready()


def test_render_config_is_valid(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    path = tmp_path / "prometheus.yml"
    path.write_text(
        render_config(["127.0.0.1:1", "127.0.0.1:2"], [RULES], scrape_interval_s=0.5, labels={"a": "b"})
    )
    out = subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"scrape_interval": "500ms"' in path.read_text()  # JSON is valid YAML


def test_start_prometheus_reports_a_bad_rule_file(tmp_path: Path) -> None:
    require_tool("prometheus")
    bad = tmp_path / "bad.yml"
    bad.write_text("groups: [{name: x, rules: [{record: 'x:y', expr: 'sum(('}]}]\n")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="did not start"):
        start_prometheus(tmp_path / "prom", ["127.0.0.1:1"], [bad])
    assert time.monotonic() - started < 20


def test_wait_targets_up_names_the_down_target(workdir: Path) -> None:
    require_tool("prometheus")
    from reframe.localproc import free_port

    dead = f"127.0.0.1:{free_port()}"
    server = start_prometheus(workdir, [dead], [], scrape_interval_s=0.5)
    try:
        with pytest.raises(TimeoutError, match=dead):
            server.wait_targets_up(timeout_s=4)
    finally:
        server.stop()
