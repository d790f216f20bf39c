"""Every job belongs to a tenant, written by the enqueue script itself (issues #12, #13)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from config import Settings
from producer import EnqueueRequest, InvalidRequest, Producer
from tests.hostile.test_library_inputs import snapshot

VIDEO = {"video_url": "https://cdn.example.com/a.mp4", "aspect_ratio": "9:16"}


@pytest.fixture
def producer(make_settings: Callable[..., Settings], rclient: redis.Redis) -> Iterator[Producer]:
    p = Producer(make_settings())
    yield p
    p.close()


def test_a_job_without_a_tenant_belongs_to_default_and_is_indexed(
    producer: Producer, rclient: redis.Redis
) -> None:
    job_id = producer.enqueue(VIDEO)
    assert rclient.hget(f"{{reframe}}:job:{job_id}", "tenant") == "default"
    assert rclient.zscore("{reframe}:tenant:default:jobs", job_id) is not None
    assert rclient.zscore("{reframe}:jobs:index", job_id) is not None
    # an index expires by itself once nobody enqueues: nothing rots
    assert 0 < rclient.pttl("{reframe}:tenant:default:jobs")


def test_tenant_tag_and_index_are_written_with_the_batch(producer: Producer, rclient: redis.Redis) -> None:
    ids = producer.enqueue_many([EnqueueRequest(VIDEO), EnqueueRequest(VIDEO, "k")], tenant="acme")
    assert [rclient.hget(f"{{reframe}}:job:{j}", "tenant") for j in ids] == ["acme", "acme"]
    assert set(rclient.zrange("{reframe}:tenant:acme:jobs", 0, -1)) == set(ids)
    assert rclient.zcard("{reframe}:tenant:default:jobs") == 0


def test_idempotency_keys_are_per_tenant(producer: Producer, rclient: redis.Redis) -> None:
    a = producer.enqueue(VIDEO, idempotency_key="order-1", tenant="a")
    b = producer.enqueue(VIDEO, idempotency_key="order-1", tenant="b")
    plain = producer.enqueue(VIDEO, idempotency_key="order-1")
    assert len({a, b, plain}) == 3
    assert producer.enqueue(VIDEO, idempotency_key="order-1", tenant="a") == a
    assert producer.enqueue(VIDEO, idempotency_key="order-1", tenant="default") == plain


@pytest.mark.parametrize("tenant", ["", "UPPER", "a" * 41, "spa ce", "dot.ted", "-lead", "x:y", "é"])
def test_a_bad_tenant_is_refused_naming_the_field_and_nothing_is_written(
    producer: Producer, rclient: redis.Redis, tenant: str
) -> None:
    before = snapshot(rclient)
    with pytest.raises(InvalidRequest) as info:
        producer.enqueue(VIDEO, tenant=tenant)
    assert info.value.errors[0][0] == "tenant"
    with pytest.raises(InvalidRequest):
        producer.enqueue_many([EnqueueRequest(VIDEO)], tenant=tenant)
    assert snapshot(rclient) == before
