"""fal completion webhooks: recorded once by the receiver, finished by a worker through the lifecycle.

The receiver (``reframe/api/fal_webhook.py``) verifies fal's signature and the attempt token of the
URL (:mod:`worker.fal.webhooks`), then calls :meth:`WebhookInbox.accept`: one script sets the
request id's de-duplication key (``SET NX`` with ``REFRAME_WEBHOOK_DEDUP_TTL_S``), stores the raw
body and pushes a ``reframe.webhook`` task message, so a delivery is either recorded and queued or
recognised as a duplicate, never half of it. fal retries a delivery until it gets a 2xx, so a
receiver that crashes before answering loses nothing.

A worker runs :func:`handle` for the message. Every change goes through :mod:`worker.lifecycle`,
fenced by the attempt the token names and by fal's request id:

* the job is at fal with that request id: finished by the tracker's own rules (success settles
  from the output's duration; a failure fal reports is cancelled, a model error, or a runner
  failure that may start a new attempt);
* the job is still SUBMITTING for that attempt (its submit answer was lost): the attempt adopts
  the request (SUBMITTING -> IN_QUEUE with the revealed id), then it is finished as above; while
  the submitter may still be waiting for fal's answer the task is retried later instead;
* the job was dead-lettered as ``ambiguous_submit`` by that attempt: it is *not* reopened (its life
  ended and was published; replay stays an operator's choice), but the request id is recorded, the
  charge corrected to what fal billed and the held slot freed (:func:`lifecycle.resolve_ambiguous`);
* anything else (another attempt owns the job, it ended already, the record is gone): nothing
  changes; that is the duplicate or late delivery the fences exist for.

Completions whose payload we cannot use are handed to the trackers at once (reconciliation), so a
webhook can only speed a job up, never lose it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import redis

from config import Settings
from worker import lifecycle, outcomes
from worker.contracts.keys import Keys, celery_queue_key
from worker.contracts.lua import load_lua, script_path
from worker.contracts.models import JobState
from worker.contracts.record import JobRecord, text
from worker.contracts.wire import task_message
from worker.fal import FalError, FalModelError, QueueStatus, ReframeOutput, classify_response
from worker.fal.webhooks import FalWebhook
from worker.lifecycle import AT_FAL
from worker.presence import Presence
from worker.runtime import Runtime
from worker.submit import submit_timeout_s

log = logging.getLogger(__name__)

WEBHOOK_TASK = "reframe.webhook"
#: Celery priority of webhook messages: finishing a job frees a slot, so it goes before submits.
WEBHOOK_PRIORITY = 0


def seen_key(keys: Keys, request_id: str) -> str:
    """STRING ``P:webhook:seen:{request id}``: the request id's de-duplication mark."""
    return f"{keys.root}:webhook:seen:{request_id}"


def delivery_key(keys: Keys, request_id: str) -> str:
    """HASH ``P:webhook:{request id}``: the recorded delivery (raw body, job id, attempt)."""
    return f"{keys.root}:webhook:{request_id}"


def pending_key(keys: Keys) -> str:
    """ZSET ``P:webhook:pending``: request id -> when its task is sent again (until it is handled)."""
    return f"{keys.root}:webhook:pending"


#: How often a delivery waiting for its submitter's answer looks again.
RECHECK_S = 2.0
#: A recorded delivery whose task message was lost (its worker died holding it) is sent again
#: after this long; handling it takes milliseconds.
PENDING_LEASE_MS = 30_000


class WebhookInbox:
    """The receiver's side: record a verified delivery once and queue it for a worker."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.r = client
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self._accept = client.register_script(load_lua(script_path(__file__, "webhook_accept")))

    def accept(self, hook: FalWebhook, raw_body: bytes, *, job_id: str, attempt: str, now_ms: int) -> bool:
        """Record ``hook`` for ``job_id``/``attempt`` and queue its task; False for a duplicate."""
        queue = self.settings.queue_name
        message = task_message(WEBHOOK_TASK, [hook.request_id], queue=queue, priority=WEBHOOK_PRIORITY)
        ttl_ms = int(self.settings.webhook_dedup_ttl_s * 1000)
        raw = self._accept(
            keys=[
                seen_key(self.keys, hook.request_id),
                delivery_key(self.keys, hook.request_id),
                celery_queue_key(queue, WEBHOOK_PRIORITY),
                pending_key(self.keys),
            ],
            args=[ttl_ms, raw_body, job_id, attempt, message, now_ms, PENDING_LEASE_MS, hook.request_id],
        )
        return int(raw) == 1


@dataclass(frozen=True)
class Delivery:
    """A recorded delivery as the worker reads it."""

    job_id: str
    attempt: str
    hook: FalWebhook


class RetryLater(Exception):
    """The submitter may still be waiting for fal's answer: look again after ``delay_s``
    (:func:`run` parks the delivery in the pending set; the housekeeper sends it again)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(f"retry in {delay_s:.1f}s")
        self.delay_s = delay_s


