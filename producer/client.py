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

import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import redis

from config import Settings
from worker.contracts.keys import celery_queue_key
from worker.contracts.models import (
    PRE_SUBMIT_STATES,
    InvalidRequest,
    JobState,
    Priority,
    ReframeInput,
    parse_input,
)
from worker.contracts.store import JobStore
from worker.contracts.wire import CANCEL_TASK, task_message


class IdempotencyConflict(ValueError):
    """The idempotency key was already used for a different request."""

    def __init__(self, key: str, job_id: str) -> None:
        self.key = key
        self.job_id = job_id
        super().__init__(
            f"idempotency_key: {key!r} was already used by job {job_id} with a different request"
        )


class CancelOutcome(StrEnum):
    """What :meth:`Producer.cancel` did."""

    CANCELLED = "cancelled"
    """The job had not reached fal; it is CANCELLED now."""
    REQUESTED = "cancel_requested"
    """fal has (or may have) the request; a worker asks fal to cancel it."""
    ALREADY_FINISHED = "already_finished"
    """The job was already in a terminal state."""
    NOT_FOUND = "not_found"
    """No such job (or its record expired)."""


@dataclass(frozen=True)
class EnqueueRequest:
    """One job for :meth:`Producer.enqueue_many`."""

    input: ReframeInput | dict[str, Any]
    idempotency_key: str | None = None
    priority: Priority | str = Priority.NORMAL
    metadata: Mapping[str, Any] | None = None
    callback_url: str | None = None


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

    @property
    def terminal(self) -> bool:
        """True once the job SUCCEEDED, FAILED or was CANCELLED."""
        return self.state.terminal

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
        )


def _check_callback_url(url: str | None) -> str | None:
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest([("callback_url", "must be an http(s) URL with a host")])
    return url


def _check_priority(value: Priority | str) -> Priority:
    try:
        return Priority(value)
    except ValueError:
        raise InvalidRequest([("priority", "must be one of high, normal, low")]) from None


def _check_idempotency_key(key: str | None) -> str | None:
    if key is not None and not (1 <= len(key) <= 255):
        raise InvalidRequest([("idempotency_key", "must be 1 to 255 characters")])
    return key


class Producer:
    """Enqueue and observe reframe jobs. Thread-safe; one instance per process is plenty."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self._own_client = client is None
        self.r = client or redis.Redis.from_url(
            settings.redis_url, socket_timeout=settings.redis_socket_timeout_s, health_check_interval=25
        )
        self.store = JobStore(
            self.r,
            prefix=settings.key_prefix,
            queue=settings.queue_name,
            retention_s=settings.job_retention_s,
            stream_maxlen=settings.results_stream_maxlen,
        )

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the Redis connection pool if this producer created it."""
        if self._own_client:
            self.r.close()

    # ------------------------------------------------------------------ enqueue
    def validate(self, request: ReframeInput | Mapping[str, Any]) -> ReframeInput:
        """Validate a request against fal's schema and our limits; raises :class:`InvalidRequest`."""
        data = request if isinstance(request, ReframeInput) else dict(request)
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
    ) -> str:
        """Validate and enqueue one job; return its id.

        The record and the Celery message are written by one Redis script, so either both exist or
        neither does. With ``idempotency_key``, the same key and the same input return the first
        job's id (nothing is enqueued again); the same key with a different input raises
        :class:`IdempotencyConflict`.
        """
        item = EnqueueRequest(
            dict(request) if isinstance(request, Mapping) else request,
            idempotency_key,
            priority,
            metadata,
            callback_url,
        )
        return self.enqueue_many([item])[0]

    def enqueue_many(
        self, requests: Iterable[EnqueueRequest | Mapping[str, Any]], *, batch_size: int = 1000
    ) -> list[str]:
        """Validate every request first, then enqueue them pipelined; return the job ids in order.

        Nothing is enqueued if any request is invalid (the error names the item index and field).
        """
        prepared = [self._prepare(i, item) for i, item in enumerate(requests)]
        ids: list[str] = []
        for start in range(0, len(prepared), batch_size):
            chunk = prepared[start : start + batch_size]
            outcomes = self.store.enqueue_many((keys, argv) for keys, argv, _fp, _key in chunk)
            for (_keys, _argv, fingerprint, key), out in zip(chunk, outcomes, strict=True):
                if not out.created and out.existing_fingerprint != fingerprint:
                    raise IdempotencyConflict(key or "", out.job_id)
                ids.append(out.job_id)
        return ids

    def _prepare(
        self, index: int, item: EnqueueRequest | Mapping[str, Any]
    ) -> tuple[list[str], list[str], str, str | None]:
        if not isinstance(item, EnqueueRequest):
            item = EnqueueRequest(dict(item))
        try:
            request = self.validate(item.input if isinstance(item.input, ReframeInput) else dict(item.input))
            priority = _check_priority(item.priority)
            callback = _check_callback_url(item.callback_url)
            key = _check_idempotency_key(item.idempotency_key)
        except InvalidRequest as exc:
            if index == 0:
                raise
            raise InvalidRequest([(f"[{index}].{f}", m) for f, m in exc.errors]) from None
        job_id = uuid.uuid4().hex
        fields = self.store.record_fields(
            job_id,
            request,
            priority=priority,
            metadata=item.metadata,
            callback_url=callback,
            idempotency_key=key,
            deadline_s=self.settings.job_deadline_s,
        )
        fingerprint = request.fingerprint()
        keys, argv = self.store.enqueue_args(job_id, fields, fingerprint, priority, key)
        return keys, argv, fingerprint, key

    # ------------------------------------------------------------------ observe
    def get(self, job_id: str) -> Job | None:
        """The job, or None if unknown or expired."""
        rec = self.store.get(job_id)
        return Job.from_record(rec) if rec else None

    def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        """Several jobs in one round trip."""
        return [Job.from_record(r) if r else None for r in self.store.get_many(job_ids)]

    def wait(self, job_id: str, timeout_s: float, *, poll_interval_s: float = 0.5) -> Job:
        """Block until the job is terminal; raise ``TimeoutError`` after ``timeout_s``.

        Blocks on the result stream (``XREAD``) rather than polling the record, so a waiter wakes as
        soon as the terminal event is published; the record is re-read at least every
        ``poll_interval_s`` in case the stream was trimmed.
        """
        deadline = time.monotonic() + timeout_s
        last_id = "$"
        while True:
            job = self.get(job_id)
            if job is None:
                raise KeyError(f"job_id: no job {job_id}")
            if job.terminal:
                return job
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"job {job_id} still {job.state.value} after {timeout_s}s")
            block_ms = max(1, int(min(remaining, poll_interval_s) * 1000))
            entries: Any = self.r.xread({self.store.keys.events: last_id}, block=block_ms, count=100)
            for _stream, items in entries or []:
                if items:
                    last_id = items[-1][0]

    def cancel(self, job_id: str) -> CancelOutcome:
        """Cancel a job: at once if it has not reached fal, else ask a worker to cancel it at fal."""
        outcome = self.store.finish(
            job_id,
            JobState.CANCELLED,
            record={"error": {"type": "cancelled", "message": "cancelled before submission"}},
            event={"error_type": "cancelled", "error_message": "cancelled before submission"},
            allowed_from=PRE_SUBMIT_STATES,
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
