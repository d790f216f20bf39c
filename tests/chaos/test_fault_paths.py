"""Issue #10: the fault paths of the fenced lifecycle, created on purpose against real processes.

Real redis-server, real ``reframe worker`` processes, the fal emulator over HTTP. Every test judges
by the emulator's ledger (what fal saw, billed and cancelled) and by Redis (records, slots, budget,
claims, locks, streams), never by the code's own counters. Waits are conditions with deadlines; a
deadline that is part of the claim (e.g. "within 25 s, well before the 60 s claim TTL") is the
assertion. Each test says what the old behaviour would have done, so none of them can pass on it.
"""

from __future__ import annotations

import collections
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import CancelOutcome, JobState, Producer
from producer.client import ReplayOutcome
from reframe.localcluster import LocalCluster
from reframe.localproc import wait_until
from tests.chaos.conftest import (
    KEYS,
    PRICE_MICRO_PER_S,
    budget_day,
    distinct_inputs,
    explained,
    ledger,
    max_open_from_timeline,
    new_tag,
    redis_of,
    worker_of,
)
from tests.cluster.conftest import fingerprint_of, upload, wait_terminal

pytestmark = pytest.mark.integration

ClusterFactory = Callable[..., LocalCluster]
#: What fal bills for one run of the 3 s clip (whole seconds x price).
BILL_MICRO = 3 * PRICE_MICRO_PER_S
#: What a submit reserves for it: the input's 3 s plus REFRAME_ESTIMATE_MARGIN_S (0.5), rounded up.
ESTIMATE_MICRO = 4 * PRICE_MICRO_PER_S
MONEY_ENV = {"REFRAME_ESTIMATE_MARGIN_S": "0.5", "REFRAME_BILLING_UNIT_S": "1"}
AT_FAL = {"IN_QUEUE", "IN_PROGRESS"}
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
NOT_FOUND = {"detail": "Request not found"}


def _submits_by_fingerprint(book: dict[str, Any]) -> collections.Counter[str]:
    return collections.Counter(s["fingerprint"] for s in book["submits"])


def _request_ids_of(book: dict[str, Any], request: dict[str, Any]) -> list[str]:
    fp = fingerprint_of(request)
    return [s["request_id"] for s in book["submits"] if s["fingerprint"] == fp]


def _state(r: redis.Redis, job_id: str) -> str:
    return str(r.hget(KEYS.job(job_id), "state") or "")


def _redis_ms(r: redis.Redis) -> int:
    seconds, micro = r.time()
    return int(seconds) * 1000 + int(micro) // 1000


def _live_owner(cluster: LocalCluster, owner: str | None) -> bool:
    """True when ``owner`` (a process id) is a worker of the cluster that is still running."""
    if not owner:
        return False
    try:
        return worker_of(cluster, owner).process.alive()
    except LookupError:
        return False


def _in_wait_lists(r: redis.Redis, job_id: str) -> bool:
    return any(entry.endswith(f"|{job_id}") for entry in r.zrange(KEYS.wait_queue, 0, -1))


