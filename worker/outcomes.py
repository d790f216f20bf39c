"""What fal said about a request, applied to its job: the end-of-request rules.

Both completion paths use these: the tracker (fal's status stream and result) and the fal webhook
handler (:mod:`worker.webhooks`). Every rule is one fenced lifecycle step for the attempt and fal
request id recorded on the job (:func:`fence_of`), so a late or duplicate report changes nothing.

* succeeded: settle the billed seconds of the output (whole billing units), publish the result;
* cancelled at fal: CANCELLED, nothing billed;
* a model error (fal's 422 replayed by the result): FAILED for good, fal's messages kept;
* a runner failure: fal does not bill it and the request is over, so a new attempt is scheduled;
* lost (fal no longer knows it, or its result stayed unreadable): FAILED, charged at its estimate.

Each rule names the path that learned the end (``via``: ``"webhook"`` or ``"status"``) and counts
it in ``reframe_job_completions_total{via}`` when its fenced step took effect (a late or duplicate
report is not counted).
"""

from __future__ import annotations

from typing import Literal

from worker import lifecycle
from worker.contracts.media import video_duration_s
from worker.contracts.models import JobState
from worker.contracts.record import JobRecord
from worker.contracts.store import BudgetAction, Fence, SlotAction
from worker.fal import FalError, FalModelError, QueueStatus, ReframeOutput, SubmitReceipt
from worker.flow.budget import billable_s
from worker.lifecycle import AT_FAL, Failure, attempt_fence, record_breaker
from worker.runtime import Runtime

#: The path that learned the end of a fal request: fal's webhook, or the tracker's status reads.
Via = Literal["webhook", "status"]


def _counted(rt: Runtime, via: Via, applied: bool) -> bool:
    if applied:
        rt.metrics.job_completion(via)
    return applied


def receipt_from_record(rec: JobRecord, rt: Runtime) -> SubmitReceipt:
    """The fal request handle stored in a job record (URLs rebuilt by fal's rule if missing)."""
    status_url, response_url = rec.get("fal_status_url"), rec.get("fal_response_url")
    if not (status_url and response_url):
        return rt.fal.receipt_for(rec.fal_request_id)
    return SubmitReceipt(
        request_id=rec.fal_request_id,
        status_url=status_url,
        response_url=response_url,
        cancel_url=rec.get("fal_cancel_url"),
        queue_position=None,
    )


def fence_of(rec: JobRecord) -> Fence:
    """The fence of the attempt and fal request the record names, from the at-fal states."""
    return attempt_fence(rec.attempt, request_id=rec.fal_request_id, states=AT_FAL)


def cancelled(rt: Runtime, rec: JobRecord, *, via: Via) -> None:
    """fal reports the request cancelled."""
    _counted(rt, via, lifecycle.cancel(rt, rec, fence=fence_of(rec), message="cancelled at fal"))


def model_error(rt: Runtime, rec: JobRecord, err: FalModelError, *, via: Via) -> None:
    """The model rejected the input (fal's 422): fal said so; permanent, fal's messages verbatim."""
    record_breaker(rt, True, probe=False, account=rec.get("fal_account"))
    message = "; ".join(err.messages) or err.message
    failure = Failure("fal_validation", message, err.detail)
    _counted(rt, via, lifecycle.fail(rt, rec, failure, fence=fence_of(rec)))


def runner_failed(
    rt: Runtime, rec: JobRecord, status: QueueStatus, err: FalError | None, *, via: Via
) -> None:
    """fal finished the request with a runner error: not billed, and over, so a new attempt may go."""
    record_breaker(rt, False, probe=False, account=rec.get("fal_account"))
    message = status.error or (err.message if err else "runner failure")
    retry_after = getattr(err, "retry_after_s", None)
    previous = [x for x in rec.get("previous_request_ids").split(",") if x]
    moved = lifecycle.retry_later(
        rt,
        rec,
        rec.attempt,
        reason="runner",
        failure=Failure("fal_runner_error", message, {"error_type": status.error_type or ""}),
        retry_after_s=retry_after,
        states=AT_FAL,
        request_id=rec.fal_request_id,
        fields={"fal_request_id": "", "previous_request_ids": ",".join([*previous, rec.fal_request_id])},
    )
    _counted(rt, via, moved != "stale")


def succeeded(rt: Runtime, rec: JobRecord, output: ReframeOutput, status: QueueStatus, *, via: Via) -> bool:
    """Publish the result and settle what fal billed for the output; True if this call finished it."""
    duration = output_duration_s(rt, output)
    billed_s: float | None = None
    if duration is None:
        # Cannot measure: settle the reservation as charged (never under-count spend).
        actual = lifecycle.reserved_micro(rt, rec)
    else:
        # fal bills whole seconds of output; the estimate rounds the input up the same way.
        actual = rt.flow.budget.estimate_micro(duration)
        billed_s = billable_s(duration, rt.flow.budget.billing_unit_s)
    inference = (status.metrics or {}).get("inference_time")
    video = output.video
    done = lifecycle.finish(
        rt,
        rec,
        JobState.SUCCEEDED,
        fence=fence_of(rec),
        budget=BudgetAction.SETTLE,
        settle_micro=actual,
        slot=SlotAction.RELEASE,
        fields={
            "result": output.model_dump(mode="json"),
            "cost_actual_micro": actual,
            "output_duration_s": "" if duration is None else f"{duration:.3f}",
            "fal_inference_time_s": "" if inference is None else inference,
        },
        event={
            "video_url": video.url,
            "content_type": video.content_type or "",
            "file_size": video.file_size or "",
            "cost_usd": f"{actual / 1e6:.6f}",
        },
        callback={"video": video.model_dump(mode="json"), "cost_usd": actual / 1e6},
        ledger_kind="estimate" if duration is None else "settled",
        billed_s=billed_s,
        copy=lifecycle.copy_entry(rt, rec, video.url, settled_micro=actual, billed_s=billed_s),
    )
    if done and isinstance(inference, int | float):
        rt.metrics.fal_inference(float(inference))
    return _counted(rt, via, done)


def lost(rt: Runtime, rec: JobRecord, message: str, *, via: Via) -> None:
    """fal no longer knows the request (or its result could not be read while fal kept it)."""
    done = lifecycle.fail(
        rt,
        rec,
        Failure("result_unavailable", message),
        fence=fence_of(rec),
        budget=BudgetAction.SETTLE,
        settle_micro=lifecycle.reserved_micro(rt, rec),
        ledger_kind="estimate",
    )
    _counted(rt, via, done)


def output_duration_s(rt: Runtime, output: ReframeOutput) -> float | None:
    """Seconds of the output video: the File's own ``duration`` if fal sent one, else read the header."""
    extra = output.video.model_extra or {}
    value = extra.get("duration")
    if isinstance(value, int | float) and value > 0:
        return float(value)
    return video_duration_s(
        output.video.url,
        fetcher=rt.fetcher,
        timeout_s=rt.settings.probe_timeout_s,
        max_bytes=rt.settings.probe_max_bytes,
    )
