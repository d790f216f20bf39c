"""Issue #15: Redis Sentinel failovers while a few hundred jobs drain, and what a failover may not break.

Real parts only: a primary and a replica (redis-server, AOF with ``appendfsync always``), three
Sentinels (the same binary with ``--sentinel``, ``down-after-milliseconds`` 1000), two real
``reframe worker`` processes and the producer, all configured with ``REFRAME_REDIS_SENTINELS`` and
``REFRAME_REDIS_MIN_REPLICAS=1`` in production mode, and the fal emulator over HTTP. While the jobs
drain through N slots, the primary is SIGKILLed; once Sentinel promoted the replica, the old primary
comes back *as a replica of the new one* (never as a primary with its old data), and after it is in
sync the new primary is SIGKILLed too. The judges are the emulator's ledger and Redis:

* every accepted job ends in exactly one terminal state (one result event each);
* no job is billed twice by fal (ledger requests mapped to jobs by their input's fingerprint);
* never more than N requests open at fal at once (the ledger's timeline);
* the day's spend equals billed seconds x price for the succeeded jobs plus the estimates charged
  for jobs dead-lettered as ambiguous (fal may or may not have billed those: never under-counted);
* the run finishes once a primary is back.

Why this holds with WAIT (worker/contracts/durable.py): a write counts only once the replica
acknowledged it, and with one replica the replica that acknowledged is the one Sentinel promotes,
so the SUBMITTING intent of every POST that left, the receipt of every job reported submitted and
every enqueue the producer heard of are on the new primary. While the new primary has no replica in
sync, no intent is acknowledged: submits take the conservative path (no POST, retried later).

``REFRAME_FAILOVER_JOBS`` sets the size (default 200; ``--soak-long`` runs 1,500).
"""

from __future__ import annotations

import collections
import datetime as dt
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import Producer
from reframe.localcluster import LocalCluster, start_cluster
from reframe.localproc import RedisServer, start_redis, start_sentinel, wait_until
from tests.chaos.conftest import BASE_ENV, KEYS, distinct_inputs, max_open_from_timeline, new_tag
from tests.cluster.conftest import fingerprint_of, upload
from worker.contracts.models import JobState

pytestmark = pytest.mark.integration

N = 6
MASTER = "mymaster"
PRICE_MICRO_PER_S = 60_000  # settings default: 0.06 USD per second of video
BILLED_S_PER_JOB = 3.0  # the whole_clip fixture: 3 s without audio
TERMINAL = {s.value for s in JobState if s.terminal}

FAILOVER_ENV = {
    **BASE_ENV,
    "REFRAME_MAX_CONCURRENCY": str(N),
    "REFRAME_WORKER_CONCURRENCY": "6",
    # REFRAME_FAILOVER_MIN_REPLICAS=0 shows what this test catches without the acknowledgement.
    "REFRAME_REDIS_MIN_REPLICAS": os.environ.get("REFRAME_FAILOVER_MIN_REPLICAS") or "1",
    "REFRAME_REDIS_REPLICA_WAIT_MS": "500",
    "REFRAME_PRODUCTION": "true",
    # Calls to a dead primary fail fast; the next one asks the Sentinels again.
    "REFRAME_REDIS_SOCKET_TIMEOUT_S": "3",
    "REFRAME_TASK_SOFT_TIME_LIMIT_S": "10",
    "REFRAME_TASK_TIME_LIMIT_S": "12",
    "REFRAME_VISIBILITY_TIMEOUT_S": "20",
    "REFRAME_GATE_TTL_S": "12",
    "REFRAME_RETRY_MAX_ATTEMPTS": "30",
    "REFRAME_RETRY_BASE_S": "0.3",
    "REFRAME_RETRY_CAP_S": "2",
    "REFRAME_BREAKER_OPEN_BASE_S": "1",
    "REFRAME_BREAKER_OPEN_CAP_S": "2",
    "REFRAME_AMBIGUOUS_SLOT_HOLD_S": "5",
    "REFRAME_FAL_CONNECT_TIMEOUT_S": "2",
    "REFRAME_FAL_WRITE_TIMEOUT_S": "5",
    "REFRAME_FAL_READ_TIMEOUT_S": "5",
    "REFRAME_FAL_POOL_TIMEOUT_S": "2",
}


