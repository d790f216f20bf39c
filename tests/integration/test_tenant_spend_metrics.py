"""Per-tenant spend and budget headroom from ``reframe exporter`` (reframe/exporter/collector.py
``TenantSpend``) against a real redis-server: the named top tenants, ``other``, caps, headroom,
tenants at a cap, tenants found only through this month's ledger, and defensive reads."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest
import redis
from prometheus_client import CollectorRegistry

from config import Settings
from reframe.exporter.collector import ClusterCollector, exporter_redis_client, metric_names

pytestmark = pytest.mark.integration

P = "{reframe}"


def periods(r: redis.Redis) -> tuple[str, str]:
    secs, _us = r.time()
    when = datetime.fromtimestamp(int(secs), tz=UTC)
    return when.strftime("%Y-%m-%d"), when.strftime("%Y-%m")


def spend(r: redis.Redis, tenant: str, *, day: int, month: int, reserved: int = 0) -> None:
    today, this_month = periods(r)
    r.hset(f"{P}:fc:budget:tenant:{tenant}:day:{today}", mapping={"spent": day, "reserved": reserved})
    r.hset(
        f"{P}:fc:budget:tenant:{tenant}:month:{this_month}", mapping={"spent": month, "reserved": reserved}
    )


def samples(reg: CollectorRegistry, name: str) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for family in reg.collect():
        for s in family.samples:
            if s.name == name:
                out[tuple(s.labels[k] for k in sorted(s.labels))] = s.value
    return out


def scrape(settings: Settings) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(ClusterCollector(exporter_redis_client(settings), settings))
    return reg


def test_top_tenants_named_rest_as_other(
    make_settings: Callable[..., Settings], rclient: redis.Redis
) -> None:
    settings = make_settings(metrics_top_tenants=2)
    for i, t in enumerate(["t1", "t2", "t3", "t4"]):
        rclient.sadd(f"{P}:tenants", t)
        spend(rclient, t, day=(i + 1) * 100_000, month=(i + 1) * 1_000_000, reserved=10_000)
    rclient.sadd(f"{P}:tenants", "idle")  # limits but no spend: never named
    rclient.hset(f"{P}:tenant:idle:limits", mapping={"daily_budget_usd": "5"})
    rclient.hset(f"{P}:tenant:t4:limits", mapping={"daily_budget_usd": "0.45", "monthly_budget_usd": "100"})
    rclient.hset(f"{P}:tenant:t1:limits", mapping={"daily_budget_usd": "0.05", "monthly_budget_usd": "bogus"})
    # a tenant with no limits, known only from this month's ledger
    secs, _us = rclient.time()
    rclient.xadd(
        f"{P}:ledger", {"job_id": "j", "tenant": "ledger-only", "micro": "1", "at_ms": str(int(secs) * 1000)}
    )
    spend(rclient, "ledger-only", day=50_000, month=50_000)
    reg = scrape(settings)
    spent = samples(reg, "reframe_tenant_spent_usd")
    assert spent == {
        ("day", "t4"): 0.4, ("month", "t4"): 4.0,
        ("day", "t3"): 0.3, ("month", "t3"): 3.0,
        ("day", "other"): 0.1 + 0.2 + 0.05, ("month", "other"): 1.0 + 2.0 + 0.05,
    }  # fmt: skip
    reserved = samples(reg, "reframe_tenant_reserved_usd")
    assert reserved[("day", "t4")] == 0.01 and reserved[("month", "other")] == pytest.approx(0.02)
    # other: t1's daily cap (0.05, used 0.11) and idle's (5, unused); nobody else in it has one
    assert samples(reg, "reframe_tenant_budget_cap_usd") == {
        ("day", "t4"): 0.45, ("month", "t4"): 100.0, ("day", "other"): 5.05, ("month", "other"): 0.0,
    }  # fmt: skip
    assert samples(reg, "reframe_tenant_budget_headroom_usd") == {
        ("day", "t4"): pytest.approx(0.04),
        ("month", "t4"): pytest.approx(95.99),
        ("day", "other"): pytest.approx(5.05 - 0.11),
        ("month", "other"): 0.0,
    }
    # t1 (0.11 used of 0.05) counts at its cap though it is not named; its unreadable monthly cap is no cap
    assert samples(reg, "reframe_tenants_at_budget_cap") == {("day",): 1.0, ("month",): 0.0}
    assert samples(reg, "reframe_tenants") == {(): 6.0}
    assert samples(reg, "reframe_ledger_entries") == {(): 1.0}
    assert samples(reg, "reframe_cluster_scrape_success") == {(): 1.0}
    for name in ("reframe_tenant_spent_usd", "reframe_tenants_at_budget_cap", "reframe_ledger_entries"):
        assert name in metric_names()


def test_no_tenants_and_garbage_are_harmless(
    make_settings: Callable[..., Settings], rclient: redis.Redis
) -> None:
    settings = make_settings()
    reg = scrape(settings)
    assert samples(reg, "reframe_tenant_spent_usd") == {("day", "other"): 0.0, ("month", "other"): 0.0}
    assert samples(reg, "reframe_tenants") == {(): 0.0}
    today, _month = periods(rclient)
    rclient.sadd(f"{P}:tenants", "odd")
    rclient.hset(f"{P}:fc:budget:tenant:odd:day:{today}", mapping={"spent": "x", "reserved": ""})
    rclient.hset(f"{P}:tenant:odd:limits", mapping={"daily_budget_usd": "inf", "monthly_budget_usd": "-1"})
    reg = scrape(settings)
    assert samples(reg, "reframe_cluster_scrape_success") == {(): 1.0}
    assert samples(reg, "reframe_tenants_at_budget_cap") == {("day",): 0.0, ("month",): 0.0}
    assert samples(reg, "reframe_tenant_budget_cap_usd") == {("day", "other"): 0.0, ("month", "other"): 0.0}
