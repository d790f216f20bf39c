"""Admission and submission of one job: the body of the ``reframe.submit`` task.

Order of checks before any fal call (each one atomic script in Redis, shared by every worker):
breaker -> budget -> slot -> rate. A job that may not go now is parked where the cluster will find
it again (``P:delayed``, ``P:blocked`` or a slot wait list) and the task returns at once, so no
worker thread waits for capacity.

Why no retry here can pay twice: a submit is only repeated after a failure that proves fal did
not accept it (connection refused, 408/409/429, a 5xx without an accepted request); a failure
after the body was sent is *ambiguous* and follows ``REFRAME_AMBIGUOUS_SUBMIT_POLICY``; a job that
already has a fal request id is never submitted again; and the ``SUBMITTING`` intent record is
written before the call, so a crash mid-call is detected as ambiguous rather than retried blindly.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import CancelledError
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from config import AmbiguousSubmitPolicy
from worker.contracts.models import PRE_SUBMIT_STATES, JobState, Priority
from worker.fal import (
    FalAmbiguousError,
    FalError,
    FalPermanentError,
    FalTransientError,
    SubmitReceipt,
    backoff_s,
)
from worker.flow import BreakerState
from worker.probe import video_duration_s
from worker.runtime import Runtime

log = logging.getLogger(__name__)

JITTER_MAX_MS = 1000


class Outcome(StrEnum):
    """What one run of the submit task did (for logs, metrics and tests)."""

    SUBMITTED = "submitted"
    DUPLICATE = "duplicate"
    WAITING = "waiting"
    BLOCKED = "blocked"
    DEFERRED = "deferred"
    FAILED = "failed"
    CANCELLED = "cancelled"
    MISSING = "missing"
    AMBIGUOUS = "ambiguous"


@dataclass(frozen=True)
class Failure:
    """Why a job failed, as stored in the record and the result event."""

    type: str
    message: str
    detail: Any = None

    def as_record(self) -> dict[str, Any]:
        """The ``error`` field of the record."""
        out: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.detail is not None:
            out["fal_detail"] = self.detail
        return out


def record_breaker(rt: Runtime, success: bool, *, probe: bool, before: BreakerState | None = None) -> None:
    """Report a provider-health outcome to the shared breaker and count any state change it causes.

    ``before`` is the state the caller saw (from ``allow()``); without it one extra read is made.
    """
    if before is None:
        before = rt.flow.breaker.state().state
    after = rt.flow.breaker.record(success, probe=probe)
    if after != before:
        rt.metrics.breaker_transition(before.value, after.value)


def counts_against_breaker(err: FalError) -> bool:
    """Provider-health failures open the breaker; 4xx and 429 (the rate limiter's job) do not."""
    if isinstance(err, FalAmbiguousError):
        return True
    if isinstance(err, FalTransientError):
        return err.status_code is None or err.status_code >= 500
    return False


class Submitter:
    """Runs the gate and the fal submit for one job at a time (thread-safe; shared per process)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.s = rt.settings
        self.flow = rt.flow

    # ------------------------------------------------------------------ entry point
    def handle(self, job_id: str) -> Outcome:
        """Drive ``job_id`` one step: submit it, park it, or recognise a duplicate delivery."""
        rec = self.rt.store.get(job_id)
        if rec is None:
            self._free(job_id)
            return Outcome.MISSING
        state = JobState(rec["state"])
        if state.terminal:
            self._free(job_id, settle_micro=rec.get("cost_actual_micro"))
            return Outcome.DUPLICATE
        if state.at_fal or rec.get("fal_request_id"):
            self._ensure_tracked(job_id)
            return Outcome.DUPLICATE
        if state == JobState.SUBMITTING:
            return self.resolve_unknown(job_id, rec)
        if rec.get("cancel_requested") == "1":
            return self._cancel_pre_submit(job_id)
        if state == JobState.QUEUED and not rec.get("attempts"):
            self.rt.metrics.job_enqueued(str(rec.get("priority") or "normal"))
        if state == JobState.DEFERRED:
            # Only deferred jobs sit in P:delayed (leased there until this task picks them up).
            self.rt.redis.zrem(self.rt.store.keys.delayed, job_id)
            rec = self._account_deferral(job_id, rec)
        if self._past_deadline(rec):
            self.fail(
                job_id,
                Failure("deadline_exceeded", "job was not submitted before its deadline"),
                dead_letter=True,
            )
            return Outcome.FAILED
        return self._gate_and_submit(job_id, rec)

    def _account_deferral(self, job_id: str, rec: dict[str, Any]) -> dict[str, Any]:
        """Add the time a deferred job was parked to ``deferred_total_ms``.

        Queue-wait metrics subtract that total, so deliberate delays (backoff, an open breaker, a
        rate pause) do not look like the cluster being slow.
        """
        parked_ms = max(0, self._now_ms() - int(rec.get("ts_DEFERRED") or self._now_ms()))
        total = self.rt.store.incr_field(job_id, "deferred_total_ms", parked_ms)
        return {**rec, "deferred_total_ms": total}

    # ------------------------------------------------------------------ gate
    def _gate_and_submit(self, job_id: str, rec: dict[str, Any]) -> Outcome:
        priority = Priority(rec.get("priority") or "normal")
        decision = self.flow.breaker.allow()
        if not decision.allowed:
            self.defer(job_id, until_ms=decision.retry_at_ms, reason="breaker_open")
            return Outcome.DEFERRED
        probe = decision.probe
        estimate = self._estimate_micro(job_id, rec)
        if estimate is None:
            self._give_back_probe(probe)
            limit = self.s.max_video_duration_s
            self.fail(
                job_id,
                Failure("input_too_long", f"video_url: the video is longer than {limit:g}s"),
                dead_letter=True,
            )
            return Outcome.FAILED
        budget = self.flow.budget.reserve(job_id, estimate)
        if not budget.ok:
            self._give_back_probe(probe)
            self._block(job_id, scope=str(budget.scope))
            return Outcome.BLOCKED
        self.rt.redis.zrem(self.rt.store.keys.blocked, job_id)
        slot = self.flow.slots.acquire(job_id, priority.value)
        if not slot.acquired:
            self._give_back_probe(probe)
            self.rt.store.transition(job_id, PRE_SUBMIT_STATES, JobState.WAITING, slots_ahead=slot.ahead)
            return Outcome.WAITING
        waited_s = self._take_rate_token(job_id)
        if waited_s is None:
            self._give_back_probe(probe)
            return Outcome.DEFERRED
        return self._submit(job_id, rec, probe=probe, breaker_state=decision.state)

    def _take_rate_token(self, job_id: str) -> float | None:
        """Wait briefly for a submit token; defer (keeping slot and reservation) if it is far off."""
        started = time.monotonic()
        max_wait_ms = int(self.s.max_rate_wait_s * 1000)
        while True:
            decision = self.flow.rate.try_acquire()
            if decision.allowed:
                waited = time.monotonic() - started
                if waited > 0:
                    self.rt.metrics.rate_limit_waited(waited)
                return waited
            if decision.retry_after_ms > max_wait_ms:
                now_ms = self._now_ms()
                until = now_ms + decision.retry_after_ms
                # Keep the slot alive across the deferral: nobody can submit before then anyway.
                self.flow.slots.renew(
                    [job_id], ttl_ms=decision.retry_after_ms + int(self.s.slot_lease_ttl_s * 1000)
                )
                self.defer(job_id, until_ms=until, reason=str(decision.reason))
                return None
            time.sleep(decision.retry_after_ms / 1000)

    def _estimate_micro(self, job_id: str, rec: dict[str, Any]) -> int | None:
        """Budget estimate: the input's duration if cheap to read, else the configured maximum.

        None when the input is longer than ``max_video_duration_s`` (it must not be submitted).
        """
        cached = rec.get("estimate_micro")
        if isinstance(cached, int) and cached > 0:
            return cached
        url = str((rec.get("input") or {}).get("video_url", ""))
        duration = video_duration_s(url, timeout_s=self.s.probe_timeout_s) if url else None
        if duration is not None and duration > self.s.max_video_duration_s:
            return None
        if duration is None or duration <= 0:
            duration = self.s.max_video_duration_s
        micro = self.flow.budget.estimate_micro(duration)
        self.rt.store.set_fields(job_id, estimate_micro=micro, input_duration_s=f"{duration:.3f}")
        return micro

    # ------------------------------------------------------------------ submit
    def _submit(
        self, job_id: str, rec: dict[str, Any], *, probe: bool, breaker_state: BreakerState
    ) -> Outcome:
        now = self._now_ms()
        intent = self.rt.store.transition(
            job_id, PRE_SUBMIT_STATES, JobState.SUBMITTING, incr_attempts=1, submit_started_at_ms=now
        )
        if not intent.ok:
            # Cancelled (or finished) between the gate and here: give everything back.
            self._give_back_probe(probe)
            self._free(job_id)
            return Outcome.CANCELLED
        if self._paused_since_token(job_id, now_ms=intent.at_ms):
            self._give_back_probe(probe)
            return Outcome.DEFERRED
        attempt = int(rec.get("attempts") or 0) + 1
        payload = dict(rec.get("input") or {})
        try:
            receipt: SubmitReceipt = self.rt.portal.call(
                lambda: self.rt.fal.submit(payload), timeout_s=self._submit_timeout_s()
            )
        except FalAmbiguousError as err:
            record_breaker(self.rt, False, probe=probe, before=breaker_state)
            return self.ambiguous(job_id, reason=err.message)
        except FalPermanentError as err:
            # A definite "no" from fal: not charged, not counted against provider health.
            record_breaker(self.rt, True, probe=probe, before=breaker_state)
            self.flow.budget.release(job_id)
            self.fail(job_id, Failure("fal_rejected", err.message, err.detail), dead_letter=True)
            return Outcome.FAILED
        except FalTransientError as err:
            self._on_transient_submit_error(job_id, err, probe=probe, attempt=attempt, before=breaker_state)
            return Outcome.DEFERRED
        except (TimeoutError, CancelledError):
            # The wait ended (deadline, or the loop is shutting down); the call may have gone out.
            record_breaker(self.rt, False, probe=probe, before=breaker_state)
            return self.ambiguous(job_id, reason="submit did not finish within the task's deadline")
        record_breaker(self.rt, True, probe=probe, before=breaker_state)
        if attempt == 1:
            self.flow.retry_budget.record_first_attempt()
        self._accepted(job_id, rec, receipt, attempt=attempt)
        return Outcome.SUBMITTED

    def _accepted(self, job_id: str, rec: dict[str, Any], receipt: SubmitReceipt, *, attempt: int) -> None:
        moved = self.rt.store.transition(
            job_id,
            [JobState.SUBMITTING],
            JobState.IN_QUEUE,
            fal_request_id=receipt.request_id,
            fal_status_url=receipt.status_url,
            fal_response_url=receipt.response_url,
            fal_cancel_url=receipt.cancel_url,
            queue_position="" if receipt.queue_position is None else receipt.queue_position,
        )
        if not moved.ok:
            log.warning("job %s left SUBMITTING unexpectedly (now %s)", job_id, moved.state)
        created = int(rec.get("created_at_ms") or 0)
        if attempt == 1 and created:
            # Queue wait excludes deliberate delays: time parked in DEFERRED is not counted.
            deferred_ms = int(rec.get("deferred_total_ms") or 0)
            self.rt.metrics.job_queue_wait(
                str(rec.get("priority") or "normal"), max(0.0, (moved.at_ms - created - deferred_ms) / 1000)
            )
        self.flow.slots.renew([job_id])
        from worker.tracker import adopt, has_tracker  # the tracker lives on this process's loop

        if has_tracker(self.rt):
            # Claim it for this process's tracker straight away (saves a claim tick of latency).
            claim_ms = int(self.s.tracker_claim_ttl_s * 1000)
            self.rt.redis.zadd(self.rt.store.keys.track, {job_id: self._now_ms() + claim_ms})
            adopt(self.rt, job_id)
        else:
            self._ensure_tracked(job_id)
        if self.rt.store.r.hget(self.rt.store.keys.job(job_id), "cancel_requested") in (b"1", "1"):
            from worker.cancel import cancel_at_fal

            cancel_at_fal(self.rt, job_id)

    def _paused_since_token(self, job_id: str, *, now_ms: int) -> bool:
        """True (and the job deferred again, unsent) if fal pushed back after this job took its token.

        The token script already checks the pause; this second look, just before the request goes
        out, closes the window in which another worker's 429 arrives between token and send.
        """
        until = self.flow.rate.paused_until_ms()
        if until is None or until <= now_ms:
            return False
        moved = self.rt.store.transition(
            job_id,
            [JobState.SUBMITTING],
            JobState.DEFERRED,
            incr_attempts=-1,
            deferred_reason="paused",
            deferred_until_ms=until,
        )
        if moved.ok:
            ttl_ms = until - now_ms + int(self.s.slot_lease_ttl_s * 1000)
            self.flow.slots.renew([job_id], ttl_ms=ttl_ms)  # nobody can submit before then anyway
            self._schedule(job_id, until + self.rt.rng.randint(0, JITTER_MAX_MS))
            self.rt.metrics.job_deferred("paused")
        return moved.ok

    def _on_transient_submit_error(
        self, job_id: str, err: FalTransientError, *, probe: bool, attempt: int, before: BreakerState
    ) -> None:
        """fal did not accept the request: free the slot and reservation, retry later if allowed."""
        record_breaker(self.rt, not counts_against_breaker(err), probe=probe, before=before)
        if err.status_code in (429, 503) and err.retry_after_s:
            # fal asked everyone to back off: hold every worker's submits until then.
            paused = self.flow.rate.pause(min(err.retry_after_s, self.s.retry_after_max_s))
            self.rt.metrics.rate_limit_paused(err.retry_after_s)
            log.info("fal asked to retry after %.1fs; cluster paused until %d", err.retry_after_s, paused)
        self.flow.budget.release(job_id)
        admitted = self.flow.slots.release(job_id)
        self.rt.dispatch(admitted)
        reason = f"http_{err.status_code}" if err.status_code else "connect"
        self.retry_later(
            job_id,
            reason=reason,
            attempt=attempt,
            retry_after_s=err.retry_after_s,
            failure=Failure("fal_unavailable", err.message),
            from_states=[JobState.SUBMITTING],
        )

    # ------------------------------------------------------------------ unknown outcomes
    def ambiguous(self, job_id: str, *, reason: str) -> Outcome:
        """A submit whose outcome is unknown: fal may hold (and bill) the request."""
        policy = self.s.ambiguous_submit_policy
        self.rt.metrics.ambiguous_submit(policy.value)
        estimate = self.flow.budget.reservation(job_id)
        # Assume the worst for money: the unknown attempt is charged at its estimate.
        self.flow.budget.settle(job_id, estimate.micro if estimate else 0)
        log.warning("ambiguous submit of job %s (%s); policy=%s", job_id, reason, policy.value)
        if policy is AmbiguousSubmitPolicy.RESUBMIT:
            moved = self.rt.store.transition(
                job_id, [JobState.SUBMITTING], JobState.DEFERRED, ambiguous_submits=1, incr_ambiguous_count=1
            )
            if moved.ok:
                self._schedule(job_id, self._now_ms() + 1000)
            return Outcome.AMBIGUOUS
        # Keep the slot until its lease runs out: fal may be running the request we cannot see.
        self.fail(
            job_id,
            Failure(
                "ambiguous_submit",
                f"submit outcome unknown ({reason}); not resubmitted to avoid paying twice",
            ),
            dead_letter=True,
            release_slot=False,
            from_states=[JobState.SUBMITTING],
        )
        return Outcome.AMBIGUOUS

    def resolve_unknown(self, job_id: str, rec: dict[str, Any]) -> Outcome:
        """A job found in SUBMITTING with no fal request id: its submitter died or timed out mid-call."""
        started = int(rec.get("submit_started_at_ms") or 0)
        if self._now_ms() - started < self._submit_timeout_s() * 1000:
            return Outcome.DUPLICATE  # the first submitter may still be waiting for fal's answer
        return self.ambiguous(job_id, reason="worker lost during submit")

    # ------------------------------------------------------------------ parking and failing
    def retry_later(
        self,
        job_id: str,
        *,
        reason: str,
        attempt: int,
        retry_after_s: float | None,
        failure: Failure,
        from_states: list[JobState],
    ) -> None:
        """Schedule a new attempt with full-jitter backoff, or fail when attempts/deadline/budget run out."""
        rec = self.rt.store.get(job_id) or {}
        if attempt >= self.s.retry_max_attempts:
            self.fail(
                job_id,
                Failure("retries_exhausted", f"{failure.message} (after {attempt} attempts)", failure.detail),
                dead_letter=True,
                from_states=from_states,
            )
            return
        delay_s = backoff_s(
            attempt,
            base_s=self.s.retry_base_s,
            cap_s=self.s.retry_cap_s,
            rng=self.rt.rng,
            retry_after_s=min(retry_after_s, self.s.retry_after_max_s) if retry_after_s else None,
        )
        if not self.flow.retry_budget.try_spend():
            # Retries are over their share of traffic: park longer instead of failing.
            delay_s = max(delay_s, self.s.retry_cap_s)
            reason = "retry_budget"
        if self._past_deadline(rec, extra_s=delay_s):
            self.fail(
                job_id,
                Failure("deadline_exceeded", failure.message, failure.detail),
                dead_letter=True,
                from_states=from_states,
            )
            return
        self.rt.metrics.retry(reason)
        self.defer(
            job_id,
            until_ms=self._now_ms() + int(delay_s * 1000),
            reason=reason,
            from_states=from_states,
        )

    def defer(
        self,
        job_id: str,
        *,
        until_ms: int,
        reason: str,
        from_states: list[JobState] | None = None,
    ) -> None:
        """Park a job until ``until_ms`` (+ jitter so a crowd does not return at one instant)."""
        until_ms += self.rt.rng.randint(0, JITTER_MAX_MS)
        allowed = from_states or list(PRE_SUBMIT_STATES)
        moved = self.rt.store.transition(
            job_id, allowed, JobState.DEFERRED, deferred_reason=reason, deferred_until_ms=until_ms
        )
        if moved.ok:
            self._schedule(job_id, until_ms)
            self.rt.metrics.job_deferred(reason)

    def _schedule(self, job_id: str, at_ms: int) -> None:
        self.rt.redis.zadd(self.rt.store.keys.delayed, {job_id: at_ms})

    def _block(self, job_id: str, *, scope: str) -> None:
        moved = self.rt.store.transition(job_id, PRE_SUBMIT_STATES, JobState.BLOCKED, blocked_scope=scope)
        if moved.ok:
            self.rt.redis.zadd(self.rt.store.keys.blocked, {job_id: self._now_ms()}, nx=True)
            self.rt.metrics.budget_rejection(scope)

    def fail(
        self,
        job_id: str,
        failure: Failure,
        *,
        dead_letter: bool,
        release_slot: bool = True,
        from_states: list[JobState] | None = None,
    ) -> bool:
        """Finish the job FAILED (once), optionally into the dead-letter set, and free its resources."""
        from worker.finalize import finish_job

        ok = finish_job(
            self.rt,
            job_id,
            JobState.FAILED,
            record={"error": failure.as_record(), "dead_letter_reason": failure.type if dead_letter else ""},
            event={"error_type": failure.type, "error_message": failure.message},
            dead_letter=dead_letter,
            allowed_from=from_states or "*",
        )
        if release_slot:
            self._free(job_id)
        else:
            self.flow.budget.release(job_id)
        return ok

    def _cancel_pre_submit(self, job_id: str) -> Outcome:
        from worker.finalize import finish_job

        finish_job(
            self.rt,
            job_id,
            JobState.CANCELLED,
            record={"error": {"type": "cancelled", "message": "cancelled before submission"}},
            event={"error_type": "cancelled", "error_message": "cancelled before submission"},
            allowed_from=PRE_SUBMIT_STATES,
        )
        self._free(job_id)
        return Outcome.CANCELLED

    def _free(self, job_id: str, *, settle_micro: Any = None) -> None:
        """Give back a finished job's slot and reservation (idempotent), admitting the next jobs."""
        if isinstance(settle_micro, int):
            self.flow.budget.settle(job_id, settle_micro)
        else:
            self.flow.budget.release(job_id)
        self.rt.dispatch(self.flow.slots.release(job_id))

    def _give_back_probe(self, probe: bool) -> None:
        if probe:
            self.flow.breaker.release_probe()

    def _ensure_tracked(self, job_id: str) -> None:
        self.rt.redis.zadd(self.rt.store.keys.track, {job_id: self._now_ms()}, nx=True)

    # ------------------------------------------------------------------ helpers
    def _submit_timeout_s(self) -> float:
        s = self.s
        return s.fal_connect_timeout_s + s.fal_write_timeout_s + s.fal_read_timeout_s + s.fal_pool_timeout_s

    def _past_deadline(self, rec: dict[str, Any], *, extra_s: float = 0.0) -> bool:
        created = int(rec.get("created_at_ms") or 0)
        deadline_s = float(rec.get("deadline_s") or self.s.job_deadline_s)
        return bool(created) and self._now_ms() + extra_s * 1000 > created + deadline_s * 1000

    def _now_ms(self) -> int:
        sec, usec = self.rt.redis.time()
        return int(sec) * 1000 + int(usec) // 1000
