"""Finishing jobs: terminal state, result event, budget settlement, slot release, callbacks.

Order matters for crash safety: the terminal transition (with its event) is one atomic script and
happens first; settling the budget and releasing the slot are idempotent and happen after. If the
process dies in between, the housekeeper finds a terminal job still holding a slot and finishes
the clean-up, so nothing is published twice and nothing leaks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from worker.contracts.keys import celery_queue_key
from worker.contracts.models import JobState, Priority
from worker.contracts.wire import CALLBACK_TASK, task_message
from worker.fal import FalModelError, FalRunnerError, FalTransientError, QueueStatus, ReframeOutput
from worker.probe import video_duration_s
from worker.runtime import Runtime

log = logging.getLogger(__name__)

OUTCOME_BY_STATE = {
    JobState.SUCCEEDED: "succeeded",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
}


def finish_job(
    rt: Runtime,
    job_id: str,
    state: JobState,
    *,
    record: Mapping[str, Any],
    event: Mapping[str, Any],
    dead_letter: bool = False,
    allowed_from: Iterable[JobState] | str = "*",
) -> bool:
    """Finish a job exactly once; on success observe metrics and queue the callback. Returns ok."""
    outcome = rt.store.finish(
        job_id, state, record=record, event=event, dead_letter=dead_letter, allowed_from=allowed_from
    )
    if not outcome.ok:
        return False
    rec = rt.store.get(job_id) or {}
    created = int(rec.get("created_at_ms") or 0)
    e2e_s = max(0.0, (outcome.at_ms - created) / 1000) if created else 0.0
    label = "dead_lettered" if dead_letter else OUTCOME_BY_STATE[state]
    rt.metrics.job_finished(label, str(rec.get("priority") or "normal"), e2e_s)
    rt.metrics.result_published("stream", True)
    if dead_letter:
        rt.metrics.dead_letter(str(record.get("dead_letter_reason") or "unknown"))
    if rec.get("callback_url"):
        pri = Priority.HIGH.celery_priority
        rt.redis.lpush(
            celery_queue_key(rt.settings.queue_name, pri),
            task_message(CALLBACK_TASK, [job_id], queue=rt.settings.queue_name, priority=pri),
        )
    return True


def free_resources(rt: Runtime, job_id: str, *, actual_micro: int | None) -> None:
    """Settle (or release) the job's budget reservation and release its slot, admitting the next jobs."""
    if actual_micro is None:
        rt.flow.budget.release(job_id)
    elif rt.flow.budget.settle(job_id, actual_micro):
        rt.metrics.spent(actual_micro / 1e6)
    rt.dispatch(rt.flow.slots.release(job_id))


def output_duration_s(rt: Runtime, output: ReframeOutput) -> float | None:
    """Seconds of the output video: the File's own ``duration`` if fal sent one, else read the header."""
    extra = output.video.model_extra or {}
    value = extra.get("duration")
    if isinstance(value, int | float) and value > 0:
        return float(value)
    return video_duration_s(output.video.url, timeout_s=rt.settings.probe_timeout_s)


def complete_success(rt: Runtime, job_id: str, output: ReframeOutput, status: QueueStatus) -> bool:
    """Store and publish a successful result, settle its cost from the output's duration."""
    rec = rt.store.get(job_id) or {}
    duration = output_duration_s(rt, output)
    if duration is None:
        # Cannot measure: settle the reservation as charged (never under-count spend).
        res = rt.flow.budget.reservation(job_id)
        actual = res.micro if res else int(rec.get("estimate_micro") or 0)
    else:
        # fal bills the output's seconds; estimates round up to whole seconds, so actual <= reserved.
        actual = round(duration * rt.flow.budget.price_per_s_micro)
    inference = (status.metrics or {}).get("inference_time")
    video = output.video
    ok = finish_job(
        rt,
        job_id,
        JobState.SUCCEEDED,
        record={
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
    )
    free_resources(rt, job_id, actual_micro=actual)
    if ok and isinstance(inference, int | float):
        rt.metrics.fal_inference(float(inference))
    return ok


def complete_failure(rt: Runtime, job_id: str, err: Exception, status: QueueStatus) -> str:
    """A request that fal finished with an error: fail, cancel, or retry with a new request."""
    from worker.submit import Failure, Submitter, record_breaker

    sub = Submitter(rt)
    rec = rt.store.get(job_id) or {}
    if status.error_type == "client_cancelled" or (
        rec.get("cancel_requested") == "1" and not isinstance(err, FalModelError)
    ):
        finish_job(
            rt,
            job_id,
            JobState.CANCELLED,
            record={"error": {"type": "cancelled", "message": "cancelled at fal"}},
            event={"error_type": "cancelled", "error_message": "cancelled at fal"},
        )
        free_resources(rt, job_id, actual_micro=None)
        return "cancelled"
    if isinstance(err, FalModelError):
        # The model rejected the input (fal's 422): permanent, fal's messages kept verbatim.
        record_breaker(rt, True, probe=False)
        message = "; ".join(err.messages) or err.message
        sub.fail(job_id, Failure("fal_validation", message, err.detail), dead_letter=True)
        return "failed"
    # Runner failure: fal does not bill 5xx; the request is terminal, so a new one cannot double-pay.
    record_breaker(rt, False, probe=False)
    rt.flow.budget.release(job_id)
    rt.dispatch(rt.flow.slots.release(job_id))
    message = getattr(err, "message", str(err))
    attempt = int(rec.get("attempts") or 1)
    retry_after = err.retry_after_s if isinstance(err, FalTransientError) else None
    # Forget the finished fal request so the next attempt submits a new one.
    moved = rt.store.transition(
        job_id,
        [JobState.IN_QUEUE, JobState.IN_PROGRESS],
        JobState.DEFERRED,
        fal_request_id="",
        last_error={"type": "fal_runner", "message": message, "error_type": status.error_type or ""},
    )
    if not moved.ok:
        return "stale"
    rt.redis.zrem(rt.store.keys.track, job_id)
    kind = "runner" if isinstance(err, FalRunnerError) else "fal_error"
    sub.retry_later(
        job_id,
        reason=kind,
        attempt=attempt,
        retry_after_s=retry_after,
        failure=Failure("fal_runner_error", message, getattr(err, "detail", None)),
        from_states=[JobState.DEFERRED],
    )
    return "retrying"
