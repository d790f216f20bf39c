"""Periodic sweeps that keep the cluster live after crashes, run by one process at a time.

Every worker process runs a :class:`Housekeeper` thread; a Redis lock with a short TTL lets exactly
one of them sweep at any moment (if it dies, another takes over within the lock TTL). A sweep:

* dispatches deferred jobs whose time has come (``P:delayed``; the entry is leased, not removed,
  until the submit task picks the job up, so a lost message is dispatched again);
* checks expired slot leases against fal before releasing them: a slot belongs to the fal
  request, so a crashed worker neither frees a slot while fal still runs its job nor leaks it;
* resolves jobs stuck in SUBMITTING (their submitter died mid-call) by the ambiguous-submit policy;
* re-admits waiting jobs if capacity appeared, and retries budget-blocked jobs.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

from worker.contracts.models import PRE_SUBMIT_STATES, JobState
from worker.fal import FalError, FalNotFoundError
from worker.finalize import free_resources
from worker.runtime import Runtime
from worker.submit import Submitter
from worker.tracker import receipt_from_record

log = logging.getLogger(__name__)

_LEAD = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not cur then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""

_DUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id) end
return due
"""

LOCK_TTL_MS = 5000
DISPATCH_LEASE_MS = 60_000


def _text(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class Housekeeper:
    """The sweeping thread of one worker process (active only while it holds the lock)."""

    def __init__(self, rt: Runtime, *, interval_s: float = 0.2) -> None:
        self.rt = rt
        self.interval_s = interval_s
        self.token = uuid.uuid4().hex
        self.submitter = Submitter(rt)
        self._lead = rt.redis.register_script(_LEAD)
        self._due = rt.redis.register_script(_DUE)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reframe-housekeeper", daemon=True)
        self._last: dict[str, float] = {}

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and give up the lock."""
        self._stop.set()
        self._thread.join(10)
        try:
            self.rt.redis.eval(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end "
                "return 0",
                1,
                self.rt.store.keys.housekeeper_lock,
                self.token,
            )
        except Exception:
            log.debug("housekeeper unlock failed", exc_info=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self._lead(keys=[self.rt.store.keys.housekeeper_lock], args=[self.token, LOCK_TTL_MS]):
                    self.sweep()
            except Exception:
                log.warning("housekeeping sweep failed", exc_info=True)
            self._stop.wait(self.interval_s)

    def _every(self, name: str, period_s: float) -> bool:
        now = time.monotonic()
        if now - self._last.get(name, 0.0) >= period_s:
            self._last[name] = now
            return True
        return False

    def sweep(self) -> None:
        """One pass of every duty that is due."""
        self.dispatch_due()
        if self._every("leases", 1.0):
            self.check_expired_leases()
        if self._every("admit", 2.0):
            self.rt.dispatch(self.rt.flow.slots.admit())
        if self._every("blocked", 5.0):
            self.retry_blocked()

    def dispatch_due(self) -> list[str]:
        """Send deferred jobs whose time has come back through the submit task."""
        raw = self._due(keys=[self.rt.store.keys.delayed], args=[500, DISPATCH_LEASE_MS])
        ids = [_text(x) for x in raw]
        self.rt.dispatch(ids)
        return ids

    def retry_blocked(self, limit: int = 200) -> None:
        """Budget-blocked jobs try the gate again once there is room (a raised cap, a new period).

        Nothing is dispatched while the headroom is below one second of video: no job could fit.
        """
        snap = self.rt.flow.budget.snapshot()
        headroom = min(
            snap.day_cap - snap.day_spent - snap.day_reserved,
            snap.month_cap - snap.month_spent - snap.month_reserved,
        )
        if headroom < self.rt.flow.budget.estimate_micro(1.0):
            return
        ids = [_text(x) for x in self.rt.redis.zrange(self.rt.store.keys.blocked, 0, limit - 1)]
        self.rt.dispatch(ids)

    def check_expired_leases(self) -> None:
        """Decide every expired slot lease from the job record and, if fal has it, from fal."""
        for job_id in self.rt.flow.slots.expired(limit=100):
            try:
                self._resolve_lease(job_id)
            except Exception:
                log.warning("lease check of job %s failed", job_id, exc_info=True)

    def _resolve_lease(self, job_id: str) -> None:
        rec = self.rt.store.get(job_id)
        if rec is None:
            self.rt.dispatch(self.rt.flow.slots.release(job_id))
            return
        state = JobState(rec["state"])
        if state.terminal:
            actual = rec.get("cost_actual_micro")
            free_resources(self.rt, job_id, actual_micro=actual if isinstance(actual, int) else None)
            return
        if rec.get("fal_request_id"):
            self._check_at_fal(job_id, rec)
            return
        if state == JobState.SUBMITTING:
            self.submitter.resolve_unknown(job_id, rec)
            self.rt.flow.slots.renew([job_id], ttl_ms=10_000)
            return
        if state in PRE_SUBMIT_STATES:
            # Admitted but its dispatch was lost (or it sat out a rate pause): send it again.
            self.rt.flow.slots.renew([job_id])
            self.rt.dispatch([job_id])

    def _check_at_fal(self, job_id: str, rec: dict[str, object]) -> None:
        receipt = receipt_from_record(dict(rec), self.rt)
        try:
            status = self.rt.portal.call(lambda: self.rt.fal.status(receipt), timeout_s=30)
        except FalNotFoundError:
            status = None
        except (FalError, TimeoutError):
            return  # fal unreachable: the slot keeps counting against the cap
        if status is not None and not status.completed:
            self.rt.flow.slots.renew([job_id])
        else:
            # Completed (or unknown to fal): make sure a tracker finalises it soon.
            self.rt.flow.slots.renew([job_id], ttl_ms=30_000)
        sec, usec = self.rt.redis.time()
        self.rt.redis.zadd(self.rt.store.keys.track, {job_id: int(sec) * 1000 + int(usec) // 1000}, nx=True)
