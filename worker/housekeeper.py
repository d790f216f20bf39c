"""Periodic sweeps that keep the cluster live after crashes, run by one process at a time.

Every worker process runs a :class:`Housekeeper` thread; a Redis lock held by a token lets exactly
one of them sweep. The holder renews the lock from a second thread while it works (every third of
its TTL) and every step checks that it still holds it, so a long sweep (fal calls) never overlaps
another holder's; and every action a sweep takes is a fenced lifecycle step anyway. A sweep:

* dispatches deferred jobs whose time has come (``delayed``; the entry stays, leased, until the job
  leaves DEFERRED, so a lost message is dispatched again);
* checks expired slot leases against fal before releasing them: a slot belongs to the fal request,
  so a crashed worker neither frees a slot while fal still runs its job nor leaks it;
* resolves jobs stuck in SUBMITTING (their submitter died mid-call) by the ambiguous-submit policy;
* re-admits waiting jobs if capacity appeared, and retries budget-blocked jobs;
* takes over the tracker claims and in-flight submits of processes whose heartbeat stopped
  (``REFRAME_HEARTBEAT_TTL_MS``), so a dead worker's jobs are followed again within seconds;
* trims the result stream below the slowest consumer group, drops dead-letter entries whose record
  expired, and reconciles budget reservations whose job has ended (nothing grows without bound);
* trims cost-ledger entries past their retention (by age only: the ledger outlives job records).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid

from worker.contracts.keys import KOMBU_UNACKED, celery_queue_key, celery_queue_keys
from worker.contracts.lua import load_lua, script_path
from worker.contracts.models import PRE_SUBMIT_STATES
from worker.contracts.record import JobRecord, text
from worker.contracts.wire import submit_job_id
from worker.fal import FalError, FalNotFoundError
from worker.outbox import STREAM_KEEP
from worker.outcomes import receipt_from_record
from worker.presence import Presence
from worker.runtime import Runtime
from worker.submit import Outcome, Submitter
from worker.webhooks import PENDING_LEASE_MS, dispatch_pending, pending_key

log = logging.getLogger(__name__)

LOCK_TTL_MS = 6_000


def _loads(raw: object) -> object:
    try:
        return json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except ValueError:
        return None


DISPATCH_LEASE_MS = 60_000
#: A fal call made by a sweep gives up well inside the lock's TTL.
FAL_CALL_TIMEOUT_S = LOCK_TTL_MS / 3000


class Housekeeper:
    """The sweeping thread of one worker process (active only while it holds the lock)."""

    def __init__(self, rt: Runtime, *, interval_s: float = 0.2) -> None:
        self.rt = rt
        self.keys = rt.store.keys
        self.interval_s = interval_s
        self.token = f"{rt.process_id}:{uuid.uuid4().hex[:8]}"
        self.submitter = Submitter(rt)
        self._hold = rt.redis.register_script(load_lua(script_path(__file__, "lock_hold")))
        self._release = rt.redis.register_script(load_lua(script_path(__file__, "lock_release")))
        self._due = rt.redis.register_script(load_lua(script_path(__file__, "delayed_due")))
        self._trim = rt.redis.register_script(load_lua(script_path(__file__, "events_trim")))
        self._takeover = rt.redis.register_script(load_lua(script_path(__file__, "track_takeover")))
        self.presence = Presence.from_settings(rt.redis, rt.settings)
        self._stop = threading.Event()
        self._holding = threading.Event()
        self._held_at = 0.0  # monotonic time of the last successful take or renewal
        self._thread = threading.Thread(target=self._loop, name="reframe-housekeeper", daemon=True)
        self._renewer = threading.Thread(
            target=self._renew_loop, name="reframe-housekeeper-lock", daemon=True
        )
        self._last: dict[str, float] = {}

    def start(self) -> None:
        """Start the sweeping and lock-renewing threads."""
        self._thread.start()
        self._renewer.start()

    def stop(self) -> None:
        """Stop the threads and give up the lock."""
        self._stop.set()
        self._thread.join(10)
        self._renewer.join(5)
        self._holding.clear()
        try:
            self._release(keys=[self.keys.housekeeper_lock], args=[self.token])
        except Exception:
            log.debug("housekeeper unlock failed", exc_info=True)

    @property
    def holding(self) -> bool:
        """True while this process holds the sweeping lock.

        Besides the flag, the last successful take must be younger than the lock's TTL on the
        monotonic clock, which keeps running while the process is stopped: a process resumed after
        a SIGSTOP longer than the TTL stops sweeping at its next step, before its renewal even fails.
        """
        return self._holding.is_set() and (time.monotonic() - self._held_at) * 1000 < LOCK_TTL_MS

    def _take(self) -> bool:
        asked_at = time.monotonic()
        held = bool(self._hold(keys=[self.keys.housekeeper_lock], args=[self.token, LOCK_TTL_MS]))
        if held:
            self._held_at = asked_at
            self._holding.set()
        else:
            if self._holding.is_set():
                log.warning("housekeeper lock lost to another process; this one stops sweeping")
            self._holding.clear()
        return held

    def _renew_loop(self) -> None:
        while not self._stop.wait(LOCK_TTL_MS / 3000):
            if not self._holding.is_set():
                continue
            try:
                self._take()
            except Exception:
                # Cannot prove we still hold it: stop sweeping until a renewal succeeds.
                self._holding.clear()
                log.warning("housekeeper lock renewal failed", exc_info=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self._take():
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
        """One pass of every duty that is due (each step first checks the lock is still ours)."""
        duties = (
            ("due", 0.0, self.dispatch_due),
            ("webhooks", 1.0, self.dispatch_pending_webhooks),
            ("takeover", 1.0, self.take_over_dead),
            ("leases", 1.0, self.check_expired_leases),
            ("admit", 2.0, lambda: self.rt.dispatch(self.rt.flow.slots.admit())),
            ("blocked", 5.0, self.retry_blocked),
            ("stream", 10.0, self.trim_events),
            ("dlq", 60.0, self.sweep_dead_letters),
            ("callbacks", 60.0, self.sweep_failed_callbacks),
            ("reservations", 30.0, self.reconcile_reservations),
            ("queued", 15.0, self.redispatch_lost_queued),
            ("ledger", 600.0, self.trim_ledger),
        )
        for name, period_s, duty in duties:
            if not self.holding:
                return
            if self._every(name, period_s):
                duty()

    def take_over_dead(self) -> int:
        """Release the tracker claims of dead processes and resolve their in-flight submits.

        A process is dead when its heartbeat is older than ``REFRAME_HEARTBEAT_TTL_MS``. Its claims
        become due now (a live tracker resumes each request from its fal request id, so nothing is
        submitted again); a job it left in SUBMITTING is resolved by the ambiguous-submit policy at
        once instead of after the submit timeout. Returns how many claims were released.
        """
        alive = set(self.presence.alive_ids())
        owners = {text(k): text(v) for k, v in self.rt.redis.hgetall(self.keys.track_owner).items()}
        pairs = [x for job, owner in owners.items() if owner not in alive for x in (job, owner)]
        released = (
            int(self._takeover(keys=[self.keys.track, self.keys.track_owner], args=pairs)) if pairs else 0
        )
        if released:
            log.info("took over %d tracker claims of dead processes", released)
        # A submit is resolved only once its process has been silent for a while longer: declaring a
        # live (but starved) submitter dead would dead-letter a job fal may be accepting right now.
        silent_ms = max(3 * self.rt.settings.heartbeat_ttl_ms, 10_000)
        now_ms = self.rt.now_ms()
        gates_released = False
        for job_id in self._holders_left_by(alive, now_ms):
            rec = self.rt.store.record(job_id)
            if (
                rec is not None
                and rec.state in PRE_SUBMIT_STATES
                and int(rec.get("gate_until_ms") or 0) > now_ms
                and rec.get("gate_process")
                and rec.get("gate_process") not in alive
                and self.rt.store.release_gate(job_id, rec.attempt)
            ):
                # A slot holder whose gate run died: dispatched again now, not after the gate TTL.
                gates_released = True
                continue
            if (
                rec is not None
                and rec.state.value == "SUBMITTING"
                and rec.submit_process
                and rec.submit_process not in alive
                and now_ms - rec.submit_started_at_ms > silent_ms
            ):
                self.submitter.resolve_unknown(rec, submitter_dead=True)
        if gates_released:
            self.dispatch_due()
        return released

    def _holders_left_by(self, alive: set[str], now_ms: int) -> list[str]:
        """Slot holders whose gate run or submit may belong to a dead process: the few fields that
        say so, for every holder in one round trip (this runs every second over every job in flight,
        so it must not read whole records); :meth:`take_over_dead` reads the full record of these."""
        holders = [text(x) for x in self.rt.redis.zrange(self.keys.slots, 0, -1)]
        if not holders:
            return []
        fields = ("state", "gate_until_ms", "gate_process", "submit_process")
        pipe = self.rt.redis.pipeline(transaction=False)
        for job_id in holders:
            pipe.hmget(self.keys.job(job_id), fields)
        out = []
        for job_id, raw in zip(holders, pipe.execute(), strict=True):
            state, gate_until, gate_process, submit_process = (text(v) if v is not None else "" for v in raw)
            gated = state in PRE_SUBMIT_STATES and int(gate_until or 0) > now_ms and gate_process
            if (gated and gate_process not in alive) or (
                state == "SUBMITTING" and submit_process and submit_process not in alive
            ):
                out.append(job_id)
        return out

    def dispatch_due(self) -> list[str]:
        """Send deferred jobs whose time has come back through the submit task."""
        raw = self._due(keys=[self.keys.delayed], args=[500, DISPATCH_LEASE_MS])
        ids = [text(x) for x in raw]
        self.rt.dispatch(ids)
        return ids

    def dispatch_pending_webhooks(self) -> list[str]:
        """Send again the tasks of recorded fal webhooks not handled yet (a worker died holding the
        message, or the delivery waits for its submitter: ``worker/webhooks.py``)."""
        raw = self._due(keys=[pending_key(self.keys)], args=[500, PENDING_LEASE_MS])
        due = [text(x) for x in raw]
        dispatch_pending(self.rt, due)
        return due

    def retry_blocked(self, limit: int = 200, scan: int = 5000) -> list[str]:
        """Budget-blocked jobs try the gate again once there is room (a raised cap, a new period).

        Nothing is dispatched while the cluster's headroom is below one second of video: no job
        could fit. A job blocked by its tenant's cap is skipped while that tenant has less room
        than that, so a tenant over its cap neither churns the gate nor keeps the jobs of others
        (blocked behind it in time) from their turn. Returns the ids dispatched.
        """
        budget = self.rt.flow.budget
        one_second = budget.estimate_micro(1.0)
        snap = budget.snapshot()
        headroom = min(
            snap.day_cap - snap.day_spent - snap.day_reserved,
            snap.month_cap - snap.month_spent - snap.month_reserved,
        )
        if headroom < one_second:
            return []
        room_of: dict[str, int | None] = {}
        chosen: list[str] = []
        for start in range(0, scan, 500):
            ids = [text(x) for x in self.rt.redis.zrange(self.keys.blocked, start, start + 499)]
            if not ids:
                break
            pipe = self.rt.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hmget(self.keys.job(job_id), "blocked_scope", "tenant", "estimate_micro")
            for job_id, (scope, tenant, estimate) in zip(ids, pipe.execute(), strict=True):
                name = text(tenant or "")
                if text(scope or "").startswith("tenant_") and name:
                    if name not in room_of:
                        room_of[name] = budget.tenant_headroom_micro(name)
                    room = room_of[name]
                    if room is not None and room < max(one_second, int(text(estimate or "0") or 0)):
                        continue  # its tenant still has no room for it: not worth a gate run
                chosen.append(job_id)
                if len(chosen) >= limit:
                    break
            if len(chosen) >= limit:
                break
        self.rt.dispatch(chosen)
        return chosen

    def trim_events(self, *, keep: int = STREAM_KEEP) -> tuple[int, int]:
        """Trim the result stream below every consumer group's needs (and past the hard ceiling).

        The newest ``keep`` entries stay even when no group needs them (late ``XREAD`` waiters).
        Returns (entries trimmed below the groups, unread entries trimmed past the ceiling).
        """
        raw = self._trim(keys=[self.keys.events], args=[self.rt.settings.results_stream_maxlen, keep])
        below, over = int(raw[0]), int(raw[1])
        if over:
            self.rt.metrics.stream_trimmed_unread(over)
            log.warning(
                "result stream over its ceiling: %d entries no consumer group had read were trimmed", over
            )
        return below, over

    def sweep_dead_letters(self, batch: int = 500) -> int:
        """Drop dead-letter entries whose job record has expired; returns how many."""
        ids = [text(x) for x in self.rt.redis.zrange(self.keys.dlq, 0, batch - 1)]
        if not ids:
            return 0
        pipe = self.rt.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(self.keys.job(job_id))
        gone = [j for j, exists in zip(ids, pipe.execute(), strict=True) if not exists]
        if gone:
            self.rt.redis.zrem(self.keys.dlq, *gone)
        return len(gone)

    def trim_ledger(self) -> int:
        """Drop cost-ledger entries older than ``REFRAME_LEDGER_RETENTION_DAYS`` (``XTRIM MINID``: the
        stream ids are Redis time); never by length. Returns how many (worker/contracts/ledger.py)."""
        min_ms = self.rt.now_ms() - self.rt.settings.ledger_retention_days * 86_400_000
        return int(self.rt.redis.xtrim(self.keys.ledger, minid=str(max(0, min_ms)), approximate=False))

    def sweep_failed_callbacks(self, batch: int = 500) -> int:
        """Drop given-up callback ids whose entry has expired (``dlq_retention_s``); returns how many."""
        ids = [text(x) for x in self.rt.redis.zrange(self.keys.callbacks_failed, 0, batch - 1)]
        if not ids:
            return 0
        pipe = self.rt.redis.pipeline(transaction=False)
        for event_id in ids:
            pipe.exists(self.keys.outbox_entry(event_id))
        gone = [e for e, exists in zip(ids, pipe.execute(), strict=True) if not exists]
        if gone:
            self.rt.redis.zrem(self.keys.callbacks_failed, *gone)
        return len(gone)

    def redispatch_lost_queued(self, *, min_age_ms: int = 30_000, limit: int = 200) -> list[str]:
        """Dispatch again QUEUED jobs whose submit message was lost; returns their ids.

        kombu pops a message and records it as unacknowledged in two steps, so a worker killed in
        between loses it and nothing would ever run the job. A job that has been QUEUED for
        ``min_age_ms`` with no submit run yet is lost when its message is neither unacknowledged nor
        still in its Celery list: the list is FIFO, so once its oldest message belongs to a job
        created later (or it is empty), this job's message has left it. A wrong guess only makes a
        duplicate message, which the job's gate turns away.
        """
        k = self.keys
        cutoff = self.rt.now_ms() - min_age_ms
        ids = [text(x) for x in self.rt.redis.zrangebyscore(k.queued, "-inf", cutoff, start=0, num=limit)]
        if not ids:
            return []
        unacked = {
            submit_job_id(entry[0])
            for entry in (_loads(v) for v in self.rt.redis.hvals(KOMBU_UNACKED))
            if isinstance(entry, list) and entry
        }
        oldest_created: dict[str, int | None] = {}
        for key in celery_queue_keys(self.rt.settings.queue_name):
            tail = self.rt.redis.lindex(key, -1)
            tail_job = submit_job_id(tail) if tail is not None else None
            tail_rec = self.rt.store.record(tail_job) if tail_job else None
            # an unreadable tail proves nothing: treat it as "may be older" (created at 0)
            oldest_created[key] = None if tail is None else (tail_rec.created_at_ms if tail_rec else 0)
        lost: list[str] = []
        for job_id in ids:
            rec = self.rt.store.record(job_id)
            if rec is None or rec.state.value != "QUEUED":
                self.rt.redis.zrem(k.queued, job_id)  # it started (or ended); nothing to watch
                continue
            if job_id in unacked or int(rec.get("gate_until_ms") or 0) > self.rt.now_ms():
                continue
            oldest = oldest_created[
                celery_queue_key(self.rt.settings.queue_name, rec.priority.celery_priority)
            ]
            if oldest is not None and oldest <= rec.created_at_ms:
                continue  # its message may still be in the list
            lost.append(job_id)
        if lost:
            log.warning("submit messages of %d QUEUED jobs were lost; dispatching them again", len(lost))
            for job_id in lost:
                rec = self.rt.store.record(job_id)
                if rec is not None:
                    self.rt.dispatch([job_id], priority=rec.priority)
        return lost

    def reconcile_reservations(self) -> int:
        """Settle or release reservations whose job has ended or vanished (a crash mid-clean-up)."""
        fixed = 0
        for job_id, _res in self.rt.flow.budget.reservations().items():
            rec = self.rt.store.record(job_id)
            if rec is not None and not rec.state.terminal:
                continue
            if rec is not None and rec.cost_actual_micro is not None:
                entry = {"attempt": rec.attempt, "request_id": rec.fal_request_id or "", "kind": "settled"}
                done = self.rt.flow.budget.settle(job_id, rec.cost_actual_micro, entry)
            else:
                done = self.rt.flow.budget.release(job_id)
            fixed += int(done)
        return fixed

    def check_expired_leases(self) -> None:
        """Decide every expired slot lease from the job record and, if fal has it, from fal."""
        for job_id in self.rt.flow.slots.expired(limit=100):
            if not self.holding:
                return
            try:
                self._resolve_lease(job_id)
            except Exception:
                log.warning("lease check of job %s failed", job_id, exc_info=True)

    def _resolve_lease(self, job_id: str) -> None:
        rec = self.rt.store.record(job_id)
        if rec is None:
            self.rt.dispatch(self.rt.store.forget(job_id).admitted)
            return
        if rec.state.terminal:
            # Finished (an ambiguous submit's hold has run out): the slot is free.
            self.rt.dispatch(self.rt.flow.slots.release(job_id))
            return
        if rec.fal_request_id:
            self._check_at_fal(rec)
            return
        if rec.state.value == "SUBMITTING":
            if self.submitter.resolve_unknown(rec) is Outcome.DUPLICATE:
                # Its submitter may still be waiting for fal's answer: look again soon. (Any other
                # outcome set the lease itself: an ambiguous hold or the wait for a webhook.)
                self.rt.flow.slots.renew([job_id], ttl_ms=10_000)
            return
        if rec.state in PRE_SUBMIT_STATES:
            # Admitted but its dispatch was lost (or it sat out a rate pause): send it again.
            self.rt.flow.slots.renew([job_id])
            self.rt.dispatch([job_id])

    def _check_at_fal(self, rec: JobRecord) -> None:
        receipt = receipt_from_record(rec, self.rt)
        try:
            status = self.rt.portal.call(lambda: self.rt.fal.status(receipt), timeout_s=FAL_CALL_TIMEOUT_S)
        except FalNotFoundError:
            status = None
        except (FalError, TimeoutError):
            return  # fal unreachable: the slot keeps counting against the cap
        if status is not None and not status.completed:
            self.rt.flow.slots.renew([rec.id])
        else:
            # Completed (or unknown to fal): make sure a tracker finalises it soon.
            self.rt.flow.slots.renew([rec.id], ttl_ms=30_000)
        self.rt.store.ensure_tracked(rec.id)
