"""Spend caps per UTC day and month: reserve before the submit, settle with the billed amount.

Checking spend *after* the call lets N concurrent jobs through on a stale total (LiteLLM's
overspend reports); reserving the estimate first in one atomic script does not
(docs/flow-control-notes.md §8).

Money is integer micro-dollars (``_micro``). Keys:

* ``{prefix}:fc:budget:day:{YYYY-MM-DD}`` and ``{prefix}:fc:budget:month:{YYYY-MM}``: HASH with
  ``spent`` and ``reserved`` (UTC periods of Redis time). Kept ``PERIOD_RETENTION_S`` after the
  last write, for reports.
* ``{prefix}:fc:budget:res``: HASH job id -> ``"{micro}|{day}|{month}|{reserved_at_ms}|{tenant}"``,
  then ``|{account}`` once a slot bound it to a fal account (worker/contracts/lua/accounts_lib.lua:
  an account's optional budget). The reservation remembers its periods, so a job reserved at
  23:59:59 settles into that day. It has no TTL: a stale reservation is resolved by the reconciler,
  never expired silently.
* The fal accounts' money lives in the slot pool's HASH ``{prefix}:fc:fair`` (accounts_lib): a
  settlement of a bound reservation moves it there in the same script.

The scripts (``lua/budget_*.lua``) compute the periods from Redis time but touch only period keys
passed in ``KEYS`` (valid on Redis Cluster and Dragonfly): the caller passes its guess (its own UTC
clock, or the reservation's periods), and a script given other keys refuses before writing anything,
naming the right ones, and the call is repeated with them (:data:`PERIOD_RETRIES`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from enum import StrEnum
from typing import Any

import redis

from worker.contracts.keys import parse_budget_refusal
from worker.contracts.lua import load_lua, script_path
from worker.flow._redis import as_int, run, text

MICRO_PER_USD = 1_000_000
#: Period hashes live this long after their last write (day: 62 days, month: 400 days).
PERIOD_RETENTION_S = (62 * 86400, 400 * 86400)


def usd_to_micro(usd: float, *, round_up: bool = False) -> int:
    """Dollars as integer micro-dollars, via the decimal string (so 0.06 is exactly 60000)."""
    rounding = ROUND_CEILING if round_up else ROUND_FLOOR
    return int((Decimal(str(usd)) * MICRO_PER_USD).to_integral_value(rounding=rounding))


def micro_to_usd(micro: int) -> float:
    """Micro-dollars as dollars (for display and metrics only; keep sums in micro-dollars)."""
    return micro / MICRO_PER_USD


def billable_s(duration_s: float, unit_s: float) -> float:
    """Seconds billed for ``duration_s``: whole ``unit_s`` units, rounded up (``unit_s`` 0: exact).

    A micro-second of tolerance keeps a container's rounding (3.000001 s) from billing a 4th second.
    """
    if unit_s <= 0:
        return duration_s
    return math.ceil(duration_s / unit_s - 1e-6) * unit_s


def estimate_micro(duration_s: float, *, price_per_s_micro: int, billing_unit_s: float) -> int:
    """Cost of ``duration_s`` seconds of video as billed: whole billing units, rounded up."""
    if duration_s < 0 or math.isnan(duration_s):
        raise ValueError("duration_s must be >= 0")
    return math.ceil(billable_s(duration_s, billing_unit_s) * price_per_s_micro)


def max_job_micro(
    *, max_duration_s: float, margin_s: float, price_per_s_usd: float, billing_unit_s: float
) -> int:
    """The largest reservation a job can hold: the model's longest input plus the estimate margin.

    The gate refuses a longer input (worker/contracts/quotes.py) and estimates at most
    ``duration + margin`` (or ``max_duration`` when the duration is unknown), with the same rule as
    :meth:`Budget.estimate_micro`, so no reservation exceeds this. The fal accounts' budgets use it
    (worker/contracts/lua/accounts_lib.lua): an account is usable only while this much still fits.
    """
    return estimate_micro(
        max_duration_s + margin_s,
        price_per_s_micro=usd_to_micro(price_per_s_usd, round_up=True),
        billing_unit_s=billing_unit_s,
    )


#: A script that was passed the wrong period keys names the right ones; this many tries suffice
#: (the date can change once between the caller's clock and Redis TIME).
PERIOD_RETRIES = 3


def utc_periods(now_s: float | None = None) -> tuple[str, str]:
    """(``YYYY-MM-DD``, ``YYYY-MM``) of the UTC day and month at ``now_s`` (default: this clock).

    Only a first guess of the periods a script will compute from Redis ``TIME``: a script that
    disagrees refuses with the right ones and the call is repeated.
    """
    t = time.gmtime(time.time() if now_s is None else now_s)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}", f"{t.tm_year:04d}-{t.tm_mon:02d}"


def parse_period_refusal(reply: str) -> tuple[str, str]:
    """The (day, month) a ``BUDGET_KEYS:<day>|<month>|<tenant>`` refusal names."""
    day, month, _tenant = parse_budget_refusal(reply)
    return day, month


class BudgetScope(StrEnum):
    """The cap a reservation was refused by."""

    DAY = "day"
    MONTH = "month"
    TENANT_DAY = "tenant_day"
    TENANT_MONTH = "tenant_month"


@dataclass(frozen=True, slots=True)
class BudgetDecision:
    """Outcome of :meth:`Budget.reserve`; ``scope`` names the exceeded cap when not ``ok``."""

    ok: bool
    scope: BudgetScope | None = None


@dataclass(frozen=True, slots=True)
class Reservation:
    """A job's outstanding reservation and the periods it is charged to."""

    micro: int
    day: str
    month: str
    reserved_at_ms: int
    tenant: str = ""
    #: The fal account a slot bound it to ('' = none yet).
    account: str = ""


