"""Spend caps per UTC day and month: reserve before the submit, settle with the billed amount.

Checking spend *after* the call lets N concurrent jobs through on a stale total (LiteLLM's
overspend reports); reserving the estimate first in one atomic script does not (flow-control §8).

Money is integer micro-dollars (``_micro``). Keys:

* ``{prefix}:fc:budget:day:{YYYY-MM-DD}`` and ``{prefix}:fc:budget:month:{YYYY-MM}``: HASH with
  ``spent`` and ``reserved`` (UTC periods of Redis time). Kept ``PERIOD_RETENTION_S`` after the
  last write, for reports.
* ``{prefix}:fc:budget:res``: HASH job id -> ``"{micro}|{day}|{month}|{reserved_at_ms}"``. The
  reservation remembers its periods, so a job reserved at 23:59:59 settles into that day. It has no
  TTL: a stale reservation is resolved by the reconciler, never expired silently.

The scripts build the period key names from Redis time, so they address keys not passed in
``KEYS``: fine on a single Redis (our deployment), not on Redis Cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from enum import StrEnum

import redis

from worker.flow._redis import LUA_NOW, as_int, run, text

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


class BudgetScope(StrEnum):
    """The cap a reservation was refused by."""

    DAY = "day"
    MONTH = "month"


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


# H. Hinnant's days since 1970-01-01 -> (y, m, d) in the proleptic Gregorian calendar; Redis Lua has
# no os.date, and the periods must come from Redis time.
LUA_CIVIL = """
local function civil(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
                          - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end
"""

# Periods of Redis time (UTC) and helpers shared by the budget scripts.
_PRELUDE = (
    LUA_NOW
    + LUA_CIVIL
    + """
local y, m, d = civil(math.floor(now_ms / 86400000))
local today = string.format('%04d-%02d-%02d', y, m, d)
local this_month = string.format('%04d-%02d', y, m)
local prefix = ARGV[1]
local function day_key(day) return prefix .. ':fc:budget:day:' .. day end
local function month_key(month) return prefix .. ':fc:budget:month:' .. month end
local function field(k, f) return tonumber(redis.call('HGET', k, f)) or 0 end
local function parse(rec)
  local est, day, month = string.match(rec, '^(%d+)|([^|]+)|([^|]+)|')
  return tonumber(est), day, month
end
-- take a reservation back out of a period; never below zero (a period key may have expired)
local function unreserve(k, est)
  if est == 0 then return end  -- Lua would send -0, which HINCRBY refuses
  if redis.call('HINCRBY', k, 'reserved', -est) < 0 then redis.call('HSET', k, 'reserved', 0) end
end
"""
)

# KEYS: 1 reservations. ARGV: 1 prefix, 2 job, 3 est, 4 day cap, 5 month cap, 6 day ttl, 7 month ttl.
# Returns {ok, scope}.
_RESERVE = (
    _PRELUDE
    + """
local job, est = ARGV[2], tonumber(ARGV[3])
if redis.call('HEXISTS', KEYS[1], job) == 1 then return {1, ''} end
local dk, mk = day_key(today), month_key(this_month)
if field(dk, 'spent') + field(dk, 'reserved') + est > tonumber(ARGV[4]) then return {0, 'day'} end
if field(mk, 'spent') + field(mk, 'reserved') + est > tonumber(ARGV[5]) then return {0, 'month'} end
redis.call('HINCRBY', dk, 'reserved', est)
redis.call('HINCRBY', mk, 'reserved', est)
redis.call('EXPIRE', dk, ARGV[6])
redis.call('EXPIRE', mk, ARGV[7])
local record = table.concat({ARGV[3], today, this_month, string.format('%.0f', now_ms)}, '|')
redis.call('HSET', KEYS[1], job, record)
return {1, ''}
"""
)

# KEYS: 1 reservations. ARGV: 1 prefix, 2 job, 3 actual (or -1 to release). Returns 1 if settled.
_SETTLE = (
    _PRELUDE
    + """
local rec = redis.call('HGET', KEYS[1], ARGV[2])
if not rec then return 0 end
local est, day, month = parse(rec)
local actual = tonumber(ARGV[3])
for _, k in ipairs({day_key(day), month_key(month)}) do
  unreserve(k, est)
  if actual >= 0 then redis.call('HINCRBY', k, 'spent', actual) end
end
redis.call('HDEL', KEYS[1], ARGV[2])
return 1
"""
)

# ARGV: 1 prefix. Returns {day spent, day reserved, month spent, month reserved}.
_SNAPSHOT = (
    _PRELUDE
    + """
local dk, mk = day_key(today), month_key(this_month)
return {field(dk, 'spent'), field(dk, 'reserved'), field(mk, 'spent'), field(mk, 'reserved')}
"""
)


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
    ) -> None:
        if min(daily_cap_usd, monthly_cap_usd, price_per_s_usd) < 0:
            raise ValueError("caps and price must be >= 0")
        self.prefix = prefix
        # caps round down and the price up: rounding never lets spend past a cap
        self.day_cap_micro = usd_to_micro(daily_cap_usd)
        self.month_cap_micro = usd_to_micro(monthly_cap_usd)
        self.price_per_s_micro = usd_to_micro(price_per_s_usd, round_up=True)
        self.reservations_key = f"{prefix}:fc:budget:res"
        self._r = r
        self._reserve = r.register_script(_RESERVE)
        self._settle = r.register_script(_SETTLE)
        self._snapshot = r.register_script(_SNAPSHOT)

    def estimate_micro(self, duration_s: float) -> int:
        """Cost of ``duration_s`` seconds of video: whole seconds (rounded up) times the price."""
        if duration_s < 0 or math.isnan(duration_s):
            raise ValueError("duration_s must be >= 0")
        return math.ceil(duration_s) * self.price_per_s_micro

    def reserve(self, job_id: str, micro: int) -> BudgetDecision:
        """Reserve ``micro`` for ``job_id`` in today's and this month's budget, or refuse.

        Refused (``ok=False``, ``scope`` = the first cap that would be exceeded) when
        ``spent + reserved + micro > cap``. A job that already holds a reservation gets ``ok``
        without reserving twice.
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
        ]
        reply = run(self._reserve, [self.reservations_key], args)
        if as_int(reply[0]) == 1:
            return BudgetDecision(ok=True)
        return BudgetDecision(ok=False, scope=BudgetScope(text(reply[1])))

    def settle(self, job_id: str, actual_micro: int) -> bool:
        """Charge ``actual_micro`` and drop the reservation, in the reservation's periods.

        Returns False (and changes nothing) when the job holds no reservation, e.g. a second
        settle of the same job.
        """
        if actual_micro < 0:
            raise ValueError("actual_micro must be >= 0")
        return as_int(run(self._settle, [self.reservations_key], [self.prefix, job_id, actual_micro])) == 1

    def release(self, job_id: str) -> bool:
        """Drop the reservation without spending: only when fal definitely did not accept the job.

        Returns False when there was no reservation.
        """
        return as_int(run(self._settle, [self.reservations_key], [self.prefix, job_id, -1])) == 1

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
        reply = [as_int(v) for v in run(self._snapshot, [self.reservations_key], [self.prefix])]
        return BudgetSnapshot(
            day_spent=reply[0],
            day_reserved=reply[1],
            day_cap=self.day_cap_micro,
            month_spent=reply[2],
            month_reserved=reply[3],
            month_cap=self.month_cap_micro,
        )


def _parse_reservation(raw: str) -> Reservation:
    micro, day, month, at_ms = raw.split("|")
    return Reservation(micro=int(micro), day=day, month=month, reserved_at_ms=int(at_ms))
