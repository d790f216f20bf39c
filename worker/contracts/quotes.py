"""Quotes before paying: what a job would cost and whether it would go, without enqueuing it.

The one place the quote is computed: :meth:`producer.Producer.quote` (and through it ``reframe
quote`` and ``POST /v1/quotes``) reads the input's facts (:class:`MediaInfo`: duration, size,
resolution; read by ``worker/contracts/media.py`` through the guarded fetcher, or from a local file) and the
budgets (:func:`read_budgets`), then :func:`build_quote` prices them. The model's limits
(:class:`ModelLimits`) are also what the submitter and the producer refuse inputs with
(``worker/submit.py``, ``producer/client.py``), so a quote's reasons and a refusal read the same.

Pricing is worker/flow/budget.py's ``Budget.estimate_micro``, restated here because the producer
must not load ``worker.flow`` (docs/design.md, import direction); tests/unit/test_quotes.py checks
that the two agree on every duration, price and billing unit they try:

* **price** (``price_micro``): what a job is charged when it succeeds. fal bills the output's
  seconds in whole billing units (``REFRAME_BILLING_UNIT_S``) at ``REFRAME_PRICE_PER_S_USD`` (rounded
  up to a micro-dollar), and the output keeps the input's duration (docs/fal-wire-protocol.md,
  limits), so the price is ``estimate_micro(input duration)``: the settlement rule of
  worker/outcomes.py applied to the input.
* **reservation** (``estimate_micro``): what the gate reserves against the budgets while the job
  runs, ``estimate_micro(duration + REFRAME_ESTIMATE_MARGIN_S)`` (worker/submit.py), or the
  maximum duration when the duration is unreadable and ``REFRAME_UNKNOWN_DURATION_POLICY`` is
  ``reserve_max``. Whether the job fits the budgets is judged on this amount, as the gate does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

from pydantic import BaseModel, Field

from config import Settings
from config.settings import UnknownDurationPolicy
from worker.contracts.keys import Keys

MICRO_PER_USD = 1_000_000


def usd_to_micro(usd: float, *, round_up: bool = False) -> int:
    """Dollars as integer micro-dollars via the decimal string (worker/flow/budget.py's rule)."""
    rounding = ROUND_CEILING if round_up else ROUND_FLOOR
    return int((Decimal(str(usd)) * MICRO_PER_USD).to_integral_value(rounding=rounding))


def billable_s(duration_s: float, unit_s: float) -> float:
    """Seconds billed for ``duration_s``: whole ``unit_s`` units, rounded up (``unit_s`` 0: exact),
    with worker/flow/budget.py's micro-second of tolerance."""
    if unit_s <= 0:
        return duration_s
    return math.ceil(duration_s / unit_s - 1e-6) * unit_s


@dataclass(frozen=True)
class Pricing:
    """fal's price as the budget charges it: micro-dollars per second (rounded up) and the unit."""

    price_per_s_micro: int
    billing_unit_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Pricing:
        """``REFRAME_PRICE_PER_S_USD`` and ``REFRAME_BILLING_UNIT_S``."""
        return cls(usd_to_micro(settings.price_per_s_usd, round_up=True), settings.billing_unit_s)

    def micro(self, duration_s: float) -> int:
        """What ``duration_s`` seconds of video cost as billed (``Budget.estimate_micro``)."""
        if duration_s < 0 or math.isnan(duration_s):
            raise ValueError("duration_s must be >= 0")
        return math.ceil(billable_s(duration_s, self.billing_unit_s) * self.price_per_s_micro)


@dataclass(frozen=True)
class MediaInfo:
    """What could be read about an input video; None where it could not be."""

    duration_s: float | None = None
    size_bytes: int | None = None
    width: int | None = None
    height: int | None = None

    @property
    def known_duration_s(self) -> float | None:
        """The duration when it is a usable number (positive and finite), else None."""
        d = self.duration_s
        return d if d is not None and math.isfinite(d) and d > 0 else None


@dataclass(frozen=True)
class ModelLimits:
    """The inputs the model accepts: ``REFRAME_MAX_VIDEO_DURATION_S`` (30 s) and
    ``REFRAME_MAX_UPLOAD_BYTES`` (100 MiB), the limits Luma publishes for the model
    (docs/fal-wire-protocol.md, "Luma Ray 2 Flash Reframe limits")."""

    max_duration_s: float
    max_input_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelLimits:
        """The configured limits."""
        return cls(settings.max_video_duration_s, settings.max_upload_bytes)

    def duration_problem(self, duration_s: float | None) -> str | None:
        """Why a video of ``duration_s`` is refused, or None (also when the duration is unknown)."""
        if duration_s is None or duration_s <= self.max_duration_s:
            return None
        return (
            f"lasts {duration_s:.1f}s; the model's limit REFRAME_MAX_VIDEO_DURATION_S "
            f"allows {self.max_duration_s:g}s"
        )

    def size_problem(self, size_bytes: int | None) -> str | None:
        """Why an input of ``size_bytes`` is refused, or None (also when the size is unknown)."""
        if size_bytes is None or size_bytes <= self.max_input_bytes:
            return None
        return (
            f"is {size_bytes} bytes; the model's limit REFRAME_MAX_UPLOAD_BYTES allows {self.max_input_bytes}"
        )

    def problems(self, info: MediaInfo) -> list[str]:
        """Every limit ``info`` is known to break (size first), each naming its setting."""
        found = [self.size_problem(info.size_bytes), self.duration_problem(info.known_duration_s)]
        return [p for p in found if p]


# ---------------------------------------------------------------------------------- budgets
@dataclass(frozen=True)
class Headroom:
    """Caps and use (spent + reserved) of one budget's current UTC day and month, micro-dollars.

    A cap of None is no cap (a tenant without limits); ``cap_unreadable`` names a stored cap that is
    not a finite number >= 0 (then the room is unknown).
    """

    day_cap: int | None
    day_used: int
    month_cap: int | None
    month_used: int
    cap_unreadable: str = ""

    def room(self) -> tuple[int | None, int | None]:
        """(day room, month room); None where there is no cap."""
        day = None if self.day_cap is None else self.day_cap - self.day_used
        month = None if self.month_cap is None else self.month_cap - self.month_used
        return day, month

    def fits(self, micro: int) -> str | None:
        """None if ``micro`` fits both periods now, else the first period it does not fit."""
        day, month = self.room()
        if day is not None and micro > day:
            return "day"
        if month is not None and micro > month:
            return "month"
        return None


@dataclass(frozen=True)
class Budgets:
    """The cluster's budget and one tenant's, as they stand now."""

    cluster: Headroom
    tenant: Headroom
    day: str
    month: str


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _cap(value: Any) -> tuple[int | None, bool]:
    """(cap in micro-dollars or None when absent, readable)."""
    if value is None or value in (b"", ""):
        return None, True
    try:
        usd = float(value.decode() if isinstance(value, bytes) else value)
    except (TypeError, ValueError, UnicodeDecodeError):
        return None, False
    if not math.isfinite(usd) or usd < 0:
        return None, False
    return usd_to_micro(usd), True


def read_budgets(r: Any, *, prefix: str, settings: Settings, tenant: str) -> Budgets:
    """The cluster's and ``tenant``'s budgets for the UTC day and month of Redis ``TIME``.

    Reads (two round trips, nothing written) the period HASHes the budget scripts keep
    (``P:fc:budget:day:{day}``, ``...:month:{month}``, and ``P:fc:budget:tenant:{t}:day:{day}`` /
    ``...:month:{month}``; fields ``spent`` and ``reserved``) and the tenant's caps
    (``P:tenant:{t}:limits``, fields ``daily_budget_usd`` and ``monthly_budget_usd``). Read
    defensively: an absent hash or field is zero use, an absent cap is no cap. The cluster's caps
    are ``REFRAME_BUDGET_DAILY_USD`` and ``REFRAME_BUDGET_MONTHLY_USD`` of ``settings``.
    """
    seconds, _micro = r.time()
    t = time.gmtime(int(seconds))
    day, month = f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}", f"{t.tm_year:04d}-{t.tm_mon:02d}"
    root = Keys(prefix).root
    pipe = r.pipeline(transaction=False)
    for key in (
        f"{root}:fc:budget:day:{day}",
        f"{root}:fc:budget:month:{month}",
        f"{root}:fc:budget:tenant:{tenant}:day:{day}",
        f"{root}:fc:budget:tenant:{tenant}:month:{month}",
    ):
        pipe.hmget(key, "spent", "reserved")
    pipe.hmget(f"{root}:tenant:{tenant}:limits", "daily_budget_usd", "monthly_budget_usd")
    cd, cm, td, tm, caps = pipe.execute()
    used = [_int(spent) + _int(reserved) for spent, reserved in (cd, cm, td, tm)]
    (day_cap, day_ok), (month_cap, month_ok) = _cap(caps[0]), _cap(caps[1])
    unreadable = [
        name for name, ok in (("daily_budget_usd", day_ok), ("monthly_budget_usd", month_ok)) if not ok
    ]
    return Budgets(
        cluster=Headroom(
            usd_to_micro(settings.budget_daily_usd),
            used[0],
            usd_to_micro(settings.budget_monthly_usd),
            used[1],
        ),
        tenant=Headroom(day_cap, used[2], month_cap, used[3], cap_unreadable=", ".join(unreadable)),
        day=day,
        month=month,
    )


