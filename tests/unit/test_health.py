"""worker.health: /metrics, /livez, /healthz, /readyz semantics over real HTTP."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry

from worker import health as health_mod
from worker.health import ConsumerLink, HealthServer
from worker.metrics import Metrics
from worker.watchdog import TaskWatchdog


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read().decode()


@pytest.fixture
def make_server() -> Iterator[Callable[..., HealthServer]]:
    servers: list[HealthServer] = []

    def factory(readiness: Callable[[], bool] = lambda: True, **kw: float) -> HealthServer:
        reg = CollectorRegistry()
        Metrics(reg).job_enqueued("high")
        srv = HealthServer("127.0.0.1", 0, reg, readiness=readiness, **kw)
        srv.start()
        servers.append(srv)
        return srv

    yield factory
    for srv in servers:
        srv.stop()


def test_ephemeral_port_and_metrics(make_server: Callable[..., HealthServer]) -> None:
    srv = make_server()
    assert srv.port > 0
    status, ctype, body = get(f"{srv.url}/metrics")
    assert status == 200
    assert ctype.startswith("text/plain")
    assert 'reframe_jobs_enqueued_total{priority="high"} 1.0' in body


def test_liveness_follows_beats(make_server: Callable[..., HealthServer]) -> None:
    srv = make_server(liveness_max_age_s=0.3)
    assert get(f"{srv.url}/livez")[0] == 200  # alive from construction (grace for the first beat)
    assert get(f"{srv.url}/healthz")[0] == 200
    time.sleep(0.45)
    status, _, body = get(f"{srv.url}/livez")
    assert status == 503 and "stale" in body
    assert get(f"{srv.url}/healthz")[0] == 503
    srv.beat()
    assert get(f"{srv.url}/livez")[0] == 200


def test_readiness_is_independent_of_liveness(make_server: Callable[..., HealthServer]) -> None:
    broker_up = threading.Event()
    srv = make_server(readiness=broker_up.is_set)
    # A broker/Redis outage: not ready, but alive (Kubernetes must not restart the pod).
    assert get(f"{srv.url}/readyz")[0] == 503
    assert get(f"{srv.url}/livez")[0] == 200
    broker_up.set()
    status, _, body = get(f"{srv.url}/readyz")
    assert status == 200 and body.strip() == "ready"


def test_readiness_exception_and_timeout_mean_not_ready(
    make_server: Callable[..., HealthServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    def raises() -> bool:
        raise ConnectionError("redis down")

    srv = make_server(readiness=raises)
    status, _, body = get(f"{srv.url}/readyz")
    assert status == 503 and "ConnectionError" in body
    assert get(f"{srv.url}/livez")[0] == 200

    monkeypatch.setattr(health_mod, "READINESS_TIMEOUT_S", 0.2)
    release = threading.Event()
    slow = make_server(readiness=lambda: release.wait(5))
    started = time.monotonic()
    status, _, body = get(f"{slow.url}/readyz")
    assert status == 503 and "took over" in body
    assert time.monotonic() - started < 2
    release.set()


def test_unknown_path_and_head(make_server: Callable[..., HealthServer]) -> None:
    srv = make_server()
    assert get(f"{srv.url}/nope")[0] == 404
    req = urllib.request.Request(f"{srv.url}/livez", method="HEAD")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200
        assert resp.read() == b""


def test_metrics_collector_failure_gives_500(make_server: Callable[..., HealthServer]) -> None:
    class Broken:
        def collect(self):  # type: ignore[no-untyped-def]
            raise RuntimeError("collector exploded")

    srv = make_server()
    srv.registry.register(Broken())  # type: ignore[arg-type]
    assert get(f"{srv.url}/metrics")[0] == 500
    assert get(f"{srv.url}/livez")[0] == 200


def test_stop_is_idempotent_and_frees_the_port() -> None:
    srv = HealthServer("127.0.0.1", 0, CollectorRegistry(), readiness=lambda: True)
    with srv:
        port = srv.port
        assert get(f"http://127.0.0.1:{port}/livez")[0] == 200
    srv.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=2)
    # the same port can be bound again right away
    again = HealthServer("127.0.0.1", port, CollectorRegistry(), readiness=lambda: True)
    again.start()
    assert again.port == port
    again.stop()


def test_invalid_liveness_age() -> None:
    with pytest.raises(ValueError):
        HealthServer("127.0.0.1", 0, CollectorRegistry(), readiness=lambda: True, liveness_max_age_s=0)


def test_concurrent_scrapes_do_not_block_probes(make_server: Callable[..., HealthServer]) -> None:
    gate = threading.Event()

    class Slow:
        def collect(self):  # type: ignore[no-untyped-def]
            gate.wait(5)
            return []

    srv = make_server()
    srv.registry.register(Slow())  # type: ignore[arg-type]
    scrape = threading.Thread(target=get, args=(f"{srv.url}/metrics",))
    scrape.start()
    time.sleep(0.1)
    started = time.monotonic()
    assert get(f"{srv.url}/livez")[0] == 200
    assert time.monotonic() - started < 1
    gate.set()
    scrape.join(5)


# --- process health: the task watchdog (worker/watchdog.py) and the consumer link --------------


def test_watchdog_acts_only_on_runs_past_the_limit() -> None:
    now = [100.0]
    acted: list[list[str]] = []
    dog = TaskWatchdog(
        5.0, clock=lambda: now[0], on_overrun=lambda late: acted.append([t.task_id for t in late])
    )
    dog.started("a", "reframe.submit", thread_id=1)
    now[0] = 103.0
    dog.started("b", "reframe.submit", thread_id=2)
    now[0] = 105.0
    assert not dog.check() and acted == []  # exactly at the limit is still in time
    now[0] = 106.0
    assert dog.check() and acted == [["a"]]
    dog.finished("a", thread_id=1)
    now[0] = 108.5
    assert dog.check() and acted[-1] == ["b"]
    dog.finished("b", thread_id=2)
    assert dog.running() == [] and not dog.check()


def test_consumer_link_starts_down() -> None:
    link = ConsumerLink()
    assert not link.is_up()
    link.set(True)
    assert link.is_up()
    link.set(False)
    assert not link.is_up()
