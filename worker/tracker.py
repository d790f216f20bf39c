"""Completion tracking: follow every in-flight fal request without a thread per job.

Jobs at fal live in the ZSET ``P:track`` scored by "next due" time. Each worker process runs one
:class:`Tracker` on its event loop. It claims due jobs with one script (bumping their score to
now + claim TTL, a lease), follows each claimed request over fal's SSE status stream (falling back
to polls every ``status_poll_interval_s``), and refreshes its claims and the jobs' slot leases in
one pipelined heartbeat. If the process dies, its claims lapse and another tracker takes the jobs
over, resuming from the fal request id in the record, so nothing is submitted again.

A follower is a coroutine (a few KB), so a process tracks thousands of jobs; fal's status traffic
is one long-lived stream per job plus reconnects, not a poll loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from worker.contracts.models import JobState
from worker.fal import (
    FalError,
    FalModelError,
    FalNotFoundError,
    FalPermanentError,
    FalRunnerError,
    QueueStatus,
    ReframeOutput,
    SubmitReceipt,
    backoff_s,
)
from worker.runtime import Runtime

log = logging.getLogger(__name__)

_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id) end
return due
"""

_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #ARGV - 1 do redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[#ARGV]), ARGV[i]) end
return #ARGV - 1
"""


def receipt_from_record(rec: dict[str, Any], rt: Runtime) -> SubmitReceipt:
    """The fal request handle stored in a job record (URLs rebuilt by fal's rule if missing)."""
    if not (rec.get("fal_status_url") and rec.get("fal_response_url")):
        return rt.fal.receipt_for(str(rec["fal_request_id"]))
    return SubmitReceipt(
        request_id=str(rec["fal_request_id"]),
        status_url=str(rec.get("fal_status_url") or ""),
        response_url=str(rec.get("fal_response_url") or ""),
        cancel_url=str(rec.get("fal_cancel_url") or ""),
        queue_position=None,
    )


class Tracker:
    """Follows in-flight jobs on one event loop. Create and run it on the runtime's portal."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.s = rt.settings
        self.claim_ttl_ms = int(self.s.tracker_claim_ttl_s * 1000)
        self.followers: dict[str, asyncio.Task[None]] = {}
        self.alive_at: dict[str, float] = {}
        self._claim = rt.redis.register_script(_CLAIM)
        self._heartbeat = rt.redis.register_script(_HEARTBEAT)
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------------ main loops
    async def run(self) -> None:
        """Claim due jobs until stopped; heartbeat claims and leases."""
        beat = asyncio.create_task(self._heartbeat_loop())
        try:
            while not self._stopping.is_set():
                try:
                    self._claim_due()
                except Exception:
                    log.warning("tracker claim failed", exc_info=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.s.tracker_tick_s)
        finally:
            beat.cancel()

    async def stop(self) -> None:
        """Stop claiming and cancel followers (their claims lapse; another tracker resumes them)."""
        self._stopping.set()
        for task in list(self.followers.values()):
            task.cancel()
        await asyncio.gather(*self.followers.values(), return_exceptions=True)

    def _claim_due(self) -> None:
        room = self.s.tracker_max_jobs - len(self.followers)
        if room <= 0:
            return
        for raw in self._claim(keys=[self.rt.store.keys.track], args=[room, self.claim_ttl_ms]):
            self.adopt(raw.decode() if isinstance(raw, bytes) else str(raw))

    def adopt(self, job_id: str) -> bool:
        """Start following ``job_id`` here (no-op if already followed or at capacity)."""
        if job_id in self.followers or len(self.followers) >= self.s.tracker_max_jobs:
            return job_id in self.followers
        task = asyncio.get_running_loop().create_task(self._follow_guarded(job_id), name=f"follow-{job_id}")
        self.followers[job_id] = task
        self.rt.metrics.tracker_load(len(self.followers), self.s.tracker_max_jobs)
        return True

    async def _heartbeat_loop(self) -> None:
        interval_s = self.s.tracker_claim_ttl_s / 3
        while True:
            await asyncio.sleep(interval_s)
            try:
                self._beat()
            except Exception:
                log.warning("tracker heartbeat failed", exc_info=True)

    def _beat(self) -> None:
        held = list(self.followers)
        if not held:
            return
        self._heartbeat(keys=[self.rt.store.keys.track], args=[*held, self.claim_ttl_ms])
        # A slot lease is renewed only for requests fal reported alive recently: the slot belongs
        # to the fal request, not to this process.
        fresh = time.monotonic() - self.s.slot_lease_ttl_s / 2
        alive = [j for j in held if self.alive_at.get(j, 0.0) >= fresh]
        if alive:
            self.rt.flow.slots.renew(alive)

    # ------------------------------------------------------------------ one job
    async def _follow_guarded(self, job_id: str) -> None:
        try:
            await self._follow(job_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("tracking job %s failed; handing it back", job_id)
            with contextlib.suppress(Exception):
                self.rt.redis.zadd(self.rt.store.keys.track, {job_id: self._now_ms() + 5000}, xx=True)
        finally:
            self.followers.pop(job_id, None)
            self.alive_at.pop(job_id, None)
            self.rt.metrics.tracker_load(len(self.followers), self.s.tracker_max_jobs)

    async def _follow(self, job_id: str) -> None:
        rec = self.rt.store.get(job_id)
        if rec is None or JobState(rec["state"]).terminal or not rec.get("fal_request_id"):
            self.rt.redis.zrem(self.rt.store.keys.track, job_id)
            return
        receipt = receipt_from_record(rec, self.rt)
        failures = 0
        while True:
            try:
                final = await self._watch(job_id, receipt, rec)
            except FalNotFoundError as err:
                await asyncio.to_thread(self._lost, job_id, err)
                return
            except (FalError, OSError) as err:
                failures += 1
                self.rt.metrics.tracker_stream_reconnect()
                delay = backoff_s(failures, base_s=1.0, cap_s=30.0, rng=self.rt.rng)
                log.info("status of job %s unavailable (%s); retrying in %.1fs", job_id, err, delay)
                await asyncio.sleep(delay)
                continue
            if final is not None:
                await self._finish(job_id, receipt, final)
                return

    async def _watch(self, job_id: str, receipt: SubmitReceipt, rec: dict[str, Any]) -> QueueStatus | None:
        """Follow the status until COMPLETED (returned) or the stream ends (None)."""
        if self.s.use_status_stream:
            # aclosing: leaving the loop early must release the stream's connection at once.
            async with contextlib.aclosing(self.rt.fal.stream_status(receipt)) as stream:
                async for status in stream:
                    if await self._observe(job_id, status, rec):
                        return status
            return None
        status = await self.rt.fal.status(receipt)
        if await self._observe(job_id, status, rec):
            return status
        self.rt.metrics.tracker_poll("ok")
        await asyncio.sleep(self.s.status_poll_interval_s)
        return None

    async def _observe(self, job_id: str, status: QueueStatus, rec: dict[str, Any]) -> bool:
        """Record one status; True when the request is COMPLETED."""
        if status.status == "COMPLETED":
            return True
        self.alive_at[job_id] = time.monotonic()
        if status.status == "IN_PROGRESS" and rec.get("state") != JobState.IN_PROGRESS.value:
            moved = self.rt.store.transition(
                job_id, [JobState.IN_QUEUE], JobState.IN_PROGRESS, queue_position=""
            )
            rec["state"] = JobState.IN_PROGRESS.value
            if moved.ok and isinstance(rec.get("ts_IN_QUEUE"), int):
                self.rt.metrics.fal_queued(max(0.0, (moved.at_ms - rec["ts_IN_QUEUE"]) / 1000))
        elif (
            status.status == "IN_QUEUE"
            and status.queue_position is not None
            and rec.get("queue_position") != status.queue_position
        ):
            rec["queue_position"] = status.queue_position
            self.rt.store.set_fields(job_id, queue_position=status.queue_position)
        return False

    async def _finish(self, job_id: str, receipt: SubmitReceipt, status: QueueStatus) -> None:
        from worker.finalize import complete_failure, complete_success

        try:
            output = await self._fetch_result(receipt)
        except (FalPermanentError, FalRunnerError) as err:
            if isinstance(err, FalNotFoundError) and not status.failed:
                await asyncio.to_thread(self._lost, job_id, err)
                return
            await asyncio.to_thread(complete_failure, self.rt, job_id, err, status)
            return
        if status.failed:
            # fal said COMPLETED with an error but served a result anyway: treat as a runner error.
            runner = FalRunnerError(
                status.error or "runner failure", op="result", error_type=status.error_type
            )
            await asyncio.to_thread(complete_failure, self.rt, job_id, runner, status)
            return
        await asyncio.to_thread(complete_success, self.rt, job_id, output, status)

    async def _fetch_result(self, receipt: SubmitReceipt) -> ReframeOutput:
        attempt = 0
        while True:
            try:
                return await self.rt.fal.result(receipt)
            except (FalModelError, FalPermanentError, FalRunnerError):
                raise
            except FalError:
                attempt += 1
                if attempt >= 5:
                    raise
                await asyncio.sleep(backoff_s(attempt, base_s=0.5, cap_s=10.0, rng=self.rt.rng))

    def _lost(self, job_id: str, err: FalError) -> None:
        """fal no longer knows the request (or its result expired): fail it, assume it was charged."""
        from worker.finalize import finish_job, free_resources

        res = self.rt.flow.budget.reservation(job_id)
        finish_job(
            self.rt,
            job_id,
            JobState.FAILED,
            record={
                "error": {"type": "result_unavailable", "message": err.message},
                "dead_letter_reason": "result_unavailable",
            },
            event={"error_type": "result_unavailable", "error_message": err.message},
            dead_letter=True,
        )
        free_resources(self.rt, job_id, actual_micro=res.micro if res else None)

    def _now_ms(self) -> int:
        sec, usec = self.rt.redis.time()
        return int(sec) * 1000 + int(usec) // 1000


_trackers: dict[int, Tracker] = {}


def start_tracker(rt: Runtime) -> Tracker:
    """Create the process tracker on the runtime's loop and start its main loop."""
    tracker: Tracker = rt.portal.call(_create(rt))
    _trackers[id(rt)] = tracker
    rt.portal.spawn(tracker.run())
    return tracker


def _create(rt: Runtime) -> Any:
    async def make() -> Tracker:
        return Tracker(rt)

    return make


def stop_tracker(rt: Runtime) -> None:
    """Stop the process tracker (claims lapse and other processes resume the jobs)."""
    tracker = _trackers.pop(id(rt), None)
    if tracker is not None:
        with contextlib.suppress(Exception):
            rt.portal.call(tracker.stop, timeout_s=10)


def has_tracker(rt: Runtime) -> bool:
    """True when this process runs a tracker for ``rt``."""
    return id(rt) in _trackers


def adopt(rt: Runtime, job_id: str) -> None:
    """Follow ``job_id`` in this process right away (called after a successful submit)."""
    tracker = _trackers.get(id(rt))
    if tracker is not None:
        rt.portal.loop.call_soon_threadsafe(tracker.adopt, job_id)