# ---------------------------------------------------------------------------------- the quote
def _usd(micro: int | None) -> float | None:
    return None if micro is None else micro / MICRO_PER_USD


class QuoteBudget(BaseModel):
    """Budget headroom now (cap minus spent minus reserved), in dollars; null = no cap."""

    day_headroom_usd: float = Field(description="The cluster's room today (REFRAME_BUDGET_DAILY_USD).")
    month_headroom_usd: float = Field(
        description="The cluster's room this month (REFRAME_BUDGET_MONTHLY_USD)."
    )
    tenant: str = Field(description="The tenant the job would belong to.")
    tenant_day_headroom_usd: float | None = Field(description="The tenant's room today (null: no cap).")
    tenant_month_headroom_usd: float | None = Field(
        description="The tenant's room this month (null: no cap)."
    )


class Quote(BaseModel):
    """What a job would cost and whether it would be accepted now; nothing is enqueued."""

    source: str = Field(description="`url`, `data` (a data: URI) or `file` (read locally, not uploaded).")
    duration_s: float | None = Field(description="The input's duration (null: unreadable).")
    size_bytes: int | None = Field(description="The input's size (null: unknown).")
    width: int | None = Field(description="The input's width in pixels (null: unknown).")
    height: int | None = Field(description="The input's height in pixels (null: unknown).")
    billed_s: float | None = Field(
        description="Seconds fal bills for an output as long as the input: whole billing units."
    )
    price_usd: float | None = Field(description="What the job is charged when it succeeds (null: unknown).")
    price_micro: int | None = Field(description="The price in micro-dollars (the settled cost).")
    billable_s: float | None = Field(description="Seconds reserved: whole billing units, margin included.")
    estimate_usd: float | None = Field(description="What is reserved against the budgets while it runs.")
    estimate_micro: int | None = Field(description="The reservation in micro-dollars.")
    price_per_s_usd: float
    billing_unit_s: float
    max_video_duration_s: float
    max_upload_bytes: int
    fits_model_limits: bool | None = Field(description="Duration and size within the limits (null: unknown).")
    budget: QuoteBudget
    fits_budget_now: bool | None = Field(
        description="The reservation fits the cluster's and the tenant's budgets now (null: unknown)."
    )
    would_accept: bool = Field(description="True when the job would be submitted as things stand now.")
    reasons: list[str] = Field(description="Why it would not be, or what is uncertain.")
    dedupe_hit: str | None = Field(
        default=None,
        description="The job an identical request would reuse now (paying once for identical work: a "
        "success within the retention window, or a job in flight); the price is then 0. Null: none, "
        "or dedupe is off for this request.",
    )


