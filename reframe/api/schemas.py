"""Request and response models of the HTTP API (they are its OpenAPI schema).

Requests are *validated* by the producer's strict contracts (``worker/contracts/intake.py``:
``check_enqueue``/``check_batch``), exactly as the library validates them; the request models
here only describe those bodies in the OpenAPI document. A job body is the reframe input (fal's
schema) plus ``priority``, ``metadata``, ``callback_url``, ``deadline_s`` and ``dedupe``, flat.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from producer import Job
from worker.contracts.intake import IDEMPOTENCY_KEY_PATTERN, MAX_CALLBACK_URL_CHARS
from worker.contracts.models import JobState, ReframeInput

#: Body fields that are not part of the reframe input.
CALL_FIELDS = ("priority", "metadata", "callback_url", "deadline_s", "dedupe")


class JobCreate(ReframeInput):
    """A job: the reframe input plus how to run and report it (documentation model)."""

    priority: Literal["high", "normal", "low"] = Field(default="normal", description="Queue priority.")
    metadata: dict[str, Any] | None = Field(
        default=None, description="Your JSON object, stored and published with the job's events."
    )
    callback_url: str | None = Field(
        default=None,
        max_length=MAX_CALLBACK_URL_CHARS,
        description="Signed POST of the terminal result (needs REFRAME_CALLBACK_SIGNING_KEY).",
    )
    deadline_s: float | None = Field(
        default=None, gt=0, description="Fail the job if it is not submitted within this many seconds."
    )
    dedupe: bool | None = Field(
        default=None,
        description="Pay once for identical work (null: the tenant's default, else REFRAME_DEDUPE_DEFAULT).",
    )


class BatchItem(JobCreate):
    """One job of a batch; ``idempotency_key`` plays the role of the Idempotency-Key header."""

    idempotency_key: str | None = Field(default=None, pattern=IDEMPOTENCY_KEY_PATTERN, max_length=120)


class BatchCreate(BaseModel):
    """A batch: all of it is enqueued or none of it."""

    model_config = ConfigDict(extra="forbid")

    items: list[BatchItem] = Field(description="The jobs (at most REFRAME_ENQUEUE_MAX_BATCH).")


class Enqueued(BaseModel):
    """What an enqueue did."""

    id: str = Field(description="The job id.")
    state: JobState | None = Field(description="QUEUED when created; the existing job's state otherwise.")
    created: bool = Field(description="False when an idempotency key returned an existing job.")


class BatchEnqueued(BaseModel):
    """What a batch enqueue did, item by item (same order)."""

    items: list[Enqueued]


class JobOut(BaseModel):
    """A job as the API shows it."""

    id: str
    state: JobState
    priority: Literal["high", "normal", "low"]
    tenant: str | None = Field(description="Owner (null for jobs enqueued through the library or CLI).")
    input: dict[str, Any]
    metadata: dict[str, Any]
    created_at_ms: int
    attempts: int
    terminal: bool
    video_url: str | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    cost_usd: float | None
    fal_request_id: str | None
    timestamps_ms: dict[str, int]
    dead_letter_reason: str | None
    deduped_from: str | None = Field(
        default=None, description="The job whose result this one reused without a fal call (null: it paid)."
    )
    output_copy: str | None = Field(
        default=None,
        description="The output's copy into the output store: pending, retrying, copied or failed "
        "(null: no store, or not a paid success).",
    )
    output_key: str | None = Field(default=None, description="The stored output's content-addressed key.")
    output_verify: str | None = Field(
        default=None, description="ok, or mismatch: the output is not the requested aspect ratio or length."
    )
    output_verification: dict[str, Any] | None = Field(
        default=None, description="The measured output (width, height, duration_s, codec, ...), reasons."
    )

    @classmethod
    def of(cls, job: Job, tenant: str | None) -> JobOut:
        """From the library's read-only view."""
        return cls(
            id=job.id,
            state=job.state,
            priority=job.priority.value,
            tenant=tenant or None,
            input=job.input,
            metadata=job.metadata,
            created_at_ms=job.created_at_ms,
            attempts=job.attempts,
            terminal=job.terminal,
            video_url=job.video_url,
            result=job.result if isinstance(job.result, dict) else None,
            error=job.error if isinstance(job.error, dict) else None,
            cost_usd=job.cost_usd,
            fal_request_id=job.fal_request_id,
            timestamps_ms=job.timestamps_ms,
            dead_letter_reason=job.dead_letter_reason,
            deduped_from=job.deduped_from,
            output_copy=job.output_copy,
            output_key=job.output_key,
            output_verify=job.output_verify,
            output_verification=job.output_verification,
        )


class JobPage(BaseModel):
    """One page of a listing. Follow ``next_cursor`` until it is null; a page may hold fewer than
    ``limit`` items (a filter skipped entries) and still have a next one."""

    items: list[JobOut]
    next_cursor: str | None


class CancelOut(BaseModel):
    """What a cancel did."""

    outcome: Literal["cancelled", "cancel_requested", "already_finished"]
    job: JobOut | None


class ReplayIn(BaseModel):
    """Replay options."""

    model_config = ConfigDict(extra="forbid", strict=True)

    force: bool = Field(
        default=False,
        description="Replay even when fal may already hold (and bill) the dead attempt: may pay twice.",
    )


class ReplayOut(BaseModel):
    """A replayed job."""

    outcome: Literal["replayed"]
    job: JobOut | None


class PurgeIn(BaseModel):
    """Purge confirmation."""

    model_config = ConfigDict(extra="forbid", strict=True)

    confirm: bool = Field(description="Must be true: every dead letter of every tenant is dropped.")


class PurgeOut(BaseModel):
    """What a purge did."""

    purged: int = Field(description="Dead letters removed from the set.")


class DeadLetterPage(BaseModel):
    """Dead-lettered jobs, oldest first."""

    items: list[JobOut]
    total: int = Field(description="Dead letters in the cluster (admin) or in this page's scan (tenant).")


class Upload(BaseModel):
    """A file stored at fal."""

    url: str
    size_bytes: int


class Health(BaseModel):
    """Liveness or readiness."""

    status: Literal["ok"]
