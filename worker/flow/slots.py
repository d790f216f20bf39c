"""Cluster-wide concurrency slots with leases, priorities and FIFO admission.

A slot stands for one fal request in flight: it is taken before the submit and given back when fal
reports the request terminal (or definitely never accepted it). The slot belongs to the fal request,
not to the worker process, so an expired lease does *not* free it: expired leases are reported by
:meth:`SlotPool.expired` and keep counting against the capacity until the caller has checked fal and
calls :meth:`SlotPool.release`. Otherwise a crashed worker would let the cluster go over capacity
while its fal request is still running (flow-control notes §3).

Redis keys (design.md): ``{prefix}:slots`` (ZSET job id -> lease deadline ms),
``{prefix}:wait:{high|normal|low}`` (LIST, FIFO per priority) and ``{prefix}:fc:waiting`` (SET of the
ids currently queued; an id that left the set, e.g. by :meth:`SlotPool.withdraw`, is skipped).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import redis

from worker.contracts.models import Priority
from worker.flow._redis import LUA_NOW, as_int, as_texts, run

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

    @property
    def acquired(self) -> bool:
        """True when the job holds a slot now."""
        return self.status is SlotStatus.ACQUIRED


# Shared Lua prelude. KEYS: 1 slots, 2 waiting set, 3..5 wait lists (high, normal, low).
# ARGV: 1 capacity, 2 reserved_high, 3 lease_ms, then script-specific arguments.
_PRELUDE = (
    LUA_NOW
    + """
local slots, waiting = KEYS[1], KEYS[2]
local queues = {KEYS[3], KEYS[4], KEYS[5]}
local capacity, reserved, lease_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])

-- high may use every slot; normal and low leave reserved_high slots free for high
local function limit(i)
  if i == 1 then return capacity end
  return capacity - reserved
end

-- first id of queue i that is still waiting; withdrawn ids at the head are dropped on the way so
-- they neither block admission nor make a free slot look contended
local function live_head(i)
  while true do
    local head = redis.call('LINDEX', queues[i], 0)
    if not head then return nil end
    if redis.call('SISMEMBER', waiting, head) == 1 then return head end
    redis.call('LPOP', queues[i])
  end
end

local function unqueue(job)
  if redis.call('SREM', waiting, job) == 1 then
    for i = 1, 3 do redis.call('LREM', queues[i], 0, job) end
    return 1
  end
  return 0
end

-- admit waiting jobs in priority order, FIFO within a priority, while capacity allows
local function admit_all()
  local admitted = {}
  for i = 1, 3 do
    while true do
      local head = live_head(i)
      if not head then break end
      -- limits only shrink from high to low, so a full level means every later level is full too
      if redis.call('ZCARD', slots) >= limit(i) then return admitted end
      redis.call('LPOP', queues[i])
      redis.call('SREM', waiting, head)
      if not redis.call('ZSCORE', slots, head) then
        redis.call('ZADD', slots, now_ms + lease_ms, head)
        table.insert(admitted, head)
      end
    end
  end
  return admitted
end

-- queued entries that will be served before `job` (which sits in queue i, or is about to)
local function ahead_of(job, i)
  local n = 0
  for k = 1, i - 1 do n = n + redis.call('LLEN', queues[k]) end
  local pos = redis.call('LPOS', queues[i], job)
  if pos then return n + pos end
  return n + redis.call('LLEN', queues[i])
end
"""
)

# ARGV: 4 job, 5 priority index. Returns {1, 0} acquired or {0, ahead} waiting.
_ACQUIRE = (
    _PRELUDE
    + """
local job, p = ARGV[4], tonumber(ARGV[5])
if redis.call('ZSCORE', slots, job) then
  redis.call('ZADD', slots, now_ms + lease_ms, job)  -- idempotent: same slot, fresh lease
  return {1, 0}
end
local contended = false
for i = 1, p do
  local head = live_head(i)
  if head and head ~= job then contended = true end