# ---------------------------------------------------------------------- 1. a dead tracker
def test_dead_workers_tracked_jobs_are_followed_again_within_seconds(
    chaos_cluster: ClusterFactory, whole_clip: Path
) -> None:
    """Old behaviour: a SIGKILLed worker's claims were taken over only when the claim TTL ran out
    (60 s here), so the 25 s deadline below fails and the jobs sit at fal unfollowed."""
    n = 4
    cluster = chaos_cluster(
        workers=2,
        emulator_concurrency=8,
        emulator_processing_time_s=25.0,
        env={
            "REFRAME_MAX_CONCURRENCY": str(n),
            "REFRAME_TRACKER_CLAIM_TTL_S": "60",
            "REFRAME_HEARTBEAT_TTL_MS": "5000",
            # Settings require it above the task limit plus the claim TTL.
            "REFRAME_VISIBILITY_TIMEOUT_S": "100",
            **MONEY_ENV,
        },
    )
    r = redis_of(cluster)
    url = upload(cluster.settings(), whole_clip)
    tag = new_tag("dead-tracker")
    requests = distinct_inputs(url, n, tag)
    ids: list[str] = []
    with Producer(cluster.settings()) as p, explained(cluster, ids):
        ids.extend(p.enqueue_many(requests))
        print("job ids:", ids)
        wait_until(
            lambda: all(_state(r, j) in AT_FAL and r.hget(KEYS.track_owner, j) for j in ids),
            timeout_s=30,
            what="every job at fal with a tracker claim",
        )
        owners = {j: str(r.hget(KEYS.track_owner, j)) for j in ids}
        victim_id, _count = collections.Counter(owners.values()).most_common(1)[0]
        victim_jobs = [j for j, o in owners.items() if o == victim_id]
        victim = worker_of(cluster, victim_id)
        print(f"SIGKILL {victim_id} (pid {victim.process.pid}), owner of {victim_jobs}")
        cluster.kill_worker(victim)
        assert all(_state(r, j) in AT_FAL for j in victim_jobs), "jobs finished before the kill"

        def followed_again() -> bool:
            for j in victim_jobs:
                owner = r.hget(KEYS.track_owner, j)
                # Terminal means a live tracker already took it over and finished it.
                if not (_live_owner(cluster, owner) or _state(r, j) in TERMINAL):
                    return False
            return True

        # The deadline is the assertion: well before the 60 s claim TTL.
        wait_until(followed_again, timeout_s=25, interval_s=0.2, what="dead worker's jobs claimed again")
        wait_terminal(p, ids, timeout_s=60)
        jobs = p.get_many(ids)
    book = ledger(cluster)
    assert [j.state for j in jobs if j] == [JobState.SUCCEEDED] * n, [
        (j.id, j.state, j.error) for j in jobs if j
    ]
    per_fp = _submits_by_fingerprint(book)
    assert [per_fp[fingerprint_of(req)] for req in requests] == [1] * n, per_fp
    assert len(book["submits"]) == n
    assert book["billed_requests"] == n
    spent, reserved = budget_day(r)
    assert spent == n * BILL_MICRO and reserved == 0, (spent, reserved)


