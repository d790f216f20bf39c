"""The lifecycle's fenced verbs on a real Redis, in process (no fal call is made in these tests).

Each test makes the bad order happen by hand (a duplicate gate run, a late tracker, a replay) and
judges by what Redis holds: the record, the slot ZSET, the reservations and the outbox.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest
import redis
from prometheus_client import CollectorRegistry

from config import Settings
from producer import JobState, Producer
from reframe.localproc import wait_until
from worker import lifecycle
from worker.contracts.keys import celery_queue_keys
from worker.contracts.models import PRE_SUBMIT_STATES
from worker.contracts.store import BudgetAction, Fence
from worker.contracts.wire import submit_job_id
from worker.fal import FalAmbiguousError, FalAuthError, FalTransientError, SubmitReceipt
from worker.flow.budget import BudgetRefused
from worker.flow.slots import SlotRefused
from worker.housekeeper import Housekeeper
from worker.lifecycle import AT_FAL, Failure, attempt_fence, counts_against_breaker
from worker.metrics import Metrics
from worker.outbox import Outbox
from worker.runtime import Runtime
from worker.submit import Outcome, Submitter

REQ = {"video_url": "https://x.test/v.mp4", "aspect_ratio": "9:16"}
ALLOW_CB = {"callback_allow_unsigned": True}


@pytest.fixture
def runtime(make_settings: Callable[..., Settings], rclient: redis.Redis) -> Iterator[Runtime]:
    rt = Runtime.build(make_settings(max_concurrency=1, **ALLOW_CB), metrics=Metrics(CollectorRegistry()))
    yield rt
    rt.close()


def enqueue(rt: Runtime, **kw: object) -> str:
    with Producer(rt.settings, client=rt.redis) as p:
        return p.enqueue(REQ, **kw)  # type: ignore[arg-type]


def receipt(request_id: str) -> SubmitReceipt:
    base = f"http://127.0.0.1:9/fal-ai/x/requests/{request_id}"
    return SubmitReceipt(
        request_id=request_id,
        status_url=base + "/status",
        response_url=base,
        cancel_url=base + "/cancel",
        queue_position=None,
    )


def at_fal(rt: Runtime, job_id: str, request_id: str) -> str:
    """Drive a job through gate, reservation, slot and submit to IN_QUEUE; returns its attempt."""
    gate = lifecycle.begin(rt, job_id)
    assert gate.owner
    key = rt.store.keys.job(job_id)
    assert rt.flow.budget.reserve(job_id, 60_000, record_key=key, attempt=gate.attempt).ok
    assert rt.flow.slots.acquire(job_id, "normal", record_key=key, attempt=gate.attempt).acquired
    assert lifecycle.mark_submitting(rt, job_id, gate.attempt).ok
    rec = rt.store.record(job_id)
    assert rec is not None
    assert lifecycle.accepted(rt, rec, gate.attempt, receipt(request_id)).ok
    return gate.attempt


def test_a_duplicate_gate_run_finds_the_gate_taken_and_touches_nothing(runtime: Runtime) -> None:
    job_id = enqueue(runtime)
    first = lifecycle.begin(runtime, job_id)
    second = lifecycle.begin(runtime, job_id)
    assert first.owner and second.busy and not second.owner
    assert Submitter(runtime).handle(job_id) is Outcome.DUPLICATE
    assert not runtime.flow.slots.holds(job_id) and runtime.flow.budget.reservation(job_id) is None


def test_a_stale_attempt_can_take_no_resource_and_write_no_intent(
    make_settings: Callable[..., Settings], runtime: Runtime, rclient: redis.Redis
) -> None:
    fast = Runtime.build(
        make_settings(max_concurrency=1, gate_ttl_s=0.05, **ALLOW_CB), metrics=Metrics(CollectorRegistry())
    )
    try:
        job_id = enqueue(fast)
        old = lifecycle.begin(fast, job_id)
        key = fast.store.keys.job(job_id)
        gate_until = int(rclient.hget(key, "gate_until_ms"))
        wait_until(lambda: fast.now_ms() > gate_until, timeout_s=5, what="the old gate expired")
        new = lifecycle.begin(fast, job_id)  # the old run was stopped past its gate
        assert old.owner and new.owner and old.attempt != new.attempt
        with pytest.raises(BudgetRefused):
            fast.flow.budget.reserve(job_id, 60_000, record_key=key, attempt=old.attempt)
        with pytest.raises(SlotRefused):
            fast.flow.slots.acquire(job_id, "normal", record_key=key, attempt=old.attempt)
        assert not lifecycle.mark_submitting(fast, job_id, old.attempt).ok
        assert fast.store.state(job_id) is JobState.QUEUED
        assert rclient.zcard("{reframe}:slots") == 0 and rclient.hlen("{reframe}:fc:budget:res") == 0
    finally:
        fast.close()


def test_a_late_tracker_cannot_touch_the_next_attempt(runtime: Runtime, rclient: redis.Redis) -> None:
    """Scenario 2 of the fenced-lifecycle issue: R1 fails, R2 runs, R1's late handler loses."""
    job_id = enqueue(runtime)
    a1 = at_fal(runtime, job_id, "R1")
    rec1 = runtime.store.record(job_id)
    assert rec1 is not None
    # The tracker that owns the claim handles R1's runner failure: a new attempt is scheduled.
    outcome = lifecycle.retry_later(
        runtime,
        rec1,
        a1,
        reason="runner",
        failure=Failure("fal_runner_error", "runner died"),
        retry_after_s=None,
        states=AT_FAL,
        request_id="R1",
        fields={"fal_request_id": ""},
    )
    assert outcome == "retrying"
    assert not runtime.flow.slots.holds(job_id), "fal does not bill a runner failure: its slot is free"
    rclient.zadd("{reframe}:delayed", {job_id: 0})
    a2 = at_fal(runtime, job_id, "R2")
    assert a2 != a1 and runtime.flow.slots.holds(job_id)
    held = runtime.flow.budget.reservation(job_id)
    # The late tracker, still holding rec1, handles the same failure again: it must lose.
    late = lifecycle.retry_later(
        runtime,
        rec1,
        a1,
        reason="runner",
        failure=Failure("fal_runner_error", "runner died"),
        retry_after_s=None,
        states=AT_FAL,
        request_id="R1",
    )
    assert late == "stale"
    assert not lifecycle.fail(runtime, rec1, Failure("x", "y"), fence=attempt_fence(a1, states=AT_FAL))
    now = runtime.store.record(job_id)
    assert now is not None and now.state is JobState.IN_QUEUE and now.fal_request_id == "R2"
    assert runtime.flow.slots.holds(job_id) and runtime.flow.budget.reservation(job_id) == held


