"""The verbs of a job's life, as plain functions of the runtime, every one fenced by attempt.

``submit``, ``tracker``, ``cancel`` and ``housekeeper`` call down into this module and never into
each other. Each verb is one fenced script in Redis (:mod:`worker.contracts.store`): it names the
attempt (and, once known, the fal request) it acts for, and the resources it frees go in the same
atomic step as the transition. A late or duplicate actor therefore only learns that it lost and
touches nothing: it cannot free another attempt's slot or reservation, nor move the job.

The fencing rule (docs/design.md): a slot, a reservation, a tracker claim and every transition out
of SUBMITTING, IN_QUEUE and IN_PROGRESS belong to the attempt recorded in the job's ``attempt``
field (and to its ``fal_request_id``); an attempt id is never reused, replays included.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from worker.contracts.dedupe import LEADER_SLACK_S, Claim, is_canonical
from worker.contracts.durable import NotReplicated
from worker.contracts.models import PRE_SUBMIT_STATES, JobState
from worker.contracts.record import JobRecord
from worker.contracts.store import BudgetAction, Fence, GateOutcome, MoveOutcome, SlotAction
from worker.fal import FalAmbiguousError, FalError, FalTransientError, SubmitReceipt, backoff_s
from worker.flow import BreakerState, CircuitBreaker, UnknownAccount
from worker.runtime import Runtime

log = logging.getLogger(__name__)

#: Spread of re-dispatch times so a crowd of deferred jobs does not return at one instant.
JITTER_MAX_MS = 1000
AT_FAL = frozenset({JobState.IN_QUEUE, JobState.IN_PROGRESS})
OUTCOME_BY_STATE = {
    JobState.SUCCEEDED: "succeeded",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
}


@dataclass(frozen=True)
class Failure:
    """Why a job failed, as stored in the record, the result event and the callback."""

    type: str
    message: str
    detail: Any = None

    def as_record(self) -> dict[str, Any]:
        """The ``error`` field of the record (and of the callback body)."""
        out: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.detail is not None:
            out["fal_detail"] = self.detail
        return out


def attempt_fence(attempt: str, *, request_id: str | None = None, states: Iterable[JobState]) -> Fence:
    """The fence of an attempt acting from ``states`` (and for ``request_id`` once fal named it)."""
    return Fence(attempt=attempt, request_id=request_id, from_states=frozenset(states))


# ---------------------------------------------------------------------- provider health
def breaker_of(rt: Runtime, account: str) -> CircuitBreaker:
    """The breaker of fal account ``account`` ('' or an account no longer configured: the first's)."""
    try:
        return rt.flow.accounts.get(account).breaker
    except UnknownAccount:
        return rt.flow.breaker


def record_breaker(
    rt: Runtime, success: bool, *, probe: bool, before: BreakerState | None = None, account: str = ""
) -> None:
    """Report a provider-health outcome to the breaker of the fal account the request went through
    (``account``; '' = the first) and count any state change it causes."""
    breaker = breaker_of(rt, account)
    if before is None:
        before = breaker.state().state
    after = breaker.record(success, probe=probe)
    if after != before:
        rt.metrics.breaker_transition(before.value, after.value)


def key_rejected(rt: Runtime, account: str, err: FalError) -> None:
    """fal rejected ``account``'s key (401/403): drain the account (no new slot goes to it) and say so.

    With one account nothing is drained (there is no other to carry the work; jobs fail as
    ``fal_rejected`` as before) but the rejection is logged the same way."""
    if not rt.flow.accounts.multi:
        log.error("fal rejected the key of account %s (%s)", account or "default", err.status_code)
        return
    try:
        newly = rt.flow.accounts.drain(account)
    except UnknownAccount:
        return
    if newly:
        log.error(
            "fal rejected the key of account %s (%s): account drained; its jobs at fal are resolved "
            "there, new work goes to the other accounts (reframe accounts undrain %s after fixing it)",
            account,
            err.status_code,
            account,
        )


def counts_against_breaker(err: FalError) -> bool:
    """Provider-health failures open the breaker; 4xx and 429 (the rate limiter's job) do not."""
    if isinstance(err, FalAmbiguousError):
        return True
    if isinstance(err, FalTransientError):
        return err.status_code is None or err.status_code >= 500
    return False


# ---------------------------------------------------------------------- before fal
def begin(rt: Runtime, job_id: str) -> GateOutcome:
    """Take the job's gate as a new attempt (a duplicate delivery finds it busy and stops)."""
    return rt.store.gate(job_id, gate_ttl_ms=int(rt.settings.gate_ttl_s * 1000), process_id=rt.process_id)


def _dispatch(rt: Runtime, moved: MoveOutcome) -> MoveOutcome:
    if moved.admitted:
        rt.dispatch(moved.admitted)
    return moved


def park_waiting(rt: Runtime, job_id: str, attempt: str, *, ahead: int) -> MoveOutcome:
    """The attempt found no free slot: the job waits in its priority queue (already queued)."""
    return rt.store.move(
        job_id,
        JobState.WAITING,
        attempt_fence(attempt, states=PRE_SUBMIT_STATES),
        fields={"slots_ahead": ahead, "gate_until_ms": 0},
    )


def block(rt: Runtime, job_id: str, attempt: str, *, scope: str) -> MoveOutcome:
    """The budget has no room: the job waits visibly in BLOCKED (retried when room appears)."""
    moved = rt.store.move(
        job_id,
        JobState.BLOCKED,
        attempt_fence(attempt, states=PRE_SUBMIT_STATES),
        blocked=True,
        fields={"blocked_scope": scope, "gate_until_ms": 0},
    )
    if moved.ok:
        rt.metrics.budget_rejection(scope)
    return moved


def defer(
    rt: Runtime,
    job_id: str,
    attempt: str,
    *,
    until_ms: int,
    reason: str,
    states: Iterable[JobState] = PRE_SUBMIT_STATES,
    request_id: str | None = None,
    slot: SlotAction = SlotAction.KEEP,
    budget: BudgetAction = BudgetAction.KEEP,
    settle_micro: int = 0,
    fields: Mapping[str, Any] | None = None,
    incr: Mapping[str, int] | None = None,
    ledger_kind: str = "settled",
) -> MoveOutcome:
    """Park the job until ``until_ms`` (+ jitter); the housekeeper dispatches it again then."""
    until_ms += rt.rng.randint(0, JITTER_MAX_MS)
    moved = rt.store.move(
        job_id,
        JobState.DEFERRED,
        attempt_fence(attempt, request_id=request_id, states=states),
        slot=slot,
        budget=budget,
        settle_micro=settle_micro,
        park_at_ms=until_ms,
        untrack=request_id is not None,
        fields={
            "deferred_reason": reason,
            "deferred_until_ms": until_ms,
            "gate_until_ms": 0,
            **(fields or {}),
        },
        incr=incr,
        ledger_kind=ledger_kind,
    )
    if moved.ok:
        rt.metrics.job_deferred(reason)
    return _dispatch(rt, moved)


def mark_submitting(rt: Runtime, job_id: str, attempt: str) -> MoveOutcome:
    """Write the intent before the POST: only the attempt that owns the gate may. The same step binds
    the attempt to the fal account of its slot (``fal_account``): its submit, status, result, cancel
    and webhook use that account's key and no other.

    With ``REFRAME_REDIS_MIN_REPLICAS``, the intent counts only once that many replicas acknowledged
    it (worker/contracts/durable.py); else :class:`NotReplicated` is raised and the caller sends
    nothing (:func:`unsent`).
    """
    # A token only this call writes. A dropped connection can lose the script's reply after the
    # script ran: the caller then sees a connection error (or, where the client sends the command
    # again, a fence that refuses the second run against the first run's own write). Without the
    # token either would read as "not written" or "another actor moved the job", the POST would not
    # be sent, and the job would sit SUBMITTING until the ambiguous policy dead-letters it and
    # charges its estimate (tests/chaos/test_lost_replies.py).
    token = uuid.uuid4().hex
    at_ms = rt.now_ms()
    fields = {
        "submit_started_at_ms": at_ms,
        "submit_process": rt.process_id,
        "submit_token": token,
        "gate_until_ms": 0,
    }
    what = f"job {job_id}: the SUBMITTING intent"
    with rt.replication.pinned(rt.redis) as conn:
        try:
            moved = rt.store.on(conn).move(
                job_id,
                JobState.SUBMITTING,
                attempt_fence(attempt, states=PRE_SUBMIT_STATES),
                fields=fields,
                incr={"attempts": 1},
                bind_account=True,
            )
        except redis.ConnectionError:
            if not _wrote_intent(rt, job_id, attempt, token):
                raise  # it did not run: nothing is written, nothing sent; the gate's TTL redispatches
            moved = MoveOutcome(ok=False, state=JobState.SUBMITTING.value)
        if (
            not moved.ok
            and moved.state == JobState.SUBMITTING.value
            and _wrote_intent(rt, job_id, attempt, token)
        ):
            # Our own intent, whose reply was lost. With replicas to wait for, the connection that
            # wrote it is gone, so no WAIT can vouch for it: it counts as not acknowledged (not sent).
            if rt.replication.on:
                raise NotReplicated(
                    what,
                    acked=0,
                    wanted=rt.replication.min_replicas,
                    timeout_ms=rt.replication.timeout_ms,
                    detail="the write's reply was lost with its connection",
                )
            log.info("job %s: the SUBMITTING intent's reply was lost; the intent is ours", job_id)
            return MoveOutcome(ok=True, state=JobState.SUBMITTING.value, at_ms=at_ms)
        if moved.ok:
            rt.replication.confirm(conn, what)
    return moved


def _wrote_intent(rt: Runtime, job_id: str, attempt: str, token: str) -> bool:
    """Whether the record holds the intent this call wrote (state, attempt and token)."""
    rec = rt.store.record(job_id)
    return (
        rec is not None
        and rec.state is JobState.SUBMITTING
        and rec.attempt == attempt
        and rec.get("submit_token") == token
    )


def unsent(rt: Runtime, job_id: str, attempt: str, *, reason: str) -> MoveOutcome:
    """The intent was not acknowledged by enough replicas: the POST is not sent; the attempt is
    undone (SUBMITTING -> DEFERRED, attempts back, slot and reservation freed) and the housekeeper
    dispatches the job again after the retry base delay.

    Why this cannot pay twice: nothing went to fal. If a failover lost the intent, the job is back
    in its pre-submit state and this fenced move finds it there and does nothing; if the intent
    survived, this move takes the job out of SUBMITTING, so nobody resolves it as ambiguous. If
    this move is lost too, the job stays SUBMITTING without a request and is resolved as
    ambiguous, the conservative path (README, "Never paying twice").
    """
    delay_ms = int(rt.settings.retry_base_s * 1000)
    return defer(
        rt,
        job_id,
        attempt,
        until_ms=rt.now_ms() + delay_ms,
        reason=reason,
        states=[JobState.SUBMITTING],
        slot=SlotAction.RELEASE,
        budget=BudgetAction.RELEASE,
        incr={"attempts": -1},
    )


def accepted(rt: Runtime, rec: JobRecord, attempt: str, receipt: SubmitReceipt) -> MoveOutcome:
    """fal accepted the attempt's request: record the receipt and hand the job to a tracker.

    When the attempt has lost the job meanwhile (declared ambiguous while this process was
    stopped, cancelled), the receipt is not dropped: it is recorded as a late receipt and the
    request is cancelled at fal by the caller, so nothing is paid for a request nobody follows.

    With ``REFRAME_REDIS_MIN_REPLICAS``, a receipt that replicas did not acknowledge raises
    :class:`NotReplicated` *after* the job was handed to a tracker (the primary has it, so it is
    followed); the caller does not report the job submitted (README, "Redis durability").
    """
    claim_ms = int(rt.settings.tracker_claim_ttl_s * 1000)
    # With fal webhooks on, the webhook finishes the job; a tracker looks only after the grace.
    grace_ms = int(rt.settings.webhook_grace_s * 1000) if rt.settings.webhooks_on else 0
    mine = rt.track_hook is not None and not grace_ms
    track_at_ms = rt.now_ms() + (grace_ms or (claim_ms if mine else 0))
    unconfirmed: NotReplicated | None = None
    with rt.replication.pinned(rt.redis) as conn:
        moved = rt.store.on(conn).move(
            rec.id,
            JobState.IN_QUEUE,
            attempt_fence(attempt, states=[JobState.SUBMITTING]),
            track_at_ms=track_at_ms,
            track_by=rt.process_id if mine else "",
            fields={
                "fal_request_id": receipt.request_id,
                "fal_status_url": receipt.status_url,
                "fal_response_url": receipt.response_url,
                "fal_cancel_url": receipt.cancel_url,
                "queue_position": "" if receipt.queue_position is None else receipt.queue_position,
            },
        )
        if moved.ok:
            try:
                rt.replication.confirm(conn, f"job {rec.id}: the receipt of fal request {receipt.request_id}")
            except NotReplicated as err:
                unconfirmed = err
    if not moved.ok:
        late_receipt(rt, rec.id, attempt, receipt, state=moved.state)
        return moved
    if grace_ms:
        # Nobody follows the request during the grace: its slot lease must outlast it.
        rt.flow.slots.renew([rec.id], ttl_ms=grace_ms + int(rt.settings.slot_lease_ttl_s * 1000))
    else:
        rt.flow.slots.renew([rec.id])
        if rt.track_hook is not None:
            rt.track_hook(rec.id)
    if unconfirmed is not None:
        raise unconfirmed
    return moved


def adopted(rt: Runtime, rec: JobRecord, attempt: str, receipt: SubmitReceipt) -> MoveOutcome:
    """fal's webhook revealed the request of the attempt's submit whose answer was lost.

    The job is still SUBMITTING, owned by that attempt: it moves to IN_QUEUE with the request id
    (fenced like :func:`accepted`), tracked after the webhook grace as a safety net; the caller
    finishes it from the webhook at once. Nothing is submitted again.
    """
    grace_ms = int(rt.settings.webhook_grace_s * 1000)
    moved = rt.store.move(
        rec.id,
        JobState.IN_QUEUE,
        attempt_fence(attempt, states=[JobState.SUBMITTING]),
        track_at_ms=rt.now_ms() + grace_ms,
        track_by="",
        fields={
            "fal_request_id": receipt.request_id,
            "fal_status_url": receipt.status_url,
            "fal_response_url": receipt.response_url,
            "fal_cancel_url": receipt.cancel_url,
            "adopted_by": "webhook",
        },
    )
    if moved.ok:
        rt.flow.slots.renew([rec.id], ttl_ms=grace_ms + int(rt.settings.slot_lease_ttl_s * 1000))
    return moved


def resolve_ambiguous(
    rt: Runtime,
    rec: JobRecord,
    attempt: str,
    request_id: str,
    *,
    billed_micro: int,
    fields: Mapping[str, Any] | None = None,
) -> MoveOutcome:
    """fal's webhook revealed the request of a submit already dead-lettered as ambiguous.

    The job is not reopened: its life ended (event and callback published) and replaying is an
    operator's decision. The request id is recorded, the charge is corrected from the estimate the
    dead letter settled to what fal billed, and the slot held for the unseen request is freed, in
    one script fenced by the submitting attempt (``worker/lua/ambiguous_resolve.lua``).
    """
    # the dead letter charged the periods of the reservation, taken just before the submit
    at = time.gmtime((rec.submit_started_at_ms or rt.now_ms()) / 1000)
    moved = rt.store.resolve_ambiguous(
        rec.id,
        attempt,
        request_id,
        charged_micro=int(rec.estimate_micro or 0),
        billed_micro=int(billed_micro),
        fields=fields,
        day=f"{at.tm_year:04d}-{at.tm_mon:02d}-{at.tm_mday:02d}",
        month=f"{at.tm_year:04d}-{at.tm_mon:02d}",
        tenant=rec.get("tenant"),
    )
    if not moved.ok:
        return moved
    rt.metrics.spent((billed_micro - int(rec.estimate_micro or 0)) / 1e6)  # a refund is not counted
    return _dispatch(rt, moved)


def late_receipt(rt: Runtime, job_id: str, attempt: str, receipt: SubmitReceipt, *, state: str) -> None:
    """Record a fal request accepted for an attempt that had already lost the job."""
    log.warning(
        "late submit receipt: job %s attempt %s got fal request %s while the job is %s",
        job_id,
        attempt,
        receipt.request_id,
        state or "gone",
    )
    rt.redis.xadd(
        rt.store.keys.late_receipts,
        {
            "job_id": job_id,
            "attempt": attempt,
            "request_id": receipt.request_id,
            "cancel_url": receipt.cancel_url,
            "status_url": receipt.status_url,
            "state": state,
        },
        maxlen=100_000,
        approximate=True,
    )


def started(rt: Runtime, job_id: str, attempt: str, request_id: str) -> MoveOutcome:
    """fal reports the attempt's request IN_PROGRESS."""
    return rt.store.move(
        job_id,
        JobState.IN_PROGRESS,
        attempt_fence(attempt, request_id=request_id, states=[JobState.IN_QUEUE]),
        fields={"queue_position": ""},
    )


def retry_later(
    rt: Runtime,
    rec: JobRecord,
    attempt: str,
    *,
    reason: str,
    failure: Failure,
    retry_after_s: float | None,
    states: Iterable[JobState],
    request_id: str | None = None,
    fields: Mapping[str, Any] | None = None,
) -> str:
    """The attempt ended without being billed (fal refused it, or fal said the run failed).

    A new attempt is scheduled with full-jitter backoff, or the job fails when attempts, the
    deadline or the retry budget run out. Either way the attempt's slot and reservation are freed in
    the same fenced step. Returns ``"retrying"``, ``"failed"`` or ``"stale"`` (the fence refused).
    """
    s = rt.settings
    fence = attempt_fence(attempt, request_id=request_id, states=states)
    if rec.attempts >= s.retry_max_attempts:
        failed = Failure(
            "retries_exhausted", f"{failure.message} (after {rec.attempts} attempts)", failure.detail
        )
        return "failed" if fail(rt, rec, failed, fence=fence) else "stale"
    delay_s = backoff_s(
        max(1, rec.attempts),
        base_s=s.retry_base_s,
        cap_s=s.retry_cap_s,
        rng=rt.rng,
        retry_after_s=min(retry_after_s, s.retry_after_max_s) if retry_after_s else None,
    )
    if not rt.flow.retry_budget.try_spend():
        # Retries are over their share of traffic: park longer instead of failing.
        delay_s = max(delay_s, s.retry_cap_s)
        reason = "retry_budget"
    if past_deadline(rt, rec, extra_s=delay_s):
        failed = Failure("deadline_exceeded", failure.message, failure.detail)
        return "failed" if fail(rt, rec, failed, fence=fence) else "stale"
    moved = defer(
        rt,
        rec.id,
        attempt,
        until_ms=rt.now_ms() + int(delay_s * 1000),
        reason=reason,
        states=states,
        request_id=request_id,
        slot=SlotAction.RELEASE,
        budget=BudgetAction.RELEASE,
        fields={"last_error": {"type": failure.type, "message": failure.message}, **(fields or {})},
    )
    if moved.ok:
        rt.metrics.retry(reason)
        return "retrying"
    return "stale"


def past_deadline(rt: Runtime, rec: JobRecord, *, extra_s: float = 0.0) -> bool:
    """True when the job cannot be submitted (``extra_s`` from now) before its deadline."""
    deadline_s = rec.deadline_s or rt.settings.job_deadline_s
    created = rec.created_at_ms
    return bool(created) and rt.now_ms() + extra_s * 1000 > created + deadline_s * 1000


# ---------------------------------------------------------------------- the end of a life
def finish(
    rt: Runtime,
    rec: JobRecord,
    to: JobState,
    *,
    fence: Fence,
    slot: SlotAction = SlotAction.RELEASE,
    budget: BudgetAction = BudgetAction.RELEASE,
    settle_micro: int = 0,
    dead_letter: bool = False,
    failure: Failure | None = None,
    fields: Mapping[str, Any] | None = None,
    event: Mapping[str, Any] | None = None,
    callback: Mapping[str, Any] | None = None,
    ledger_kind: str = "settled",
    billed_s: float | None = None,
    copy: Mapping[str, Any] | None = None,
) -> bool:
    """End the job's life once: state, resources, event and callback in one step. True if it did.

    A settlement appends one cost-ledger entry of ``ledger_kind`` (``settled`` from the output,
    ``estimate`` when the outcome is unknown), with ``billed_s`` when fal's bill is known.
    ``copy``: the output copy entry of a success (:mod:`worker.output_copy` publishes the held
    event and callback once the output is stored)."""
    record = dict(fields or {})
    ev = dict(event or {})
    cb: dict[str, Any] = {"video": None, "cost_usd": None, "error": None, **(callback or {})}
    if failure is not None:
        record["error"] = failure.as_record()
        record["dead_letter_reason"] = failure.type if dead_letter else ""
        ev.update(error_type=failure.type, error_message=failure.message)
        cb["error"] = failure.as_record()
    hold_ms = int(rt.settings.ambiguous_slot_hold_s * 1000)
    moved = rt.store.finish(
        rec.id,
        to,
        fence,
        event_id=rec.event_id,
        slot=slot,
        budget=budget,
        settle_micro=settle_micro,
        hold_ms=hold_ms,
        dead_letter=dead_letter,
        fields=record,
        event=ev,
        callback=cb,
        idempotency_key=rec.idempotency_key,
        ledger_kind=ledger_kind,
        billed_s="" if billed_s is None else f"{billed_s:g}",
        copy=copy,
    )
    if not moved.ok:
        return False
    _dispatch(rt, moved)
    if "deduped_from" not in record:
        release_identical(rt, rec)
    e2e_s = max(0.0, (moved.at_ms - rec.created_at_ms) / 1000) if rec.created_at_ms else 0.0
    label = "dead_lettered" if dead_letter else OUTCOME_BY_STATE[to]
    rt.metrics.job_finished(label, rec.priority.value, e2e_s)
    if copy is None:  # else published by the copier, with the stored location
        rt.metrics.result_published()
    if budget is BudgetAction.SETTLE and settle_micro > 0:
        rt.metrics.spent(settle_micro / 1e6)
    if dead_letter and failure is not None:
        rt.metrics.dead_letter(failure.type)
    return True


def fail(
    rt: Runtime,
    rec: JobRecord,
    failure: Failure,
    *,
    fence: Fence,
    dead_letter: bool = True,
    slot: SlotAction = SlotAction.RELEASE,
    budget: BudgetAction = BudgetAction.RELEASE,
    settle_micro: int = 0,
    ledger_kind: str = "settled",
) -> bool:
    """Finish the job FAILED (by default into the dead-letter set)."""
    return finish(
        rt,
        rec,
        JobState.FAILED,
        fence=fence,
        slot=slot,
        budget=budget,
        settle_micro=settle_micro,
        dead_letter=dead_letter,
        failure=failure,
        callback={"cost_usd": settle_micro / 1e6 if budget is BudgetAction.SETTLE else None},
        ledger_kind=ledger_kind,
    )


def cancel(rt: Runtime, rec: JobRecord, *, fence: Fence, message: str) -> bool:
    """Finish the job CANCELLED, freeing its slot and reservation at once (fal billed nothing)."""
    failure = Failure("cancelled", message)
    return finish(rt, rec, JobState.CANCELLED, fence=fence, failure=failure)


def reserved_micro(rt: Runtime, rec: JobRecord) -> int:
    """What the job's reservation holds (or its recorded estimate): the charge of an unknown outcome."""
    res = rt.flow.budget.reservation(rec.id)
    return res.micro if res else int(rec.estimate_micro or 0)


def ambiguous(rt: Runtime, rec: JobRecord, attempt: str, *, reason: str) -> bool:
    """A submit whose outcome is unknown: fal may hold (and bill) the request.

    With fal webhooks on, the job first stays SUBMITTING for ``ambiguous_webhook_wait_s``, holding
    its slot and reservation (:func:`await_webhook`): a request fal accepted always ends with a
    webhook naming the attempt, which adopts it (nothing is submitted again, the result is kept).
    Without webhooks, or once that wait is over, the policy applies: the money is settled as
    charged (the estimate) and the slot is held for ``ambiguous_slot_hold_s`` (fal may be running
    the request we cannot see, and the cap N must count it); the job is dead-lettered (replay
    needs an explicit force) or resubmitted.
    """
    if rt.settings.public_url and not webhook_wait_over(rt, rec):
        return await_webhook(rt, rec, attempt, reason=reason)
    counted: dict[str, int] = {} if rec.get("ambiguous_since_ms") else {"ambiguous_count": 1}
    policy = rt.settings.ambiguous_submit_policy.value
    rt.metrics.ambiguous_submit(policy)
    charge = reserved_micro(rt, rec)
    fence = attempt_fence(attempt, states=[JobState.SUBMITTING])
    log.warning("ambiguous submit of job %s attempt %s (%s); policy=%s", rec.id, attempt, reason, policy)
    if policy == "resubmit":
        moved = defer(
            rt,
            rec.id,
            attempt,
            until_ms=rt.now_ms() + 1000,
            reason="ambiguous_resubmit",
            states=[JobState.SUBMITTING],
            slot=SlotAction.KEEP,
            budget=BudgetAction.SETTLE,
            settle_micro=charge,
            fields={"last_error": {"type": "ambiguous_submit", "message": reason}},
            incr=counted,
            ledger_kind="estimate",
        )
        if moved.ok:
            rt.metrics.spent(charge / 1e6)
        return moved.ok
    return fail(
        rt,
        rec,
        Failure(
            "ambiguous_submit", f"submit outcome unknown ({reason}); not resubmitted to avoid paying twice"
        ),
        fence=fence,
        slot=SlotAction.HOLD,
        budget=BudgetAction.SETTLE,
        settle_micro=charge,
        ledger_kind="estimate",
    )


def webhook_wait_over(rt: Runtime, rec: JobRecord) -> bool:
    """True once an ambiguous submit has waited ``ambiguous_webhook_wait_s`` for its webhook."""
    since_ms = int(rec.get("ambiguous_since_ms") or 0)
    return since_ms > 0 and rt.now_ms() - since_ms >= int(rt.settings.ambiguous_webhook_wait_s * 1000)


def awaiting_webhook(rec: JobRecord) -> bool:
    """True while an ambiguous submit waits for its attempt's webhook (its submitter gave up)."""
    return rec.state == JobState.SUBMITTING and bool(rec.get("ambiguous_since_ms"))


def await_webhook(rt: Runtime, rec: JobRecord, attempt: str, *, reason: str) -> bool:
    """Keep an ambiguous submit SUBMITTING, slot and reservation held, until its webhook adopts it
    or ``ambiguous_webhook_wait_s`` runs out (then the slot lease expires and the housekeeper's
    lease check applies the policy through :func:`ambiguous`). Idempotent: later calls only renew."""
    wait_ms = int(rt.settings.ambiguous_webhook_wait_s * 1000)
    since_ms = int(rec.get("ambiguous_since_ms") or 0)
    if since_ms == 0:
        moved = rt.store.move(
            rec.id,
            JobState.SUBMITTING,
            attempt_fence(attempt, states=[JobState.SUBMITTING]),
            fields={
                "ambiguous_since_ms": rt.now_ms(),
                "last_error": {"type": "ambiguous_submit", "message": reason},
            },
            incr={"ambiguous_count": 1},
        )
        if not moved.ok:
            return False
        since_ms = moved.at_ms
        rt.metrics.ambiguous_submit("await_webhook")
        log.warning(
            "ambiguous submit of job %s attempt %s (%s): waiting up to %.0f s for its fal webhook",
            rec.id,
            attempt,
            reason,
            wait_ms / 1000,
        )
    # The lease runs out with the wait: the housekeeper's lease check then applies the policy.
    rt.flow.slots.renew([rec.id], ttl_ms=max(1000, since_ms + wait_ms - rt.now_ms()))
    return True


# ---------------------------------------------------------------------- paying once for identical work
def claim_identical(
    rt: Runtime, rec: JobRecord, attempt: str, canonical: str, *, refuse_done: str = ""
) -> Claim:
    """Lead, follow or be served for the job's canonical input, fenced by ``attempt`` (the job must
    be pre-submit and owned by it): ``worker/contracts/lua/dedupe_claim.lua``. A leader's name lasts
    the job's deadline plus slack; a success is reused for ``dedupe_retention_s``."""
    deadline_s = rec.deadline_s or rt.settings.job_deadline_s
    return rt.dedupe.claim(
        rec.id,
        attempt,
        canonical,
        lease_ms=int((deadline_s + LEADER_SLACK_S) * 1000),
        retention_ms=done_retention_ms(rt),
        refuse_done=refuse_done,
        ambiguous_hold_ms=int(rt.settings.ambiguous_slot_hold_s * 1000),
    )


def attach(rt: Runtime, job_id: str, attempt: str, *, leader: str) -> MoveOutcome:
    """A job identical to a live leader waits for it: parked (DEFERRED ``dedupe_attached``) for the
    re-check period, its slot and reservation (if any) released: it will not pay. The leader's end
    dispatches it at once; the re-check brings it back if that dispatch is lost."""
    return defer(
        rt,
        job_id,
        attempt,
        until_ms=rt.now_ms() + int(rt.settings.dedupe_recheck_s * 1000),
        reason="dedupe_attached",
        slot=SlotAction.RELEASE,
        budget=BudgetAction.RELEASE,
        fields={"dedupe_leader": leader},
    )


def copy_entry(
    rt: Runtime, rec: JobRecord, source_url: str, *, settled_micro: int, billed_s: float | None
) -> dict[str, Any] | None:
    """The output copy work of a success (worker/output_copy.py), or None when no store is set:
    where to read the output, what was asked for (verification) and what was settled (its
    correction to the verified duration; ``billed_s`` None: nothing to correct, as for a job served
    an identical job's result, which was charged nothing)."""
    if rt.outputs is None or not source_url:
        return None
    return {
        "source_url": source_url,
        "aspect_ratio": str(rec.input.get("aspect_ratio") or ""),
        "input_duration_s": rec.get("input_measured_s"),
        "settled_micro": settled_micro,
        "settled_billed_s": "" if billed_s is None else f"{billed_s:g}",
    }


def serve_identical(rt: Runtime, rec: JobRecord, attempt: str, claim: Claim) -> bool:
    """Finish the job SUCCEEDED with a copy of an identical job's result, without a fal call: fenced
    by ``attempt`` from a pre-submit state, charged nothing (no ledger entry), its own event and
    callback naming ``deduped_from``. True if this call finished it."""
    result = dict(claim.result or {})
    raw_video = result.get("video")
    video: dict[str, Any] = raw_video if isinstance(raw_video, dict) else {}
    done = finish(
        rt,
        rec,
        JobState.SUCCEEDED,
        fence=attempt_fence(attempt, states=PRE_SUBMIT_STATES),
        slot=SlotAction.RELEASE,
        budget=BudgetAction.RELEASE,
        fields={"result": result, "cost_actual_micro": 0, "deduped_from": claim.other},
        event={
            "video_url": str(video.get("url") or ""),
            "content_type": str(video.get("content_type") or ""),
            "file_size": "" if video.get("file_size") is None else str(video.get("file_size")),
            "cost_usd": "0.000000",
            "deduped_from": claim.other,
        },
        callback={"video": video or None, "cost_usd": 0.0, "deduped_from": claim.other},
        # its own copy in the output store, under its own tenant (the same bytes of the same tenant
        # are the same object); charged nothing, so nothing to correct
        copy=copy_entry(rt, rec, str(video.get("url") or ""), settled_micro=0, billed_s=None),
    )
    if done:
        rt.metrics.dedup("served", claim.cost_micro / 1e6)
    return done


def release_identical(rt: Runtime, rec: JobRecord) -> None:
    """After a job with a canonical key ended: it stops leading, a success is remembered for reuse,
    and the followers it led are dispatched (``worker/contracts/lua/dedupe_release.lua``). A failure
    here loses nothing: followers look again after ``dedupe_recheck_s`` and read the leader's state."""
    canonical = rec.get("dedupe_key")
    if not is_canonical(canonical):
        return
    try:
        followers = rt.dedupe.release(rec.id, canonical, retention_ms=done_retention_ms(rt))
    except redis.RedisError:
        log.warning("dedupe release of job %s failed; its followers look again later", rec.id, exc_info=True)
        return
    rt.dispatch(followers)


def done_retention_ms(rt: Runtime) -> int:
    """How long a success is reused: ``dedupe_retention_s``, never past the record that keeps the
    result (``job_retention_s``)."""
    return int(min(rt.settings.dedupe_retention_s, rt.settings.job_retention_s) * 1000)