# ---------------------------------------------------------------------- 2. a stopped submitter
def test_sigstopped_submitter_is_ambiguous_and_its_late_receipt_is_recorded_and_cancelled(
    chaos_cluster: ClusterFactory, whole_clip: Path
) -> None:
    """Old behaviour: the receipt of the late POST was thrown away: no ``late_receipts`` entry,
    no cancel at fal, and the request nobody followed ran to the end and was billed."""
    cluster = chaos_cluster(
        workers=2,
        emulator_concurrency=4,
        # Long enough that the late request is still running at fal when it is cancelled.
        emulator_processing_time_s=90.0,
        env={
            "REFRAME_HEARTBEAT_TTL_MS": "5000",
            # The stopped submit task must not trip the task watchdog (it ends the worker at the limit).
            "REFRAME_TASK_SOFT_TIME_LIMIT_S": "50",
            "REFRAME_TASK_TIME_LIMIT_S": "60",
            "REFRAME_VISIBILITY_TIMEOUT_S": "100",
            **MONEY_ENV,
        },
    )
    r = redis_of(cluster)
    control = cluster.emulator_control
    assert control is not None
    url = upload(cluster.settings(), whole_clip)
    tag = new_tag("stopped-submitter")
    (request,) = distinct_inputs(url, 1, tag)
    fp = fingerprint_of(request)
    control.set_faults([{"op": "submit", "kind": "slow", "delay_s": 4.0, "times": 1}])
    ids: list[str] = []
    with Producer(cluster.settings()) as p, explained(cluster, ids):
        job_id = p.enqueue(request)
        ids.append(job_id)
        print("job id:", job_id)
        # fal created the request; its answer is held back 4 s by the emulator: the POST is in flight.
        wait_until(
            lambda: ledger(cluster)["submissions"].get(fp, 0) >= 1,
            timeout_s=30,
            interval_s=0.05,
            what="the submit reached fal",
        )
        submitter_id = str(r.hget(KEYS.job(job_id), "submit_process"))
        submitter = worker_of(cluster, submitter_id)
        submitter.process.kill(signal.SIGSTOP)
        print(f"housekeeper lock at the stop: {r.get(KEYS.housekeeper_lock)}")
        try:
            rec = r.hgetall(KEYS.job(job_id))
            print(f"SIGSTOP {submitter_id} (pid {submitter.process.pid}) mid-submit: {rec.get('state')}")
            # The interleaving: stopped with the POST unanswered (nothing recorded from fal yet).
            assert rec.get("state") == "SUBMITTING" and not rec.get("fal_request_id"), rec
            attempt = rec["attempt"]
            # Its heartbeat stops; after REFRAME_HEARTBEAT_TTL_MS the housekeeper (the other
            # worker's, or after the 15 s lock TTL if the stopped one held it) resolves the submit.
            wait_until(
                lambda: _state(r, job_id) in TERMINAL,
                timeout_s=35,
                interval_s=0.2,
                what="the stopped submit resolved",
            )
            rec = r.hgetall(KEYS.job(job_id))
            assert rec["state"] == "FAILED" and rec.get("dead_letter_reason") == "ambiguous_submit", rec
            assert r.zscore(KEYS.dlq, job_id) is not None
        finally:
            submitter.process.kill(signal.SIGCONT)
        # The late answer reaches the resumed worker: recorded against its attempt, cancelled at fal.
        (request_id,) = _request_ids_of(ledger(cluster), request)

        def late_entries() -> list[dict[str, str]]:
            return [f for _sid, f in r.xrange(KEYS.late_receipts, "-", "+") if f.get("job_id") == job_id]

        wait_until(late_entries, timeout_s=20, what="the late receipt recorded")
        wait_until(
            lambda: any(c["request_id"] == request_id for c in ledger(cluster)["cancels"]),
            timeout_s=20,
            what="the late request cancelled at fal",
        )
        (entry,) = late_entries()
        assert entry["attempt"] == attempt and entry["request_id"] == request_id, entry
        rec = r.hgetall(KEYS.job(job_id))
    book = ledger(cluster)
    cancels = [c for c in book["cancels"] if c["request_id"] == request_id]
    assert [c["code"] for c in cancels] == [202], cancels
    # Submitted once, never again; the cancelled request is not billed.
    assert book["submissions"].get(fp) == 1 and len(book["submits"]) == 1, book["submits"]
    assert book["billed_requests"] == 0
    # The job stays dead-lettered and never took the late request id as its own.
    assert rec["state"] == "FAILED" and rec.get("dead_letter_reason") == "ambiguous_submit", rec
    assert not rec.get("fal_request_id"), rec
    # The slot is held for REFRAME_AMBIGUOUS_SLOT_HOLD_S (default 3600 s), not freed.
    lease = r.zscore(KEYS.slots, job_id)
    assert lease is not None and lease - _redis_ms(r) > 3000 * 1000, lease
    # Charged at its estimate (fal may have billed it), nothing left reserved.
    assert budget_day(r) == (ESTIMATE_MICRO, 0), budget_day(r)


# ---------------------------------------------------------------------- 3. 404 on status/result
@pytest.mark.parametrize("use_stream", [True, False], ids=["stream", "poll"])
def test_transient_404_on_status_and_result_does_not_lose_a_job(
    chaos_cluster: ClusterFactory, whole_clip: Path, use_stream: bool
) -> None:
    """Old behaviour: the first 404 on status or result was taken as "request lost": the job was
    dead-lettered as charged while fal was still running it (and then billed it)."""
    n, status_404s, result_404s = 3, 3, 2
    status_op = "stream" if use_stream else "status"
    cluster = chaos_cluster(
        workers=1,
        emulator_concurrency=8,
        emulator_processing_time_s=1.0,
        env={
            "REFRAME_MAX_CONCURRENCY": str(n),
            "REFRAME_LOST_CONFIRM_S": "10",
            "REFRAME_USE_STATUS_STREAM": "true" if use_stream else "false",
            "REFRAME_STATUS_POLL_INTERVAL_S": "0.5",
            **MONEY_ENV,
        },
    )
    r = redis_of(cluster)
    control = cluster.emulator_control
    assert control is not None
    url = upload(cluster.settings(), whole_clip)
    tag = new_tag(f"404-{status_op}")
    requests = distinct_inputs(url, n, tag)
    control.set_faults(
        [
            {"op": status_op, "kind": "http", "status": 404, "json": NOT_FOUND, "times": status_404s},
            {"op": "result", "kind": "http", "status": 404, "json": NOT_FOUND, "times": result_404s},
        ]
    )
    ids: list[str] = []
    with Producer(cluster.settings()) as p, explained(cluster, ids):
        ids.extend(p.enqueue_many(requests))
        print("job ids:", ids)
        wait_terminal(p, ids, timeout_s=40)
        jobs = p.get_many(ids)
    book = ledger(cluster)
    answered = collections.Counter((row["op"], row["status"]) for row in book["requests"])
    # The interleaving happened: fal answered 404 for requests it was running or had finished.
    assert answered[(status_op, 404)] == status_404s and answered[("result", 404)] == result_404s, answered
    assert [j.state for j in jobs if j] == [JobState.SUCCEEDED] * n, [
        (j.id, j.state, j.error) for j in jobs if j
    ]
    per_fp = _submits_by_fingerprint(book)
    assert [per_fp[fingerprint_of(req)] for req in requests] == [1] * n, per_fp
    assert book["billed_requests"] == n and book["billed_seconds"] == 3 * n
    assert [r.zscore(KEYS.dlq, j) for j in ids] == [None] * n
    assert [r.hget(KEYS.job(j), "dead_letter_reason") or "" for j in ids] == [""] * n
    assert budget_day(r) == (n * BILL_MICRO, 0), budget_day(r)


