"""Issue #9: the interleavings that broke the unfenced lifecycle, created on purpose.

Real redis-server, real ``reframe worker`` processes, the fal emulator over HTTP. Every test judges
by the emulator's ledger (what fal saw and billed) and by Redis (records, budget, slots, events),
never by the code's own counters. Each names (printed) the run tag and job ids that matter.
"""

from __future__ import annotations

import base64
import collections
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import JobState, Priority, Producer
from reframe.localcluster import LocalCluster
from reframe.localproc import wait_until
from tests.chaos.conftest import (
    KEYS,
    PRICE_MICRO_PER_S,
    BudgetSampler,
    budget_day,
    distinct_inputs,
    events,
    explained,
    ledger,
    max_open_from_timeline,
    new_tag,
    redis_of,
    scrape_counter,
    worker_of,
)
from tests.cluster.conftest import fingerprint_of, upload, wait_terminal
from worker.contracts.keys import celery_queue_keys

pytestmark = pytest.mark.integration

ClusterFactory = Callable[..., LocalCluster]
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
#: What fal bills for one run of the 3 s clip (whole seconds x price).
BILL_MICRO = 3 * PRICE_MICRO_PER_S
#: What a submit reserves for it: the input's 3 s plus REFRAME_ESTIMATE_MARGIN_S (0.5), rounded up.
ESTIMATE_MICRO = 4 * PRICE_MICRO_PER_S
MONEY_ENV = {"REFRAME_ESTIMATE_MARGIN_S": "0.5", "REFRAME_BILLING_UNIT_S": "1"}


def _submits_by_fingerprint(book: dict[str, Any]) -> collections.Counter[str]:
    return collections.Counter(s["fingerprint"] for s in book["submits"])


def _assert_money(r: Any, book: dict[str, Any], ids: list[str], p: Producer) -> None:
    """Spend in Redis (records and budget hash) equals what fal billed, and nothing stays reserved."""
    billed_micro = round(book["billed_seconds"] * PRICE_MICRO_PER_S)
    costs = [int(r.hget(KEYS.job(j), "cost_actual_micro") or 0) for j in ids]
    spent, reserved = budget_day(r)
    assert sum(costs) == billed_micro, (costs, book["billed_seconds"])
    assert spent == billed_micro, (spent, book["billed_seconds"])
    assert reserved == 0
    assert r.hlen(KEYS.reservations) == 0, r.hgetall(KEYS.reservations)


def _assert_one_event_per_life(r: Any, ids: list[str]) -> None:
    per_job = collections.Counter(fields["job_id"] for _sid, fields in events(r))
    for job_id in ids:
        life = int(r.hget(KEYS.job(job_id), "replays") or 0) + 1
        assert per_job[job_id] == life, (job_id, per_job[job_id], life)
    event_ids = [fields["event_id"] for _sid, fields in events(r)]
    assert len(event_ids) == len(set(event_ids)), event_ids


# ---------------------------------------------------------------------- 1. 5xx on result reads
def test_5xx_on_result_reads_after_completed_never_resubmits(
    chaos_cluster: ClusterFactory, whole_clip: Path
) -> None:
    """Old bug: a 500 on the result GET was taken for a runner failure: submitted again, billed twice."""
    n_jobs, n_faults = 6, 4
    cluster = chaos_cluster(
        workers=2,
        emulator_concurrency=8,
        emulator_processing_time_s=0.5,
        env={"REFRAME_MAX_CONCURRENCY": "3", "REFRAME_BUDGET_DAILY_USD": "100", **MONEY_ENV},
    )
    r = redis_of(cluster)
    assert cluster.emulator_control is not None
    url = upload(cluster.settings(), whole_clip)
    tag = new_tag("result-5xx")
    requests = distinct_inputs(url, n_jobs, tag)
    cluster.emulator_control.set_faults(
        [
            {"op": "result", "kind": "http", "status": 500, "times": n_faults},
            {"op": "result", "kind": "http", "status": 502, "nginx": True, "times": 1},
        ]
    )
    with Producer(cluster.settings()) as p:
        ids = p.enqueue_many(requests)
        print("job ids:", ids)
        wait_terminal(p, ids, timeout_s=60)
        jobs = p.get_many(ids)
    book = ledger(cluster)
    answered = collections.Counter((row["status"]) for row in book["requests"] if row["op"] == "result")
    # The interleaving happened: fal answered result reads of COMPLETED requests with 5xx.
    assert answered[500] == n_faults and answered[502] == 1, answered
    assert [j.state for j in jobs if j] == [JobState.SUCCEEDED] * n_jobs, [
        (j.id, j.state, j.error) for j in jobs if j
    ]
    per_fp = _submits_by_fingerprint(book)
    assert {fingerprint_of(req): per_fp[fingerprint_of(req)] for req in requests} == {
        fingerprint_of(req): 1 for req in requests
    }
    assert len(book["submits"]) == n_jobs
    assert book["billed_requests"] == n_jobs
    assert book["billed_seconds"] == 3 * n_jobs
    _assert_money(r, book, ids, p)
    _assert_one_event_per_life(r, ids)


