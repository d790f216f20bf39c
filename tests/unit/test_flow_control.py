"""FlowControl.from_settings: every primitive built from the settings under the key prefix."""

from __future__ import annotations

from collections.abc import Callable

import redis

from config import Settings
from worker.flow import FlowControl


def test_from_settings_wires_every_primitive(
    rclient: redis.Redis, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(
        key_prefix="fcx",
        max_concurrency=3,
        reserved_high_slots=1,
        slot_lease_ttl_s=1.5,
        submit_rate_per_s=4.0,
        submit_burst=2,
        budget_daily_usd=1.0,
        breaker_min_calls=2,
    )
    fc = FlowControl.from_settings(rclient, settings)
    assert fc.slots.capacity == 3 and fc.slots.reserved_high == 1 and fc.slots.lease_ttl_ms == 1500
    assert fc.slots.slots_key == "{fcx}:slots"  # one hash tag for every key
    assert fc.rate.interval_us == 250_000 and fc.rate.burst == 2
    assert fc.budget.day_cap_micro == 1_000_000 and fc.budget.price_per_s_micro == 60_000

    # the gate order the worker uses: breaker -> budget -> slot -> rate
    assert fc.breaker.allow().allowed
    assert fc.budget.reserve("j1", fc.budget.estimate_micro(10)).ok
    assert fc.slots.acquire("j1", "normal").acquired
    assert fc.rate.try_acquire().allowed
    fc.retry_budget.record_first_attempt()

    keys = set(rclient.keys("*"))
    assert keys and all(k.startswith("{fcx}:") for k in keys)
    assert {"{fcx}:slots", "{fcx}:fc:gcra", "{fcx}:fc:budget:res", "{fcx}:fc:retry_budget"} <= keys