def test_finish_writes_event_and_callback_snapshot_in_one_step(
    runtime: Runtime, rclient: redis.Redis
) -> None:
    job_id = enqueue(runtime, callback_url="https://hooks.example.com/x", metadata={"k": [1, 2.5, "é"]})
    attempt = at_fal(runtime, job_id, "R1")
    rec = runtime.store.record(job_id)
    assert rec is not None
    assert lifecycle.fail(
        runtime,
        rec,
        Failure("fal_validation", "bad"),
        fence=attempt_fence(attempt, request_id="R1", states=AT_FAL),
    )
    assert not runtime.flow.slots.holds(job_id) and runtime.flow.budget.reservation(job_id) is None
    event_id = f"{job_id}.1"
    events = [f for _i, f in rclient.xrange("{reframe}:events") if f["job_id"] == job_id]
    assert [e["event_id"] for e in events] == [event_id]
    entry = rclient.hgetall("{reframe}:outbox:" + event_id)
    body = json.loads(entry["body"])
    assert (
        body["state"] == "FAILED"
        and body["event_id"] == event_id
        and body["metadata"] == {"k": [1, 2.5, "é"]}
    )
    assert body["error"]["type"] == "fal_validation"
    assert rclient.zscore("{reframe}:outbox", event_id) is not None
    # A second finish (a duplicate, late actor) changes nothing and writes no second event.
    assert not lifecycle.fail(runtime, rec, Failure("x", "y"), fence=Fence())
    assert len([1 for _i, f in rclient.xrange("{reframe}:events") if f["job_id"] == job_id]) == 1