class Pair:
    """The two data nodes and the Sentinels; knows which port is the primary now."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: dict[int, RedisServer] = {}
        first = start_redis(root / "node-a", appendonly=True)
        self.nodes[first.port] = first
        second = start_redis(root / "node-b", appendonly=True, replica_of=first.port)
        self.nodes[second.port] = second
        self.dirs = {first.port: root / "node-a", second.port: root / "node-b"}
        self.sentinels = [start_sentinel(root / f"sentinel-{i}", master_port=first.port) for i in range(3)]
        self.log: list[str] = []
        self.t0 = time.monotonic()
        self.wait_in_sync(first.port)

    def note(self, what: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {what}"
        self.log.append(line)
        print(line, flush=True)

    @property
    def addresses(self) -> str:
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def primary_port(self) -> int:
        """The primary's port as a majority of the Sentinels see it."""
        seen = collections.Counter()
        for s in self.sentinels:
            client = redis.Redis(port=s.port, socket_timeout=1, decode_responses=True)
            try:
                addr = client.execute_command("SENTINEL", "get-master-addr-by-name", MASTER)
                seen[int(addr[1])] += 1
            except redis.RedisError:
                pass
            finally:
                client.close()
        port, votes = seen.most_common(1)[0]
        assert votes >= 2, seen
        return port

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2, decode_responses=True)

    def wait_in_sync(self, primary: int) -> None:
        """Until ``primary`` is a primary with one replica online."""

        def ok() -> bool:
            info: Any = self.client(primary).info("replication")
            online = [v for k, v in info.items() if k.startswith("slave") and v.get("state") == "online"]
            return bool(info["role"] == "master" and online)

        wait_until(ok, timeout_s=30, what=f"a replica in sync with the primary on {primary}")

    def cut(self) -> tuple[int, int]:
        """Stop the replica (SIGSTOP) and cut its link on the primary (``CLIENT KILL TYPE replica``):
        from now on the primary takes writes the replica can never receive. Returns (primary,
        replica)."""
        old = self.primary_port()
        replica = next(port for port in self.nodes if port != old)
        self.nodes[replica].process.kill(signal.SIGSTOP)
        self.client(old).client_kill_filter(_type="replica")
        self.note(f"SIGSTOP replica {replica}, its link cut at offset {self.offset(old)}")
        return old, replica

    def fail_over(self, old: int, replica: int) -> int:
        """SIGKILL the primary and resume the replica; wait until Sentinel promoted it, bring the
        killed node back (same port, same AOF) as a replica of the new primary, in sync; return the
        new primary's port."""
        try:
            self.nodes[old].process.kill()
        finally:
            self.nodes[replica].process.kill(signal.SIGCONT)
        self.nodes[old].process.popen.wait(timeout=10)
        self.note(f"SIGKILL primary {old}")
        wait_until(lambda: self.primary_port() != old, timeout_s=30, interval_s=0.1, what="promotion")
        new = self.primary_port()
        self.note(f"Sentinel promoted {new}")
        self.nodes[old] = start_redis(self.dirs[old], port=old, appendonly=True, replica_of=new)
        self.wait_in_sync(new)
        self.note(f"{old} back as a replica of {new}, in sync")
        return new

    def kill_primary(self) -> int:
        """Cut the replica off, let the primary take writes the replica lacks, then fail over: the
        promoted node lacks the primary's last writes, the window in which, without the replicas'
        acknowledgement, a SUBMITTING intent or a receipt is lost and the job is submitted to fal
        again. Returns the new primary's port."""
        old, replica = self.cut()
        cut = self.offset(old)
        try:
            wait_until(lambda: self.offset(old) > cut + 20_000, timeout_s=20, what="writes the replica lacks")
        except BaseException:
            self.nodes[replica].process.kill(signal.SIGCONT)
            raise
        self.note(f"the primary took {self.offset(old) - cut} bytes of writes the replica lacks")
        return self.fail_over(old, replica)

    def offset(self, primary: int) -> int:
        """The primary's replication offset (bytes of writes it has taken)."""
        info: Any = self.client(primary).info("replication")
        return int(info["master_repl_offset"])

    def stop(self) -> None:
        for node in self.nodes.values():
            node.process.kill(signal.SIGCONT)
            # nothing to keep: a node still writing its first AOF would ignore SIGTERM for seconds
            node.process.kill()
        for s in self.sentinels:
            s.stop()
        for node in self.nodes.values():
            node.stop()


def _terminal(p: Producer, ids: list[str]) -> int:
    return sum(1 for j in p.get_many(ids) if j is not None and j.terminal)


