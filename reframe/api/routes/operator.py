"""``/v1/me`` (who a key is) and ``/v1/cluster`` (the cluster's flow-control state, admins only).

``/v1/cluster`` reads exactly what ``reframe status --cluster --json`` reads
(:func:`reframe.cli.cluster_snapshot`: live workers and the limits they publish, slots, wait lists,
queues, pause, breaker, budget, and slots and budget headroom per tenant from
``reframe/tenant_usage.py``), so the operator console (``reframe/console/``) and the CLI never
disagree.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from reframe.api.keys import Principal, Scope
from reframe.api.services import require, services
from reframe.cli import cluster_snapshot
from reframe.tenant_usage import TOP_TENANTS

router = APIRouter(prefix="/v1", tags=["operator"])


class Me(BaseModel):
    """The calling key: its id (not secret), tenant and scopes."""

    key_id: str
    tenant: str
    scopes: list[str]
    admin: bool


class WorkerOut(BaseModel):
    """One live worker process as it publishes itself (``worker/presence.py``)."""

    process_id: str
    last_beat_ms: int
    hostname: str | None = None
    state: str | None = None
    version: str | None = None


class WorkersOut(BaseModel):
    """Workers whose heartbeat is younger than ``window_ms``."""

    alive: int
    window_ms: int
    processes: list[WorkerOut]


class BreakerOut(BaseModel):
    """The circuit breaker in front of fal."""

    state: str
    trips: int


class BudgetOut(BaseModel):
    """Spend and reservations of the current day and month (dollars), and the caps (null: unknown
    while no worker publishes them), cluster-wide."""

    day_spent: float
    day_reserved: float
    month_spent: float
    month_reserved: float
    daily_cap: float | None
    monthly_cap: float | None


class TenantOut(BaseModel):
    """One tenant's slots and budgets now (dollars; a cap and its headroom are null when the tenant
    has no such cap; headroom = cap - spent - reserved, below zero only if fal billed more than was
    reserved)."""

    tenant: str
    has_limits: bool = Field(description="Limits are set (`reframe tenants set`); else the defaults.")
    slots_in_use: int = Field(description="Slots it holds now (the fair-share bookkeeping).")
    weight: float = Field(description="Its weight in the fair shares of the slots.")
    max_concurrent: int | None = Field(description="Most slots it may hold (null: no tenant cap).")
    day_spent: float
    day_reserved: float
    day_cap: float | None
    day_headroom: float | None
    month_spent: float
    month_reserved: float
    month_cap: float | None
    month_headroom: float | None


class ClusterOut(BaseModel):
    """What ``reframe status --cluster --json`` shows."""

    workers: WorkersOut
    limits: dict[str, Any] = Field(description="Limits the live workers publish (null: they disagree).")
    disagreements: dict[str, list[str]]
    slots_in_use: int
    expired_leases: int
    waiting: dict[str, int] = Field(description="Jobs waiting for a slot, per priority.")
    celery_queue: int
    deferred: int
    blocked: int
    tracked: int
    dead_letters: int
    paused_until_ms: int | None
    breaker: BreakerOut
    budget_usd: BudgetOut
    tenants: list[TenantOut] = Field(
        description=(
            f"Tenants with limits or holding slots: at most {TOP_TENANTS}, the most slots first, then "
            "the most spent + reserved this month, then today, then by name."
        )
    )
    tenants_not_shown: int = Field(description="How many more such tenants there are.")


@router.get("/me", response_model=Me, summary="The calling API key")
def me(principal: Annotated[Principal, Depends(require(Scope.READ))]) -> Me:
    """The key's id, tenant and scopes (never its token)."""
    return Me(
        key_id=principal.key_id,
        tenant=principal.tenant,
        scopes=sorted(s.value for s in principal.scopes),
        admin=principal.admin,
    )


@router.get("/cluster", response_model=ClusterOut, summary="Cluster state (admin)")
def cluster(
    request: Request,
    _principal: Annotated[Principal, Depends(require(Scope.ADMIN))],
) -> ClusterOut:
    """Workers alive, slots in use, waiting jobs, queues, submit pause, breaker and budget, and
    slots and budget headroom per tenant, as the workers and Redis report them now."""
    svc = services(request)
    snap = cluster_snapshot(svc.settings, svc.r)
    limits = snap["limits"]
    processes = [
        WorkerOut(
            process_id=str(p.get("process_id")),
            last_beat_ms=int(p.get("last_beat_ms") or 0),
            hostname=_str_or_none(p.get("hostname")),
            state=_str_or_none(p.get("state")),
            version=_str_or_none(p.get("version")),
        )
        for p in snap["workers"]["processes"]
    ]
    return ClusterOut(
        workers=WorkersOut(
            alive=snap["workers"]["alive"], window_ms=snap["workers"]["window_ms"], processes=processes
        ),
        limits=limits,
        disagreements=snap["disagreements"],
        slots_in_use=snap["slots_in_use"],
        expired_leases=snap["expired_leases"],
        waiting=snap["waiting"],
        celery_queue=snap["celery_queue"],
        deferred=snap["deferred"],
        blocked=snap["blocked"],
        tracked=snap["tracked"],
        dead_letters=snap["dead_letters"],
        paused_until_ms=snap["paused_until_ms"],
        breaker=BreakerOut(**snap["breaker"]),
        budget_usd=BudgetOut(
            **snap["budget_usd"],
            daily_cap=_float_or_none(limits.get("budget_daily_usd")),
            monthly_cap=_float_or_none(limits.get("budget_monthly_usd")),
        ),
        tenants=[TenantOut(**t) for t in snap["tenants"]],
        tenants_not_shown=snap["tenants_not_shown"],
    )


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None