# ---------------------------------------------------------------------- 2. a stopped tracker
def test_stopped_tracker_past_claim_ttl_cannot_touch_the_next_attempt(
    chaos_cluster: ClusterFactory, whole_clip: Path
) -> None:
    """Old bug: the resumed tracker handled R1's runner failure by job id: it freed R2's slot and
    reservation and moved the job back, and R3 was submitted while R2 ran."""
    n = 2
    cap_micro = 3 * ESTIMATE_MICRO  # exactly the three jobs' reservations: no room for a fourth
    cluster = chaos_cluster(
        workers=2,
        emulator_concurrency=8,
        emulator_processing_time_s=3.0,
        env={
            "REFRAME_MAX_CONCURRENCY": str(n),
            "REFRAME_TRACKER_CLAIM_TTL_S": "2",
            "REFRAME_RETRY_BASE_S": "0.2",
            "REFRAME_RETRY_CAP_S": "0.5",
            "REFRAME_BUDGET_DAILY_USD": f"{cap_micro / 1e6:.2f}",
            **MONEY_ENV,
        },
    )
    r = redis_of(cluster)
    control = cluster.emulator_control
    assert control is not None
    url = upload(cluster.settings(), whole_clip)
    tag = new_tag("stopped-tracker")
    first, *others = distinct_inputs(url, 3, tag)
    control.set_faults([{"op": "submit", "kind": "runner_error", "times": 1}])
    ids: list[str] = []
    with BudgetSampler(r) as sampler, Producer(cluster.settings()) as p, explained(cluster, ids):
        j1 = p.enqueue(first)
        ids.append(j1)
        wait_until(lambda: r.hget(KEYS.track_owner, j1), timeout_s=30, what="R1 accepted and tracked")
        owner = r.hget(KEYS.track_owner, j1)
        r1 = r.hget(KEYS.job(j1), "fal_request_id")
        victim = worker_of(cluster, owner)
        print(f"job {j1}: R1={r1} tracked by {owner} (pid {victim.process.pid}); stopping it")
        victim.process.kill(signal.SIGSTOP)
        try:
            # Two decoy messages (jobs that do not exist) answer any BRPOP the stopped worker had
            # outstanding, so the job's next dispatch reaches the live worker.
            decoys = [p.store.submit_message(f"decoy{i}-{tag}", Priority.NORMAL) for i in range(2)]
            r.lpush(decoys[0][0], *[message for _key, message in decoys])
            ids.extend(p.enqueue_many(others))
            print("job ids:", ids)
            wait_until(
                lambda: r.hget(KEYS.track_owner, j1) not in (None, owner),
                timeout_s=20,
                what="the live worker took over the claim",
            )
            wait_until(
                lambda: len(_fal_ids(r, j1)) >= 2,
                timeout_s=45,
                what="R1 failed at fal and R2 was submitted (the victim still stopped)",
            )
            ids_now = _fal_ids(r, j1)
            print(f"job {j1}: fal requests so far {ids_now}")
            # R2 must still be running at fal when the stopped tracker wakes up.
            assert r.hget(KEYS.job(j1), "state") in ("IN_QUEUE", "IN_PROGRESS")
        finally:
            victim.process.kill(signal.SIGCONT)
        wait_terminal(p, ids, timeout_s=60)
        jobs = p.get_many(ids)
    book = ledger(cluster)
    assert [j.state for j in jobs if j] == [JobState.SUCCEEDED] * 3, [
        (j.id, j.state, j.error) for j in jobs if j
    ]
    per_fp = _submits_by_fingerprint(book)
    # R1 (runner error, unbilled) and R2: never a third submit while R2 ran.
    assert per_fp[fingerprint_of(first)] == 2, per_fp
    assert [per_fp[fingerprint_of(x)] for x in others] == [1, 1], per_fp
    assert book["max_open"] <= n and max_open_from_timeline(book) <= n, book["open_timeline"]
    assert book["billed_requests"] == 3 and book["failed"] == 1
    assert sampler.samples, "the budget sampler took no sample"
    assert sampler.over(cap_micro) == [], sampler.over(cap_micro)[:5]
    _assert_money(r, book, ids, p)
    _assert_one_event_per_life(r, ids)
    assert r.zcard(KEYS.slots) == 0, r.zrange(KEYS.slots, 0, -1, withscores=True)


