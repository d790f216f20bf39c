"""The producer library: validate reframe requests and enqueue them as jobs on Redis.

Imports only :mod:`config` and :mod:`worker.contracts`; it never loads the worker runtime.

Example::

    from config import load_settings
    from producer import Producer

    with Producer(load_settings()) as p:
        job_id = p.enqueue({"video_url": "https://…/clip.mp4", "aspect_ratio": "9:16"})
        job = p.wait(job_id, timeout_s=600)
        print(job.state, job.video_url)
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from config import Settings
from worker.contracts.connect import redis_client
from worker.contracts.dedupe import DedupeStore, Hit
from worker.contracts.durable import Replication
from worker.contracts.intake import (
    EnqueueCall,
    EnqueueResult,
    IdempotencyConflict,
    Intake,
    IntakeLimits,
    JobIdCall,
    JobIdsCall,
    WaitCall,
    check_batch,
    check_call,
    check_enqueue,
    index_horizon_ms,
)
from worker.contracts.keys import celery_queue_key
from worker.contracts.models import (
    PRE_SUBMIT_STATES,
    CancelOutcome,
    InvalidRequest,
    JobState,
    Priority,
    ReframeInput,
    parse_input,
)
from worker.contracts.quotes import ModelLimits, Quote, build_quote, read_budgets
from worker.contracts.store import BudgetAction, Fence, JobStore, SlotAction
from worker.contracts.tenants import DEFAULT_TENANT, check_tenant
from worker.contracts.wire import CANCEL_TASK, task_message

if TYPE_CHECKING:
    from producer.inputs import InputReader

__all__ = [
    "CancelOutcome",
    "EnqueueRequest",
    "EnqueueResult",
    "IdempotencyConflict",
    "InvalidRequest",
    "Job",
    "Producer",
    "Quote",
]


@dataclass(frozen=True)
class EnqueueRequest:
    """One job for :meth:`Producer.enqueue_many`; the fields are the keyword arguments of
    :meth:`Producer.enqueue` and are checked the same way (strictly, nothing coerced)."""

    input: ReframeInput | Mapping[str, Any]
    idempotency_key: str | None = None
    priority: Priority | str = Priority.NORMAL
    metadata: Mapping[str, Any] | None = None
    callback_url: str | None = None
    deadline_s: float | None = None
    dedupe: bool | None = None

    def arguments(self) -> dict[str, Any]:
        """The call arguments, as validated by :class:`worker.contracts.intake.EnqueueCall`."""
        args = {
            "input": self.input,
            "idempotency_key": self.idempotency_key,
            "priority": self.priority,
            "metadata": self.metadata,
            "callback_url": self.callback_url,
            "deadline_s": self.deadline_s,
            "dedupe": self.dedupe,
        }
        return {k: v for k, v in args.items() if v is not None or k == "input"}


@dataclass(frozen=True)
class Job:
    """A read-only view of a job record."""

    id: str
    state: JobState
    priority: Priority
    input: dict[str, Any]
    created_at_ms: int
    attempts: int
    metadata: dict[str, Any]
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    fal_request_id: str | None = None
    queue_position: int | None = None
    cost_usd: float | None = None
    timestamps_ms: dict[str, int] = field(default_factory=dict)
    dead_letter_reason: str | None = None
    deduped_from: str | None = None
    """The job whose result this one reused (paying once for identical work); None when it paid."""
    output_copy: str | None = None
    """The copy of a success's output into the output store: ``pending``, ``retrying``, ``copied``,
    ``failed`` (given up: fal's URL only; ``reframe outputs retry``), None when no store is set."""
    output_copy_error: str | None = None
    """Why the last copy try failed (``retrying`` or ``failed``)."""
    output_key: str | None = None
    """The stored output's content-addressed key (``reframe outputs url JOB`` signs a URL for it)."""
    output_verify: str | None = None
    """``ok`` or ``mismatch`` (the output is not what was asked for; ``output_verification`` says how)."""
    output_verification: dict[str, Any] | None = None
    """The measured output (width, height, duration_s, codec, ...) and the reasons of a mismatch."""

    @property
    def terminal(self) -> bool:
        """True once the job SUCCEEDED, FAILED or was CANCELLED and its end is out: a success whose
        output copy is still ``pending`` (its first try under way; the result event waits for it)
        is not yet terminal here, one whose copy is ``retrying`` or ``failed`` is."""
        return self.state.terminal and self.output_copy != "pending"

    @property
    def video_url(self) -> str | None:
        """URL of the reframed video (SUCCEEDED jobs only)."""
        video = (self.result or {}).get("video") or {}
        url = video.get("url")
        return str(url) if url else None

    @property
    def elapsed_s(self) -> float | None:
        """Seconds from enqueue to the terminal state (None while running)."""
        end = self.timestamps_ms.get(f"ts_{self.state.value}") if self.terminal else None
        return None if end is None else max(0.0, (end - self.created_at_ms) / 1000)

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Job:
        """Build from a decoded record (see :func:`worker.contracts.store.decode_record`)."""
        actual = rec.get("cost_actual_micro")
        return cls(
            id=str(rec["id"]),
            state=JobState(rec["state"]),
            priority=Priority(rec.get("priority") or "normal"),
            input=dict(rec.get("input") or {}),
            created_at_ms=int(rec.get("created_at_ms") or 0),
            attempts=int(rec.get("attempts") or 0),
            metadata=dict(rec.get("metadata") or {}),
            result=rec.get("result"),
            error=rec.get("error"),
            fal_request_id=rec.get("fal_request_id") or None,
            queue_position=rec.get("queue_position") if rec.get("queue_position") != "" else None,
            cost_usd=(int(actual) / 1e6) if isinstance(actual, int) else None,
            timestamps_ms={k: int(v) for k, v in rec.items() if k.startswith("ts_") and isinstance(v, int)},
            dead_letter_reason=rec.get("dead_letter_reason") or None,
            deduped_from=rec.get("deduped_from") or None,
            output_copy=rec.get("output_copy") or None,
            output_copy_error=rec.get("output_copy_error") or None,
            output_key=rec.get("output_key") or None,
            output_verify=rec.get("output_verify") or None,
            output_verification=_json_object(rec.get("output_verification")),
        )


def _json_object(raw: Any) -> dict[str, Any] | None:
    """A JSON object stored as text in a record field (None when absent or not an object)."""
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str) or not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _tenant(tenant: str | None) -> str:
    """The tenant a call names (``default`` for None); :class:`InvalidRequest` naming ``tenant``."""
    if tenant is None:
        return DEFAULT_TENANT
    try:
        return check_tenant(tenant)
    except ValueError as exc:
        raise InvalidRequest([("tenant", str(exc).removeprefix("tenant: "))]) from None