@dataclass(frozen=True, slots=True)
class BudgetSnapshot:
    """Spend and reservations of the current UTC day and month, with the caps (micro-dollars)."""

    day_spent: int
    day_reserved: int
    day_cap: int
    month_spent: int
    month_reserved: int
    month_cap: int

    def usd(self) -> dict[str, float]:
        """The same figures in dollars, keyed ``day_spent_usd`` etc."""
        return {f"{name}_usd": micro_to_usd(getattr(self, name)) for name in self.__dataclass_fields__}


class BudgetRefused(Exception):
    """The job's record refused the reservation: it left the pre-submit states or another attempt owns it."""

    def __init__(self, state: str) -> None:
        super().__init__(f"reservation refused: job is {state or 'gone'} or owned by another attempt")
        self.state = state


class Budget:
    """Daily and monthly spend caps, enforced by reserving each job's estimate before its submit.

    Guarantees (each call one atomic script; periods are UTC days/months of Redis time):

    * ``spent + reserved <= cap`` for the day and the month after every call, provided settled
      amounts do not exceed their reservations (the estimate is an upper bound by construction).
      If fal bills more than estimated, ``spent`` still records the truth and later reservations
      are refused until there is room again.
    * N concurrent reservations of ``E`` against room for ``k*E`` admit exactly ``k``.
    * :meth:`reserve` is idempotent per job id; :meth:`settle` and :meth:`release` are no-ops
      for a job without a reservation, so a repeated settle never charges twice.
    * Settle and release charge the periods recorded at reservation time.

    A job that reserves again after settling (a deliberate resubmit) needs its own reservation id,
    e.g. ``f"{job_id}:{attempt}"``.
    """

    def __init__(
        self,
        r: redis.Redis,
        *,
        prefix: str,
        daily_cap_usd: float,
        monthly_cap_usd: float,
        price_per_s_usd: float,
        billing_unit_s: float = 1.0,
    ) -> None:
        if min(daily_cap_usd, monthly_cap_usd, price_per_s_usd, billing_unit_s) < 0:
            raise ValueError("caps and price must be >= 0")
        self.prefix = prefix
        # caps round down and the price up: rounding never lets spend past a cap
        self.day_cap_micro = usd_to_micro(daily_cap_usd)
        self.month_cap_micro = usd_to_micro(monthly_cap_usd)
        self.price_per_s_micro = usd_to_micro(price_per_s_usd, round_up=True)
        self.billing_unit_s = billing_unit_s
        self.reservations_key = f"{prefix}:fc:budget:res"
        #: The slot pool's HASH (worker/flow/slots.py), where the fal accounts' money lives.
        self.fair_key = f"{prefix}:fc:fair"
        self.ledger_key = f"{prefix}:ledger"
        self._r = r
        self._reserve = r.register_script(load_lua(script_path(__file__, "budget_reserve")))
        self._settle = r.register_script(load_lua(script_path(__file__, "budget_settle")))
        self._snapshot = r.register_script(load_lua(script_path(__file__, "budget_snapshot")))

    def estimate_micro(self, duration_s: float) -> int:
        """Cost of ``duration_s`` seconds of video as billed: whole billing units, rounded up.

        The same rule settles a success (from the output's duration), so an estimate made from the
        input's duration is an upper bound whenever the output is no longer than the input.
        """
        return estimate_micro(
            duration_s, price_per_s_micro=self.price_per_s_micro, billing_unit_s=self.billing_unit_s
        )

    def reserve(
        self,
        job_id: str,
        micro: int,
        *,
        record_key: str | None = None,
        attempt: str = "",
        tenant: str = "",
    ) -> BudgetDecision:
        """Reserve ``micro`` for ``job_id`` in today's and this month's budget, the cluster's and
        ``tenant``'s at once, or refuse.

        Refused (``ok=False``, ``scope`` = the first cap that would be exceeded) when
        ``spent + reserved + micro > cap`` for the cluster or for the tenant (its caps are
        ``daily_budget_micro`` / ``monthly_budget_micro`` in its limits HASH, read live; with
        ``record_key`` the record's ``tenant`` decides, ``tenant`` is only a first guess). A job
        that already holds a reservation gets ``ok`` without reserving twice. With ``record_key``
        the reservation is fenced like :meth:`SlotPool.acquire <worker.flow.slots.SlotPool.acquire>`:
        :class:`BudgetRefused` when the job left the pre-submit states or ``attempt`` no longer
        owns it.
        """
        if micro < 0:
            raise ValueError("micro must be >= 0")
        args = [
            self.prefix,
            job_id,
            micro,
            self.day_cap_micro,
            self.month_cap_micro,
            *PERIOD_RETENTION_S,
            attempt,
            "1" if record_key else "0",
            tenant,
        ]
        reply: Any = None
        day, month = utc_periods()
        for _ in range(PERIOD_RETRIES):
            limits = f"{self.prefix}:tenant:{tenant}:limits" if tenant else self.reservations_key
            keys = [
                self.reservations_key,
                record_key or self.reservations_key,
                *self.period_keys(day, month, tenant, padded=True),
                limits,
            ]
            reply = run(self._reserve, keys, [*args[:-1], tenant])
            if as_int(reply[0]) != -2:
                break
            # the periods changed, or the record names another tenant than the guess
            day, month, tenant = parse_budget_refusal(text(reply[1]))
        else:
            raise RuntimeError("budget periods kept changing under the reservation")
        if as_int(reply[0]) == -1:
            raise BudgetRefused(text(reply[1]))
        if as_int(reply[0]) == 1:
            return BudgetDecision(ok=True)
        return BudgetDecision(ok=False, scope=BudgetScope(text(reply[1])))

    def settle(self, job_id: str, actual_micro: int, entry: dict[str, str] | None = None) -> bool:
        """Charge ``actual_micro`` and drop the reservation, in the reservation's periods (the
        cluster's and its tenant's), appending the charge to the cost ledger with ``entry``'s
        ``attempt``, ``request_id``, ``billed_s`` and ``kind``.

        Returns False (and changes nothing) when the job holds no reservation, e.g. a second
        settle of the same job.
        """
        if actual_micro < 0:
            raise ValueError("actual_micro must be >= 0")
        return self._settle_as(job_id, actual_micro, entry or {})

    def release(self, job_id: str) -> bool:
        """Drop the reservation without spending: only when fal definitely did not accept the job.

        Returns False when there was no reservation.
        """
        return self._settle_as(job_id, -1, {})

    def _settle_as(self, job_id: str, actual_micro: int, entry: dict[str, str]) -> bool:
        res = self.reservation(job_id)
        day, month = (res.day, res.month) if res else utc_periods()
        tenant = res.tenant if res else ""
        for _ in range(PERIOD_RETRIES):
            keys = [
                self.reservations_key,
                *self.period_keys(day, month, tenant, padded=True),
                self.ledger_key,
                self.fair_key,
            ]
            reply = run(self._settle, keys, [self.prefix, job_id, actual_micro, json.dumps(entry)])
            if not text(reply).startswith("BUDGET_KEYS:"):
                return as_int(reply) == 1
            day, month, tenant = parse_budget_refusal(text(reply))
        raise RuntimeError("budget periods kept changing under the settlement")

    def period_keys(self, day: str, month: str, tenant: str = "", *, padded: bool = False) -> list[str]:
        """The budget HASH keys of one UTC day (``YYYY-MM-DD``) and month (``YYYY-MM``): the
        cluster's, then ``tenant``'s (with ``padded``, placeholders when there is no tenant, so
        scripts get their keys at fixed positions)."""
        keys = [f"{self.prefix}:fc:budget:day:{day}", f"{self.prefix}:fc:budget:month:{month}"]
        if tenant:
            keys += [
                f"{self.prefix}:fc:budget:tenant:{tenant}:day:{day}",
                f"{self.prefix}:fc:budget:tenant:{tenant}:month:{month}",
            ]
        elif padded:
            keys += [self.reservations_key, self.reservations_key]
        return keys

    def tenant_headroom_micro(self, tenant: str) -> int | None:
        """Room left under ``tenant``'s day and month caps now (None: the tenant has no cap).

        A hint for the housekeeper (read without a script); reservations decide atomically.
        """
        caps = self._r.hmget(
            f"{self.prefix}:tenant:{tenant}:limits", "daily_budget_micro", "monthly_budget_micro"
        )
        day, month = utc_periods()
        room: list[int] = []
        for cap, key in zip(caps, self.period_keys(day, month, tenant)[2:], strict=True):
            if cap is None or text(cap) == "":
                continue
            used: Any = self._r.hmget(key, "spent", "reserved")
            room.append(int(text(cap)) - sum(as_int(x or 0) for x in used))
        return min(room) if room else None

    def tenant_spend(self, tenant: str) -> dict[str, float]:
        """``tenant``'s spent and reserved dollars of the current UTC day and month (a report)."""
        day, month = utc_periods()
        out: dict[str, float] = {}
        for period, key in zip(("day", "month"), self.period_keys(day, month, tenant)[2:], strict=True):
            spent, reserved = (as_int(x or 0) for x in self._r.hmget(key, "spent", "reserved"))
            out[f"{period}_spent_usd"] = micro_to_usd(spent)
            out[f"{period}_reserved_usd"] = micro_to_usd(reserved)
        return out

    def reservation(self, job_id: str) -> Reservation | None:
        """The job's outstanding reservation, if any."""
        raw = self._r.hget(self.reservations_key, job_id)
        return None if raw is None else _parse_reservation(text(raw))

    def reservations(self) -> dict[str, Reservation]:
        """Every outstanding reservation (for the reconciler and reports)."""
        raw = self._r.hgetall(self.reservations_key)
        return {text(k): _parse_reservation(text(v)) for k, v in raw.items()}

    def snapshot(self) -> BudgetSnapshot:
        """Spent and reserved micro-dollars of the current UTC day and month, with the caps."""
        day, month = utc_periods()
        raw: Any = None
        for _ in range(PERIOD_RETRIES):
            raw = run(self._snapshot, [self.reservations_key, *self.period_keys(day, month)], [self.prefix])
            if len(raw) == 4:
                break
            day, month = parse_period_refusal(text(raw[0]))
        reply = [as_int(v) for v in raw]
        return BudgetSnapshot(
            day_spent=reply[0],
            day_reserved=reply[1],
            day_cap=self.day_cap_micro,
            month_spent=reply[2],
            month_reserved=reply[3],
            month_cap=self.month_cap_micro,
        )


def _parse_reservation(raw: str) -> Reservation:
    micro, day, month, at_ms, *rest = raw.split("|")
    tenant = rest[0] if rest else ""
    account = rest[1] if len(rest) > 1 else ""
    return Reservation(
        micro=int(micro), day=day, month=month, reserved_at_ms=int(at_ms), tenant=tenant, account=account
    )
