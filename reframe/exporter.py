"""``reframe exporter``: the one process that exports cluster-wide gauges.

Queue depths, slots, budget and breaker state describe the whole cluster, so exactly one replica
serves them; workers export only their own counters and histograms, and ``sum()`` over pods never
multiplies a cluster gauge.
"""

from __future__ import annotations

import logging
import signal
import threading

import redis
from prometheus_client import CollectorRegistry

from config import Settings
from worker.cluster_metrics import ClusterCollector
from worker.health import HealthServer

log = logging.getLogger(__name__)


def build_exporter(settings: Settings) -> HealthServer:
    """A health/metrics server whose registry holds the cluster collector (not started)."""
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    registry = CollectorRegistry()
    registry.register(ClusterCollector(client, settings))
    server = HealthServer(
        settings.metrics_host,
        settings.metrics_port,
        registry,
        liveness_max_age_s=60.0,
        readiness=lambda: bool(client.ping()),
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