def test_expired_result_is_result_unavailable_charged_and_replay_needs_force(
    chaos_cluster: ClusterFactory, whole_clip: Path
) -> None:
    """The other side of a 404: the result is gone for good (fal's retention passed).

    Old behaviour would differ in what matters: an unreadable result was called a runner failure and
    resubmitted (a second submit in the ledger, paid twice), or dead-lettered without a charge, and
    a plain replay was accepted without ``force``.
    """
    cluster = chaos_cluster(
        workers=1,
        emulator_concurrency=4,
        emulator_processing_time_s=0.5,
        env={"REFRAME_LOST_CONFIRM_S": "10", **MONEY_ENV},
    )
    r = redis_of(cluster)
    control = cluster.emulator_control
    assert control is not None
    url = upload(cluster.settings(), whole_clip)
    tag = new_tag("expired-result")
    (request,) = distinct_inputs(url, 1, tag)
    fp = fingerprint_of(request)
    control.set_faults([{"op": "result", "kind": "expire_result", "times": 1}])
    ids: list[str] = []
    with Producer(cluster.settings()) as p, explained(cluster, ids):
        job_id = p.enqueue(request)
        ids.append(job_id)
        print("job id:", job_id)
        wait_terminal(p, ids, timeout_s=45)
        rec = r.hgetall(KEYS.job(job_id))
        assert rec["state"] == "FAILED" and rec.get("dead_letter_reason") == "result_unavailable", rec
        assert r.zscore(KEYS.dlq, job_id) is not None
        book = ledger(cluster)
        result_rows = [row for row in book["requests"] if row["op"] == "result"]
        # fal kept answering 404 for the whole confirmation window: more than one read, all 404.
        assert len(result_rows) >= 2 and {row["status"] for row in result_rows} == {404}, result_rows
        assert book["submissions"].get(fp) == 1 and len(book["submits"]) == 1
        # fal billed it (it completed), and we charged the estimate: never under-count spend.
        assert book["billed_requests"] == 1
        assert budget_day(r) == (ESTIMATE_MICRO, 0), budget_day(r)
        # Replaying may pay twice: refused until forced, and the refusal changes nothing.
        assert p.replay(job_id) is ReplayOutcome.NEEDS_FORCE
        assert p.replay(job_id) is ReplayOutcome.NEEDS_FORCE
        assert _state(r, job_id) == "FAILED" and r.zscore(KEYS.dlq, job_id) is not None
        assert ledger(cluster)["submissions"].get(fp) == 1
        assert p.replay(job_id, force=True) is ReplayOutcome.REPLAYED
        wait_until(lambda: _state(r, job_id) in TERMINAL, timeout_s=30, what="the forced replay finished")
        assert _state(r, job_id) == "SUCCEEDED", r.hgetall(KEYS.job(job_id))
    book = ledger(cluster)
    # The forced replay is the one, explicit second submit.
    assert book["submissions"].get(fp) == 2 and book["billed_requests"] == 2
    assert budget_day(r) == (ESTIMATE_MICRO + BILL_MICRO, 0), budget_day(r)