def read_delivery(rt: Runtime, request_id: str) -> Delivery | None:
    """The recorded delivery of ``request_id`` (None when it expired)."""
    raw = rt.redis.hgetall(delivery_key(rt.store.keys, request_id))
    if not raw:
        return None
    entry = {text(k): text(v) for k, v in raw.items()}
    try:
        body = json.loads(entry.get("body", ""))
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    return Delivery(entry.get("job_id", ""), entry.get("attempt", ""), FalWebhook(request_id, body))


def run(rt: Runtime, request_id: str) -> str:
    """The ``reframe.webhook`` task: :func:`handle` one delivery, then take it out of the pending
    set, or park it there until ``RetryLater`` says (no Celery countdown: a message held by a
    worker that dies would wait for the visibility timeout; the pending set is in Redis)."""
    pending = pending_key(rt.store.keys)
    try:
        outcome = handle(rt, request_id)
    except RetryLater as wait:
        rt.redis.zadd(pending, {request_id: rt.now_ms() + int(wait.delay_s * 1000)})
        return "retry_later"
    rt.redis.zrem(pending, request_id)
    return outcome


def dispatch_pending(rt: Runtime, due: list[str]) -> None:
    """Send the task of each due pending delivery (the housekeeper leased them)."""
    if not due:
        return
    queue = rt.settings.queue_name
    pipe = rt.redis.pipeline(transaction=False)
    for request_id in due:
        message = task_message(WEBHOOK_TASK, [request_id], queue=queue, priority=WEBHOOK_PRIORITY)
        pipe.lpush(celery_queue_key(queue, WEBHOOK_PRIORITY), message)
    pipe.execute()


def handle(rt: Runtime, request_id: str) -> str:
    """Finish the job of one recorded webhook (the body of the ``reframe.webhook`` task).

    Returns what happened: ``finished``, ``adopted``, ``resolved`` (an ambiguous dead letter),
    ``reconcile`` (handed to the trackers), ``stale``, ``duplicate``, ``missing`` or ``gone``.
    Raises :class:`RetryLater` while the submitting attempt may still be waiting for fal's answer.
    """
    delivery = read_delivery(rt, request_id)
    if delivery is None:
        return "gone"
    rec = rt.store.record(delivery.job_id)
    if rec is None:
        return "missing"
    if rec.attempt != delivery.attempt:
        # Another attempt owns the job: this request ended (a runner failure that was retried) or
        # was recorded as a late receipt. Its own path already dealt with it.
        return "stale"
    outcome = ""
    if rec.state == JobState.SUBMITTING and not rec.fal_request_id:
        waited_ms = rt.now_ms() - rec.submit_started_at_ms
        limit_ms = int((submit_timeout_s(rt) + 5) * 1000)
        # Adopt at once when nobody can still be waiting for fal's answer: the submitter gave up
        # (an ambiguous submit awaiting this webhook) or its process is dead (no heartbeat).
        gave_up = lifecycle.awaiting_webhook(rec) or not _submitter_alive(rt, rec)
        if not gave_up and waited_ms < limit_ms:
            # look again soon, not at the end of the submit timeout: the submitter may die meanwhile
            # (then the request is adopted within a heartbeat TTL of its death)
            raise RetryLater(min(RECHECK_S, max(0.5, (limit_ms - waited_ms) / 1000)))
        moved = lifecycle.adopted(rt, rec, delivery.attempt, rt.fal.receipt_for(request_id))
        log.info(
            "job %s: webhook revealed fal request %s of a lost submit (adopted=%s)",
            rec.id,
            request_id,
            moved.ok,
        )
        outcome = "adopted" if moved.ok else ""
        rec = rt.store.record(rec.id)
        if rec is None:
            return "missing"
    if rec.state == JobState.FAILED and rec.get("dead_letter_reason") == "ambiguous_submit":
        return _resolve_dead(rt, rec, delivery)
    if rec.state.terminal:
        return "duplicate"
    if rec.state not in AT_FAL or rec.fal_request_id != request_id:
        return "stale"
    finished = _finish(rt, rec, delivery.hook)
    return outcome or finished