def _fal_ids(r: Any, job_id: str) -> list[str]:
    """Every fal request id the job's record names (earlier attempts' and the current one)."""
    rec = r.hmget(KEYS.job(job_id), "previous_request_ids", "fal_request_id")
    return [x for x in (rec[0] or "").split(",") if x] + ([rec[1]] if rec[1] else [])


# ---------------------------------------------------------------------- 3. duplicate messages
def _submit_messages(raw: Any, queue: str) -> dict[str, tuple[bytes, bytes]]:
    """job id -> (list key, the message exactly as kombu stores it) of every queued submit message."""
    out: dict[str, tuple[bytes, bytes]] = {}
    for key in celery_queue_keys(queue):
        for message in raw.lrange(key, 0, -1):
            envelope = json.loads(message)
            args = json.loads(base64.b64decode(envelope["body"]))[0]
            assert envelope["headers"]["task"] == "reframe.submit"
            out[args[0]] = (key.encode(), message)
    return out


def test_duplicate_celery_messages_mid_submit_never_exceed_n_or_double_reserve(
    chaos_cluster: ClusterFactory, whole_clip: Path
) -> None:
    """Old bug: a duplicate delivery's refused move freed the slot and reservation of the submit in
    flight: with N=2, three requests were open at fal."""
    n, n_jobs = 2, 6
    cap_micro = n_jobs * ESTIMATE_MICRO  # every job's reservation fits once, none twice
    cluster = chaos_cluster(
        workers=0,
        emulator_concurrency=8,
        emulator_processing_time_s=1.0,
        env={
            "REFRAME_MAX_CONCURRENCY": str(n),
            "REFRAME_BUDGET_DAILY_USD": f"{cap_micro / 1e6:.2f}",
            **MONEY_ENV,
        },
    )
    r = redis_of(cluster)
    raw = redis.Redis.from_url(cluster.redis_url)
    control = cluster.emulator_control
    assert control is not None
    url = upload(cluster.settings(), whole_clip)
    tag = new_tag("duplicates")
    requests = distinct_inputs(url, n_jobs, tag)
    ids: list[str] = []
    waves: list[dict[str, str]] = []

    def push_copies(messages: dict[str, tuple[bytes, bytes]]) -> None:
        states = {j: r.hget(KEYS.job(j), "state") or "" for j in ids}
        waves.append(states)
        print(f"duplicate wave {len(waves)} while {states}")
        for job_id in ids:
            if states[job_id] not in TERMINAL:
                key, message = messages[job_id]
                raw.lpush(key, message)

    with BudgetSampler(r) as sampler, Producer(cluster.settings()) as p, explained(cluster, ids):
        ids.extend(p.enqueue_many(requests))
        print("job ids:", ids)
        # No worker yet: every message is still in its kombu list, byte for byte as enqueued.
        messages = _submit_messages(raw, cluster.settings().queue_name)
        assert sorted(messages) == sorted(ids)
        # Every submit is answered only after 2.5 s: the duplicates arrive while submits are in flight.
        control.set_faults([{"op": "submit", "kind": "slow", "delay_s": 2.5, "times": -1}])
        workers = [cluster.start_worker(wait=False), cluster.start_worker(wait=False)]

        def in_state(state: str) -> list[str]:
            return [j for j in ids if r.hget(KEYS.job(j), "state") == state]

        wait_until(lambda: len(in_state("SUBMITTING")) == n, timeout_s=30, what=f"{n} submits in flight")
        first_submitting = set(in_state("SUBMITTING"))
        push_copies(messages)
        for worker in workers:
            cluster.wait_ready(worker)
        # A second wave when a job that was WAITING is being submitted in its turn.
        wait_until(
            lambda: bool(set(in_state("SUBMITTING")) - first_submitting),
            timeout_s=30,
            what="a waiting job's submit in flight",
        )
        push_copies(messages)
        wait_terminal(p, ids, timeout_s=60)
        jobs = p.get_many(ids)
        book = ledger(cluster)
        # The interleavings happened: duplicates met submits in flight and jobs WAITING for a slot.
        assert all("SUBMITTING" in w.values() for w in waves), waves
        assert "WAITING" in waves[0].values(), waves[0]
        assert [j.state for j in jobs if j] == [JobState.SUCCEEDED] * n_jobs
        per_fp = _submits_by_fingerprint(book)
        assert [per_fp[fingerprint_of(x)] for x in requests] == [1] * n_jobs, per_fp
        assert book["max_open"] <= n and max_open_from_timeline(book) <= n, book["open_timeline"]
        assert book["billed_requests"] == n_jobs
        assert sampler.samples, "the budget sampler took no sample"
        assert sampler.over(cap_micro) == [], sampler.over(cap_micro)[:5]
        _assert_money(r, book, ids, p)
        _assert_one_event_per_life(r, ids)
        assert r.zcard(KEYS.slots) == 0, r.zrange(KEYS.slots, 0, -1, withscores=True)


