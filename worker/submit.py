"""Admission and submission of one job: the body of the ``reframe.submit`` task.

A run first takes the job's gate as a new attempt (:func:`worker.lifecycle.begin`); a duplicate
delivery finds the gate taken, or the job past its pre-submit states, and stops without touching
anything. The owning attempt then passes the checks, each one atomic script in Redis shared by
every worker: breaker -> budget -> slot -> rate. The reservation and the slot are taken fenced by
the attempt, so a run that lost the job cannot take them either. A job that may not go now is
parked where the cluster finds it again and the task returns at once.

Why no path here can pay twice (README, "Never paying twice"):

* a submit is repeated only after an answer that proves fal did not accept it (connection refused,
  408/409/429, fal's own 5xx); a failure after the body may have reached fal is *ambiguous* and
  follows ``REFRAME_AMBIGUOUS_SUBMIT_POLICY`` (dead letter by default, and the slot stays held);
* the SUBMITTING intent is written, fenced by the attempt, before the POST: a crash mid-call is
  found as SUBMITTING and resolved as ambiguous, never retried blindly; a duplicate run cannot
  write it because the attempt no longer owns the gate;
* a job with a fal request id is never submitted again: only :mod:`worker.tracker`, on what fal
  *said* (a failed request), can start a new attempt;
* a receipt that arrives after the attempt lost the job (a late POST) is recorded and that request
  is cancelled at fal, never dropped and never resubmitted.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import CancelledError, Future
from enum import StrEnum

from config import UnknownDurationPolicy
from worker import lifecycle
from worker.contracts.canonical import canonical_key, result_served
from worker.contracts.dedupe import ClaimKind, is_canonical
from worker.contracts.durable import NotReplicated
from worker.contracts.media import probe_media
from worker.contracts.models import PRE_SUBMIT_STATES, JobState
from worker.contracts.quotes import ModelLimits
from worker.contracts.record import JobRecord
from worker.contracts.store import BudgetAction, Fence, SlotAction
from worker.contracts.tenants import TenantRegistry
from worker.fal import (
    FalAmbiguousError,
    FalAuthError,
    FalError,
    FalPermanentError,
    FalTransientError,
    SubmitReceipt,
)
from worker.fal.webhooks import webhook_url
from worker.flow import Account, BreakerDecision, BreakerState, RateDecision, UnknownAccount
from worker.flow.budget import BudgetRefused
from worker.flow.slots import SlotRefused
from worker.lifecycle import Failure, attempt_fence, record_breaker
from worker.runtime import Runtime

log = logging.getLogger(__name__)


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
    LOST = "lost"
    """The run's attempt lost the job to another actor on the way; it touched nothing."""
    ATTACHED = "attached"
    """Identical to a job in flight: parked until that job ends (it will not pay)."""
    SERVED = "served"
    """Identical to a succeeded job: finished with a copy of its result, no fal call."""
    UNCONFIRMED = "unconfirmed"
    """fal accepted the request, but too few Redis replicas acknowledged its receipt."""


def submit_timeout_s(rt: Runtime) -> float:
    """The longest one submit POST can take (every httpx phase at its limit)."""
    s = rt.settings
    return s.fal_connect_timeout_s + s.fal_write_timeout_s + s.fal_read_timeout_s + s.fal_pool_timeout_s


