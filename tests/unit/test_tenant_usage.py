"""reframe/tenant_usage.py against a real redis-server: per-tenant slots (equal to the fair-share
``use:`` counts), weights, caps, spend and headroom, the ranking and the bound."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from reframe.tenant_usage import slots_by_tenant, tenant_usage
from worker.contracts.keys import Keys
from worker.contracts.tenants import TenantLimits, TenantRegistry
from worker.flow import Budget, SlotPool

KEYS = Keys("t")
E = 120_000  # a 2 s clip at $0.06/s


@pytest.fixture(params=[True, False], ids=["decoded", "bytes"])
def r(redis_url: str, request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=request.param)
    yield client
    client.close()


def pool(r: redis.Redis) -> SlotPool:
    return SlotPool(r, prefix=KEYS.root, capacity=8, lease_ttl_ms=60_000)


def budget(r: redis.Redis) -> Budget:
    return Budget(r, prefix=KEYS.root, daily_cap_usd=1000, monthly_cap_usd=10_000, price_per_s_usd=0.06)


def test_rows_of_tenants_with_limits_or_slots(r: redis.Redis) -> None:
    registry = TenantRegistry(r, KEYS)
    registry.set(
        "acme", TenantLimits(daily_budget_usd=1.0, monthly_budget_usd=20.0, weight=3, max_concurrent=4)
    )
    registry.set("idle", TenantLimits(weight=2))
    slots, b = pool(r), budget(r)
    for i in range(3):
        assert slots.acquire(f"a{i}", "normal", tenant="acme").acquired
    assert slots.acquire("g0", "normal", tenant="globex").acquired
    assert slots.acquire("legacy", "normal", tenant="").acquired  # a record without a tenant
    assert b.reserve("a0", E, tenant="acme").ok and b.settle("a0", E)
    assert b.reserve("a1", E, tenant="acme").ok  # still reserved
    rows, rest = tenant_usage(r, KEYS)
    assert rest == 0
    assert [row["tenant"] for row in rows] == ["acme", "default", "globex", "idle"]
    acme = rows[0]
    assert acme == {
        "tenant": "acme",
        "has_limits": True,
        "slots_in_use": 3,
        "weight": 3.0,
        "max_concurrent": 4,
        "day_spent": 0.12,
        "day_reserved": 0.12,
        "day_cap": 1.0,
        "day_headroom": pytest.approx(0.76),
        "month_spent": 0.12,
        "month_reserved": 0.12,
        "month_cap": 20.0,
        "month_headroom": pytest.approx(19.76),
    }
    globex = rows[2]
    assert globex["has_limits"] is False and globex["weight"] == 1.0 and globex["max_concurrent"] is None
    assert globex["day_cap"] is None and globex["day_headroom"] is None and globex["month_headroom"] is None
    assert rows[3]["slots_in_use"] == 0 and rows[3]["weight"] == 2.0
    # the same counts the fair-share rule keeps (worker/contracts/lua/slots_lib.lua)
    fair = slots.in_use_by_tenant()
    assert slots_by_tenant(r, KEYS) == {"default" if t == "" else t: n for t, n in fair.items()}
    slots.release("a2")
    assert tenant_usage(r, KEYS)[0][0]["slots_in_use"] == 2


def test_headroom_goes_below_zero_only_when_billed_over_the_reservation(r: redis.Redis) -> None:
    TenantRegistry(r, KEYS).set("acme", TenantLimits(daily_budget_usd=0.2))
    b = budget(r)
    assert b.reserve("a0", E, tenant="acme").ok
    assert b.settle("a0", 250_000)  # fal billed more than estimated
    (row,), _ = tenant_usage(r, KEYS)
    assert row["day_headroom"] == pytest.approx(-0.05) and row["month_cap"] is None


def test_bounded_by_slots_then_spend(r: redis.Redis) -> None:
    registry, slots, b = TenantRegistry(r, KEYS), pool(r), budget(r)
    for i in range(12):
        registry.set(f"t{i:02d}", TenantLimits())
    for i in range(4):  # t04..t07 spend i+1 estimates this month
        for k in range(i + 1):
            assert b.reserve(f"s{i}-{k}", E, tenant=f"t{i + 4:02d}").ok
    assert slots.acquire("x", "normal", tenant="t11").acquired
    rows, rest = tenant_usage(r, KEYS, top=5)
    assert [row["tenant"] for row in rows] == ["t11", "t07", "t06", "t05", "t04"]
    assert rest == 7
    assert tenant_usage(r, KEYS, top=0) == ([], 12)