def build_quote(
    info: MediaInfo,
    settings: Settings,
    budgets: Budgets,
    *,
    tenant: str,
    source: str,
    dedupe_hit: str | None = None,
    dedupe_hit_state: str = "",
) -> Quote:
    """Price ``info`` and judge it against the model's limits and ``budgets`` (pure). With
    ``dedupe_hit`` (the job an identical request reuses, in ``dedupe_hit_state``), the price and the
    reservation are 0: the job is served that job's result without a fal call."""
    pricing = Pricing.from_settings(settings)
    limits = ModelLimits.from_settings(settings)
    reasons: list[str] = []
    duration = info.known_duration_s
    price = None if duration is None else pricing.micro(duration)
    reserve_from: float | None = None
    if duration is not None:
        reserve_from = duration + settings.estimate_margin_s
    elif settings.unknown_duration_policy is UnknownDurationPolicy.RESERVE_MAX:
        reserve_from = settings.max_video_duration_s
        reasons.append("duration unreadable: the maximum duration would be reserved")
    else:
        reasons.append(
            "duration unreadable: the job would be refused (REFRAME_UNKNOWN_DURATION_POLICY=refuse)"
        )
    estimate = None if reserve_from is None else pricing.micro(reserve_from)
    problems = limits.problems(info)
    reasons += [f"video_url {p}" for p in problems]
    fits_model: bool | None = not problems
    if fits_model and (info.size_bytes is None or duration is None):
        fits_model = None  # nothing known is over, but not everything is known
    if info.size_bytes is None:
        reasons.append("size unknown: the source did not say how large the file is")
    fits_budget: bool | None = None
    if estimate is not None:
        cluster_short = budgets.cluster.fits(estimate)
        tenant_short = budgets.tenant.fits(estimate)
        if cluster_short:
            reasons.append(f"over the cluster's {cluster_short} budget now: the job would wait BLOCKED")
        if tenant_short:
            reasons.append(f"over tenant {tenant}'s {tenant_short} budget now: the job would wait BLOCKED")
        fits_budget = not (cluster_short or tenant_short)
        if fits_budget and budgets.tenant.cap_unreadable:
            fits_budget = None
    if budgets.tenant.cap_unreadable:
        reasons.append(f"tenant {tenant}'s {budgets.tenant.cap_unreadable} is not a number >= 0")
    if dedupe_hit is not None:
        price = estimate = 0
        fits_budget = True
        reasons = [r for r in reasons if "budget now" not in r]
        reasons.append(
            f"identical to job {dedupe_hit} ({dedupe_hit_state}): its result is reused, nothing is paid "
            "(if it is still in flight and fails, this job pays for itself)"
        )
    day_room, month_room = budgets.cluster.room()
    tenant_day, tenant_month = budgets.tenant.room()
    return Quote(
        source=source,
        duration_s=info.duration_s,
        size_bytes=info.size_bytes,
        width=info.width,
        height=info.height,
        billed_s=None if duration is None else billable_s(duration, settings.billing_unit_s),
        price_usd=_usd(price),
        price_micro=price,
        billable_s=None if reserve_from is None else billable_s(reserve_from, settings.billing_unit_s),
        estimate_usd=_usd(estimate),
        estimate_micro=estimate,
        price_per_s_usd=settings.price_per_s_usd,
        billing_unit_s=settings.billing_unit_s,
        max_video_duration_s=limits.max_duration_s,
        max_upload_bytes=limits.max_input_bytes,
        fits_model_limits=fits_model,
        budget=QuoteBudget(
            day_headroom_usd=(day_room or 0) / MICRO_PER_USD,
            month_headroom_usd=(month_room or 0) / MICRO_PER_USD,
            tenant=tenant,
            tenant_day_headroom_usd=_usd(tenant_day),
            tenant_month_headroom_usd=_usd(tenant_month),
        ),
        fits_budget_now=fits_budget,
        would_accept=estimate is not None and fits_model is not False and fits_budget is True,
        reasons=reasons,
        dedupe_hit=dedupe_hit,
    )
