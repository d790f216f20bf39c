"""enqueue_many is all or nothing (issue #11): conflicts write nothing, retries never pay twice."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import redis

from config import Settings
from producer import EnqueueRequest, IdempotencyConflict, InvalidRequest, JobState, Producer
from tests.hostile.test_library_inputs import snapshot
from worker.contracts.keys import celery_queue_keys


def item(n: int, key: str | None = None, ratio: str = "9:16") -> EnqueueRequest:
    return EnqueueRequest({"video_url": f"https://cdn.example.com/{n}.mp4", "aspect_ratio": ratio}, key)


def messages(r: redis.Redis) -> int:
    return sum(int(r.llen(k)) for k in celery_queue_keys("reframe"))


@pytest.fixture
def producer(make_settings: Callable[..., Settings], rclient: redis.Redis) -> Iterator[Producer]:
    p = Producer(make_settings())
    yield p
    p.close()


def test_a_conflicting_key_in_a_batch_of_four_writes_nothing_and_names_the_item(
    producer: Producer, rclient: redis.Redis
) -> None:
    first = producer.enqueue(item(0).input, idempotency_key="k2")
    before = snapshot(rclient)
    batch = [item(1, "k1"), item(2), item(3, "k2", ratio="1:1"), item(4, "k4")]
    for _attempt in range(2):  # the hostile tester's retry: still nothing written
        with pytest.raises(IdempotencyConflict) as info:
            producer.enqueue_many(batch)
        assert [(c.index, c.idempotency_key, c.job_id) for c in info.value.conflicts] == [(2, "k2", first)]
        assert "items[2].idempotency_key" in str(info.value)
        assert snapshot(rclient) == before


def test_retrying_a_good_batch_returns_the_same_ids_and_writes_no_second_job(
    producer: Producer, rclient: redis.Redis
) -> None:
    batch = [item(1, "a"), item(2, "b"), item(3, "c")]
    first = producer.enqueue_many_results(batch)
    assert all(r.created and r.state is JobState.QUEUED for r in first)
    before = snapshot(rclient)
    again = producer.enqueue_many_results(batch)
    assert [r.job_id for r in again] == [r.job_id for r in first]
    assert not any(r.created for r in again)
    assert snapshot(rclient) == before
    assert messages(rclient) == 3


def test_existing_job_is_reported_with_its_state(producer: Producer, rclient: redis.Redis) -> None:
    job_id = producer.enqueue(item(1).input, idempotency_key="order-42")
    producer.cancel(job_id)
    result = producer.enqueue_result(item(1).input, idempotency_key="order-42")
    assert (result.job_id, result.created, result.state) == (job_id, False, JobState.CANCELLED)
    assert result.describe() == f"returned existing job {job_id} (CANCELLED)"


def test_duplicate_keys_inside_one_batch(producer: Producer, rclient: redis.Redis) -> None:
    same = producer.enqueue_many_results([item(1, "d"), item(2), item(1, "d")])
    assert same[0].job_id == same[2].job_id != same[1].job_id
    assert (same[0].created, same[2].created) == (True, False)
    assert messages(rclient) == 2
    before = snapshot(rclient)
    with pytest.raises(IdempotencyConflict) as info:
        producer.enqueue_many([item(5, "e"), item(6, "e")])
    assert (info.value.conflicts[0].index, info.value.conflicts[0].other_index) == (1, 0)
    assert "items[1].idempotency_key" in str(info.value)
    assert snapshot(rclient) == before


def test_one_invalid_item_reports_every_problem_and_writes_nothing(
    producer: Producer, rclient: redis.Redis
) -> None:
    with pytest.raises(InvalidRequest) as info:
        producer.enqueue_many([item(1, "ok"), item(2, "bad key"), EnqueueRequest({"x": 1})])
    fields = [f for f, _ in info.value.errors]
    assert "items[1].idempotency_key" in fields and "items[2].video_url" in fields and "items[2].x" in fields
    assert rclient.dbsize() == 0


def test_batch_size_is_bounded_by_the_setting(
    make_settings: Callable[..., Settings], rclient: redis.Redis
) -> None:
    with Producer(make_settings(enqueue_max_batch=3)) as p:
        assert len(p.enqueue_many([item(i) for i in range(3)])) == 3
        with pytest.raises(InvalidRequest, match="items: at most 3"):
            p.enqueue_many([item(i) for i in range(4)])
    assert messages(rclient) == 3


def test_concurrent_identical_batches_make_one_job_per_key(producer: Producer, rclient: redis.Redis) -> None:
    batch = [item(i, f"key-{i}") for i in range(20)]
    results: list[list[str]] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def go() -> None:
        start.wait(timeout=10)
        ids = producer.enqueue_many(batch)
        with lock:
            results.append(ids)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 8 and all(ids == results[0] for ids in results)
    assert len(set(results[0])) == 20
    assert messages(rclient) == 20
    assert sum(1 for k in rclient.keys("*") if k.startswith(producer.store.keys.job(""))) == 20
