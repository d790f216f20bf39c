"""``reframe exporter``: the one process that exports cluster-wide gauges.

Queue depths, slots, budget and breaker state describe the whole cluster, so exactly one replica
serves them; workers export only their own counters and histograms, and ``sum()`` over pods never
multiplies a cluster gauge.
"""

from __future__ import annotations

import logging
import signal
import threading

from prometheus_client import CollectorRegistry

from config import Settings
from reframe.exporter.collector import ClusterCollector, exporter_redis_client
from worker.health import HealthServer

log = logging.getLogger(__name__)


def build_exporter(settings: Settings) -> HealthServer:
    """A health/metrics server whose registry holds the cluster collector (not started)."""
    # Short timeouts and no retries: a scrape must report a Redis outage
    # (reframe_cluster_scrape_success 0) well inside Prometheus' scrape timeout, not time out itself.
    client = exporter_redis_client(settings)
    registry = CollectorRegistry()
    registry.register(ClusterCollector(client, settings))
    # Always ready: the exporter's job during a Redis outage is to report it, not to leave the Service.
    server = HealthServer(
        settings.metrics_host,
        settings.metrics_port,
        registry,
        liveness_max_age_s=60.0,
        readiness=lambda: True,
    )
    return server


def run_exporter(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT."""
    server = build_exporter(settings)
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("exporter serving cluster metrics on port %d", server.port)
    while not stop.wait(1.0):
        server.beat()
    server.stop()
