"""The pool of fal accounts: each with its own cap of requests in flight, submit rate and breaker.

Which account a job uses is decided with its slot, in the slot scripts (``lua/accounts_lib.lua``
under worker/contracts): a slot is taken only on an account that is not drained and has room, so
no account ever holds more requests than its cap and the pool's capacity is the sum of the usable
accounts' room. Which *job* gets a slot stays the fair-share rule of worker/flow/slots.py.

An account is *drained* (no new slot goes to it; jobs it holds are resolved there):

* for good when fal rejects its key (401/403), until an operator runs
  ``reframe accounts undrain <id>`` after fixing the key;
* until its breaker's open period ends, when the breaker refuses a submit (the next slot goes to
  another account instead of waiting behind that one).

The state lives in the slot pool's fair HASH (``adrain:<id>``, ``adrain_until:<id>``,
``ause:<id>``), so draining and taking slots are atomic with respect to each other.

In a pool of one account (no ``REFRAME_FAL_ACCOUNTS``) that account's breaker and rate limiter use
the cluster's keys of before (``{prefix}:fc:breaker``, ``{prefix}:fc:gcra``): nothing moves on
upgrade. In a pool of several, account ``a`` keeps them under ``{prefix}:acct:a``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis
from redis.commands.core import Script

from worker.contracts.lua import load_lua, script_path
from worker.flow._redis import as_int, run, text
from worker.flow.breaker import CircuitBreaker
from worker.flow.budget import max_job_micro, usd_to_micro
from worker.flow.rate import SubmitRateLimiter
from worker.flow.slots import SlotPool

if TYPE_CHECKING:
    from config import Settings

#: Why an account was drained for good: fal rejected its key.
KEY_REJECTED = "key_rejected"


@dataclass(frozen=True, slots=True)
class Account:
    """One fal account's flow-control primitives."""

    id: str
    cap: int
    breaker: CircuitBreaker
    rate: SubmitRateLimiter


@dataclass(frozen=True, slots=True)
class AccountStatus:
    """One account as the slot scripts see it now."""

    id: str
    cap: int
    in_use: int
    usable: bool
    drain_reason: str
    drained_until_ms: int
    #: Its budget (micro-dollars; None: no cap), spent today / this month, and reserved by the jobs
    #: bound to it (worker/contracts/lua/accounts_lib.lua).
    day_cap_micro: int | None = None
    month_cap_micro: int | None = None
    day_spent_micro: int = 0
    month_spent_micro: int = 0
    reserved_micro: int = 0
    #: True while its budget has no room for one more job (it is then not ``usable``).
    budget_full: bool = False


class UnknownAccount(KeyError):
    """A job names an account that is not configured (any more): nothing may use another's key."""