def test_each_life_has_its_own_event_id(runtime: Runtime, rclient: redis.Redis) -> None:
    job_id = enqueue(runtime, callback_url="https://hooks.example.com/x")
    rec = runtime.store.record(job_id)
    assert rec is not None
    assert lifecycle.fail(
        runtime, rec, Failure("fal_rejected", "no"), fence=Fence(from_states=PRE_SUBMIT_STATES)
    )
    assert runtime.store.replay(job_id, rec.priority).ok
    rec2 = runtime.store.record(job_id)
    assert rec2 is not None and rec2.event_id == f"{job_id}.2"
    assert lifecycle.cancel(runtime, rec2, fence=Fence(from_states=PRE_SUBMIT_STATES), message="stop")
    ids = [f["event_id"] for _i, f in rclient.xrange("{reframe}:events") if f["job_id"] == job_id]
    assert ids == [f"{job_id}.1", f"{job_id}.2"]
    bodies = [json.loads(rclient.hget("{reframe}:outbox:" + i, "body")) for i in ids]
    assert [b["state"] for b in bodies] == ["FAILED", "CANCELLED"], "each body is its life's snapshot"


def test_replaying_a_possibly_paid_death_needs_force(runtime: Runtime) -> None:
    job_id = enqueue(runtime)
    gate = lifecycle.begin(runtime, job_id)
    key = runtime.store.keys.job(job_id)
    assert runtime.flow.budget.reserve(job_id, 60_000, record_key=key, attempt=gate.attempt).ok
    assert runtime.flow.slots.acquire(job_id, "normal", record_key=key, attempt=gate.attempt).acquired
    assert lifecycle.mark_submitting(runtime, job_id, gate.attempt).ok
    rec = runtime.store.record(job_id)
    assert rec is not None
    assert lifecycle.ambiguous(runtime, rec, gate.attempt, reason="reset after send")
    assert runtime.flow.slots.holds(job_id), "an ambiguous submit keeps its slot: fal may run it"
    assert runtime.flow.budget.snapshot().day_spent == 60_000, "charged at its estimate"
    refused = runtime.store.replay(job_id, rec.priority)
    assert not refused.ok and refused.state == "NEEDS_FORCE:ambiguous_submit"
    assert runtime.store.replay(job_id, rec.priority, force=True).ok


def test_cancelling_a_waiting_job_frees_its_slot_and_reservation_at_once(runtime: Runtime) -> None:
    holder, waiter = enqueue(runtime), enqueue(runtime)
    at_fal(runtime, holder, "R1")
    gate = lifecycle.begin(runtime, waiter)
    key = runtime.store.keys.job(waiter)
    assert runtime.flow.budget.reserve(waiter, 60_000, record_key=key, attempt=gate.attempt).ok
    assert not runtime.flow.slots.acquire(waiter, "normal", record_key=key, attempt=gate.attempt).acquired
    assert lifecycle.park_waiting(runtime, waiter, gate.attempt, ahead=0).ok
    with Producer(runtime.settings, client=runtime.redis) as p:
        assert p.cancel(waiter).value == "cancelled"
    assert runtime.flow.budget.reservation(waiter) is None
    assert runtime.flow.slots.waiting_depths() == {"high": 0, "normal": 0, "low": 0}