def run_failover(tmp_path: Path, whole_clip: Path, *, jobs: int) -> None:
    tag = new_tag("failover")
    pair = Pair(tmp_path / "redis")
    cap_usd = round(2 * jobs * BILLED_S_PER_JOB * PRICE_MICRO_PER_S / 1e6, 2)
    cluster: LocalCluster | None = None
    try:
        first = pair.primary_port()
        cluster = start_cluster(
            tmp_path / "cluster",
            workers=2,
            # With Sentinels, the URL gives only the database number (worker/contracts/connect.py).
            redis_url=f"redis://127.0.0.1:{first}/0",
            emulator_concurrency=N,
            emulator_processing_time_s=0.2,
            env={
                **FAILOVER_ENV,
                "REFRAME_REDIS_SENTINELS": pair.addresses,
                "REFRAME_REDIS_MASTER_NAME": MASTER,
                "REFRAME_BUDGET_DAILY_USD": f"{cap_usd:.2f}",
                "REFRAME_BUDGET_MONTHLY_USD": f"{10 * cap_usd:.2f}",
                "REFRAME_RESULTS_STREAM_MAXLEN": str(10 * jobs),
            },
        )
        assert cluster.emulator_control is not None
        control = cluster.emulator_control
        settings = cluster.settings()
        url = upload(settings, whole_clip)
        requests = distinct_inputs(url, jobs, tag)
        job_of_fp = {fingerprint_of(req): i for i, req in enumerate(requests)}
        with Producer(settings) as p:
            ids: list[str] = []
            for i in range(0, jobs, settings.enqueue_max_batch):  # each call acknowledged by the replica
                ids += p.enqueue_many(requests[i : i + settings.enqueue_max_batch])
            pair.note(f"{jobs} jobs enqueued")
            wait_until(lambda: _terminal(p, ids) >= jobs // 4, timeout_s=120, interval_s=0.2, what="25% done")
            pair.kill_primary()
            wait_until(lambda: _terminal(p, ids) >= jobs // 2, timeout_s=120, interval_s=0.2, what="50% done")
            last = pair.kill_primary()
            wait_until(
                lambda: _terminal(p, ids) == jobs, timeout_s=180, interval_s=0.5, what="every job terminal"
            )
            pair.note("every job terminal")
            wait_until(lambda: control.ledger()["open"] == 0, timeout_s=60, what="nothing open at fal")
        r = pair.client(last)
        records = {j: r.hgetall(KEYS.job(j)) for j in ids}
        book = control.ledger()
        _judge(r, ids, records, book, job_of_fp, cap_usd)
        exited = [w.process.name for w in cluster.workers if not w.process.alive()]
        assert exited == [], [w.process.log_tail(40) for w in cluster.workers]
        unsent = sum(
            w.process.log_tail(100_000).count("not submitted, retried later") for w in cluster.workers
        )
        pair.note(f"submits not sent for want of a replica's acknowledgement: {unsent}")
    except BaseException:
        print("\n".join(pair.log))
        raise
    finally:
        if cluster is not None:
            cluster.stop()
        pair.stop()


def _judge(
    r: redis.Redis,
    ids: list[str],
    records: dict[str, dict[str, str]],
    book: dict[str, Any],
    job_of_fp: dict[str, int],
    cap_usd: float,
) -> None:
    states = collections.Counter(rec.get("state") for rec in records.values())
    reasons = collections.Counter(rec.get("dead_letter_reason") or "-" for rec in records.values())
    print(f"states {dict(states)}; dead-letter reasons {dict(reasons)}")
    # 1. Every accepted job is there and terminal, with exactly one result event.
    assert all(rec and JobState(rec["state"]).terminal for rec in records.values()), states
    entries = r.xrange(KEYS.events, "-", "+")
    per_job = collections.Counter(fields["job_id"] for _sid, fields in entries)
    assert {j: per_job[j] for j in ids} == dict.fromkeys(ids, 1), [
        (j, per_job[j]) for j in ids if per_job[j] != 1
    ]
    # 2. fal billed no job twice.
    job_of_request = {}
    for sub in book["submits"]:
        assert sub["fingerprint"] in job_of_fp, sub
        job_of_request[sub["request_id"]] = ids[job_of_fp[sub["fingerprint"]]]
    billed = [c["request_id"] for c in book["completions"] if c["ok"]]
    billed_per_job = collections.Counter(job_of_request[req] for req in billed)
    assert {j: n for j, n in billed_per_job.items() if n > 1} == {}
    succeeded = {j for j, rec in records.items() if rec["state"] == JobState.SUCCEEDED.value}
    charged = {
        j
        for j, rec in records.items()
        if rec.get("dead_letter_reason") in ("ambiguous_submit", "result_unavailable")
    }
    for j in succeeded:
        assert billed_per_job[j] == 1, (j, records[j])
    assert set(billed_per_job) - succeeded <= charged
    # 3. Never more than N requests open at fal.
    assert max_open_from_timeline(book) <= N and book["max_open"] <= N, book["max_open"]
    # 4. Spend = price x billed seconds of the succeeded jobs + the estimates charged for the rest.
    seconds, _ = r.time()
    day = dt.datetime.fromtimestamp(int(seconds), tz=dt.UTC).strftime("%Y-%m-%d")
    spent, reserved = (int(x or 0) for x in r.hmget(f"{KEYS.root}:fc:budget:day:{day}", "spent", "reserved"))
    fal_billed = sum(
        1 for c in book["completions"] if c["ok"] and job_of_request[c["request_id"]] in succeeded
    )
    fal_billed_micro = round(fal_billed * BILLED_S_PER_JOB * PRICE_MICRO_PER_S)
    estimates = sum(int(records[j].get("estimate_micro") or 0) for j in charged)
    print(
        f"spent {spent} = fal billed {fal_billed_micro} ({fal_billed} jobs) + estimates {estimates} ({len(charged)})"
    )
    assert reserved == 0 and r.hlen(KEYS.reservations) == 0, (reserved, r.hgetall(KEYS.reservations))
    assert spent == fal_billed_micro + estimates, (spent, fal_billed_micro, estimates)
    assert spent <= round(cap_usd * 1e6)


def test_a_receipt_lost_in_a_failover_is_never_paid_twice(tmp_path: Path, whole_clip: Path) -> None:
    """fal accepts a job's POST while the replica is cut off: its receipt is not acknowledged (the
    job is followed but not reported submitted), then the primary dies with it. The promoted
    node has the job SUBMITTING (its intent was acknowledged before the POST) without a request
    id: it is resolved as an ambiguous submit (dead letter, charged at its estimate), and fal is
    never asked twice."""
    pair = Pair(tmp_path / "redis")
    cluster: LocalCluster | None = None
    try:
        cluster = start_cluster(
            tmp_path / "cluster",
            workers=1,
            redis_url=f"redis://127.0.0.1:{pair.primary_port()}/0",
            emulator_concurrency=N,
            emulator_processing_time_s=0.5,
            env={
                **FAILOVER_ENV,
                "REFRAME_REDIS_SENTINELS": pair.addresses,
                "REFRAME_REDIS_MASTER_NAME": MASTER,
                # a submit whose answer never came is resolved connect+write+read+pool+5 s after it began
                "REFRAME_FAL_CONNECT_TIMEOUT_S": "1",
                "REFRAME_FAL_WRITE_TIMEOUT_S": "2",
                "REFRAME_FAL_READ_TIMEOUT_S": "4",
                "REFRAME_FAL_POOL_TIMEOUT_S": "1",
            },
        )
        assert cluster.emulator_control is not None
        control = cluster.emulator_control
        settings = cluster.settings()
        url = upload(settings, whole_clip)
        request = distinct_inputs(url, 1, new_tag("receipt"))[0]
        # fal answers the POST after 2 s: time to cut the replica off while the request is at fal
        control.set_faults([{"op": "submit", "kind": "slow", "delay_s": 2.0, "times": 1}])
        with Producer(settings) as p:
            job_id = p.enqueue(request)
        worker = cluster.workers[0].process
        wait_until(
            lambda: any(x["op"] == "submit" for x in control.ledger()["requests"]),
            timeout_s=30,
            what="the POST at fal (its intent acknowledged)",
        )
        old, replica = pair.cut()
        try:
            wait_until(
                lambda: "not reported submitted" in worker.log_tail(200),
                timeout_s=20,
                what="the receipt not acknowledged",
            )
        except BaseException:
            pair.nodes[replica].process.kill(signal.SIGCONT)
            raise
        assert pair.client(old).hget(KEYS.job(job_id), "fal_request_id")  # on the old primary only
        new = pair.fail_over(old, replica)
        r = pair.client(new)
        wait_until(
            lambda: r.hget(KEYS.job(job_id), "state") in TERMINAL,
            timeout_s=60,
            interval_s=0.2,
            what="the job resolved on the new primary",
        )
        rec = r.hgetall(KEYS.job(job_id))
        wait_until(lambda: control.ledger()["open"] == 0, timeout_s=30, what="nothing open at fal")
        book = control.ledger()
        pair.note(
            f"job {rec['state']} ({rec.get('dead_letter_reason')}); ledger submissions {book['submissions']}"
        )
        assert list(book["submissions"].values()) == [1], book["submissions"]  # fal asked once
        assert book["billed_requests"] <= 1
        assert rec["state"] == JobState.FAILED.value and rec["dead_letter_reason"] == "ambiguous_submit", rec
        assert not rec.get("fal_request_id")  # the receipt went down with the old primary
    except BaseException:
        print("\n".join(pair.log))
        raise
    finally:
        if cluster is not None:
            cluster.stop()
        pair.stop()


def test_two_failovers_lose_no_promise(tmp_path: Path, whole_clip: Path) -> None:
    run_failover(tmp_path, whole_clip, jobs=int(os.environ.get("REFRAME_FAILOVER_JOBS") or 200))


@pytest.mark.soak_long
def test_two_failovers_lose_no_promise_long(tmp_path: Path, whole_clip: Path) -> None:
    run_failover(tmp_path, whole_clip, jobs=1500)