def _submitter_alive(rt: Runtime, rec: JobRecord) -> bool:
    """True while the process that began the submit still beats (worker/presence.py)."""
    if not rec.submit_process:
        return False
    return Presence.from_settings(rt.redis, rt.settings).is_alive(rec.submit_process)


def _finish(rt: Runtime, rec: JobRecord, hook: FalWebhook) -> str:
    payload = hook.body.get("payload")
    if hook.ok:
        try:
            output = ReframeOutput.model_validate(payload)
        except ValueError:
            return reconcile(rt, rec.id, "webhook payload is not a reframe output")
        outcomes.succeeded(rt, rec, output, QueueStatus(status="COMPLETED"), via="webhook")
        return "finished"
    err = _error_of(hook)
    error_type = payload.get("error_type") if isinstance(payload, dict) else None
    if error_type == "client_cancelled" or rec.cancel_requested:
        outcomes.cancelled(rt, rec, via="webhook")
    elif isinstance(err, FalModelError):
        outcomes.model_error(rt, rec, err, via="webhook")
    elif payload is None or err is None:
        # e.g. fal's "payload is not JSON serializable": the queue's result endpoint may still serve it.
        return reconcile(rt, rec.id, str(hook.body.get("error") or "unusable webhook"))
    else:
        message = str(hook.body.get("error") or err.message)
        status = QueueStatus(status="COMPLETED", error=message, error_type=error_type or err.error_type)
        outcomes.runner_failed(rt, rec, status, err, via="webhook")
    return "finished"


def _error_of(hook: FalWebhook) -> FalError | None:
    """The error fal's result endpoint would have raised for this completion."""
    code = hook.status_code or 500
    body = json.dumps(hook.body.get("payload")).encode()
    headers: dict[str, str] = {}
    payload = hook.body.get("payload")
    if isinstance(payload, dict) and isinstance(payload.get("error_type"), str):
        headers["x-fal-error-type"] = payload["error_type"]
    return classify_response("result", code, headers, body)


def reconcile(rt: Runtime, job_id: str, why: str) -> str:
    """Hand the job to the trackers now (unless one follows it already): they read fal's answer."""
    log.info("job %s: webhook not usable (%s); a tracker reconciles it now", job_id, why)
    keys = rt.store.keys
    if not rt.redis.hexists(keys.track_owner, job_id):
        rt.redis.zadd(keys.track, {job_id: rt.now_ms()}, xx=True)
    return "reconcile"


def _resolve_dead(rt: Runtime, rec: JobRecord, delivery: Delivery) -> str:
    hook = delivery.hook
    fields: dict[str, Any] = {"ambiguous_resolved": "succeeded_at_fal" if hook.ok else "failed_at_fal"}
    billed = 0  # fal bills no failed request
    if hook.ok:
        try:
            output = ReframeOutput.model_validate(hook.body.get("payload"))
        except ValueError:
            output = None
        duration = outcomes.output_duration_s(rt, output) if output is not None else None
        # Without a measurable output the estimate the dead letter charged stands.
        billed = int(rec.estimate_micro or 0) if duration is None else rt.flow.budget.estimate_micro(duration)
        fields["cost_actual_micro"] = billed
        if output is not None:
            fields["result"] = output.model_dump(mode="json")
    else:
        fields["fal_error"] = str(hook.body.get("error") or "")
    moved = lifecycle.resolve_ambiguous(
        rt, rec, delivery.attempt, hook.request_id, billed_micro=billed, fields=fields
    )
    if moved.ok:
        log.warning(
            "job %s: ambiguous submit resolved by fal's webhook: request %s %s; billed %.6f USD",
            rec.id,
            hook.request_id,
            fields["ambiguous_resolved"],
            billed / 1e6,
        )
        return "resolved"
    return "duplicate" if moved.state == "DONE" else "stale"


__all__ = [
    "WEBHOOK_TASK",
    "Delivery",
    "RetryLater",
    "WebhookInbox",
    "delivery_key",
    "dispatch_pending",
    "handle",
    "pending_key",
    "read_delivery",
    "reconcile",
    "run",
    "seen_key",
]