class Submitter:
    """Runs the gate and the fal submit for one job at a time (thread-safe; shared per process)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.s = rt.settings
        self.flow = rt.flow
        self.tenants = TenantRegistry(rt.redis, rt.store.keys)

    # ------------------------------------------------------------------ entry point
    def handle(self, job_id: str) -> Outcome:
        """Drive ``job_id`` one step: submit it, park it, or recognise a duplicate delivery."""
        rec = self.rt.store.record(job_id)
        if rec is None:
            # Its record expired or was lost: forget it everywhere, so nothing re-dispatches it.
            forgotten = self.rt.store.forget(job_id)
            self.rt.dispatch(forgotten.admitted)
            return Outcome.MISSING
        if rec.state.terminal:
            return Outcome.DUPLICATE
        if rec.state.at_fal or rec.fal_request_id:
            return Outcome.DUPLICATE  # the tracker follows it
        if rec.state == JobState.SUBMITTING:
            return self.resolve_unknown(rec)
        if rec.cancel_requested:
            done = lifecycle.cancel(
                self.rt,
                rec,
                fence=Fence(from_states=PRE_SUBMIT_STATES),
                message="cancelled before submission",
            )
            return Outcome.CANCELLED if done else Outcome.LOST
        gate = lifecycle.begin(self.rt, job_id)
        if not gate.owner:
            return Outcome.DUPLICATE
        attempt = gate.attempt
        if rec.state == JobState.QUEUED and rec.attempts == 0:
            self.rt.metrics.job_enqueued(rec.priority.value)
        if rec.state == JobState.DEFERRED:
            self._account_deferral(rec)
        late = lifecycle.past_deadline(self.rt, rec)
        if rec.get("dedupe") == "1":
            # a job past its deadline may still be served an identical job's result (no submit)
            step = self._pay_once(rec, attempt, serve_only=late)
            if isinstance(step, Outcome):
                return step
            rec = step
        if late:
            failure = Failure("deadline_exceeded", "job was not submitted before its deadline")
            lifecycle.fail(self.rt, rec, failure, fence=attempt_fence(attempt, states=PRE_SUBMIT_STATES))
            return Outcome.FAILED
        return self._gate_and_submit(rec, attempt)

    # ------------------------------------------------------------------ paying once
    def _pay_once(self, rec: JobRecord, attempt: str, *, serve_only: bool = False) -> JobRecord | Outcome:
        """Before the gate reserves anything: lead the job's canonical input, attach to a live
        leader, or be served a succeeded one's result (README, "Paying once for identical work").

        The canonical key is computed once per job through the guarded fetcher and kept on the
        record (``dedupe_key``: the key, or ``none (<why>)``); a job without one goes on alone. A
        result is reused only while fal still serves its file (one ranged GET); otherwise that
        success is forgotten and this job does the work. Returns the record to go on with, or the
        outcome when the job is parked or finished here. With ``serve_only`` (the job is past its
        deadline) it is only served, never parked: the caller fails it otherwise.
        """
        stored = rec.get("dedupe_key")
        if not stored:
            key = canonical_key(rec.input, fetcher=self.rt.fetcher, settings=self.s)
            stored = key.stored
            self.rt.store.set_fields(rec.id, dedupe_key=stored)
            rec = JobRecord.from_hash({**rec.extra, "dedupe_key": stored})
            if key.value is None:
                self.rt.metrics.dedup("no_key")
        if not is_canonical(stored):
            return rec
        refuse = ""
        for _ in range(2):
            claim = lifecycle.claim_identical(self.rt, rec, attempt, stored, refuse_done=refuse)
            if claim.kind is not ClaimKind.SERVED:
                break
            video = (claim.result or {}).get("video")
            url = video.get("url") if isinstance(video, dict) else None
            if isinstance(url, str) and result_served(url, fetcher=self.rt.fetcher, settings=self.s):
                done = lifecycle.serve_identical(self.rt, rec, attempt, claim)
                return Outcome.SERVED if done else Outcome.LOST
            log.info("job %s: the result of identical job %s is gone at fal; not reused", rec.id, claim.other)
            refuse = claim.other
        if claim.kind is ClaimKind.REFUSED:
            return Outcome.LOST
        if serve_only:
            return rec
        if claim.kind is ClaimKind.FOLLOW:
            moved = lifecycle.attach(self.rt, rec.id, attempt, leader=claim.other)
            if moved.ok and rec.get("dedupe_leader") != claim.other:
                self.rt.metrics.dedup("attached")
            return Outcome.ATTACHED if moved.ok else Outcome.LOST
        if claim.kind is ClaimKind.LEAD and rec.get("dedupe_role") != "leader":
            self.rt.metrics.dedup("led")
        elif claim.kind is ClaimKind.ALONE:
            self.rt.metrics.dedup("alone")
        return rec

    def _account_deferral(self, rec: JobRecord) -> None:
        """Add the time a deferred job was parked to ``deferred_total_ms``.

        Queue-wait metrics subtract that total, so deliberate delays (backoff, an open breaker, a
        rate pause) do not look like the cluster being slow.
        """
        since = rec.ts(JobState.DEFERRED)
        if since:
            self.rt.store.incr_field(rec.id, "deferred_total_ms", max(0, self.rt.now_ms() - since))

    # ------------------------------------------------------------------ gate
    def _gate_and_submit(self, rec: JobRecord, attempt: str) -> Outcome:
        job_id = rec.id
        record_key = self.rt.store.keys.job(job_id)
        pool = self.flow.accounts
        decision: BreakerDecision | None = None
        if not pool.multi:
            # One account: its breaker is asked first, the cheapest refusal (as before accounts).
            decision = self.flow.breaker.allow()
            if not decision.allowed:
                lifecycle.defer(
                    self.rt, job_id, attempt, until_ms=decision.retry_at_ms, reason="breaker_open"
                )
                return Outcome.DEFERRED
        probe = decision.probe if decision else False
        estimate = self._estimate_micro(rec)
        if isinstance(estimate, Failure):
            self._give_back_probe(probe)
            lifecycle.fail(self.rt, rec, estimate, fence=attempt_fence(attempt, states=PRE_SUBMIT_STATES))
            return Outcome.FAILED
        try:
            budget = self.flow.budget.reserve(
                job_id, estimate, record_key=record_key, attempt=attempt, tenant=rec.get("tenant")
            )
            if not budget.ok:
                self._give_back_probe(probe)
                lifecycle.block(self.rt, job_id, attempt, scope=str(budget.scope))
                return Outcome.BLOCKED
            slot = self.flow.slots.acquire(job_id, rec.priority.value, record_key=record_key, attempt=attempt)
        except (BudgetRefused, SlotRefused):
            self._give_back_probe(probe)
            return Outcome.LOST
        if not slot.acquired:
            self._give_back_probe(probe)
            lifecycle.park_waiting(self.rt, job_id, attempt, ahead=slot.ahead)
            return Outcome.WAITING
        try:
            account = pool.get(slot.account)
        except UnknownAccount:
            # a slot on an account removed from the configuration: nothing was sent, so it goes
            # back and the job takes a slot on a configured account (its next run)
            lifecycle.defer(
                self.rt,
                job_id,
                attempt,
                until_ms=self.rt.now_ms(),
                reason="account_removed",
                slot=SlotAction.RELEASE,
                budget=BudgetAction.RELEASE,
            )
            return Outcome.DEFERRED
        if decision is None:
            decision = account.breaker.allow()
            if not decision.allowed:
                return self._breaker_refused(job_id, attempt, account, decision)
            probe = decision.probe
        if not self._take_tenant_token(rec, attempt):
            self._give_back_probe(probe, account)
            return Outcome.DEFERRED
        token = self._take_rate_token(job_id, attempt, account)
        if token is None:
            self._give_back_probe(probe, account)
            return Outcome.DEFERRED
        outcome = self._submit(rec, attempt, probe=probe, breaker_state=decision.state, account=account)
        # After a pushback the first token is a lone probe: its outcome lets the others go.
        account.rate.probe_done(token, outcome in (Outcome.SUBMITTED, Outcome.LOST, Outcome.UNCONFIRMED))
        return outcome

    def _breaker_refused(
        self, job_id: str, attempt: str, account: Account, decision: BreakerDecision
    ) -> Outcome:
        """Several accounts: the breaker of the account the slot is on refuses. That account takes no
        new slot until the breaker may let a probe through; the job gives its slot back and is
        dispatched again at once, to another account's room (nothing was sent: it cannot be paid)."""
        now = self.rt.now_ms()
        self.flow.accounts.drain(account.id, until_ms=max(decision.retry_at_ms, now + 1))
        lifecycle.defer(
            self.rt,
            job_id,
            attempt,
            until_ms=now,
            reason="breaker_open",
            slot=SlotAction.RELEASE,
            budget=BudgetAction.RELEASE,
        )
        return Outcome.DEFERRED

    def _take_tenant_token(self, rec: JobRecord, attempt: str) -> bool:
        """The tenant's own submit rate (``reframe tenants set --submit-rate-per-s``), before the
        cluster's: a short wait in place; a longer one defers the job and gives its slot to the
        next waiter (other tenants are not held up by this tenant's rate)."""
        tenant = rec.get("tenant")
        if not tenant:
            return True
        rate = self.tenants.get(tenant).submit_rate_per_s
        if rate is None:
            return True
        max_wait_ms = int(self.s.max_rate_wait_s * 1000)
        while True:
            decision = self.flow.tenant_rate.try_acquire(tenant, rate)
            if decision.allowed:
                return True
            if decision.retry_after_ms > max_wait_ms:
                until = self.rt.now_ms() + decision.retry_after_ms
                lifecycle.defer(
                    self.rt, rec.id, attempt, until_ms=until, reason="tenant_rate", slot=SlotAction.RELEASE
                )
                return False
            time.sleep(decision.retry_after_ms / 1000)

    def _take_rate_token(
        self, job_id: str, attempt: str, account: Account | None = None
    ) -> RateDecision | None:
        """Wait briefly for a submit token of the slot's account; defer (keeping slot and
        reservation) if it is far off."""
        started = time.monotonic()
        max_wait_ms = int(self.s.max_rate_wait_s * 1000)
        while True:
            decision = (account or self.flow.accounts.first).rate.try_acquire()
            if decision.allowed:
                waited = time.monotonic() - started
                if waited > 0:
                    self.rt.metrics.rate_limit_waited(waited)
                return decision
            if decision.retry_after_ms > max_wait_ms:
                until = self.rt.now_ms() + decision.retry_after_ms
                # Keep the slot alive across the deferral: nobody can submit before then anyway.
                self.flow.slots.renew(
                    [job_id], ttl_ms=decision.retry_after_ms + int(self.s.slot_lease_ttl_s * 1000)
                )
                lifecycle.defer(self.rt, job_id, attempt, until_ms=until, reason=str(decision.reason))
                return None
            time.sleep(decision.retry_after_ms / 1000)

    def _estimate_micro(self, rec: JobRecord) -> int | Failure:
        """Budget estimate from the input's duration (plus a margin), read through the guarded fetcher.

        A failure (nothing was sent to fal) when the input is over the model's limits
        (``max_upload_bytes``, ``max_video_duration_s``: worker/contracts/quotes.py, the rule quotes
        and the producer use too), or when its duration cannot be read and
        ``unknown_duration_policy`` is ``refuse``: without a duration no reservation is an upper
        bound, and the budget must never be under-reserved.
        """
        if rec.estimate_micro:
            return rec.estimate_micro
        url = str(rec.input.get("video_url", ""))
        limits = ModelLimits.from_settings(self.s)
        info = probe_media(
            url, fetcher=self.rt.fetcher, timeout_s=self.s.probe_timeout_s, max_bytes=self.s.probe_max_bytes
        )
        too_large = limits.size_problem(info.size_bytes)
        if too_large:
            return Failure("input_too_large", f"video_url: the video {too_large}")
        duration = info.known_duration_s
        too_long = limits.duration_problem(duration)
        if too_long:
            return Failure("input_too_long", f"video_url: the video {too_long}")
        if duration is None:
            if self.s.unknown_duration_policy is not UnknownDurationPolicy.RESERVE_MAX:
                return Failure(
                    "duration_unknown",
                    "video_url: the input's duration could not be read, so no reservation is an upper "
                    "bound (REFRAME_UNKNOWN_DURATION_POLICY=reserve_max reserves the maximum instead)",
                )
            duration = limits.max_duration_s
            micro = self.flow.budget.estimate_micro(duration)
        else:
            micro = self.flow.budget.estimate_micro(duration + self.s.estimate_margin_s)
        measured = "" if info.known_duration_s is None else f"{info.known_duration_s:.3f}"
        # input_measured_s: only a read duration (the output is verified against it), never the maximum
        self.rt.store.set_fields(
            rec.id, estimate_micro=micro, input_duration_s=f"{duration:.3f}", input_measured_s=measured
        )
        return micro

    # ------------------------------------------------------------------ submit
    def _submit(
        self, rec: JobRecord, attempt: str, *, probe: bool, breaker_state: BreakerState, account: Account
    ) -> Outcome:
        try:
            intent = lifecycle.mark_submitting(self.rt, rec.id, attempt)
        except NotReplicated as err:
            # A failover could lose the intent: no POST (nothing sent, nothing to pay), retry later.
            self._give_back_probe(probe, account)
            log.warning("%s; not submitted, retried later", err)
            lifecycle.unsent(self.rt, rec.id, attempt, reason="redis_not_replicated")
            return Outcome.DEFERRED
        if not intent.ok:
            # Another actor moved the job (cancelled, or a newer attempt): it owns the resources.
            self._give_back_probe(probe, account)
            return Outcome.LOST
        # The intent bound the attempt to its slot's account: that account's key, and no other.
        bound = self.rt.store.field(rec.id, "fal_account") or account.id
        if bound != account.id:
            account = self.flow.accounts.get(bound)
        if self._paused_since_token(rec.id, attempt, now_ms=intent.at_ms, account=account):
            self._give_back_probe(probe, account)
            return Outcome.DEFERRED
        payload = dict(rec.input)
        # With REFRAME_PUBLIC_URL, fal reports the end by webhook to a URL naming this attempt.
        hook = webhook_url(self.s, rec.id, attempt)
        fal = self.rt.fal_for(account.id)
        future: Future[SubmitReceipt] = self.rt.portal.spawn(fal.submit(payload, webhook_url=hook))
        try:
            receipt = future.result(submit_timeout_s(self.rt) + 5)
        except FalAmbiguousError as err:
            record_breaker(self.rt, False, probe=probe, before=breaker_state, account=account.id)
            lifecycle.ambiguous(self.rt, rec, attempt, reason=err.message)
            return Outcome.AMBIGUOUS
        except FalAuthError as err:
            record_breaker(self.rt, True, probe=probe, before=breaker_state, account=account.id)
            lifecycle.key_rejected(self.rt, account.id, err)
            if self.flow.accounts.multi:
                return self._to_another_account(rec, attempt, account, err)
            lifecycle.fail(
                self.rt,
                rec,
                Failure("fal_rejected", err.message, err.detail),
                fence=attempt_fence(attempt, states=[JobState.SUBMITTING]),
            )
            return Outcome.FAILED
        except FalPermanentError as err:
            # A definite "no" from fal: not charged, not counted against provider health.
            record_breaker(self.rt, True, probe=probe, before=breaker_state, account=account.id)
            lifecycle.fail(
                self.rt,
                rec,
                Failure("fal_rejected", err.message, err.detail),
                fence=attempt_fence(attempt, states=[JobState.SUBMITTING]),
            )
            return Outcome.FAILED
        except FalTransientError as err:
            self._on_transient_submit_error(
                rec, attempt, err, probe=probe, before=breaker_state, account=account
            )
            return Outcome.DEFERRED
        except (TimeoutError, CancelledError):
            # The wait ended but the call goes on: its receipt, if any, is recorded when it comes.
            record_breaker(self.rt, False, probe=probe, before=breaker_state, account=account.id)
            future.add_done_callback(lambda f: self._late(rec, attempt, f, account.id))
            lifecycle.ambiguous(
                self.rt, rec, attempt, reason="submit did not finish within the task's deadline"
            )
            return Outcome.AMBIGUOUS
        record_breaker(self.rt, True, probe=probe, before=breaker_state, account=account.id)
        if rec.attempts == 0:
            self.flow.retry_budget.record_first_attempt()
        return self._accepted(rec, attempt, receipt, account)

    def _to_another_account(
        self, rec: JobRecord, attempt: str, account: Account, err: FalAuthError
    ) -> Outcome:
        """fal rejected the key of the slot's account (401/403): the account is drained, the job gives
        its slot and reservation back and is dispatched again at once, to another account.

        Why this cannot pay twice: fal checks the key before it queues anything, so a 401/403 answer
        means no request was created (no request id, nothing to bill); the job has no fal request
        id, and the attempt count is given back, so the resubmit elsewhere is its first request.
        """
        moved = lifecycle.defer(
            self.rt,
            rec.id,
            attempt,
            until_ms=self.rt.now_ms(),
            reason="account_drained",
            states=[JobState.SUBMITTING],
            slot=SlotAction.RELEASE,
            budget=BudgetAction.RELEASE,
            fields={
                "last_error": {"type": "fal_key_rejected", "message": f"account {account.id}: {err.message}"}
            },
            incr={"attempts": -1},
        )
        return Outcome.DEFERRED if moved.ok else Outcome.LOST

    def _accepted(self, rec: JobRecord, attempt: str, receipt: SubmitReceipt, account: Account) -> Outcome:
        try:
            moved = lifecycle.accepted(self.rt, rec, attempt, receipt)
        except NotReplicated as err:
            # The primary holds the receipt and a tracker follows the request; a failover may lose
            # it, and then the job is found SUBMITTING (its intent was acknowledged) and resolved as
            # ambiguous: never submitted again blindly. The request id is logged for reconciliation.
            log.error("%s; the job is followed but not reported submitted", err)
            return Outcome.UNCONFIRMED
        if not moved.ok:
            now = self.rt.store.record(rec.id)
            if now is not None and now.attempt == attempt and now.fal_request_id == receipt.request_id:
                # fal's webhook arrived first and adopted this very request: it is ours, keep it.
                return Outcome.SUBMITTED
            self._cancel_late(receipt, account.id)
            return Outcome.LOST
        if rec.attempts == 0 and rec.created_at_ms:
            # Queue wait excludes deliberate delays: time parked in DEFERRED is not counted.
            fresh = self.rt.store.record(rec.id)
            deferred_ms = fresh.deferred_total_ms if fresh else 0
            wait_s = max(0.0, (moved.at_ms - rec.created_at_ms - deferred_ms) / 1000)
            self.rt.metrics.job_queue_wait(rec.priority.value, wait_s)
        if self.rt.store.cancel_requested(rec.id):
            self._cancel_late(receipt, account.id)
        return Outcome.SUBMITTED

    def _late(self, rec: JobRecord, attempt: str, future: Future[SubmitReceipt], account: str) -> None:
        """A POST we stopped waiting for finished after all: record its receipt against its attempt."""
        if future.cancelled() or future.exception() is not None:
            return
        receipt = future.result()
        try:
            lifecycle.late_receipt(self.rt, rec.id, attempt, receipt, state="ambiguous")
            self._cancel_late(receipt, account)
        except Exception:
            log.exception("recording the late receipt of job %s failed", rec.id)

    def _cancel_late(self, receipt: SubmitReceipt, account: str) -> None:
        """Cancel a request nobody follows (with the key of the account that holds it): fal does not
        bill one cancelled while still queued."""
        self.rt.portal.spawn(self._cancel_quietly(receipt, account))

    async def _cancel_quietly(self, receipt: SubmitReceipt, account: str) -> None:
        try:
            await self.rt.fal_for(account).cancel(receipt)
        except FalError as err:
            log.warning("cancel of late fal request %s failed: %s", receipt.request_id, err)

    def _paused_since_token(
        self, job_id: str, attempt: str, *, now_ms: int, account: Account | None = None
    ) -> bool:
        """True (and the job deferred again, unsent) if fal pushed back after this job took its token.

        The token script already checks the pause; this second look, just before the request goes
        out, closes the window in which another worker's 429 arrives between token and send.
        """
        until = (account or self.flow.accounts.first).rate.paused_until_ms()
        if until is None or until <= now_ms:
            return False
        moved = lifecycle.defer(
            self.rt,
            job_id,
            attempt,
            until_ms=until,
            reason="paused",
            states=[JobState.SUBMITTING],
            incr={"attempts": -1},
        )
        if moved.ok:
            ttl_ms = until - now_ms + int(self.s.slot_lease_ttl_s * 1000)
            self.flow.slots.renew([job_id], ttl_ms=ttl_ms)  # nobody can submit before then anyway
        return moved.ok

    def _on_transient_submit_error(
        self,
        rec: JobRecord,
        attempt: str,
        err: FalTransientError,
        *,
        probe: bool,
        before: BreakerState,
        account: Account,
    ) -> None:
        """fal did not accept the request: free the slot and reservation, retry later if allowed."""
        ok = not lifecycle.counts_against_breaker(err)
        record_breaker(self.rt, ok, probe=probe, before=before, account=account.id)
        if err.status_code in (429, 503) and err.retry_after_s:
            # fal asked this account to back off: hold every worker's submits through it until then.
            paused = account.rate.pause(min(err.retry_after_s, self.s.retry_after_max_s))
            self.rt.metrics.rate_limit_paused(err.retry_after_s)
            log.info("fal asked to retry after %.1fs; cluster paused until %d", err.retry_after_s, paused)
        reason = f"http_{err.status_code}" if err.status_code else "connect"
        counted = JobRecord.from_hash({**rec.extra, "attempts": str(rec.attempts + 1)})
        lifecycle.retry_later(
            self.rt,
            counted,
            attempt,
            reason=reason,
            failure=Failure("fal_unavailable", err.message),
            retry_after_s=err.retry_after_s,
            states=[JobState.SUBMITTING],
        )

    # ------------------------------------------------------------------ unknown outcomes
    def resolve_unknown(self, rec: JobRecord, *, submitter_dead: bool = False) -> Outcome:
        """A job found in SUBMITTING with no fal request id: its submitter died or timed out mid-call.

        Unless its process is known dead (no heartbeat) or it already gave up (an ambiguous submit
        waiting for its webhook), the submitter gets the whole submit timeout first: it may still
        be waiting for fal's answer.
        """
        in_time = self.rt.now_ms() - rec.submit_started_at_ms < (submit_timeout_s(self.rt) + 5) * 1000
        if in_time and not submitter_dead and not lifecycle.awaiting_webhook(rec):
            return Outcome.DUPLICATE
        done = lifecycle.ambiguous(self.rt, rec, rec.attempt, reason="worker lost during submit")
        return Outcome.AMBIGUOUS if done else Outcome.LOST

    def _give_back_probe(self, probe: bool, account: Account | None = None) -> None:
        if probe:
            (account.breaker if account is not None else self.flow.breaker).release_probe()
