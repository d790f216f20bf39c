"""The submit path with a pool of fal accounts, against a real redis-server (no fal call is made:
every case here stops before the POST; tests/chaos/test_accounts.py covers the POSTs)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis
from prometheus_client import CollectorRegistry

from config import Settings
from producer import Producer
from worker import lifecycle
from worker.contracts.models import JobState
from worker.contracts.store import BudgetAction, SlotAction
from worker.metrics import Metrics
from worker.runtime import Runtime
from worker.submit import Outcome, Submitter

REQ = {"video_url": "https://x.test/v.mp4", "aspect_ratio": "9:16"}


@pytest.fixture
def runtime(make_settings: Callable[..., Settings], rclient: redis.Redis) -> Iterator[Runtime]:
    settings = make_settings(
        fal_accounts="a:1,b:1",
        fal_account_keys="a=ida:seca; b=idb:secb",
        callback_allow_unsigned=True,
    )
    rt = Runtime.build(settings, metrics=Metrics(CollectorRegistry()))
    yield rt
    rt.close()


def enqueue(rt: Runtime, n: int) -> list[str]:
    with Producer(rt.settings, client=rt.redis) as p:
        ids = [p.enqueue({**REQ, "prompt": str(i)}) for i in range(n)]
    for job_id in ids:
        rt.store.set_fields(job_id, estimate_micro=60_000)  # no media probe: the estimate is known
    return ids


def test_each_account_gets_its_own_client_breaker_and_rate(runtime: Runtime) -> None:
    pool = runtime.flow.accounts
    assert pool.multi and [a.id for a in pool.accounts] == ["a", "b"]
    assert runtime.fal_for("a") is not runtime.fal_for("b") and runtime.fal_for("") is runtime.fal
    assert pool.get("a").breaker.key != pool.get("b").breaker.key
    assert pool.get("a").rate.gcra_key != pool.get("b").rate.gcra_key
    assert runtime.store.slot_params.accounts == "a:1,b:1"


def test_the_intent_binds_the_attempt_to_its_slots_account(runtime: Runtime) -> None:
    (job_id,) = enqueue(runtime, 1)
    gate = lifecycle.begin(runtime, job_id)
    key = runtime.store.keys.job(job_id)
    slot = runtime.flow.slots.acquire(job_id, "normal", record_key=key, attempt=gate.attempt)
    assert slot.acquired and slot.account in {"a", "b"}
    assert runtime.store.field(job_id, "fal_account") == ""
    assert lifecycle.mark_submitting(runtime, job_id, gate.attempt).ok
    assert runtime.store.field(job_id, "fal_account") == slot.account


def test_an_open_breaker_drains_its_account_and_the_job_goes_to_another(runtime: Runtime) -> None:
    first, second = enqueue(runtime, 2)
    pool = runtime.flow.accounts
    # the account with the most room is taken first; both have 1, so the first listed: a
    now = runtime.now_ms()
    pool.get("a").breaker.force_open_until(now + 60_000)
    sub = Submitter(runtime)
    gate = lifecycle.begin(runtime, first)
    rec = runtime.store.record(first)
    assert rec is not None
    assert sub._gate_and_submit(rec, gate.attempt) is Outcome.DEFERRED
    after = runtime.store.record(first)
    assert (
        after is not None
        and after.state == JobState.DEFERRED
        and after.get("deferred_reason") == "breaker_open"
    )
    assert not runtime.flow.slots.holds(first)  # nothing was sent: its slot and reservation went back
    assert runtime.flow.budget.reservation(first) is None
    status = {s.id: s for s in pool.status()}
    assert not status["a"].usable and status["a"].drained_until_ms >= now + 60_000
    assert status["a"].drain_reason == ""  # a breaker drain ends by itself, not a rejected key
    # the next slot is on b: a takes none while drained
    key = runtime.store.keys.job(second)
    gate2 = lifecycle.begin(runtime, second)
    assert runtime.flow.slots.acquire(second, "normal", record_key=key, attempt=gate2.attempt).account == "b"


def test_a_transition_settles_before_it_hands_on_the_slot_so_a_refund_admits_at_once(
    make_settings: Callable[..., Settings], rclient: redis.Redis
) -> None:
    # one account with room for one largest job (31 s at $0.06/s = $1.86) and $0.059999 more: the
    # first job (estimate $0.06) runs, the second waits for budget, not for a slot
    settings = make_settings(fal_accounts="a:2:-:1.919999", callback_allow_unsigned=True, fal_key="ida:seca")
    rt = Runtime.build(settings, metrics=Metrics(CollectorRegistry()))
    try:
        first, second = enqueue(rt, 2)
        attempts = {}
        for job_id in (first, second):
            gate = lifecycle.begin(rt, job_id)
            attempts[job_id] = gate.attempt
            key = rt.store.keys.job(job_id)
            assert rt.flow.budget.reserve(job_id, 60_000, record_key=key, attempt=gate.attempt).ok
            rt.flow.slots.acquire(job_id, "normal", record_key=key, attempt=gate.attempt)
        assert rt.flow.slots.account_of(first) == "a" and rt.flow.slots.account_of(second) == ""
        # the first job ends billed $0.03 (a refund of half its estimate): in the same script the
        # account's money is settled, then its slot handed on, to the second job
        moved = rt.store.move(
            first,
            JobState.DEFERRED,
            lifecycle.attempt_fence(attempts[first], states=[JobState.QUEUED]),
            slot=SlotAction.RELEASE,
            budget=BudgetAction.SETTLE,
            settle_micro=30_000,
        )
        assert moved.ok and moved.admitted == (second,)
        assert rt.flow.slots.account_of(second) == "a"
        (status,) = rt.flow.accounts.status()
        assert (status.day_spent_micro, status.reserved_micro) == (30_000, 60_000)
    finally:
        rt.close()