def _batch_arguments(requests: Any, max_batch: int) -> list[dict[str, Any] | str]:
    """Split each item of an ``enqueue_many`` batch into call arguments (a str = what is wrong)."""
    if isinstance(requests, str | bytes | Mapping) or not isinstance(requests, Iterable):
        raise InvalidRequest([("items", "must be a list of requests (EnqueueRequest or input mappings)")])
    # One more than allowed is enough to refuse; never drain an endless iterator.
    items = list(itertools.islice(requests, max_batch + 1))
    out: list[dict[str, Any] | str] = []
    for item in items:
        if isinstance(item, EnqueueRequest):
            out.append(item.arguments())
        elif isinstance(item, Mapping | ReframeInput):
            out.append({"input": item})
        else:
            out.append(f"must be an EnqueueRequest or an input mapping, not {type(item).__name__}")
    return out


class Producer:
    """Enqueue and observe reframe jobs. Thread-safe; one instance per process is plenty.

    Every public call checks its arguments strictly first (nothing is coerced: ``True`` is not ``1``,
    ``"5"`` is not ``5``) and raises one :class:`InvalidRequest` naming every bad field by path
    (``x_end``, ``metadata.k``, ``items[2].idempotency_key``) before anything is written to Redis.
    """

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.limits = IntakeLimits.from_settings(settings)
        self._own_client = client is None
        self.r = client or redis_client(
            settings, socket_timeout=settings.redis_socket_timeout_s, health_check_interval=25
        )
        self.store = JobStore(
            self.r,
            prefix=settings.key_prefix,
            queue=settings.queue_name,
            retention_s=settings.job_retention_s,
            stream_maxlen=settings.results_stream_maxlen,
        )
        self.intake = Intake(
            self.store,
            default_deadline_s=settings.job_deadline_s,
            index_horizon_ms=index_horizon_ms(settings),
            dedupe_default=settings.dedupe_default,
            replication=Replication(settings.redis_min_replicas, settings.redis_replica_wait_ms),
        )
        self._inputs: InputReader | None = None
        self._inputs_lock = threading.Lock()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the Redis connection pool if this producer created it."""
        if self._own_client:
            self.r.close()
        if self._inputs is not None:
            self._inputs.close()

    # ------------------------------------------------------------------ enqueue
    def validate(self, request: ReframeInput | Mapping[str, Any]) -> ReframeInput:
        """Validate a request against fal's schema and our limits; raises :class:`InvalidRequest`."""
        data: Any = request
        if isinstance(data, Mapping) and not isinstance(data, dict):
            data = dict(data)
        return parse_input(
            data,
            max_data_uri_bytes=self.settings.max_data_uri_bytes,
            max_prompt_chars=self.settings.max_prompt_chars,
        )

    def enqueue(
        self,
        request: ReframeInput | Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        priority: Priority | str = Priority.NORMAL,
        metadata: Mapping[str, Any] | None = None,
        callback_url: str | None = None,
        deadline_s: float | None = None,
        tenant: str | None = None,
        dedupe: bool | None = None,
    ) -> str:
        """Validate and enqueue one job; return its id (see :meth:`enqueue_result` for more).

        The record, the idempotency claim and the Celery message are written by one Redis script,
        so all exist or none does. With ``idempotency_key``, the same key and the same input return
        the first job's id (nothing is enqueued again, whatever that job's state); the same key with
        a different input raises :class:`IdempotencyConflict`. ``callback_url`` needs
        ``REFRAME_CALLBACK_SIGNING_KEY`` (or ``REFRAME_CALLBACK_ALLOW_UNSIGNED=true``).
        ``deadline_s`` shortens ``REFRAME_JOB_DEADLINE_S`` for this job. ``tenant`` names who the
        job belongs to (``default`` when None); idempotency keys are per tenant. ``dedupe`` pays once
        for identical work (README, "Paying once for identical work"): True or False for this job,
        None for the tenant's default (``reframe tenants set --dedupe``), else
        ``REFRAME_DEDUPE_DEFAULT``.
        """
        return self.enqueue_result(
            request,
            idempotency_key=idempotency_key,
            priority=priority,
            metadata=metadata,
            callback_url=callback_url,
            deadline_s=deadline_s,
            tenant=tenant,
            dedupe=dedupe,
        ).job_id

    def enqueue_result(
        self,
        request: ReframeInput | Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        priority: Priority | str = Priority.NORMAL,
        metadata: Mapping[str, Any] | None = None,
        callback_url: str | None = None,
        deadline_s: float | None = None,
        tenant: str | None = None,
        dedupe: bool | None = None,
    ) -> EnqueueResult:
        """:meth:`enqueue`, returning whether a job was created or an existing one returned, and its
        state (``result.describe()`` gives ``returned existing job X (FAILED)``)."""
        item = EnqueueRequest(request, idempotency_key, priority, metadata, callback_url, deadline_s, dedupe)
        call = check_enqueue(item.arguments(), self.limits)
        chosen = _tenant(tenant)
        if self.settings.enqueue_probe_input:
            self.refuse_over_limits([call], batch=False)
        return self.intake.write([call], batch=False, tenant=chosen)[0]

    def enqueue_many(
        self, requests: Iterable[EnqueueRequest | Mapping[str, Any]], *, tenant: str | None = None
    ) -> list[str]:
        """Validate every request, then enqueue all of them atomically; return the job ids in order.

        All or nothing: if any item is invalid, :class:`InvalidRequest` lists every bad field of
        every item (``items[2].metadata.k``); if any idempotency key is already taken by a different
        request, :class:`IdempotencyConflict` names the items. Either way nothing is written.
        Items whose key already maps to the same input return that job's id, so **retrying the same
        batch is safe** (no second job, nobody pays twice). Repeated keys inside one batch: same
        input = one job, different input = conflict. At most ``REFRAME_ENQUEUE_MAX_BATCH`` items
        per call (one Redis script must stay short); split larger batches. Every job of the batch
        belongs to ``tenant`` (``default`` when None).
        """
        return [r.job_id for r in self.enqueue_many_results(requests, tenant=tenant)]

    def enqueue_many_results(
        self, requests: Iterable[EnqueueRequest | Mapping[str, Any]], *, tenant: str | None = None
    ) -> list[EnqueueResult]:
        """:meth:`enqueue_many`, returning one :class:`EnqueueResult` per item."""
        chosen = _tenant(tenant)
        calls = check_batch(_batch_arguments(requests, self.limits.max_batch), self.limits)
        if self.settings.enqueue_probe_input:
            self.refuse_over_limits(calls, batch=True)
        return self.intake.write(calls, batch=True, tenant=chosen)

    def refuse_over_limits(self, calls: Sequence[EnqueueCall], *, batch: bool) -> None:
        """Read every input of ``calls`` (one probe per distinct URL, one after another) and raise
        :class:`InvalidRequest` naming each one over the model's limits. An input that cannot be read
        is let through: the submitter decides (worker/submit.py). Enqueues call it when
        ``REFRAME_ENQUEUE_PROBE_INPUT`` is on (the HTTP API's too, reframe/api/routes/jobs.py)."""
        limits = ModelLimits.from_settings(self.settings)
        found: dict[str, list[str]] = {}
        problems: list[tuple[str, str]] = []
        for i, call in enumerate(calls):
            url = call.input.video_url
            if url not in found:
                found[url] = limits.problems(self._reader().probe(url))
            where = f"items[{i}].video_url" if batch else "video_url"
            problems += [(where, f"the video {problem}; nothing was enqueued") for problem in found[url]]
        if problems:
            raise InvalidRequest(problems)

    # ------------------------------------------------------------------ quotes
    def quote(
        self,
        request_or_url: ReframeInput | Mapping[str, Any] | str | os.PathLike[str],
        *,
        tenant: str | None = None,
        dedupe: bool | None = None,
    ) -> Quote:
        """What a job would cost and whether it would be accepted now; nothing is enqueued.

        ``request_or_url`` is a request (checked like :meth:`enqueue`'s), a video URL (http(s) or
        ``data:``; read through the guarded fetcher: Range requests, at most
        ``REFRAME_PROBE_MAX_BYTES`` within ``REFRAME_PROBE_TIMEOUT_S``) or a local file as a
        :class:`pathlib.Path` (read here, never uploaded). The :class:`Quote` gives the duration,
        size and resolution, the price (what the job is charged when it succeeds: the duration in
        whole ``REFRAME_BILLING_UNIT_S`` at ``REFRAME_PRICE_PER_S_USD``), the reservation it would
        hold, whether it fits the model's limits and, now, the cluster's and ``tenant``'s budgets
        (``default`` when None), with the reasons. Raises :class:`InvalidRequest` for a bad request,
        URL, tenant or a local file that is not a readable video.

        For a whole request, ``dedupe_hit`` names the job an identical request would reuse now (a
        success within ``REFRAME_DEDUPE_RETENTION_S`` or a job in flight; the price is then 0) when
        dedupe applies to it: ``dedupe``, else the tenant's default, else ``REFRAME_DEDUPE_DEFAULT``.
        """
        chosen = _tenant(tenant)
        hit: Hit | None = None
        if isinstance(request_or_url, os.PathLike):
            info, source = self._reader().read_file(Path(request_or_url)), "file"
        else:
            url = self._video_url(request_or_url)
            info, source = self._reader().probe(url), "data" if url[:5].lower() == "data:" else "url"
            if isinstance(request_or_url, ReframeInput | Mapping) and self._dedupe_on(chosen, dedupe):
                hit = self._identical(check_enqueue({"input": request_or_url}, self.limits).input)
        budgets = read_budgets(self.r, prefix=self.settings.key_prefix, settings=self.settings, tenant=chosen)
        return build_quote(
            info,
            self.settings,
            budgets,
            tenant=chosen,
            source=source,
            dedupe_hit=hit.job_id if hit else None,
            dedupe_hit_state=hit.state if hit else "",
        )

    def _dedupe_on(self, tenant: str, dedupe: bool | None) -> bool:
        """Whether a request of ``tenant`` would dedupe: the request > the tenant > the cluster (the
        rule of worker/contracts/lua/enqueue.lua)."""
        if dedupe is not None:
            return dedupe
        raw = self.r.hget(self.store.keys.tenant_limits(tenant), "dedupe")
        said = _text(raw) if raw else ""
        return said == "on" if said in ("on", "off") else self.settings.dedupe_default

    def _identical(self, request: ReframeInput) -> Hit | None:
        """The job an identical request reuses now (canonical key as the submitter computes it), or None."""
        key = self._reader().canonical_key(request)
        return None if key is None else DedupeStore(self.r, self.store.keys).lookup(key)

    def _video_url(self, request_or_url: object) -> str:
        """The checked ``video_url`` of a request or of a bare URL (errors name ``video_url``)."""
        if isinstance(request_or_url, str):
            probe = {"input": {"video_url": request_or_url, "aspect_ratio": "16:9"}}
            return check_enqueue(probe, self.limits).input.video_url
        if isinstance(request_or_url, ReframeInput | Mapping):
            return check_enqueue({"input": request_or_url}, self.limits).input.video_url
        raise InvalidRequest([("input", "must be a request, a video URL or a local file (pathlib.Path)")])

    def _reader(self) -> InputReader:
        """The input reader of quotes, the enqueue probe and dedupe lookups (made on first use)."""
        # The one import of ours made on first use, for weight, not to dodge a cycle: it loads httpx
        # and PyAV, which importing the producer must not (tests/unit/test_packaging.py).
        from producer.inputs import InputReader

        with self._inputs_lock:
            if self._inputs is None:
                self._inputs = InputReader(self.settings)
            return self._inputs

    # ------------------------------------------------------------------ observe
    def get(self, job_id: str) -> Job | None:
        """The job, or None if unknown or expired."""
        call: JobIdCall = check_call(JobIdCall, {"job_id": job_id}, self.limits)
        rec = self.store.get(call.job_id)
        return Job.from_record(rec) if rec else None

    def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        """Several jobs in one round trip."""
        ids = list(job_ids) if isinstance(job_ids, list | tuple) else job_ids
        call: JobIdsCall = check_call(JobIdsCall, {"job_ids": ids}, self.limits)
        return [Job.from_record(r) if r else None for r in self.store.get_many(call.job_ids)]

    def wait(self, job_id: str, timeout_s: float, *, poll_interval_s: float = 0.5) -> Job:
        """Block until the job is terminal; raise ``TimeoutError`` after ``timeout_s``.

        A success whose output copy is still ``pending`` (its first copy try under way) is waited for
        too, so the job returned names the stored output; a copy that is ``retrying`` (the store is
        down) does not hold the wait. Blocks on the result stream (``XREAD``) rather than polling the
        record, so a waiter wakes as soon as the terminal event is published; the record is re-read
        at least every ``poll_interval_s`` in case the stream was trimmed.
        """
        args = {"job_id": job_id, "timeout_s": timeout_s, "poll_interval_s": poll_interval_s}
        call: WaitCall = check_call(WaitCall, args, self.limits)
        deadline = time.monotonic() + call.timeout_s
        last_id = "$"
        while True:
            job = self.get(call.job_id)
            if job is None:
                raise KeyError(f"job_id: no job {call.job_id}")
            if job.terminal:
                return job
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"job {call.job_id} still {job.state.value} after {call.timeout_s}s")
            block_ms = max(1, int(min(remaining, call.poll_interval_s) * 1000))
            entries: Any = self.r.xread({self.store.keys.events: last_id}, block=block_ms, count=100)
            for _stream, items in entries or []:
                if items:
                    last_id = items[-1][0]

    def cancel(self, job_id: str) -> CancelOutcome:
        """Cancel a job: at once if it has not reached fal, else ask a worker to cancel it at fal."""
        job_id = check_call(JobIdCall, {"job_id": job_id}, self.limits).job_id
        rec = self.store.record(job_id)
        if rec is None:
            return CancelOutcome.NOT_FOUND
        # A job that has not reached fal ends here, its slot and reservation freed in the same
        # step; waiting jobs are admitted into the slot by the workers' next sweep (the producer
        # does not know the cluster's capacity, so it does not admit).
        outcome = self.store.finish(
            job_id,
            JobState.CANCELLED,
            Fence(from_states=PRE_SUBMIT_STATES),
            event_id=rec.event_id,
            idempotency_key=rec.idempotency_key,
            slot=SlotAction.DROP,
            budget=BudgetAction.RELEASE,
            fields={"error": {"type": "cancelled", "message": "cancelled before submission"}},
            event={"error_type": "cancelled", "error_message": "cancelled before submission"},
            callback={
                "video": None,
                "cost_usd": None,
                "error": {"type": "cancelled", "message": "cancelled before submission"},
            },
        )
        if outcome.ok:
            return CancelOutcome.CANCELLED
        if outcome.state == "":
            return CancelOutcome.NOT_FOUND
        if JobState(outcome.state).terminal:
            return CancelOutcome.ALREADY_FINISHED
        self.store.set_fields(job_id, cancel_requested=True)
        pri = Priority.HIGH.celery_priority  # a cancel should not wait behind a backlog
        self.r.lpush(
            celery_queue_key(self.settings.queue_name, pri),
            task_message(CANCEL_TASK, [job_id], queue=self.settings.queue_name, priority=pri),
        )
        return CancelOutcome.REQUESTED

    # ------------------------------------------------------------------ dead letters
    def dead_letters(self, limit: int = 100) -> list[Job]:
        """Dead-lettered jobs, oldest first (at most ``limit``)."""
        ids = [_text(x) for x in self.r.zrange(self.store.keys.dlq, 0, max(1, int(limit)) - 1)]
        return [job for job in self.get_many(ids) if job is not None]

    def dead_letter_count(self) -> int:
        """How many jobs are in the dead-letter set."""
        return int(self.r.zcard(self.store.keys.dlq))

    def replay(self, job_id: str, *, force: bool = False) -> ReplayOutcome:
        """Send a dead-lettered job back to QUEUED as a new life (new attempts, a new event id).

        A job whose death may have been paid for at fal (an ambiguous submit, a result that could
        not be read) is refused with :attr:`ReplayOutcome.NEEDS_FORCE` unless ``force``: replaying
        it may pay twice for the same work, and the caller must say that it accepts that.
        """
        job_id = check_call(JobIdCall, {"job_id": job_id}, self.limits).job_id
        job = self.get(job_id)
        if job is None:
            return ReplayOutcome.NOT_FOUND
        outcome = self.store.replay(job_id, job.priority, force=force)
        if outcome.ok:
            return ReplayOutcome.REPLAYED
        if outcome.state.startswith("NEEDS_FORCE"):
            return ReplayOutcome.NEEDS_FORCE
        return ReplayOutcome.NOT_DEAD_LETTERED if outcome.state else ReplayOutcome.NOT_FOUND

    def purge_dead_letters(self) -> int:
        """Empty the dead-letter set (the records expire on their own); returns how many were in it."""
        n = self.dead_letter_count()
        self.r.delete(self.store.keys.dlq)
        return n

    # ------------------------------------------------------------------ callbacks
    def failed_callbacks(self, limit: int = 100) -> list[dict[str, str]]:
        """Callbacks given up after their retry window: event id, job id, url, attempts, last error."""
        return self.store.failed_callbacks(max(1, int(limit)))

    def redeliver_callback(self, event_id: str) -> bool:
        """Put a given-up callback back in the outbox (due now, a fresh retry window)."""
        return self.store.redeliver_callback(event_id)


class ReplayOutcome(StrEnum):
    """What :meth:`Producer.replay` did."""

    REPLAYED = "replayed"
    NEEDS_FORCE = "needs_force"
    """fal may hold (and bill) the dead attempt's request: replaying may pay twice; pass force."""
    NOT_DEAD_LETTERED = "not_dead_lettered"
    NOT_FOUND = "not_found"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
