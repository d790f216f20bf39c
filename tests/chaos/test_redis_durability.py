"""Issue #15: refusing an unsafe Redis, and the conservative paths when replicas do not acknowledge.

Real processes: redis-server on free ports, ``reframe worker`` / ``reframe serve`` / ``reframe
enqueue`` as subprocesses, the fal emulator over HTTP. Judged by exit codes, what the processes
printed, the emulator's ledger and Redis.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis

from config.settings import child_environment
from producer import NotReplicated, Producer
from reframe.api.keys import KeyStore
from reframe.localcluster import DEMO_FAL_KEY, start_cluster
from reframe.localproc import free_port, start_redis, start_sentinel, wait_until
from tests.chaos.conftest import BASE_ENV, KEYS
from tests.cluster.conftest import upload

pytestmark = pytest.mark.integration


def _run(argv: list[str], env: dict[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m reframe <argv>`` with exactly ``env`` as its settings."""
    return subprocess.run(
        [sys.executable, "-m", "reframe", *argv],
        env=child_environment({"FAL_KEY": DEMO_FAL_KEY, **env}),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def test_production_refuses_a_redis_that_can_lose_writes(tmp_path: Path) -> None:
    no_aof = start_redis(tmp_path / "no-aof")
    aof = start_redis(tmp_path / "aof", appendonly=True)
    try:
        # A worker on a Redis without AOF: one line naming the reason, a usage exit, no traceback.
        env = {"REFRAME_REDIS_URL": no_aof.url, "REFRAME_PRODUCTION": "true", "REFRAME_METRICS_PORT": "0"}
        done = _run(["worker"], env)
        assert done.returncode == 2, (done.returncode, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert "REFRAME_PRODUCTION" in lines[0] and "AOF is off" in lines[0], lines[0]
        assert "Traceback" not in done.stderr
        # The API (which enqueues) refuses the same way; here for want of the replica it was told to wait for.
        env = {
            "REFRAME_REDIS_URL": aof.url,
            "REFRAME_PRODUCTION": "true",
            "REFRAME_REDIS_MIN_REPLICAS": "1",
        }
        done = _run(["serve", "--port", str(free_port())], env)
        assert done.returncode == 2, (done.returncode, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "0 replica(s) in sync, REFRAME_REDIS_MIN_REPLICAS=1" in lines[0], lines
        assert "AOF is off" not in lines[0]  # this one has an AOF with appendfsync always
    finally:
        no_aof.stop()
        aof.stop()


def test_relaxed_worker_starts_on_a_risky_redis_and_logs_the_risk(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "no-aof")
    try:
        cluster = start_cluster(tmp_path / "cluster", workers=1, redis_url=server.url, env=BASE_ENV)
        try:
            worker = cluster.workers[0]
            assert worker.ready()
            log = worker.process.log_tail(400)
            risk = [line for line in log.splitlines() if "Redis durability risk" in line]
            assert any("AOF is off" in line for line in risk), log
            assert any("appendfsync" in line for line in risk), log  # everysec, no replicas
        finally:
            cluster.stop()
    finally:
        server.stop()


def test_without_acknowledgement_nothing_is_sent_and_the_caller_is_told(
    tmp_path: Path, whole_clip: Path
) -> None:
    """One Redis, no replica, REFRAME_REDIS_MIN_REPLICAS=1: enqueues fail loudly (library, CLI,
    HTTP); a job already queued is never POSTed while no replica acknowledges its intent, and goes
    (billed once) as soon as a replica is in sync."""
    primary = start_redis(tmp_path / "primary", appendonly=True)
    replica = None
    env = {**BASE_ENV, "REFRAME_REDIS_MIN_REPLICAS": "1", "REFRAME_REDIS_REPLICA_WAIT_MS": "200"}
    env["REFRAME_RETRY_BASE_S"] = "0.5"
    cluster = start_cluster(tmp_path / "cluster", workers=1, redis_url=primary.url, env=env)
    try:
        assert cluster.emulator_control is not None
        control = cluster.emulator_control
        settings = cluster.settings()
        url = upload(settings, whole_clip)
        request = {"video_url": url, "aspect_ratio": "9:16", "prompt": "library"}

        # 1. The library raises NotReplicated naming the job; the job is on the primary.
        with Producer(settings) as p, pytest.raises(NotReplicated) as caught:
            p.enqueue(request, idempotency_key="durable-1")
        assert "0 of 1 Redis replicas acknowledged it within 200 ms" in str(caught.value)
        assert "retry with the same idempotency key" in str(caught.value)

        # 2. The CLI exits 75 (EX_TEMPFAIL) with one line.
        done = _run(["enqueue", url, "--aspect-ratio", "9:16", "--prompt", "cli"], cluster.env)
        assert done.returncode == 75, (done.returncode, done.stdout, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "replicas acknowledged" in done.stderr

        # 3. HTTP: 503 with the reason as a problem document.
        api_url, _ = cluster.start_api()
        r = redis.Redis.from_url(primary.url)
        token, _ = KeyStore(r, prefix=settings.key_prefix).create("acme", ["enqueue", "read"])
        answer = httpx.post(
            f"{api_url}/v1/jobs",
            json={"video_url": url, "aspect_ratio": "9:16", "prompt": "http"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert answer.status_code == 503, answer.text
        problem = answer.json()
        assert problem["type"].endswith("not-replicated") and "replicas acknowledged" in problem["detail"]

        # 4. The job the library enqueued (its write reached the primary) is dispatched, but its
        #    intent is never acknowledged: no POST reaches fal, the job waits DEFERRED.
        job_ids = [k.decode().rsplit(":", 1)[1] for k in r.scan_iter(KEYS.job("*"))]
        assert len(job_ids) == 3, job_ids  # library, CLI and HTTP each wrote one job
        wait_until(
            lambda: all(r.hget(KEYS.job(j), "deferred_reason") == b"redis_not_replicated" for j in job_ids),
            timeout_s=30,
            what="every job deferred for want of an acknowledgement",
        )
        wait_until(
            lambda: cluster.workers[0].process.log_tail(2000).count("not submitted, retried later") >= 6,
            timeout_s=30,
            what="two rounds of unsent submits",
        )
        assert [x for x in control.ledger()["requests"] if x["op"] == "submit"] == []

        # 5. A replica comes: every job goes, each billed exactly once.
        replica = start_redis(tmp_path / "replica", appendonly=True, replica_of=primary.port)
        wait_until(
            lambda: all(r.hget(KEYS.job(j), "state") == b"SUCCEEDED" for j in job_ids),
            timeout_s=60,
            what="every job succeeded once a replica acknowledges",
        )
        book = control.ledger()
        assert sorted(book["submissions"].values()) == [1, 1, 1], book["submissions"]
        assert book["billed_requests"] == 3
        # and with the replica acknowledging, the same enqueues go through (library and HTTP)
        with Producer(settings) as p:
            assert p.enqueue({**request, "prompt": "library again"})
        answer = httpx.post(
            f"{api_url}/v1/jobs",
            json={"video_url": url, "aspect_ratio": "9:16", "prompt": "http again"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert answer.status_code == 201, answer.text
        r.close()
    finally:
        cluster.stop()
        if replica is not None:
            replica.stop()
        primary.stop()


def test_sentinel_with_passwords_end_to_end(tmp_path: Path, whole_clip: Path) -> None:
    """Password-protected Redis nodes and Sentinels: the worker's clients, its Celery broker
    (kombu's ``sentinel://`` transport) and the producer take REFRAME_REDIS_PASSWORD and
    REFRAME_REDIS_SENTINEL_PASSWORD, jobs go through, and no log line holds either password."""
    node_pw, sentinel_pw = "node-pw-7c1e9f", "sentinel-pw-3b8d2a"
    primary = start_redis(tmp_path / "primary", appendonly=True, password=node_pw)
    replica = start_redis(tmp_path / "replica", appendonly=True, replica_of=primary.port, password=node_pw)
    sentinels = [
        start_sentinel(
            tmp_path / f"sentinel-{i}", master_port=primary.port, auth_pass=node_pw, password=sentinel_pw
        )
        for i in range(3)
    ]
    cluster = None
    try:
        env = {
            **BASE_ENV,
            "REFRAME_REDIS_SENTINELS": ",".join(f"127.0.0.1:{s.port}" for s in sentinels),
            "REFRAME_REDIS_PASSWORD": node_pw,
            "REFRAME_REDIS_SENTINEL_PASSWORD": sentinel_pw,
            "REFRAME_REDIS_MIN_REPLICAS": "1",
            "REFRAME_PRODUCTION": "true",
        }
        # the URL carries no password and a host that is not used: only the database number
        cluster = start_cluster(tmp_path / "cluster", workers=1, redis_url="redis://127.0.0.1:1/0", env=env)
        settings = cluster.settings()
        url = upload(settings, whole_clip)
        with Producer(settings) as p:
            ids = p.enqueue_many(
                [{"video_url": url, "aspect_ratio": "9:16", "prompt": f"auth {i}"} for i in range(3)]
            )
            wait_until(
                lambda: all(j is not None and j.state.value == "SUCCEEDED" for j in p.get_many(ids)),
                timeout_s=60,
                what="3 jobs succeeded through password-protected Sentinels",
            )
        logs = cluster.workers[0].process.log_tail(100_000)
        assert "durability risk" not in logs and "REFRAME_PRODUCTION" not in logs  # nothing to refuse
        assert node_pw not in logs and sentinel_pw not in logs
    finally:
        if cluster is not None:
            cluster.stop()
        for s in sentinels:
            s.stop()
        for node in (replica, primary):
            node.process.kill()
            node.stop()
