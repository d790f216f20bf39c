"""The fal account pool in the slot scripts, against a real redis-server: per-account caps, drains
(for good and until a time), undrain, and slots held from before accounts existed."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import pytest
import redis

from reframe.localproc import wait_until
from worker.flow.accounts import AccountPool, accounts_arg
from worker.flow.breaker import CircuitBreaker
from worker.flow.rate import SubmitRateLimiter
from worker.flow.slots import SlotPool, SlotStatus

PREFIX = "t"
SPECS: list[tuple[str, int, float | None]] = [("a", 3, None), ("b", 5, 2.0)]


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def make(r: redis.Redis, specs: list[tuple[str, int, float | None]] = SPECS) -> tuple[SlotPool, AccountPool]:
    slots = SlotPool(
        r,
        prefix=PREFIX,
        capacity=sum(cap for _, cap, _ in specs),
        lease_ttl_ms=60_000,
        accounts=accounts_arg(specs),
    )

    def breaker(at: str) -> CircuitBreaker:
        return CircuitBreaker(
            r,
            prefix=at,
            window_s=10,
            min_calls=1,
            failure_ratio=0.5,
            open_base_s=1,
            open_cap_s=2,
            half_open_probes=1,
            close_after_successes=1,
        )

    def rate(at: str, per_s: float | None) -> SubmitRateLimiter:
        return SubmitRateLimiter(r, prefix=at, rate_per_s=per_s or 50.0, burst=5)

    return slots, AccountPool.build(r, prefix=PREFIX, slots=slots, specs=specs, breaker=breaker, rate=rate)


def held(accounts: AccountPool) -> dict[str, int]:
    return {s.id: s.in_use for s in accounts.status()}


def test_each_account_holds_at_most_its_cap_and_the_total_is_their_sum(r: redis.Redis) -> None:
    slots, accounts = make(r)
    results = [slots.acquire(f"j{i}", "normal", tenant="t") for i in range(10)]
    got = [res for res in results if res.acquired]
    assert len(got) == 8 and slots.in_use() == 8
    assert held(accounts) == {"a": 3, "b": 5}
    assert {res.account for res in got} == {"a", "b"}
    # the account a slot is on is what the slot answers, again and again (idempotent acquire)
    assert all(slots.acquire(f"j{i}", "normal").account == slots.account_of(f"j{i}") for i in range(8))
    assert [res.status for res in results[8:]] == [SlotStatus.WAITING, SlotStatus.WAITING]


def test_a_drained_account_takes_no_new_slot_and_undrain_admits_into_it(r: redis.Redis) -> None:
    slots, accounts = make(r)
    for i in range(10):
        slots.acquire(f"j{i}", "normal", tenant="t")
    on_a = [f"j{i}" for i in range(8) if slots.account_of(f"j{i}") == "a"]
    on_b = [f"j{i}" for i in range(8) if slots.account_of(f"j{i}") == "b"]
    assert accounts.drain("a") is True
    assert accounts.drain("a") is False  # already drained
    # a's freed slot is not handed on: a is drained and b is full
    assert slots.release(on_a[0]) == []
    assert held(accounts) == {"a": 2, "b": 5}
    # b's freed slot is, to the first waiter, on b
    assert slots.release(on_b[0]) == ["j8"]
    assert slots.account_of("j8") == "b"
    status = {s.id: s for s in accounts.status()}
    assert not status["a"].usable and status["a"].drain_reason == "key_rejected"
    # the operator fixed a's key: the next admission puts the waiter into a's room
    assert accounts.undrain("a") is True and accounts.undrain("a") is False
    assert slots.admit() == ["j9"]
    assert slots.account_of("j9") == "a"
    assert held(accounts) == {"a": 3, "b": 5}


def test_a_drain_until_a_time_ends_by_itself(r: redis.Redis) -> None:
    slots, accounts = make(r, [("a", 1, None), ("b", 1, None)])
    sec, usec = r.time()
    now_ms = int(sec) * 1000 + int(usec) // 1000
    assert accounts.drain("a", until_ms=now_ms + 300) is True
    assert slots.acquire("x", "normal", tenant="t").account == "b"
    assert slots.acquire("y", "normal", tenant="t").status is SlotStatus.WAITING  # a is drained, b full
    wait_until(lambda: slots.admit() == ["y"], timeout_s=5, what="a usable again after its drain")
    assert slots.account_of("y") == "a"


def test_slots_held_before_accounts_count_on_the_first_account(r: redis.Redis) -> None:
    # a cluster upgraded with two requests in flight (slots without an account)
    r.zadd(f"{PREFIX}:slots", {"old1": 9e15, "old2": 9e15})
    slots, accounts = make(r, [("a", 2, None), ("b", 1, None)])
    assert slots.acquire("new1", "normal", tenant="t").account == "b"
    assert slots.acquire("new2", "normal", tenant="t").status is SlotStatus.WAITING
    assert held(accounts) == {"a": 2, "b": 1}
    assert slots.release("old1") == ["new2"]  # old1 was on a: a has room again
    assert slots.account_of("new2") == "a"


def test_per_account_primitives_use_their_own_keys_and_one_account_keeps_the_old_ones(r: redis.Redis) -> None:
    _, many = make(r)
    assert many.get("a").breaker.key == f"{PREFIX}:acct:a:fc:breaker"
    assert many.get("b").rate.gcra_key == f"{PREFIX}:acct:b:fc:gcra"
    assert many.get("b").rate.rate_per_s == 2.0 and many.get("a").rate.rate_per_s == 50.0
    _, one = make(r, [("default", 4, None)])
    assert one.first.breaker.key == f"{PREFIX}:fc:breaker" and not one.multi
    assert one.get("") is one.first


def test_under_concurrent_acquires_and_releases_no_account_goes_over_its_cap(r: redis.Redis) -> None:
    slots, accounts = make(r)
    caps = {"a": 3, "b": 5}
    seen: list[dict[str, int]] = []
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        rng = random.Random(seed)
        mine: list[str] = []
        try:
            for n in range(60):
                job = f"w{seed}-{n}"
                if slots.acquire(job, "normal", tenant=f"t{seed % 3}").acquired:
                    mine.append(job)
                if mine and rng.random() < 0.5:
                    slots.release(mine.pop(rng.randrange(len(mine))))
                if n % 7 == 0:
                    accounts.drain("a", until_ms=0)  # a no-op drain interleaved with the rest
                seen.append(held(accounts))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(snap[k] <= caps[k] for snap in seen for k in caps), max(seen, key=lambda s: sum(s.values()))
    assert any(snap == caps for snap in seen)  # both accounts were full at some point