def test_a_pause_after_the_token_sends_nothing_and_defers_until_it_ends(
    runtime: Runtime, rclient: redis.Redis
) -> None:
    job_id = enqueue(runtime)
    gate = lifecycle.begin(runtime, job_id)
    key = runtime.store.keys.job(job_id)
    assert runtime.flow.slots.acquire(job_id, "normal", record_key=key, attempt=gate.attempt).acquired
    intent = lifecycle.mark_submitting(runtime, job_id, gate.attempt)
    pause_until = runtime.flow.rate.pause(30)  # another worker's 429 lands now
    assert Submitter(runtime)._paused_since_token(job_id, gate.attempt, now_ms=intent.at_ms)
    rec = runtime.store.record(job_id)
    assert rec is not None and rec.state is JobState.DEFERRED and rec.attempts == 0
    assert rclient.zscore("{reframe}:delayed", job_id) >= pause_until
    assert rclient.zscore("{reframe}:slots", job_id) > pause_until, "the slot is kept across the pause"


def test_the_stream_is_trimmed_only_below_the_slowest_group(runtime: Runtime, rclient: redis.Redis) -> None:
    stream = "{reframe}:events"
    ids = [rclient.xadd(stream, {"n": str(i)}) for i in range(30)]
    rclient.xgroup_create(stream, "slow", id="0")
    rclient.xgroup_create(stream, "fast", id="$")
    read = rclient.xreadgroup("slow", "c", {stream: ">"}, count=5)
    rclient.xack(stream, "slow", *[i for i, _f in read[0][1][:3]])  # 2 delivered, unacked
    hk = Housekeeper(runtime)
    below, over = hk.trim_events(keep=0)
    assert (below, over) == (3, 0)
    kept = [i for i, _f in rclient.xrange(stream)]
    assert kept[0] == ids[3], "the oldest pending entry of the slow group survives"
    assert len(kept) == 27
    # Past the hard ceiling the unread entries go too, and that is counted.
    tight = Housekeeper(
        Runtime.build(
            runtime.settings.model_copy(update={"results_stream_maxlen": 10}),
            metrics=Metrics(CollectorRegistry()),
        )
    )
    assert tight.trim_events(keep=0) == (0, 17)
    tight.rt.close()


def test_the_newest_keep_entries_stay_whatever_the_groups_need(
    runtime: Runtime, rclient: redis.Redis
) -> None:
    stream = "{reframe}:events"
    ids = [rclient.xadd(stream, {"n": str(i)}) for i in range(30)]
    hk = Housekeeper(runtime)
    assert hk.trim_events(keep=30) == (0, 0) and rclient.xlen(stream) == 30  # nothing past keep
    assert hk.trim_events(keep=12) == (18, 0)  # no group: only the newest 12 stay
    assert [i for i, _f in rclient.xrange(stream)] == ids[18:]
    rclient.xgroup_create(stream, "slow", id=ids[19])  # needs ids[20:] (unread)
    assert hk.trim_events(keep=5) == (2, 0)  # the group's need is the lower bound here
    assert [i for i, _f in rclient.xrange(stream)] == ids[20:]
    rclient.xgroup_setid(stream, "slow", id=ids[-1])  # the group has read everything
    assert hk.trim_events(keep=4) == (6, 0)  # now `keep` is
    assert [i for i, _f in rclient.xrange(stream)] == ids[26:]


def test_unrelated_fields_survive_in_the_typed_record(runtime: Runtime) -> None:
    job_id = enqueue(runtime, metadata={"team": "a"})
    rec = runtime.store.record(job_id)
    assert rec is not None
    assert rec.metadata == {"team": "a"} and rec.input["aspect_ratio"] == "9:16" and rec.life == 1


@pytest.mark.parametrize(
    ("error", "counts"),
    [
        (FalTransientError("refused", op="submit"), True),  # connection error: provider health
        (FalTransientError("busy", op="submit", status_code=503), True),
        (FalTransientError("slow down", op="submit", status_code=429), False),  # the rate limiter's job
        (FalTransientError("conflict", op="submit", status_code=409), False),
        (FalAmbiguousError("timeout after send", op="submit"), True),
        (FalAuthError("locked", op="submit", status_code=403), False),
    ],
)
def test_only_provider_health_failures_count_against_the_breaker(error: Exception, counts: bool) -> None:
    assert counts_against_breaker(error) is counts  # type: ignore[arg-type]


