"""Cancelling jobs that fal has (or may have): the body of the ``reframe.cancel`` task."""

from __future__ import annotations

import logging

from worker import lifecycle
from worker.contracts.models import PRE_SUBMIT_STATES, CancelOutcome
from worker.contracts.store import Fence
from worker.fal import FalCancelAnswer, FalError
from worker.outcomes import receipt_from_record
from worker.runtime import Runtime

log = logging.getLogger(__name__)

#: fal's answer to a cancel, as what the cancel did to the job.
_FROM_FAL = {
    FalCancelAnswer.REQUESTED: CancelOutcome.REQUESTED,
    FalCancelAnswer.ALREADY_COMPLETED: CancelOutcome.ALREADY_FINISHED,
    FalCancelAnswer.NOT_FOUND: CancelOutcome.NOT_FOUND,
}


def cancel_at_fal(rt: Runtime, job_id: str) -> CancelOutcome:
    """Ask fal to cancel the job's request; the tracker then sees it end and finishes the job.

    A job that has not reached fal is finished CANCELLED here at once (its slot and reservation
    freed in the same step). A job in SUBMITTING is left to its submitter, which checks
    ``cancel_requested`` as soon as fal answers (:attr:`CancelOutcome.REQUESTED`).
    """
    rec = rt.store.record(job_id)
    if rec is None:
        return CancelOutcome.NOT_FOUND
    if rec.state.terminal:
        return CancelOutcome.ALREADY_FINISHED
    if rec.state in PRE_SUBMIT_STATES:
        done = lifecycle.cancel(
            rt, rec, fence=Fence(from_states=PRE_SUBMIT_STATES), message="cancelled before submission"
        )
        # not done: it moved on meanwhile (submitted, or finished by another actor)
        return CancelOutcome.CANCELLED if done else cancel_at_fal(rt, job_id)
    if not rec.fal_request_id:
        return CancelOutcome.REQUESTED
    try:
        # with the key of the account the attempt is bound to: no other account can see the request
        fal = rt.fal_for(rec.get("fal_account"))
        answer = rt.portal.call(lambda: fal.cancel(receipt_from_record(rec, rt)), timeout_s=60)
    except FalError as err:
        log.warning("cancel of job %s at fal failed: %s", job_id, err)
        raise
    return _FROM_FAL[answer]
