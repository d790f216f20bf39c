"""Cluster-wide concurrency slots with leases, weighted fair shares between tenants, priorities and
FIFO admission.

A slot stands for one fal request in flight: it is taken before the submit and given back when fal
reports the request terminal (or definitely never accepted it). The slot belongs to the fal request,
not to the worker process, so an expired lease does *not* free it: expired leases are reported by
:meth:`SlotPool.expired` and keep counting against the capacity until the caller has checked fal and
calls :meth:`SlotPool.release`. Otherwise a crashed worker would let the cluster go over capacity
while its fal request is still running (docs/flow-control-notes.md §3).

A freed slot goes to the tenant furthest below its weighted share (lowest slots-held / weight,
among tenants allowed to take it: a reserved-high slot serves only high, a tenant at its
``max_concurrent`` waits), and within that tenant by priority, then FIFO; each decision is made in
the script that frees the slot (the rule and its bound: worker/contracts/lua/slots_lib.lua).

Redis keys (design.md): ``{prefix}:slots`` (ZSET job id -> lease deadline ms), ``{prefix}:wait:q``
(ZSET of waiting entries ``<tenant>|<priority>|<seq>|<job>``), ``{prefix}:fc:fair`` (HASH: slots
per tenant, queue positions, depths), ``{prefix}:tenant:params`` (HASH: weights and concurrency
caps of tenants) and ``{prefix}:fc:waiting`` (SET of the ids currently queued).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import redis
from redis.commands.core import Script

from worker.contracts.lua import load_lua, script_path
from worker.contracts.models import Priority
from worker.flow._redis import as_int, as_texts, run, text

#: Priorities in admission order; the Lua scripts address them by 1-based index.
PRIORITY_ORDER: tuple[Priority, ...] = (Priority.HIGH, Priority.NORMAL, Priority.LOW)


class SlotStatus(StrEnum):
    """Outcome of :meth:`SlotPool.acquire`."""

    ACQUIRED = "acquired"
    WAITING = "waiting"


@dataclass(frozen=True, slots=True)
class SlotResult:
    """What :meth:`SlotPool.acquire` decided.

    ``ahead`` is the number of queued jobs that will be admitted before this one at the time of the
    call (0 when acquired); later high-priority arrivals may still overtake a waiting job.
    """

    status: SlotStatus
    ahead: int = 0
    account: str = ""
    """The fal account the slot is on (when acquired): the attempt submits with that account's key."""

    @property
    def acquired(self) -> bool:
        """True when the job holds a slot now."""
        return self.status is SlotStatus.ACQUIRED


def _script(r: redis.Redis, name: str) -> Script:
    return r.register_script(load_lua(script_path(__file__, name)))


class SlotRefused(Exception):
    """The job's record refused the acquire: it left the pre-submit states or another attempt owns it."""

    def __init__(self, state: str) -> None:
        super().__init__(f"slot refused: job is {state or 'gone'} or owned by another attempt")
        self.state = state