def test_an_idempotency_claim_lives_exactly_as_long_as_its_record(
    runtime: Runtime, rclient: redis.Redis
) -> None:
    job_id = enqueue(runtime, idempotency_key="order-17")
    claim, record = "{reframe}:idem:order-17", "{reframe}:job:" + job_id
    assert rclient.pttl(claim) == -1 and rclient.pttl(record) == -1, "a live job and its claim never expire"
    rec = runtime.store.record(job_id)
    assert rec is not None
    assert lifecycle.fail(
        runtime, rec, Failure("fal_rejected", "no"), fence=Fence(from_states=PRE_SUBMIT_STATES)
    )
    assert abs(rclient.pttl(claim) - rclient.pttl(record)) < 1000
    assert rclient.pttl(record) > runtime.settings.job_retention_s * 1000, "dead letters live longer"
    assert runtime.store.replay(job_id, rec.priority).ok
    assert rclient.pttl(claim) == -1 and rclient.pttl(record) == -1


def test_nothing_we_own_rots_once_the_records_expire(
    make_settings: Callable[..., Settings], rclient: redis.Redis
) -> None:
    """Every structure that names a job forgets it when the record expires (or is swept)."""
    rt = Runtime.build(
        make_settings(job_retention_s=0.5, dlq_retention_s=0.5, **ALLOW_CB),
        metrics=Metrics(CollectorRegistry()),
    )
    try:
        ids = [
            # job 2's record is deleted by hand below: it has no claim (a live job's claim never expires)
            enqueue(
                rt, idempotency_key=f"k{i}" if i != 2 else None, callback_url="https://hooks.example.com/x"
            )
            for i in range(4)
        ]
        recs = [rt.store.record(j) for j in ids]
        assert all(recs)
        pre = Fence(from_states=PRE_SUBMIT_STATES)
        lifecycle.fail(rt, recs[0], Failure("fal_rejected", "no"), fence=pre)  # type: ignore[arg-type]
        lifecycle.cancel(rt, recs[1], fence=pre, message="stop")  # type: ignore[arg-type]
        gate = lifecycle.begin(rt, ids[2])
        key = rt.store.keys.job(ids[2])
        assert rt.flow.budget.reserve(ids[2], 60_000, record_key=key, attempt=gate.attempt).ok
        assert lifecycle.block(rt, ids[2], gate.attempt, scope="day").ok
        rclient.delete(key)  # a record lost without its clean-up (the worst case)
        at_fal(rt, ids[3], "R1")
        rec3 = rt.store.record(ids[3])
        assert rec3 is not None
        lifecycle.fail(
            rt, rec3, Failure("fal_validation", "bad"), fence=attempt_fence(rec3.attempt, states=AT_FAL)
        )
        # One callback given up for good (its entry then lives dlq_retention_s).
        from_outbox = rclient.zrange("{reframe}:outbox", 0, 0)[0]
        outbox = Outbox(rt)
        outbox._settle_try(from_outbox, from_outbox.split(".")[0], "failed", "http_500")
        outbox.stop()
        assert rclient.zscore("{reframe}:callbacks:failed", from_outbox) is not None
        hk = Housekeeper(rt)
        wait_until(
            lambda: not any(rclient.exists(rt.store.keys.job(j)) for j in ids),
            timeout_s=10,
            what="every record expired",
        )
        wait_until(
            lambda: not rclient.exists("{reframe}:outbox:" + from_outbox),
            timeout_s=10,
            what="failed entry expired",
        )
        assert rclient.zscore("{reframe}:blocked", ids[2]) is not None
        hk.retry_blocked()  # dispatches the blocked job; its submit run finds no record and forgets it
        assert Submitter(rt).handle(ids[2]) is Outcome.MISSING
        hk.sweep_dead_letters()
        hk.sweep_failed_callbacks()
        hk.reconcile_reservations()
        hk.trim_events(keep=0)
        hk.redispatch_lost_queued(min_age_ms=0)  # also drops index entries of jobs that ended QUEUED
        # Live work is not rot: pending callback deliveries (the outbox thread is not running here)
        # and the Celery messages no worker consumed.
        for event_id in rclient.zrange("{reframe}:outbox", 0, -1):
            rclient.delete("{reframe}:outbox:" + event_id)
        rclient.delete("{reframe}:outbox", *celery_queue_keys(rt.settings.queue_name))
        leftovers = {}
        for k in rclient.scan_iter("*"):
            if rclient.pttl(k) > 0:
                continue  # expires by itself
            kind = rclient.type(k)
            size = {
                "zset": rclient.zcard,
                "set": rclient.scard,
                "list": rclient.llen,
                "hash": rclient.hlen,
            }.get(kind, lambda _k: 1)(k)
            if size:
                leftovers[k] = kind
        allowed = {
            "{reframe}:fc:gcra",
            "{reframe}:fc:retry_budget",
            "{reframe}:events",
            "{reframe}:fc:breaker",
            "{reframe}:fc:fair",  # only its counters, checked below
        }
        assert set(leftovers) <= allowed, leftovers
        fair = rclient.hgetall("{reframe}:fc:fair")
        # ix: the fair index marker; acct_v: the one-time marker of the accounts' bookkeeping
        # (worker/contracts/lua/accounts_lib.lua)
        counters = ("seq", "vnow", "ix", "acct_v")
        assert {f for f in fair if f not in counters and not f.startswith("depth:")} == set(), fair
        assert {v for f, v in fair.items() if f.startswith("depth:")} <= {"0"}, fair
        assert rclient.xlen("{reframe}:events") == 0
        assert not any(
            k.startswith("{reframe}:idem:") for k in rclient.scan_iter("*") if rclient.pttl(k) == -1
        )
    finally:
        rt.close()


