"""A Redis restart (SIGKILL, same port and AOF data) while workers hold unacked tasks.

Before the fix both busy workers exited (status 0) in kombu's reconnect clean-up; see
:mod:`worker.watchdog` (``guard_kombu_restore``) for the cause. The cluster is private to the test,
so everything in the emulator's ledger belongs to its jobs.
"""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from producer import Producer
from reframe.localcluster import start_cluster
from reframe.localproc import RedisServer, start_redis, wait_until
from tests.cluster.conftest import submits_for, wait_terminal
from worker.contracts.keys import Keys

pytestmark = pytest.mark.integration

SUBMIT_DELAY_S = 3.0


def data_url(path: Path) -> str:
    """The clip inline as a ``data:`` URI (no fetch of a loopback URL needed)."""
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def _unacked(server: RedisServer) -> int:
    """Messages kombu delivered and nobody acked yet (kombu's default ``unacked`` hash)."""
    client = redis.Redis(port=server.port)
    try:
        return int(client.hlen("unacked"))
    finally:
        client.close()


def _readyz(port: int) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=3).status_code
    except httpx.HTTPError:
        return 0


def _livez(port: int) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/livez", timeout=3).status_code
    except httpx.HTTPError:
        return 0


def test_busy_workers_survive_a_redis_restart(tmp_path: Path, sample_video: Path) -> None:
    data_dir = tmp_path / "redis"
    server = start_redis(data_dir, appendonly=True)
    cluster = start_cluster(
        tmp_path / "cluster",
        workers=2,
        redis_url=server.url,
        emulator_concurrency=8,
        emulator_processing_time_s=1.0,
        env={
            "REFRAME_WORKER_CONCURRENCY": "4",  # spare threads: the consumer sits in BRPOP
            "REFRAME_MAX_CONCURRENCY": "8",
            # Short limits: the messages whose acks the outage swallowed come back within the test.
            "REFRAME_TASK_SOFT_TIME_LIMIT_S": "6",
            "REFRAME_TASK_TIME_LIMIT_S": "8",
            "REFRAME_VISIBILITY_TIMEOUT_S": "15",
            "REFRAME_TRACKER_CLAIM_TTL_S": "3",
            "REFRAME_SLOT_LEASE_TTL_S": "6",
            "REFRAME_SUBMIT_RATE_PER_S": "100",
            "REFRAME_SUBMIT_BURST": "50",
        },
    )
    try:
        assert cluster.emulator_control is not None
        control = cluster.emulator_control
        url = data_url(sample_video)
        # Every submit is answered only after SUBMIT_DELAY_S: the tasks are mid-flight, unacked.
        control.set_faults([{"op": "submit", "kind": "slow", "delay_s": SUBMIT_DELAY_S, "times": 4}])
        requests = [
            {"video_url": url, "aspect_ratio": "9:16", "prompt": f"restart {uuid.uuid4().hex}"}
            for _ in range(4)
        ]
        with Producer(cluster.settings()) as p:
            ids = p.enqueue_many(requests)
            wait_until(
                lambda: sum(1 for r in control.ledger()["requests"] if r["op"] == "submit") >= 4,
                timeout_s=30,
                what="4 submits held at the emulator",
            )
            # appendfsync always (start_redis): everything acknowledged so far survives the SIGKILL
            ports = [w.metrics_port for w in cluster.workers]
            assert all(_readyz(port) == 200 for port in ports)

            server.process.kill()
            server.process.popen.wait(timeout=10)
            # While Redis is down: not ready, but alive (Kubernetes must not restart the pod).
            wait_until(
                lambda: all(_readyz(port) == 503 for port in ports),
                timeout_s=10,
                what="workers report not ready",
            )
            assert all(_livez(port) == 200 for port in ports)
            assert all(w.process.alive() for w in cluster.workers)

            server = start_redis(data_dir, port=server.port, appendonly=True)
            cluster.redis = server
            wait_until(
                lambda: (
                    all(_readyz(port) == 200 for port in ports)
                    or not all(w.process.alive() for w in cluster.workers)
                ),
                timeout_s=60,
                what="workers ready again",
            )
            exits = [w.process.popen.poll() for w in cluster.workers]
            assert exits == [None, None], (exits, [w.process.log_tail(30) for w in cluster.workers])
            wait_terminal(p, ids, timeout_s=120)
            jobs = p.get_many(ids)
            # The outage swallowed the acks of the running tasks: kombu's sweep redelivers those
            # messages after the visibility timeout and the redelivered tasks ack them. Waiting for
            # that also outlasts a worker that would die on a late ack.
            wait_until(
                lambda: _unacked(server) == 0 or not all(w.process.alive() for w in cluster.workers),
                timeout_s=90,
                what="every message acked",
            )
            logs = "\n".join(w.process.log_tail(60) for w in cluster.workers)
            assert all(w.process.alive() for w in cluster.workers), logs

        assert all(j is not None and j.terminal for j in jobs), [j and j.state for j in jobs]
        ledger = control.ledger()
        assert all(n <= 1 for n in ledger["submissions"].values()), ledger["submissions"]
        events_key = Keys(cluster.settings().key_prefix).events
        r = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            entries: list[tuple[str, dict[str, str]]] = r.xrange(events_key)  # type: ignore[assignment]
            events = [f["job_id"] for _id, f in entries if f.get("job_id") in ids]
        finally:
            r.close()
        assert sorted(events) == sorted(ids)  # each job reached its terminal state exactly once
        assert len(submits_for(ledger)) <= len(ids)
    finally:
        cluster.stop()
        server.stop()