# ---------------------------------------------------------------------- 4. slow consumer groups
TRIMMED_UNREAD = "reframe_result_stream_trimmed_unread_total"


def _read_group(r: Any, group: str) -> list[dict[str, str]]:
    """Everything the group has not read yet, read and acknowledged."""
    got: list[dict[str, str]] = []
    while True:
        reply = r.xreadgroup(group, "late-reader", {KEYS.events: ">"}, count=500)
        entries = [e for _s, items in reply or [] for e in items]
        if not entries:
            return got
        r.xack(KEYS.events, group, *[sid for sid, _f in entries])
        got.extend(fields for _sid, fields in entries)


def test_a_stuck_consumer_group_receives_every_terminal_event_exactly_once(
    chaos_cluster: ClusterFactory, whole_clip: Path
) -> None:
    """Old bug: XADD MAXLEN ~ trimmed whatever the groups had read. A group that reads nothing until
    the end must still get every terminal event, once (below the ceiling)."""
    n_jobs = 60
    cluster = chaos_cluster(
        workers=2,
        emulator_concurrency=8,
        emulator_processing_time_s=0.0,
        env={"REFRAME_MAX_CONCURRENCY": "8", "REFRAME_RESULTS_STREAM_MAXLEN": "1000", **MONEY_ENV},
    )
    r = redis_of(cluster)
    url = upload(cluster.settings(), whole_clip)
    group = new_tag("stuck-group")
    r.xgroup_create(KEYS.events, group, id="$", mkstream=True)
    ids: list[str] = []
    with Producer(cluster.settings()) as p, explained(cluster, ids):
        ids.extend(p.enqueue_many([{"video_url": url, "aspect_ratio": "9:16"}] * n_jobs))
        wait_terminal(p, ids, timeout_s=90)
        got = _read_group(r, group)
    per_job = collections.Counter(e["job_id"] for e in got)
    assert sorted(per_job) == sorted(ids), set(ids) ^ set(per_job)
    assert set(per_job.values()) == {1}, [j for j, c in per_job.items() if c != 1]
    assert sorted(e["event_id"] for e in got) == sorted(f"{j}.1" for j in ids)
    assert r.xinfo_groups(KEYS.events)[0]["pending"] == 0


