"""Job records on a real Redis: atomic enqueue, one-way transitions, exactly-once finish, replay."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis
from pydantic import SecretStr

from config import Settings
from producer import IdempotencyConflict, InvalidRequest, JobState, Producer, ReplayOutcome
from worker.contracts.keys import celery_queue_keys
from worker.contracts.models import PRE_SUBMIT_STATES
from worker.contracts.store import Fence

REQ = {"video_url": "https://x.test/v.mp4", "aspect_ratio": "9:16"}


@pytest.fixture
def producer(make_settings: Callable[..., Settings], rclient: redis.Redis) -> Producer:
    p = Producer(make_settings())
    yield p  # type: ignore[misc]
    p.close()


def queued_messages(r: redis.Redis) -> list[dict]:
    return [json.loads(m) for k in celery_queue_keys("reframe") for m in r.lrange(k, 0, -1)]


def test_enqueue_writes_record_and_message_together(producer: Producer, rclient: redis.Redis) -> None:
    signed = Producer(producer.settings.model_copy(update={"callback_signing_key": SecretStr("k")}))
    job_id = signed.enqueue(REQ, priority="high", metadata={"order": 7}, callback_url="https://cb.test/h")
    signed.close()
    job = producer.get(job_id)
    assert job is not None and job.state is JobState.QUEUED and job.metadata == {"order": 7}
    assert job.timestamps_ms["ts_QUEUED"] == job.created_at_ms > 0
    messages = queued_messages(rclient)
    assert len(messages) == 1
    assert messages[0]["headers"]["task"] == "reframe.submit"
    assert messages[0]["properties"]["priority"] == 0
    assert rclient.ttl(f"{{reframe}}:job:{job_id}") == -1, "no expiry before the job is terminal"


def test_invalid_requests_enqueue_nothing(producer: Producer, rclient: redis.Redis) -> None:
    with pytest.raises(InvalidRequest, match=r"items\[1\]\.aspect_ratio"):
        producer.enqueue_many([REQ, {**REQ, "aspect_ratio": "5:4"}])
    with pytest.raises(InvalidRequest, match="priority: Input should be"):
        producer.enqueue(REQ, priority="urgent")
    with pytest.raises(InvalidRequest, match="callback_url"):
        producer.enqueue(REQ, callback_url="not a url")
    assert rclient.dbsize() == 0


def test_idempotency_key_same_input_same_job_different_input_conflict(
    producer: Producer, rclient: redis.Redis
) -> None:
    first = producer.enqueue(REQ, idempotency_key="k")
    assert producer.enqueue(dict(reversed(list(REQ.items()))), idempotency_key="k") == first
    with pytest.raises(IdempotencyConflict, match="idempotency_key"):
        producer.enqueue({**REQ, "aspect_ratio": "1:1"}, idempotency_key="k")
    assert len(queued_messages(rclient)) == 1


def test_concurrent_idempotent_enqueues_create_one_job(producer: Producer, rclient: redis.Redis) -> None:
    ids: list[str] = []
    lock = threading.Lock()

    def go() -> None:
        job = producer.enqueue(REQ, idempotency_key="race")
        with lock:
            ids.append(job)

    threads = [threading.Thread(target=go) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and len(queued_messages(rclient)) == 1


def finish(producer: Producer, job_id: str, state: JobState, fence: Fence | None = None, **kw: Any) -> Any:
    """End a job through the store's fenced finish script (its event id from the record)."""
    rec = producer.store.record(job_id)
    event_id = rec.event_id if rec else f"{job_id}.1"
    return producer.store.finish(job_id, state, fence or Fence(), event_id=event_id, **kw)