class AccountPool:
    """The configured fal accounts, in order, and the scripts that drain and list them."""

    def __init__(
        self,
        r: redis.Redis,
        *,
        slots: SlotPool,
        accounts: list[Account],
    ) -> None:
        if not accounts:
            raise ValueError("a pool needs at least one account")
        self._slots = slots
        self._by_id = {a.id: a for a in accounts}
        self.accounts = tuple(accounts)
        self._drain = _script(r, "account_drain")
        self._undrain = _script(r, "account_undrain")
        self._snapshot = _script(r, "accounts_snapshot")

    @classmethod
    def build(
        cls,
        r: redis.Redis,
        *,
        prefix: str,
        slots: SlotPool,
        specs: list[tuple[str, int, float | None]],
        breaker: Callable[[str], CircuitBreaker],
        rate: Callable[[str, float | None], SubmitRateLimiter],
    ) -> AccountPool:
        """Accounts from ``(id, cap, rate_per_s)`` specs; ``breaker(prefix)`` and ``rate(prefix, rate)``
        make each primitive under the account's key prefix (the cluster's own for a pool of one)."""
        single = len(specs) == 1
        accounts = [
            Account(
                id=account_id,
                cap=cap,
                breaker=breaker(prefix if single else f"{prefix}:acct:{account_id}"),
                rate=rate(prefix if single else f"{prefix}:acct:{account_id}", per_s),
            )
            for account_id, cap, per_s in specs
        ]
        return cls(r, slots=slots, accounts=accounts)

    @property
    def multi(self) -> bool:
        """True when there is more than one account to choose from."""
        return len(self.accounts) > 1

    @property
    def first(self) -> Account:
        """The first configured account (the only one in a pool of one)."""
        return self.accounts[0]

    def get(self, account_id: str) -> Account:
        """The account ``account_id`` ('' = the first: records and slots from before accounts).

        Raises :class:`UnknownAccount` for an id that is not configured."""
        if not account_id:
            return self.first
        try:
            return self._by_id[account_id]
        except KeyError:
            raise UnknownAccount(account_id) from None

    def drain(self, account_id: str, *, reason: str = KEY_REJECTED, until_ms: int | None = None) -> bool:
        """Give ``account_id`` no new slot: for good with ``reason``, or until ``until_ms``.

        Slots it holds stay (their requests are at that account). True if this call drained it."""
        self.get(account_id)
        args = [account_id, "" if until_ms is not None else reason, int(until_ms or 0)]
        return as_int(run(self._drain, self._slots_keys, [*self._slots_args, *args])) == 1

    def undrain(self, account_id: str) -> bool:
        """Make ``account_id`` usable again (True if it was drained). Waiting jobs go into its room at
        the next admission: a freed slot, or the housekeeper's sweep, which dispatches them."""
        self.get(account_id)
        return as_int(run(self._undrain, self._slots_keys, [*self._slots_args, account_id])) == 1

    def status(self) -> list[AccountStatus]:
        """Every configured account: cap, slots held, usable, why/until when it is drained, and its
        budget: caps, spent today and this month, reserved."""
        rows = run(self._snapshot, self._slots_keys, self._slots_args)
        return [
            AccountStatus(
                id=text(row[0]),
                cap=as_int(row[1]),
                in_use=as_int(row[2]),
                usable=as_int(row[3]) == 1,
                drain_reason=text(row[4]),
                drained_until_ms=as_int(row[5]),
                day_cap_micro=_cap(row[6]),
                month_cap_micro=_cap(row[7]),
                day_spent_micro=as_int(row[8]),
                month_spent_micro=as_int(row[9]),
                reserved_micro=as_int(row[10]),
                budget_full=as_int(row[11]) == 1,
            )
            for row in rows
        ]

    @property
    def _slots_keys(self) -> list[str]:
        s = self._slots
        return [s.slots_key, s.waiting_key, s.wait_key, s.fair_key, s.params_key]

    @property
    def _slots_args(self) -> list[object]:
        s = self._slots
        return [s.accounts, s.reserved_high, s.lease_ttl_ms]


def accounts_arg(
    specs: list[tuple[str, int, float | None]],
    budgets: Mapping[str, tuple[float | None, float | None]] | None = None,
    max_job_micro: int = 0,
) -> str:
    """The slot scripts' form of the pool (worker/contracts/lua/accounts_lib.lua): ``id:cap`` in
    order, ``id:cap:day_micro:month_micro`` for an account in ``budgets`` ({id: (daily_usd,
    monthly_usd)}, None = no cap; caps round down, so rounding never lets spend past one), and
    ``#max_job_micro`` after the list when any account has a budget."""
    budgets = {k: v for k, v in (budgets or {}).items() if v != (None, None)}

    def cap_of(usd: float | None) -> str:
        return "-" if usd is None else str(usd_to_micro(usd))

    entries = []
    for account_id, cap, _ in specs:
        entry = f"{account_id}:{cap}"
        if account_id in budgets:
            day, month = budgets[account_id]
            entry += f":{cap_of(day)}:{cap_of(month)}"
        entries.append(entry)
    text = ",".join(entries)
    return f"{text}#{max(0, int(max_job_micro))}" if budgets else text


def pool_arg(settings: Settings) -> str:
    """:func:`accounts_arg` of the configured pool, with the accounts' budgets and the largest
    reservation a job can hold (:func:`~worker.flow.budget.max_job_micro`)."""
    specs = settings.fal_account_specs
    budgets = {a.id: (a.daily_usd, a.monthly_usd) for a in specs if a.has_budget}
    ceiling = 0
    if budgets:
        ceiling = max_job_micro(
            max_duration_s=settings.max_video_duration_s,
            margin_s=settings.estimate_margin_s,
            price_per_s_usd=settings.price_per_s_usd,
            billing_unit_s=settings.billing_unit_s,
        )
    return accounts_arg([(a.id, a.cap, a.rate_per_s) for a in specs], budgets, ceiling)


def _cap(raw: object) -> int | None:
    value = as_int(raw)
    return None if value < 0 else value


def _script(r: redis.Redis, name: str) -> Script:
    return r.register_script(load_lua(script_path(__file__, name)))