class SlotPool:
    """A cluster-wide counting semaphore of fal requests in flight.

    Guarantees (each call is one atomic Lua script on Redis time):

    * Every slot is on one fal account (``accounts``, worker/contracts/lua/accounts_lib.lua): a slot
      is taken only on an account that is not drained and holds fewer than its cap, so no account
      ever holds more slots than its cap, and the total stays within the sum of the caps.
    * ``ZCARD {prefix}:slots`` never exceeds ``capacity`` (for a fixed capacity), under any
      interleaving of calls from any number of workers.
    * ``normal`` and ``low`` jobs together hold at most ``capacity - reserved_high`` slots.
    * Admission is by priority (high, normal, low) and FIFO within a priority: a job never takes a
      free slot while a job of higher or equal priority waits ahead of it.
    * :meth:`acquire` is idempotent: a job holds at most one slot and is queued at most once.
    * Expired leases keep counting until :meth:`release`; the pool never frees a slot by itself.
    """

    def __init__(
        self,
        r: redis.Redis,
        *,
        prefix: str,
        capacity: int,
        reserved_high: int = 0,
        lease_ttl_ms: int,
        accounts: str = "",
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if not 0 <= reserved_high < capacity:
            raise ValueError("reserved_high must be in [0, capacity)")
        if lease_ttl_ms < 1:
            raise ValueError("lease_ttl_ms must be >= 1")
        self.capacity = capacity
        #: The fal accounts as ``id:cap,...`` (worker/contracts/lua/accounts_lib.lua); '' = one account.
        self.accounts = accounts or str(capacity)
        self.reserved_high = reserved_high
        self.lease_ttl_ms = lease_ttl_ms
        self.slots_key = f"{prefix}:slots"
        self.waiting_key = f"{prefix}:fc:waiting"
        self.wait_key = f"{prefix}:wait:q"
        self.fair_key = f"{prefix}:fc:fair"
        self.params_key = f"{prefix}:tenant:params"
        self._r = r
        self._acquire = _script(r, "slot_acquire")
        self._release = _script(r, "slot_release")
        self._admit = _script(r, "slot_admit")
        self._withdraw = _script(r, "slot_withdraw")
        self._renew = _script(r, "slot_renew")
        self._expired = _script(r, "slot_expired")

    @property
    def _keys(self) -> list[str]:
        return [self.slots_key, self.waiting_key, self.wait_key, self.fair_key, self.params_key]

    @property
    def _base_args(self) -> list[int | str]:
        return [self.accounts, self.reserved_high, self.lease_ttl_ms]

    def acquire(
        self,
        job_id: str,
        priority: str,
        *,
        record_key: str | None = None,
        attempt: str = "",
        tenant: str = "",
    ) -> SlotResult:
        """Take a slot for ``job_id`` now if the fair-share rule gives it the next free slot, or queue
        it (once) in its tenant's line (``tenant``; with ``record_key``, the record's own tenant).

        A job that already holds a slot gets ACQUIRED again with a fresh lease. A WAITING job is
        admitted later by :meth:`release` or :meth:`admit`, which return it to the caller.

        With ``record_key`` the acquire is fenced in the same script: it happens only while that
        job record is in a pre-submit state and (when ``attempt`` is given) owned by ``attempt``;
        otherwise :class:`SlotRefused` is raised and nothing changed. A late or duplicate gate run
        therefore cannot take a slot for a job that has moved on.
        """
        index = PRIORITY_ORDER.index(Priority(priority)) + 1
        reply = run(
            self._acquire,
            [*self._keys, record_key or self.slots_key],
            [*self._base_args, job_id, index, attempt, "1" if record_key else "0", tenant],
        )
        if as_int(reply[0]) == -1:
            raise SlotRefused(text(reply[1]))
        if as_int(reply[0]) == 1:
            return SlotResult(SlotStatus.ACQUIRED, 0, text(reply[2]) if len(reply) > 2 else "")
        return SlotResult(SlotStatus.WAITING, as_int(reply[1]))

    def renew(self, job_ids: Sequence[str], ttl_ms: int | None = None) -> int:
        """Extend the leases of those ``job_ids`` that still hold a slot; returns how many did.

        Never creates a slot: a job whose slot was released stays released.
        """
        if not job_ids:
            return 0
        ttl = self.lease_ttl_ms if ttl_ms is None else ttl_ms
        return as_int(run(self._renew, [self.slots_key], [ttl, *job_ids]))

    def release(self, job_id: str) -> list[str]:
        """Give back ``job_id``'s slot (no-op if it holds none; also unqueues it) and admit waiters.

        Returns the ids admitted by this call, in admission order: each now holds a slot with a
        fresh lease and the caller must dispatch it.
        """
        return as_texts(run(self._release, self._keys, [*self._base_args, job_id]))

    def admit(self) -> list[str]:
        """Admit waiting jobs into free slots (periodic sweep, after a capacity change).

        Same admission rule and return value as :meth:`release`.
        """
        return as_texts(run(self._admit, self._keys, self._base_args))

    def withdraw(self, job_id: str) -> bool:
        """Remove ``job_id`` from the waiting queues (cancel); True if it was waiting."""
        return as_int(run(self._withdraw, self._keys, [*self._base_args, job_id])) == 1

    def expired(self, limit: int = 100) -> list[str]:
        """Up to ``limit`` jobs whose lease deadline has passed (Redis time).

        They still count against the capacity: check the fal request, then :meth:`renew` (still
        running) or :meth:`release` (terminal or never accepted).
        """
        return as_texts(run(self._expired, [self.slots_key], [limit]))

    def in_use(self) -> int:
        """Slots held now, expired leases included."""
        return as_int(self._r.zcard(self.slots_key))

    def waiting_depths(self) -> dict[str, int]:
        """Queued entries per priority (``{"high": n, "normal": n, "low": n}``)."""
        depths = self._r.hmget(self.fair_key, [f"depth:{i}" for i in range(1, len(PRIORITY_ORDER) + 1)])
        return {p.value: as_int(n or 0) for p, n in zip(PRIORITY_ORDER, depths, strict=True)}

    def in_use_by_tenant(self) -> dict[str, int]:
        """Slots held per tenant now (the fair-share bookkeeping)."""
        raw = self._r.hgetall(self.fair_key)
        return {text(k)[4:]: as_int(v) for k, v in raw.items() if text(k).startswith("use:")}

    def account_of(self, job_id: str) -> str:
        """The fal account of ``job_id``'s slot ('' when it holds none)."""
        raw = self._r.hget(self.fair_key, f"acct:{job_id}")
        return text(raw) if raw is not None else ""

    def holds(self, job_id: str) -> bool:
        """True when ``job_id`` holds a slot (its lease may have expired)."""
        return self._r.zscore(self.slots_key, job_id) is not None
