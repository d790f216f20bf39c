"""Slots in use and budget headroom per tenant, for ``GET /v1/cluster`` and ``reframe status
--cluster --json`` (through :func:`reframe.cli.cluster_snapshot`) and so the console's Cluster page.

The tenants are those with limits (``P:tenants``, written by ``reframe tenants set``) and those
holding a slot now. For each: the slots it holds, its fair-share weight and ``max_concurrent``
(worker/contracts/tenants.py), today's and this month's spent and reserved dollars, and its caps
and headroom (``cap - spent - reserved``; None without a cap; below zero only when fal billed more
than was reserved, see worker/flow/budget.py). At most ``top`` tenants are returned, the most
slots first, then the most spent + reserved this month (as the exporter ranks them,
reframe/exporter/collector.py), then today, then by name; the rest are only counted.

Cost of one call, whatever the number of waiting jobs: the slot holders (at most the capacity) and
their owners in the fair-share HASH (``own:<job>``, kept in the same scripts as the ``use:<tenant>``
counts, worker/contracts/lua/slots_lib.lua), one pipelined round trip of two HMGETs per tenant
(``P:tenants`` holds at most worker/contracts/tenants.py's ``MAX_TENANTS``), and one of one HGETALL
per tenant returned. Reads are not one snapshot: a slot taken or freed in between may be missed
for one refresh; every admission decision is made atomically elsewhere.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import redis

from worker.contracts.keys import Keys
from worker.contracts.tenants import DEFAULT_TENANT, TenantLimits
from worker.flow._redis import as_int, text
from worker.flow.budget import micro_to_usd, utc_periods

#: Most tenants in one answer (the Cluster page's table; the rest are counted).
TOP_TENANTS = 50


@dataclass(frozen=True)
class _Spend:
    day_spent: int
    day_reserved: int
    month_spent: int
    month_reserved: int


def slots_by_tenant(r: redis.Redis, keys: Keys) -> Counter[str]:
    """Slots held per tenant now, from the owners of the slot holders (jobs of no recorded tenant
    count as :data:`DEFAULT_TENANT`)."""
    holders = [text(j) for j in r.zrange(keys.slots, 0, -1)]
    if not holders:
        return Counter()
    owners: list[Any] = r.hmget(keys.fair, [f"own:{job}" for job in holders])
    return Counter(text(o) or DEFAULT_TENANT for o in owners if o is not None)


def tenant_usage(
    r: redis.Redis, keys: Keys, *, top: int = TOP_TENANTS, now_s: float | None = None
) -> tuple[list[dict[str, Any]], int]:
    """The ``top`` tenants' rows (see the module) and how many more tenants there are."""
    slots = slots_by_tenant(r, keys)
    names = sorted({text(m) for m in r.smembers(keys.tenants)} | set(slots))
    day, month = utc_periods(now_s)
    pipe = r.pipeline(transaction=False)
    for name in names:
        for key in keys.budget_periods(day, month, name)[2:]:
            pipe.hmget(key, ["spent", "reserved"])
    replies = pipe.execute()
    spend: dict[str, _Spend] = {}
    for i, name in enumerate(names):
        (ds, dr), (ms, mr) = replies[2 * i], replies[2 * i + 1]
        spend[name] = _Spend(*(as_int(x or 0) for x in (ds, dr, ms, mr)))

    def rank(name: str) -> tuple[int, int, int, str]:
        s = spend[name]
        return (-slots[name], -(s.month_spent + s.month_reserved), -(s.day_spent + s.day_reserved), name)

    shown = sorted(names, key=rank)[: max(top, 0)]
    pipe = r.pipeline(transaction=False)
    for name in shown:
        pipe.hgetall(keys.tenant_limits(name))
    limits = pipe.execute()
    rows = [_row(name, slots[name], spend[name], raw) for name, raw in zip(shown, limits, strict=True)]
    return rows, len(names) - len(shown)


def _row(name: str, held: int, s: _Spend, raw: dict[Any, Any]) -> dict[str, Any]:
    limits = TenantLimits.from_hash(raw)
    fields = {text(k): text(v) for k, v in raw.items()}
    out: dict[str, Any] = {
        "tenant": name,
        "has_limits": bool(fields),
        "slots_in_use": held,
        "weight": limits.weight,
        "max_concurrent": limits.max_concurrent,
    }
    for period, cap_field, spent, reserved in (
        ("day", "daily_budget_micro", s.day_spent, s.day_reserved),
        ("month", "monthly_budget_micro", s.month_spent, s.month_reserved),
    ):
        # the integer micro-dollar caps the budget scripts compare (worker/contracts/tenants.py)
        cap = int(fields[cap_field]) if fields.get(cap_field, "") != "" else None
        out[f"{period}_spent"] = micro_to_usd(spent)
        out[f"{period}_reserved"] = micro_to_usd(reserved)
        out[f"{period}_cap"] = None if cap is None else micro_to_usd(cap)
        out[f"{period}_headroom"] = None if cap is None else micro_to_usd(cap - spent - reserved)
    return out