# ---------------------------------------------------------------------- 4. housekeeper lock
def test_housekeeper_sweeps_never_overlap_across_a_stopped_holder(
    chaos_cluster: ClusterFactory, whole_clip: Path
) -> None:
    """Old behaviour: a holder stopped past the lock TTL woke up still believing it held the lock and
    swept (or re-took the lock by overwriting it) alongside the new holder: two housekeepers
    dispatched the same due deferrals, and the lock value flipped back to the stale process."""
    n, cap, retry_after_s = 3, 2, 6
    cluster = chaos_cluster(
        workers=2,
        emulator_concurrency=8,
        emulator_processing_time_s=1.0,
        env={"REFRAME_MAX_CONCURRENCY": str(cap), "REFRAME_HEARTBEAT_TTL_MS": "5000", **MONEY_ENV},
    )
    r = redis_of(cluster)
    control = cluster.emulator_control
    assert control is not None
    url = upload(cluster.settings(), whole_clip)
    tag = new_tag("housekeeper-lock")
    requests = distinct_inputs(url, n, tag)
    wait_until(lambda: r.get(KEYS.housekeeper_lock), timeout_s=20, what="a housekeeper holds the lock")
    token_a = str(r.get(KEYS.housekeeper_lock))
    holder = worker_of(cluster, token_a)
    print(f"housekeeper lock: {token_a} (pid {holder.process.pid})")
    pause_key = f"{KEYS.root}:fc:pause_until"
    control.set_faults(
        [
            {
                "op": "submit",
                "kind": "http",
                "status": 503,
                "headers": {"Retry-After": str(retry_after_s)},
                "json": {"detail": "Service temporarily unavailable"},
                "times": 1,
            }
        ]
    )
    ids: list[str] = []
    with Producer(cluster.settings()) as p, explained(cluster, ids):
        ids.extend(p.enqueue_many(requests))
        print("job ids:", ids)

        def parked_in_pause() -> bool:
            # fal pushed back and every worker's submits are paused: no submit can be in flight, so
            # stopping a worker now cannot leave an ambiguous submit behind.
            states = [_state(r, j) for j in ids]
            until = int(r.get(pause_key) or 0)
            return "DEFERRED" in states and "SUBMITTING" not in states and until > _redis_ms(r) + 2000

        wait_until(parked_in_pause, timeout_s=20, interval_s=0.05, what="jobs deferred by the 503 pause")
        holder.process.kill(signal.SIGSTOP)
        try:
            print(f"SIGSTOP the holder; states {[_state(r, j) for j in ids]}")
            wait_until(
                lambda: r.get(KEYS.housekeeper_lock) not in (None, token_a),
                timeout_s=25,
                interval_s=0.1,
                what="the other worker took the lock",
            )
            token_b = str(r.get(KEYS.housekeeper_lock))
            assert worker_of(cluster, token_b) is not holder, token_b
            print(f"lock taken over: {token_b}")

            def swept_by_new_holder() -> bool:
                # The due deferrals were dispatched while the old holder is still stopped: each
                # one left DEFERRED, or its `delayed` entry is leased (moved ~60 s ahead).
                now_ms = _redis_ms(r)
                return all(
                    _state(r, j) != "DEFERRED" or (r.zscore(KEYS.delayed, j) or 0) > now_ms + 30_000
                    for j in ids
                )

            wait_until(swept_by_new_holder, timeout_s=15, what="the new holder dispatched the deferrals")
        finally:
            holder.process.kill(signal.SIGCONT)
        resumed_at_ms = _redis_ms(r)
        # The stale holder runs again: its heartbeat is newer than the SIGCONT ...
        wait_until(
            lambda: (r.zscore(f"{KEYS.root}:procs", token_a.rsplit(":", 1)[0]) or 0) > resumed_at_ms,
            timeout_s=10,
            what="the resumed process beats again",
        )
        # ... and for longer than its renewal period (5 s) its renewals find the lock taken: the
        # value never goes back to it (nor away from the new holder).
        seen: set[str | None] = set()
        window_end = time.monotonic() + 6.5
        while time.monotonic() < window_end:
            seen.add(r.get(KEYS.housekeeper_lock))
            time.sleep(0.05)
        assert seen == {token_b}, seen
        assert holder.process.alive()
        wait_terminal(p, ids, timeout_s=40)
        jobs = p.get_many(ids)
        recs = [r.hgetall(KEYS.job(j)) for j in ids]
    book = ledger(cluster)
    assert [j.state for j in jobs if j] == [JobState.SUCCEEDED] * n, [
        (j.id, j.state, j.error) for j in jobs if j
    ]
    assert any(rec.get("ts_DEFERRED") for rec in recs), "no job was deferred: nothing to sweep"
    submit_rows = [row for row in book["requests"] if row["op"] == "submit"]
    assert collections.Counter(row["status"] for row in submit_rows) == {503: 1, 200: n}, submit_rows
    # One accepted submit per job, and every submit fal saw belongs to one recorded attempt.
    per_fp = _submits_by_fingerprint(book)
    assert [per_fp[fingerprint_of(req)] for req in requests] == [1] * n, per_fp
    assert sum(int(rec.get("attempts") or 0) for rec in recs) == len(submit_rows), [
        rec.get("attempts") for rec in recs
    ]
    assert book["max_open"] <= cap and max_open_from_timeline(book) <= cap, book["open_timeline"]
    assert budget_day(r) == (n * BILL_MICRO, 0), budget_day(r)


