"""Completion tracking: follow every in-flight fal request without a thread per job.

Jobs at fal live in the ZSET ``track`` scored by "next due" time. Each worker process runs one
:class:`Tracker` on its event loop. It claims due jobs with one script (their due time moves ahead
by the claim TTL, and the claim is recorded as this process's), follows each claimed request over
fal's SSE status stream (falling back to polls), and renews its claims in one heartbeat. A claim
that lapsed (this process was stopped) and was taken by another tracker is reported lost by the
heartbeat, and its follower stops at once. Either way every transition a follower makes is fenced
by the attempt and fal request id it follows, so a late follower can only find out that it lost.

What fal *said* and what we *could not read* are kept apart (README, "Never paying twice"):

* fal said the request failed (status COMPLETED with an error): a runner failure may start a new
  attempt (fal does not bill it); a model error (the result's 4xx) fails the job;
* a status or result read that fails (5xx, timeout, reset) is retried with backoff for as long as
  fal keeps the result (``result_read_deadline_s``) and never leads to a new submit;
* a 404 is re-checked for ``lost_confirm_s`` before the request is called lost (charged);
* every read uses the key of the fal account the attempt is bound to (``fal_account``). A 401/403
  (the key was revoked) drains that account and is re-checked like a 404: if the key stays
  rejected for ``lost_confirm_s``, what fal did cannot be read with any key we may use, so the job
  is called lost (FAILED, charged at its estimate) and never resubmitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from worker import lifecycle, outcomes
from worker.contracts.lua import load_lua, script_path
from worker.contracts.models import JobState
from worker.contracts.record import JobRecord, text
from worker.fal import (
    FalAuthError,
    FalClient,
    FalError,
    FalModelError,
    FalNotFoundError,
    QueueStatus,
    ReframeOutput,
    SubmitReceipt,
    backoff_s,
)
from worker.outcomes import receipt_from_record
from worker.runtime import Runtime

log = logging.getLogger(__name__)


class _Unreadable(Exception):
    """fal's answer could not be read for longer than fal keeps it."""


