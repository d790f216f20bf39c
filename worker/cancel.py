"""Cancelling jobs that fal has (or may have): the body of the ``reframe.cancel`` task."""

from __future__ import annotations

import logging

from worker.contracts.models import PRE_SUBMIT_STATES, JobState
from worker.fal import CancelOutcome, FalError
from worker.finalize import finish_job, free_resources
from worker.runtime import Runtime
from worker.tracker import receipt_from_record

log = logging.getLogger(__name__)


def cancel_at_fal(rt: Runtime, job_id: str) -> str:
    """Ask fal to cancel the job's request; the tracker then sees it end and finishes the job."""
    rec = rt.store.get(job_id)
    if rec is None:
        return "missing"
    state = JobState(rec["state"])
    if state.terminal:
        return "finished"
    if state in PRE_SUBMIT_STATES:
        done = finish_job(
            rt,
            job_id,
            JobState.CANCELLED,
            record={"error": {"type": "cancelled", "message": "cancelled before submission"}},
            event={"error_type": "cancelled", "error_message": "cancelled before submission"},
            allowed_from=PRE_SUBMIT_STATES,
        )
        free_resources(rt, job_id, actual_micro=None)
        return "cancelled" if done else "raced"
    if not rec.get("fal_request_id"):
        return "pending"  # SUBMITTING: the submitter checks cancel_requested once fal answers
    try:
        outcome = rt.portal.call(lambda: rt.fal.cancel(receipt_from_record(rec, rt)), timeout_s=60)
    except FalError as err:
        log.warning("cancel of job %s at fal failed: %s", job_id, err)
        raise
    return str(outcome.value if isinstance(outcome, CancelOutcome) else outcome)