def test_the_stream_ceiling_counts_every_unread_event_it_trims(
    chaos_cluster: ClusterFactory, whole_clip: Path
) -> None:
    """Past REFRAME_RESULTS_STREAM_MAXLEN a stuck group loses events, but never silently: every
    terminal event is either read by the group or counted in the trimmed-unread metric."""
    n_jobs, ceiling = 60, 20
    cluster = chaos_cluster(
        workers=2,
        emulator_concurrency=8,
        emulator_processing_time_s=0.0,
        env={"REFRAME_MAX_CONCURRENCY": "8", "REFRAME_RESULTS_STREAM_MAXLEN": str(ceiling), **MONEY_ENV},
    )
    r = redis_of(cluster)
    url = upload(cluster.settings(), whole_clip)
    group = new_tag("stuck-group")
    r.xgroup_create(KEYS.events, group, id="$", mkstream=True)
    ids: list[str] = []

    def trimmed() -> float:
        return sum(scrape_counter(w, TRIMMED_UNREAD) for w in cluster.workers)

    with Producer(cluster.settings()) as p, explained(cluster, ids):
        ids.extend(p.enqueue_many([{"video_url": url, "aspect_ratio": "1:1"}] * n_jobs))
        wait_terminal(p, ids, timeout_s=90)
        # The housekeeper trims every 10 s: wait for the trim past the ceiling after the last event.
        wait_until(lambda: r.xlen(KEYS.events) <= ceiling, timeout_s=30, what="stream trimmed to the ceiling")
        got = _read_group(r, group)
        wait_until(lambda: len(got) + trimmed() == n_jobs, timeout_s=10, what="metric scraped")
    print(f"group read {len(got)}, metric counted {trimmed()} trimmed unread")
    assert 0 < len(got) <= ceiling
    assert {e["job_id"] for e in got} <= set(ids)
    assert len({e["job_id"] for e in got}) == len(got)


def test_the_stream_ceiling_counts_nothing_when_every_group_has_read(
    chaos_cluster: ClusterFactory, whole_clip: Path
) -> None:
    """The other side of the ceiling metric: a group that keeps up loses nothing, so nothing trimmed
    past the ceiling may be counted as unread."""
    n_jobs, ceiling = 60, 20
    cluster = chaos_cluster(
        workers=2,
        emulator_concurrency=8,
        emulator_processing_time_s=0.0,
        env={"REFRAME_MAX_CONCURRENCY": "8", "REFRAME_RESULTS_STREAM_MAXLEN": str(ceiling), **MONEY_ENV},
    )
    r = redis_of(cluster)
    url = upload(cluster.settings(), whole_clip)
    group = new_tag("keeping-up")
    r.xgroup_create(KEYS.events, group, id="$", mkstream=True)
    ids: list[str] = []
    got: list[dict[str, str]] = []
    with Producer(cluster.settings()) as p, explained(cluster, ids):
        ids.extend(p.enqueue_many([{"video_url": url, "aspect_ratio": "4:3"}] * n_jobs))

        def caught_up() -> bool:
            got.extend(_read_group(r, group))
            return len(got) == n_jobs

        wait_until(caught_up, timeout_s=90, interval_s=0.2, what="the group read every event")
        wait_until(lambda: r.xlen(KEYS.events) <= ceiling, timeout_s=30, what="stream trimmed to the ceiling")
        counted = sum(scrape_counter(w, TRIMMED_UNREAD) for w in cluster.workers)
    assert sorted(e["job_id"] for e in got) == sorted(ids)
    assert counted == 0, f"{counted} events counted as trimmed unread, but the only group had read all"
