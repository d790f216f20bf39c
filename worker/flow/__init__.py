"""Cluster-wide flow control for fal submits: breaker, budget, slots, rate limit, retry budget.

Every decision is one atomic Lua script on the shared Redis, timed by Redis ``TIME``. The worker
composes them before a submit in the order breaker -> budget -> slot -> rate (cheapest refusal
first; the rate token is taken last so it is not wasted on a job that cannot go).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

from worker.contracts.keys import Keys
from worker.contracts.models import Priority
from worker.flow.accounts import Account, AccountPool, AccountStatus, UnknownAccount, pool_arg
from worker.flow.breaker import BreakerDecision, BreakerSnapshot, BreakerState, CircuitBreaker
from worker.flow.budget import (
    Budget,
    BudgetDecision,
    BudgetScope,
    BudgetSnapshot,
    Reservation,
    micro_to_usd,
    usd_to_micro,
)
from worker.flow.rate import RateDecision, RateLimited, RateReason, SubmitRateLimiter, TenantRateLimiter
from worker.flow.retry_budget import RetryBudget
from worker.flow.slots import SlotPool, SlotResult, SlotStatus

if TYPE_CHECKING:
    from config import Settings

__all__ = [
    "Account",
    "AccountPool",
    "AccountStatus",
    "BreakerDecision",
    "BreakerSnapshot",
    "BreakerState",
    "Budget",
    "BudgetDecision",
    "BudgetScope",
    "BudgetSnapshot",
    "CircuitBreaker",
    "FlowControl",
    "Priority",
    "RateDecision",
    "RateLimited",
    "RateReason",
    "Reservation",
    "RetryBudget",
    "SlotPool",
    "SlotResult",
    "SlotStatus",
    "SubmitRateLimiter",
    "TenantRateLimiter",
    "UnknownAccount",
    "micro_to_usd",
    "usd_to_micro",
]


@dataclass(frozen=True, slots=True)
class FlowControl:
    """The primitives of one cluster, built from the settings and sharing one Redis client.

    ``breaker`` and ``rate`` are the first fal account's (the only one's in a pool of one); a
    submit uses those of the account its slot is on (``accounts.get(slot.account)``).
    """

    breaker: CircuitBreaker
    budget: Budget
    slots: SlotPool
    rate: SubmitRateLimiter
    retry_budget: RetryBudget
    tenant_rate: TenantRateLimiter
    accounts: AccountPool

    @classmethod
    def from_settings(cls, r: redis.Redis, settings: Settings) -> FlowControl:
        """Build every primitive under ``settings.key_prefix`` with the configured limits."""
        prefix = Keys(settings.key_prefix).root  # one hash tag for every key (docs/design.md)
        specs = [(a.id, a.cap, a.rate_per_s) for a in settings.fal_account_specs]

        def breaker(at: str) -> CircuitBreaker:
            return CircuitBreaker(
                r,
                prefix=at,
                window_s=settings.breaker_window_s,
                min_calls=settings.breaker_min_calls,
                failure_ratio=settings.breaker_failure_ratio,
                open_base_s=settings.breaker_open_base_s,
                open_cap_s=settings.breaker_open_cap_s,
                half_open_probes=settings.breaker_half_open_probes,
                close_after_successes=settings.breaker_close_after_successes,
            )

        def rate(at: str, per_s: float | None) -> SubmitRateLimiter:
            return SubmitRateLimiter(
                r, prefix=at, rate_per_s=per_s or settings.submit_rate_per_s, burst=settings.submit_burst
            )

        slots = SlotPool(
            r,
            prefix=prefix,
            capacity=settings.slot_capacity,
            reserved_high=settings.reserved_high_slots,
            lease_ttl_ms=round(settings.slot_lease_ttl_s * 1000),
            accounts=pool_arg(settings),
        )
        accounts = AccountPool.build(r, prefix=prefix, slots=slots, specs=specs, breaker=breaker, rate=rate)
        return cls(
            breaker=accounts.first.breaker,
            budget=Budget(
                r,
                prefix=prefix,
                daily_cap_usd=settings.budget_daily_usd,
                monthly_cap_usd=settings.budget_monthly_usd,
                price_per_s_usd=settings.price_per_s_usd,
                billing_unit_s=settings.billing_unit_s,
            ),
            slots=slots,
            rate=accounts.first.rate,
            retry_budget=RetryBudget(
                r,
                prefix=prefix,
                ratio=settings.retry_budget_ratio,
                min_tokens=settings.retry_budget_min_tokens,
            ),
            tenant_rate=TenantRateLimiter(r, prefix=prefix),
            accounts=accounts,
        )