def test_a_reservation_settles_into_the_period_it_was_made_in(runtime: Runtime, rclient: redis.Redis) -> None:
    """A job reserved before midnight settles into that day: the lifecycle script is given exactly
    the reservation's period keys (every key it touches is in KEYS)."""
    job_id = enqueue(runtime)
    attempt = at_fal(runtime, job_id, "R1")
    micro, _day, _month, at_ms, tenant, account = rclient.hget("{reframe}:fc:budget:res", job_id).split("|")
    assert (tenant, account) == ("default", "default")  # the slot bound it to the fal account
    rclient.hset("{reframe}:fc:budget:res", job_id, f"{micro}|2020-01-31|2020-01|{at_ms}|{tenant}|{account}")
    rclient.hset("{reframe}:fc:budget:day:2020-01-31", "reserved", micro)
    rclient.hset("{reframe}:fc:budget:tenant:default:day:2020-01-31", "reserved", micro)
    rec = runtime.store.record(job_id)
    assert rec is not None
    done = lifecycle.finish(
        runtime,
        rec,
        JobState.SUCCEEDED,
        fence=attempt_fence(attempt, request_id="R1", states=AT_FAL),
        budget=BudgetAction.SETTLE,
        settle_micro=60_000,
    )
    assert done
    assert rclient.hgetall("{reframe}:fc:budget:day:2020-01-31") == {"reserved": "0", "spent": "60000"}
    assert rclient.hget("{reframe}:fc:budget:month:2020-01", "spent") == "60000"
    # the tenant's periods moved in the same step, and the charge is in the ledger
    assert rclient.hgetall("{reframe}:fc:budget:tenant:default:day:2020-01-31") == {
        "reserved": "0",
        "spent": "60000",
    }
    assert rclient.hget("{reframe}:fc:budget:tenant:default:month:2020-01", "spent") == "60000"
    ((_id, entry),) = rclient.xrange("{reframe}:ledger")
    assert {k: entry[k] for k in ("job_id", "attempt", "tenant", "request_id", "micro", "kind")} == {
        "job_id": job_id,
        "attempt": attempt,
        "tenant": "default",
        "request_id": "R1",
        "micro": "60000",
        "kind": "settled",
    }


