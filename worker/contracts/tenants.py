"""Tenant names: who a job belongs to (the library's ``tenant=``, an API key's tenant).

Every job has a tenant, ``default`` when the caller names none. Idempotency keys are namespaced
by tenant (:func:`tenant_idempotency_key`), so two tenants never share one; the default tenant's
keys are kept as given, so callers that never name a tenant see the keys they chose.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal
from typing import Any

import redis

from worker.contracts.keys import Keys

#: A tenant name: lowercase letters, digits, ``_`` and ``-``, at most 40 characters.
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,39}$"
#: The tenant of jobs whose caller names none.
DEFAULT_TENANT = "default"

_TENANT = re.compile(TENANT_PATTERN)


def check_tenant(tenant: str) -> str:
    """``tenant`` if it is a valid tenant name; :class:`ValueError` naming the rule otherwise."""
    if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
        raise ValueError(f"tenant: {tenant!r} must match {TENANT_PATTERN}")
    return tenant


def tenant_idempotency_key(tenant: str, key: str) -> str:
    """The stored idempotency key of ``key`` for ``tenant`` (``<tenant>:<key>``; as given for the
    default tenant)."""
    return key if tenant == DEFAULT_TENANT else f"{tenant}:{key}"


#: The limit fields of a tenant, as stored in its limits HASH (``Keys.tenant_limits``).
LIMIT_FIELDS = (
    "daily_budget_usd",
    "monthly_budget_usd",
    "max_concurrent",
    "weight",
    "submit_rate_per_s",
    "dedupe",
)
#: Most tenants with limits (each is a HASH and a member of one SET; the console lists them).
MAX_TENANTS = 10_000


@dataclass(frozen=True)
class TenantLimits:
    """One tenant's limits inside the cluster's (None = no tenant-level limit; weight 1).

    Budgets in dollars per UTC day and month (reserved before each submit together with the
    cluster's caps), the most concurrent fal requests, the weight of its fair share of the slots
    and its submit rate. Data in Redis, read live by every worker.
    """

    daily_budget_usd: float | None = None
    monthly_budget_usd: float | None = None
    max_concurrent: int | None = None
    weight: float = 1.0
    submit_rate_per_s: float | None = None
    dedupe: bool | None = None
    """The tenant's default for paying once for identical work (None: ``REFRAME_DEDUPE_DEFAULT``);
    stored as ``on`` / ``off`` and read by the enqueue script (worker/contracts/lua/enqueue.lua)."""

    def __post_init__(self) -> None:
        for name in ("daily_budget_usd", "monthly_budget_usd", "submit_rate_per_s"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"{name}: must be a finite number >= 0")
        if self.max_concurrent is not None and self.max_concurrent < 0:
            raise ValueError("max_concurrent: must be >= 0")
        if not math.isfinite(self.weight) or not 0 < self.weight <= 1000:
            raise ValueError("weight: must be > 0 and <= 1000")

    def to_hash(self) -> dict[str, str]:
        """The HASH fields: dollars as given plus integer micro-dollars the scripts compare."""
        out: dict[str, str] = {"weight": repr(float(self.weight))}
        if self.daily_budget_usd is not None:
            out["daily_budget_usd"] = repr(float(self.daily_budget_usd))
            out["daily_budget_micro"] = str(_micro(self.daily_budget_usd))
        if self.monthly_budget_usd is not None:
            out["monthly_budget_usd"] = repr(float(self.monthly_budget_usd))
            out["monthly_budget_micro"] = str(_micro(self.monthly_budget_usd))
        if self.max_concurrent is not None:
            out["max_concurrent"] = str(int(self.max_concurrent))
        if self.submit_rate_per_s is not None:
            out["submit_rate_per_s"] = repr(float(self.submit_rate_per_s))
        if self.dedupe is not None:
            out["dedupe"] = "on" if self.dedupe else "off"
        return out

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> TenantLimits:
        """Parse a limits HASH (absent fields: no limit)."""
        h = {_text(k): _text(v) for k, v in raw.items()}

        def num(name: str) -> float | None:
            return float(h[name]) if h.get(name, "") != "" else None

        concurrent = h.get("max_concurrent", "")
        return cls(
            daily_budget_usd=num("daily_budget_usd"),
            monthly_budget_usd=num("monthly_budget_usd"),
            max_concurrent=int(concurrent) if concurrent != "" else None,
            weight=num("weight") or 1.0,
            submit_rate_per_s=num("submit_rate_per_s"),
            dedupe={"on": True, "off": False}.get(h.get("dedupe", "")),
        )


class TenantRegistry:
    """Tenant limits in Redis: ``reframe tenants set|show|list`` writes them, workers read them."""

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r = r
        self.keys = keys

    def set(self, tenant: str, limits: TenantLimits) -> None:
        """Replace ``tenant``'s limits (atomically: a reader never sees half of them)."""
        check_tenant(tenant)
        if self.r.scard(self.keys.tenants) >= MAX_TENANTS and not self.r.sismember(self.keys.tenants, tenant):
            raise ValueError(f"tenant: at most {MAX_TENANTS} tenants may have limits")
        key = self.keys.tenant_limits(tenant)
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(key)
        fields: dict[Any, Any] = dict(limits.to_hash())
        pipe.hset(key, mapping=fields)
        pipe.sadd(self.keys.tenants, tenant)
        # what the slot scripts read in every admission decision (one fixed key for all tenants)
        pipe.hset(self.keys.tenant_params, f"w:{tenant}", repr(float(limits.weight)))
        if limits.max_concurrent is None:
            pipe.hdel(self.keys.tenant_params, f"max:{tenant}")
        else:
            pipe.hset(self.keys.tenant_params, f"max:{tenant}", str(int(limits.max_concurrent)))
        # the slot scripts' ready index orders tenants by slots/weight and leaves out those at their
        # cap: dropping its marker makes the next decision rebuild it (worker/contracts/lua/slots_lib.lua)
        pipe.hdel(self.keys.fair, "ix")
        pipe.execute()

    def get(self, tenant: str) -> TenantLimits:
        """``tenant``'s limits (the defaults when it has none)."""
        return TenantLimits.from_hash(self.r.hgetall(self.keys.tenant_limits(check_tenant(tenant))))

    def names(self) -> list[str]:
        """The tenants that have limits, sorted."""
        return sorted(_text(x) for x in self.r.smembers(self.keys.tenants))

    def remove(self, tenant: str) -> bool:
        """Drop ``tenant``'s limits (its jobs keep running under the cluster's); False if none."""
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.keys.tenant_limits(check_tenant(tenant)))
        pipe.srem(self.keys.tenants, tenant)
        pipe.hdel(self.keys.tenant_params, f"w:{tenant}", f"max:{tenant}")
        pipe.hdel(self.keys.fair, "ix")  # the ready index is rebuilt (see set)
        return bool(pipe.execute()[1])


def _micro(usd: float) -> int:
    """Dollars as micro-dollars, rounded down (a cap never rounds up)."""
    return int((Decimal(repr(float(usd))) * 1_000_000).to_integral_value(rounding=ROUND_FLOOR))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