# ---------------------------------------------------------------------- 5. cancel while WAITING
def test_cancel_of_a_waiting_job_frees_its_reservation_and_queue_place_at_once(
    chaos_cluster: ClusterFactory, whole_clip: Path
) -> None:
    """Old behaviour: a cancelled WAITING job kept its reservation (and its place) until its lease
    expired, so right after the cancel the budget still counted it and it was still queued."""
    cluster = chaos_cluster(
        workers=1,
        emulator_concurrency=2,
        emulator_processing_time_s=60.0,
        env={"REFRAME_MAX_CONCURRENCY": "1", **MONEY_ENV},
    )
    r = redis_of(cluster)
    url = upload(cluster.settings(), whole_clip)
    tag = new_tag("cancel-waiting")
    first, second = distinct_inputs(url, 2, tag)
    ids: list[str] = []
    with Producer(cluster.settings()) as p, explained(cluster, ids):
        j1 = p.enqueue(first)
        ids.append(j1)
        wait_until(lambda: _state(r, j1) in AT_FAL, timeout_s=30, what="the first job at fal")
        j2 = p.enqueue(second)
        ids.append(j2)
        print("job ids:", ids)
        wait_until(
            lambda: _state(r, j2) == "WAITING" and r.hexists(KEYS.reservations, j2),
            timeout_s=20,
            what="the second job WAITING with a reservation",
        )
        # The interleaving: j2 holds a reservation and a place in the wait queue, j1 the only slot.
        assert r.sismember(KEYS.waiting, j2) and _in_wait_lists(r, j2)
        assert r.zrange(KEYS.slots, 0, -1) == [j1]
        assert budget_day(r) == (0, 2 * ESTIMATE_MICRO), budget_day(r)

        assert p.cancel(j2) is CancelOutcome.CANCELLED
        # At once: no sleep, no sweep.
        assert _state(r, j2) == "CANCELLED"
        assert not r.hexists(KEYS.reservations, j2)
        assert not r.sismember(KEYS.waiting, j2) and not _in_wait_lists(r, j2)
        assert r.zscore(KEYS.slots, j2) is None
        assert r.zrange(KEYS.slots, 0, -1) == [j1]
        assert r.hexists(KEYS.reservations, j1)
        assert budget_day(r) == (0, ESTIMATE_MICRO), budget_day(r)
        assert _state(r, j1) in AT_FAL

        # Let the first one go too (a cancel at fal), so the cluster stops clean.
        assert p.cancel(j1) is CancelOutcome.REQUESTED
        wait_terminal(p, ids, timeout_s=30)
    book = ledger(cluster)
    assert book["submissions"].get(fingerprint_of(second), 0) == 0, book["submits"]
    assert book["submissions"].get(fingerprint_of(first)) == 1
    assert _state(r, j1) == "CANCELLED" and book["billed_requests"] == 0
    assert r.zcard(KEYS.slots) == 0 and budget_day(r) == (0, 0)