def test_a_run_that_dies_inside_the_gate_leaves_the_job_to_be_dispatched_again(
    runtime: Runtime, rclient: redis.Redis
) -> None:
    """A duplicate message finding the gate busy is acked and dropped; if the gate's own run then
    dies, only the gate's safety entry in `delayed` brings the job back."""
    job_id = enqueue(runtime)
    gate = lifecycle.begin(runtime, job_id)  # ... and the run is SIGKILLed here
    assert Submitter(runtime).handle(job_id) is Outcome.DUPLICATE  # the redelivery is dropped
    gate_until = int(rclient.hget(runtime.store.keys.job(job_id), "gate_until_ms"))
    assert rclient.zscore("{reframe}:delayed", job_id) == gate_until + 1000
    # every way out of the gate clears the entry (here: parked WAITING)
    assert lifecycle.park_waiting(runtime, job_id, gate.attempt, ahead=0).ok
    assert rclient.zscore("{reframe}:delayed", job_id) is None


def test_a_queued_job_whose_message_was_lost_is_dispatched_again(
    runtime: Runtime, rclient: redis.Redis
) -> None:
    """kombu pops a message and records it unacked in two steps: a kill in between loses it."""
    waiting, lost, taken = enqueue(runtime), enqueue(runtime), enqueue(runtime)
    queue = celery_queue_keys(runtime.settings.queue_name)[1]  # normal priority
    messages = rclient.lrange(queue, 0, -1)  # newest first
    by_job = {submit_job_id(m): m for m in messages}
    rclient.lrem(queue, 0, by_job[lost])  # popped, never recorded: lost
    rclient.lrem(queue, 0, by_job[taken])  # popped and recorded unacked: a worker holds it
    rclient.hset("unacked", "tag-1", json.dumps([json.loads(by_job[taken]), "", queue]))
    hk = Housekeeper(runtime)
    # `waiting`'s message is still in the list (the oldest one): it is not lost, and neither is
    # anything created after it. Once the list moves past it, `lost` is found.
    assert hk.redispatch_lost_queued(min_age_ms=0) == []
    rclient.lrem(queue, 0, by_job[waiting])
    rclient.hset("unacked", "tag-2", json.dumps([json.loads(by_job[waiting]), "", queue]))
    assert hk.redispatch_lost_queued(min_age_ms=0) == [lost]
    assert [submit_job_id(m) for m in rclient.lrange(queue, 0, -1)] == [lost]  # in its own lane again
    # once its run starts, the job leaves the index
    assert lifecycle.begin(runtime, lost).owner
    assert rclient.zscore("{reframe}:queued", lost) is None


def test_a_dead_processs_gate_on_a_slot_is_released_at_once(runtime: Runtime, rclient: redis.Redis) -> None:
    """A slot holder whose gate run died is dispatched again when its process stops beating, not
    after the gate's TTL; a live process's gate is left alone."""
    job_id = enqueue(runtime)
    gate = runtime.store.gate(job_id, gate_ttl_ms=30_000, process_id="host:1:dead")
    key = runtime.store.keys.job(job_id)
    assert runtime.flow.slots.acquire(job_id, "normal", record_key=key, attempt=gate.attempt).acquired
    hk = Housekeeper(runtime)
    hk.presence.beat("host:1:dead", {})  # alive for now
    hk.take_over_dead()
    assert int(rclient.hget(key, "gate_until_ms")) > 0, "a live process keeps its gate"
    hk.presence.remove("host:1:dead")  # ... and then it stops beating
    hk.take_over_dead()
    assert int(rclient.hget(key, "gate_until_ms")) == 0
    lanes = celery_queue_keys(runtime.settings.queue_name)
    messages = [submit_job_id(m) for key_ in lanes for m in rclient.lrange(key_, 0, -1)]
    assert messages.count(job_id) == 2, "the original message and the re-dispatch"
    assert lifecycle.begin(runtime, job_id).owner, "the next run takes the gate at once"