end
if not contended and redis.call('ZCARD', slots) < limit(p) then
  unqueue(job)
  redis.call('ZADD', slots, now_ms + lease_ms, job)
  return {1, 0}
end
if redis.call('SISMEMBER', waiting, job) == 1 then
  for i = 1, 3 do
    if redis.call('LPOS', queues[i], job) then return {0, ahead_of(job, i)} end
  end
end
local ahead = ahead_of(job, p)
redis.call('RPUSH', queues[p], job)
redis.call('SADD', waiting, job)
return {0, ahead}
"""
)

# ARGV: 4 job. Returns the admitted ids.
_RELEASE = (
    _PRELUDE
    + """
redis.call('ZREM', slots, ARGV[4])
unqueue(ARGV[4])
return admit_all()
"""
)

_ADMIT = _PRELUDE + "\nreturn admit_all()\n"

# ARGV: 4 job. Returns 1 if the job was waiting.
_WITHDRAW = _PRELUDE + "\nreturn unqueue(ARGV[4])\n"

# KEYS: 1 slots. ARGV: 1 ttl_ms, 2.. job ids. Returns how many leases were extended.
_RENEW = (
    LUA_NOW
    + """
local n = 0
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', now_ms + tonumber(ARGV[1]), ARGV[i])
    n = n + 1
  end
end
return n
"""
)

# KEYS: 1 slots. ARGV: 1 limit. Ids whose lease deadline is in the past.
_EXPIRED = (
    LUA_NOW
    + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
"""
)


class SlotPool:
    """A cluster-wide counting semaphore of fal requests in flight.

    Guarantees (each call is one atomic Lua script on Redis time):

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
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if not 0 <= reserved_high < capacity:
            raise ValueError("reserved_high must be in [0, capacity)")
        if lease_ttl_ms < 1:
            raise ValueError("lease_ttl_ms must be >= 1")
        self.capacity = capacity
        self.reserved_high = reserved_high
        self.lease_ttl_ms = lease_ttl_ms
        self.slots_key = f"{prefix}:slots"
        self.waiting_key = f"{prefix}:fc:waiting"
        self.queue_keys = tuple(f"{prefix}:wait:{p.value}" for p in PRIORITY_ORDER)
        self._r = r
        self._acquire = r.register_script(_ACQUIRE)
        self._release = r.register_script(_RELEASE)
        self._admit = r.register_script(_ADMIT)
        self._withdraw = r.register_script(_WITHDRAW)
        self._renew = r.register_script(_RENEW)
        self._expired = r.register_script(_EXPIRED)

    @property
    def _keys(self) -> list[str]:
        return [self.slots_key, self.waiting_key, *self.queue_keys]

    @property
    def _base_args(self) -> list[int]:
        return [self.capacity, self.reserved_high, self.lease_ttl_ms]

    def acquire(self, job_id: str, priority: str) -> SlotResult:
        """Take a slot for ``job_id`` now, or queue it (once) behind the jobs ahead of it.

        A job that already holds a slot gets ACQUIRED again with a fresh lease. A WAITING job is
        admitted later by :meth:`release` or :meth:`admit`, which return it to the caller.
        """
        index = PRIORITY_ORDER.index(Priority(priority)) + 1
        reply = run(self._acquire, self._keys, [*self._base_args, job_id, index])
        status = SlotStatus.ACQUIRED if as_int(reply[0]) == 1 else SlotStatus.WAITING
        return SlotResult(status, as_int(reply[1]))

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
        pipe = self._r.pipeline(transaction=False)
        for key in self.queue_keys:
            pipe.llen(key)
        depths = pipe.execute()
        return {p.value: as_int(n) for p, n in zip(PRIORITY_ORDER, depths, strict=True)}

    def holds(self, job_id: str) -> bool:
        """True when ``job_id`` holds a slot (its lease may have expired)."""
        return self._r.zscore(self.slots_key, job_id) is not None