class Tracker:
    """Follows in-flight jobs on one event loop. Create and run it on the runtime's portal."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.s = rt.settings
        self.claim_ttl_ms = int(self.s.tracker_claim_ttl_s * 1000)
        self.followers: dict[str, asyncio.Task[None]] = {}
        self.alive_at: dict[str, float] = {}
        self.in_progress: set[str] = set()
        self.queue_position: dict[str, int] = {}
        keys = rt.store.keys
        self._claim_keys = [keys.track, keys.track_owner]
        self._claim = rt.redis.register_script(load_lua(script_path(__file__, "track_claim")))
        self._heartbeat = rt.redis.register_script(load_lua(script_path(__file__, "track_beat")))
        self._handback = rt.redis.register_script(load_lua(script_path(__file__, "track_handback")))
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------------ main loops
    async def run(self) -> None:
        """Claim due jobs until stopped; heartbeat claims and leases."""
        beat = asyncio.create_task(self._heartbeat_loop())
        try:
            while not self._stopping.is_set():
                try:
                    await asyncio.to_thread(self._claim_due_ids)
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

    def _claim_due_ids(self) -> None:
        room = self.s.tracker_max_jobs - len(self.followers)
        if room <= 0:
            return
        raw = self._claim(keys=self._claim_keys, args=[room, self.claim_ttl_ms, self.rt.process_id])
        for job_id in (text(x) for x in raw):
            self.rt.portal.loop.call_soon_threadsafe(self.adopt, job_id)

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
                lost = await asyncio.to_thread(self._beat, list(self.followers))
            except Exception:
                log.warning("tracker heartbeat failed", exc_info=True)
                continue
            for job_id in lost:
                task = self.followers.get(job_id)
                if task is not None:
                    log.info("claim of job %s was lost (taken over); its follower stops", job_id)
                    task.cancel()

    def _beat(self, held: list[str]) -> list[str]:
        if not held:
            return []
        raw = self._heartbeat(keys=self._claim_keys, args=[self.claim_ttl_ms, self.rt.process_id, *held])
        lost = {text(x) for x in raw}
        # A slot lease is renewed only for requests fal reported alive recently: the slot belongs
        # to the fal request, not to this process.
        fresh = time.monotonic() - self.s.slot_lease_ttl_s / 2
        alive = [j for j in held if j not in lost and self.alive_at.get(j, 0.0) >= fresh]
        if alive:
            self.rt.flow.slots.renew(alive)
        return sorted(lost)

    # ------------------------------------------------------------------ one job
    async def _follow_guarded(self, job_id: str) -> None:
        try:
            await self._follow(job_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("tracking job %s failed; handing it back", job_id)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(
                    self._handback, keys=self._claim_keys, args=[job_id, self.rt.process_id, 5000]
                )
        finally:
            self.followers.pop(job_id, None)
            self.alive_at.pop(job_id, None)
            self.in_progress.discard(job_id)
            self.queue_position.pop(job_id, None)
            self.rt.metrics.tracker_load(len(self.followers), self.s.tracker_max_jobs)

    async def _follow(self, job_id: str) -> None:
        rec = await asyncio.to_thread(self.rt.store.record, job_id)
        if rec is None or rec.state.terminal or not rec.fal_request_id:
            await asyncio.to_thread(self._drop, job_id)
            return
        receipt = receipt_from_record(rec, self.rt)
        try:
            fal = self.rt.fal_for(rec.get("fal_account"))
        except FalAuthError as err:
            await asyncio.to_thread(outcomes.lost, self.rt, rec, err.message, via="status")
            return
        if self.s.webhooks_on and await self._checked_once(rec, receipt, fal):
            return
        failures = 0
        not_found_since: float | None = None
        while True:
            try:
                final = await self._watch(rec, receipt, fal)
            except (FalNotFoundError, FalAuthError) as err:
                if isinstance(err, FalAuthError):
                    await asyncio.to_thread(lifecycle.key_rejected, self.rt, rec.get("fal_account"), err)
                # fal may answer 404 for a moment (a replica that has not seen the request yet):
                # re-check for lost_confirm_s before calling the request lost.
                now = time.monotonic()
                not_found_since = not_found_since or now
                if now - not_found_since >= self.s.lost_confirm_s:
                    await asyncio.to_thread(outcomes.lost, self.rt, rec, err.message, via="status")
                    return
                await asyncio.sleep(min(5.0, self.s.lost_confirm_s / 3))
                continue
            except (FalError, OSError) as err:
                failures += 1
                self.rt.metrics.tracker_stream_reconnect()
                delay = backoff_s(failures, base_s=1.0, cap_s=30.0, rng=self.rt.rng)
                log.info("status of job %s unavailable (%s); retrying in %.1fs", job_id, err, delay)
                await asyncio.sleep(delay)
                continue
            not_found_since = None
            if final is not None:
                await self._finish(rec, receipt, final, fal)
                return

    async def _checked_once(self, rec: JobRecord, receipt: SubmitReceipt, fal: FalClient) -> bool:
        """Webhook mode: the job's webhook is late (the grace ran out). One status GET: the end is
        handled now, a running request is looked at again in ``webhook_recheck_s`` (claim handed
        back, slot lease kept); no connection stays open per job. False when fal's answer was an
        error: the caller follows the request as usual (404 confirmation, backoff)."""
        try:
            status = await fal.status(receipt)
        except (FalError, OSError):
            return False
        self.rt.metrics.tracker_poll("ok")
        if await self._observe(rec, status):
            await self._finish(rec, receipt, status, fal)
            return True
        recheck_ms = int(self.s.webhook_recheck_s * 1000)
        await asyncio.to_thread(
            self.rt.flow.slots.renew, [rec.id], ttl_ms=recheck_ms + int(self.s.slot_lease_ttl_s * 1000)
        )
        await asyncio.to_thread(
            self._handback, keys=self._claim_keys, args=[rec.id, self.rt.process_id, recheck_ms]
        )
        return True

    def _drop(self, job_id: str) -> None:
        # Nothing to follow (finished, or never submitted): give the claim up if it is ours.
        self.rt.redis.eval(
            "if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] or not redis.call('HGET', KEYS[2], ARGV[1]) "
            "then redis.call('ZREM', KEYS[1], ARGV[1]) redis.call('HDEL', KEYS[2], ARGV[1]) end return 0",
            2,
            *self._claim_keys,
            job_id,
            self.rt.process_id,
        )

    async def _watch(self, rec: JobRecord, receipt: SubmitReceipt, fal: FalClient) -> QueueStatus | None:
        """Follow the status until COMPLETED (returned) or the stream ends (None)."""
        if self.s.use_status_stream:
            # aclosing: leaving the loop early must release the stream's connection at once.
            async with contextlib.aclosing(fal.stream_status(receipt)) as stream:
                async for status in stream:
                    if await self._observe(rec, status):
                        return status
            return None
        status = await fal.status(receipt)
        if await self._observe(rec, status):
            return status
        self.rt.metrics.tracker_poll("ok")
        await asyncio.sleep(self.s.status_poll_interval_s)
        return None

    async def _observe(self, rec: JobRecord, status: QueueStatus) -> bool:
        """Record one status; True when the request is COMPLETED."""
        if status.status == "COMPLETED":
            return True
        self.alive_at[rec.id] = time.monotonic()
        if status.status == "IN_PROGRESS" and rec.id not in self.in_progress:
            self.in_progress.add(rec.id)
            moved = await asyncio.to_thread(
                lifecycle.started, self.rt, rec.id, rec.attempt, rec.fal_request_id
            )
            queued_at = rec.ts(JobState.IN_QUEUE)
            if moved.ok and queued_at:
                self.rt.metrics.fal_queued(max(0.0, (moved.at_ms - queued_at) / 1000))
        elif (
            status.status == "IN_QUEUE"
            and status.queue_position is not None
            and self.queue_position.get(rec.id) != status.queue_position
        ):
            self.queue_position[rec.id] = status.queue_position
            await asyncio.to_thread(self.rt.store.set_fields, rec.id, queue_position=status.queue_position)
        return False

    # ------------------------------------------------------------------ the end of a request
    async def _finish(
        self, rec: JobRecord, receipt: SubmitReceipt, status: QueueStatus, fal: FalClient
    ) -> None:
        if status.failed:
            await self._failed_at_fal(rec, receipt, status, fal)
            return
        try:
            output = await self._read_result(rec, receipt, fal)
        except FalModelError as err:
            await asyncio.to_thread(outcomes.model_error, self.rt, rec, err, via="status")
            return
        except (FalNotFoundError, FalAuthError) as err:
            await asyncio.to_thread(outcomes.lost, self.rt, rec, err.message, via="status")
            return
        except _Unreadable as err:
            await asyncio.to_thread(outcomes.lost, self.rt, rec, str(err), via="status")
            return
        await asyncio.to_thread(outcomes.succeeded, self.rt, rec, output, status, via="status")

    async def _read_result(self, rec: JobRecord, receipt: SubmitReceipt, fal: FalClient) -> ReframeOutput:
        """The result, read with backoff for as long as fal keeps it (never resubmitted).

        Only a documented error answer (a model error) or a 404 (or a rejected key, which drains
        the account) confirmed over ``lost_confirm_s`` ends the read early; every other failure is
        "we could not read what fal said".
        """
        started = time.monotonic()
        not_found_since: float | None = None
        attempt = 0
        while True:
            try:
                return await fal.result(receipt)
            except FalModelError:
                raise
            except (FalNotFoundError, FalAuthError) as err:
                if isinstance(err, FalAuthError):
                    await asyncio.to_thread(lifecycle.key_rejected, self.rt, rec.get("fal_account"), err)
                now = time.monotonic()
                not_found_since = not_found_since or now
                if now - not_found_since >= self.s.lost_confirm_s:
                    raise
            except (FalError, OSError) as err:
                not_found_since = None
                if time.monotonic() - started >= self.s.result_read_deadline_s:
                    raise _Unreadable(
                        f"result unreadable for {self.s.result_read_deadline_s:g}s: {err}"
                    ) from err
                log.info("result of fal request %s unreadable (%s); retrying", receipt.request_id, err)
            attempt += 1
            await asyncio.sleep(backoff_s(attempt, base_s=0.5, cap_s=30.0, rng=self.rt.rng))

    async def _failed_at_fal(
        self, rec: JobRecord, receipt: SubmitReceipt, status: QueueStatus, fal: FalClient
    ) -> None:
        """fal said the request failed: cancelled, a model error, or a runner failure (new attempt)."""
        if status.error_type == "client_cancelled" or rec.cancel_requested:
            await asyncio.to_thread(outcomes.cancelled, self.rt, rec, via="status")
            return
        detail: FalError | None = None
        try:
            await fal.result(receipt)  # replays fal's error answer: tells model from runner
        except FalModelError as err:
            await asyncio.to_thread(outcomes.model_error, self.rt, rec, err, via="status")
            return
        except (FalError, OSError) as err:
            detail = err if isinstance(err, FalError) else None
        await asyncio.to_thread(outcomes.runner_failed, self.rt, rec, status, detail, via="status")


def start_tracker(rt: Runtime) -> Tracker:
    """Create the process tracker on the runtime's loop, start it, and hook it into the runtime."""

    async def make() -> Tracker:
        return Tracker(rt)

    tracker: Tracker = rt.portal.call(make)
    rt.portal.spawn(tracker.run())

    def hand_over(job_id: str) -> None:
        rt.portal.loop.call_soon_threadsafe(tracker.adopt, job_id)

    rt.track_hook = hand_over
    return tracker


def stop_tracker(rt: Runtime, tracker: Tracker) -> None:
    """Stop the process tracker (claims lapse and other processes resume the jobs)."""
    rt.track_hook = None
    with contextlib.suppress(Exception):
        rt.portal.call(tracker.stop, timeout_s=10)