def test_transitions_never_go_backwards_or_leave_terminal(producer: Producer) -> None:
    store = producer.store
    job_id = producer.enqueue(REQ)
    gate = store.gate(job_id, gate_ttl_ms=30_000)
    pre = Fence(attempt=gate.attempt, from_states=PRE_SUBMIT_STATES)
    assert store.move(job_id, JobState.SUBMITTING, pre, incr={"attempts": 1}).ok
    # A late duplicate cannot move it back to WAITING.
    late = store.move(job_id, JobState.WAITING, pre)
    assert not late.ok and late.state == "SUBMITTING"
    # Nor can another attempt move it on.
    other = Fence(attempt="999", from_states=[JobState.SUBMITTING])
    assert not store.move(job_id, JobState.IN_QUEUE, other, fields={"fal_request_id": "r0"}).ok
    mine = Fence(attempt=gate.attempt, from_states=[JobState.SUBMITTING])
    assert store.move(job_id, JobState.IN_QUEUE, mine, fields={"fal_request_id": "r1"}).ok
    wrong_request = Fence(attempt=gate.attempt, request_id="r0")
    assert not finish(producer, job_id, JobState.FAILED, wrong_request).ok
    done = finish(
        producer,
        job_id,
        JobState.SUCCEEDED,
        Fence(attempt=gate.attempt, request_id="r1"),
        fields={"cost_actual_micro": 1},
        event={"video_url": "u"},
    )
    assert done.ok and done.stream_id
    again = finish(producer, job_id, JobState.FAILED)
    assert not again.ok and again.state == "SUCCEEDED"
    assert not store.move(job_id, JobState.IN_PROGRESS, Fence()).ok
    rec = store.get(job_id)
    assert rec is not None and rec["attempts"] == 1 and rec["state"] == "SUCCEEDED"
    assert producer.r.xlen("{reframe}:events") == 1
    assert 0 < producer.r.ttl(f"{{reframe}}:job:{job_id}") <= producer.settings.job_retention_s


def test_finish_races_publish_exactly_one_event(producer: Producer) -> None:
    job_id = producer.enqueue(REQ)
    results: list[bool] = []

    def finisher(state: JobState) -> None:
        results.append(finish(producer, job_id, state).ok)

    threads = [
        threading.Thread(target=finisher, args=(s,)) for s in [JobState.SUCCEEDED, JobState.FAILED] * 10
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    assert producer.r.xlen("{reframe}:events") == 1


def test_cancel_only_finishes_jobs_that_did_not_reach_fal(producer: Producer, rclient: redis.Redis) -> None:
    queued = producer.enqueue(REQ)
    assert producer.cancel(queued).value == "cancelled"
    assert producer.cancel(queued).value == "already_finished"
    assert producer.cancel("nope").value == "not_found"
    at_fal = producer.enqueue({**REQ, "aspect_ratio": "1:1"})
    producer.store.move(at_fal, JobState.IN_PROGRESS, Fence(), fields={"fal_request_id": "r"})
    assert producer.cancel(at_fal).value == "cancel_requested"
    assert producer.get(at_fal).state is JobState.IN_PROGRESS  # type: ignore[union-attr]
    tasks = [m["headers"]["task"] for m in queued_messages(rclient)]
    assert "reframe.cancel" in tasks


def test_dead_letter_replay_requeues_a_failed_job(producer: Producer, rclient: redis.Redis) -> None:
    job_id = producer.enqueue(REQ)
    finish(
        producer,
        job_id,
        JobState.FAILED,
        fields={"dead_letter_reason": "retries_exhausted"},
        dead_letter=True,
    )
    assert rclient.zscore("{reframe}:dlq", job_id) is not None
    assert producer.replay(job_id) is ReplayOutcome.REPLAYED
    job = producer.get(job_id)
    assert job is not None and job.state is JobState.QUEUED and job.attempts == 0
    assert rclient.zscore("{reframe}:dlq", job_id) is None and rclient.ttl(f"{{reframe}}:job:{job_id}") == -1
    assert producer.replay(job_id) is ReplayOutcome.NOT_DEAD_LETTERED


def test_wait_wakes_on_the_terminal_event(producer: Producer) -> None:
    job_id = producer.enqueue(REQ)
    timer = threading.Timer(0.3, lambda: finish(producer, job_id, JobState.SUCCEEDED))
    timer.start()
    job = producer.wait(job_id, timeout_s=10, poll_interval_s=5)
    assert job.state is JobState.SUCCEEDED
    with pytest.raises(TimeoutError):
        producer.wait(producer.enqueue({**REQ, "prompt": "x"}), timeout_s=0.2)


def test_incr_field_only_touches_existing_records(producer: Producer, rclient: redis.Redis) -> None:
    job_id = producer.enqueue(REQ)
    assert producer.store.incr_field(job_id, "deferred_total_ms", 1500) == 1500
    assert producer.store.incr_field(job_id, "deferred_total_ms", 500) == 2000
    assert producer.get(job_id).state is JobState.QUEUED  # type: ignore[union-attr]
    assert producer.store.incr_field("gone", "deferred_total_ms", 5) == 0
    assert not rclient.exists("{reframe}:job:gone")
