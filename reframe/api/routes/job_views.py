"""Views of jobs for people: a job's timeline (``/v1/jobs/{id}/timeline``) and a live stream of the
changes of a tenant's jobs (``/v1/job-events``, Server-Sent Events). The operator console
(``reframe/console/``) is built on them; any client may use them.

The stream is stateless like the rest of the API: on every tick (``REFRAME_API_SSE_POLL_INTERVAL_S``)
it reads the listing index (``reframe/api/tenancy.py``) for jobs created since it last looked, then
re-reads, in one pipelined round trip, the records of the jobs it follows (new ones and those named
by ``watch``) that are not terminal yet, and sends a ``job`` event for every one whose state,
attempts, life or fal request changed. A job is followed until it is terminal (its last event is
sent) or the stream ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from producer import Job
from reframe.api.keys import Principal, Scope
from reframe.api.problems import ProblemError
from reframe.api.routes.jobs import JobIdPath, _sse, own_job
from reframe.api.schemas import JobOut
from reframe.api.services import Services, require, services
from worker.contracts.intake import JOB_ID_PATTERN
from worker.contracts.models import JobState
from worker.contracts.store import decode_record
from worker.contracts.tenants import DEFAULT_TENANT, TENANT_PATTERN

router = APIRouter(prefix="/v1", tags=["jobs"])

#: Most jobs one change stream follows at once (the oldest followed ones are dropped past it).
MAX_FOLLOWED = 1000
#: Most jobs named by ``watch``.
MAX_WATCH = 200
#: Most new index entries one tick reads.
MAX_NEW_PER_TICK = 500


class TimelineStep(BaseModel):
    """A state the job entered: when (ms, Redis time) and how long it stayed (null: still there)."""

    state: JobState
    at_ms: int
    duration_ms: int | None


class JobTimeline(BaseModel):
    """A job's life as the console shows it. ``steps`` holds the last time each state was entered,
    in time order (a retried job re-enters states: the record keeps the latest entry of each)."""

    job: JobOut
    steps: list[TimelineStep]
    now_ms: int = Field(description="Redis time when this was read.")
    attempts: int = Field(description="Attempts of the current life.")
    attempt_seq: int = Field(description="Attempts over every life (replays included).")
    replays: int
    fal_request_ids: list[str] = Field(description="fal requests of this life, oldest first.")
    idempotency_key: str | None
    estimate_usd: float | None = Field(description="What was reserved from the budget for the job.")
    settled_usd: float | None = Field(description="What the budget was charged once the job ended.")
    last_error: dict[str, Any] | None = Field(description="The latest error a retry followed.")
    callback_status: str | None


@router.get("/jobs/{job_id}/timeline", response_model=JobTimeline, summary="A job's timeline")
def job_timeline(
    request: Request,
    job_id: JobIdPath,
    principal: Annotated[Principal, Depends(require(Scope.READ))],
) -> JobTimeline:
    """The job with its states in time order (each with its duration), attempts, fal request ids,
    errors, cost estimate and settlement (404 when unknown, expired or another tenant's)."""
    svc = services(request)
    own_job(svc, principal, job_id)
    raw = svc.r.hgetall(svc.producer.store.keys.job(job_id))
    seconds, micros = svc.r.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    if not raw:
        raise ProblemError(404, "not-found", "Not found", f"job {job_id} does not exist")
    rec = decode_record(raw)
    job = Job.from_record(rec)
    entered = sorted(
        ((int(v), k[3:]) for k, v in rec.items() if k.startswith("ts_") and isinstance(v, int)),
    )
    steps = []
    for i, (at_ms, state) in enumerate(entered):
        if state not in JobState.__members__:
            continue
        if i + 1 < len(entered):
            duration: int | None = entered[i + 1][0] - at_ms
        else:
            duration = None if not JobState(state).terminal else 0
        steps.append(TimelineStep(state=JobState(state), at_ms=at_ms, duration_ms=duration))
    previous = [x for x in str(rec.get("previous_request_ids") or "").split(",") if x]
    current = [job.fal_request_id] if job.fal_request_id else []
    estimate = rec.get("estimate_micro")
    settled = rec.get("cost_actual_micro")
    last_error = rec.get("last_error")
    return JobTimeline(
        job=JobOut.of(job, rec.get("tenant") or None),
        steps=steps,
        now_ms=now_ms,
        attempts=job.attempts,
        attempt_seq=_int(rec.get("attempt_seq")),
        replays=_int(rec.get("replays")),
        fal_request_ids=[*previous, *current],
        idempotency_key=_idem(rec.get("idempotency_key"), rec.get("tenant") or DEFAULT_TENANT),
        estimate_usd=_int(estimate) / 1e6 if estimate not in (None, "") else None,
        settled_usd=_int(settled) / 1e6 if settled not in (None, "") else None,
        last_error=last_error if isinstance(last_error, dict) else None,
        callback_status=str(rec.get("callback_status") or "") or None,
    )


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _idem(value: Any, tenant: str) -> str | None:
    """The caller's idempotency key (the record keeps it behind its tenant: ``tenant:key``, see
    ``worker/contracts/tenants.py``)."""
    text = str(value or "")
    if tenant != DEFAULT_TENANT:
        text = text.removeprefix(f"{tenant}:")
    return text or None


def _mark(rec: dict[str, Any]) -> tuple[Any, ...]:
    # output_copy too: a success is terminal (Job.terminal) once its copy is out of `pending`
    return (
        rec.get("state"),
        rec.get("attempts"),
        rec.get("replays"),
        rec.get("fal_request_id"),
        rec.get("output_copy") == "pending",
    )


@router.get(
    "/job-events",
    summary="Follow a tenant's jobs (Server-Sent Events)",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "`event: job` with the job as data whenever a followed job changes (new "
            "jobs are followed from their creation); `event: end` when the stream's time is up.",
        }
    },
)
async def job_events(
    request: Request,
    principal: Annotated[Principal, Depends(require(Scope.READ))],
    tenant: Annotated[
        str | None, Query(pattern=TENANT_PATTERN, description="Admins: one tenant's jobs (default all).")
    ] = None,
    since_ms: Annotated[
        int | None, Query(ge=0, description="Also follow jobs created at or after this time (ms).")
    ] = None,
    watch: Annotated[
        list[Annotated[str, Query(pattern=JOB_ID_PATTERN)]] | None,
        Query(max_length=MAX_WATCH, description="Also follow these jobs (e.g. the ones on screen)."),
    ] = None,
) -> StreamingResponse:
    """Changes of the caller's tenant's jobs (every tenant's for admins, or the one named) as SSE:
    jobs created from ``since_ms`` (default: now) and the ``watch`` ids, until each is terminal."""
    svc = services(request)
    if tenant is not None and not principal.admin and tenant != principal.tenant:
        raise ProblemError(403, "forbidden", "Forbidden", "only admin keys may follow another tenant")
    scope_tenant = tenant or (None if principal.admin else principal.tenant)
    seconds, micros = await svc.ar.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    follower = _Follower(svc, principal, scope_tenant, since_ms=now_ms if since_ms is None else since_ms)
    follower.follow(dict.fromkeys(watch or []))
    return StreamingResponse(
        follower.stream(request),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


class _Follower:
    """The state of one change stream."""

    def __init__(self, svc: Services, principal: Principal, tenant: str | None, *, since_ms: int) -> None:
        self.svc = svc
        self.principal = principal
        self.tenant = tenant
        self.keys = svc.producer.store.keys
        self.index = self.keys.jobs_index if tenant is None else self.keys.tenant_jobs(tenant)
        self.low_ms = since_ms
        self.seen_at_low: set[str] = set()
        self.followed: dict[str, tuple[Any, ...] | None] = {}

    def follow(self, ids: dict[str, None]) -> None:
        for job_id in ids:
            self.followed.setdefault(job_id, None)
        while len(self.followed) > MAX_FOLLOWED:
            self.followed.pop(next(iter(self.followed)))

    async def new_jobs(self) -> None:
        """Index entries created since the last look (ties at the boundary by id, never twice)."""
        chunk: Any = await self.svc.ar.zrangebyscore(
            self.index, self.low_ms, "+inf", start=0, num=MAX_NEW_PER_TICK, withscores=True
        )
        fresh: dict[str, None] = {}
        for member, score in chunk:
            job_id = member.decode() if isinstance(member, bytes) else str(member)
            ms = int(score)
            if ms > self.low_ms:
                self.low_ms, self.seen_at_low = ms, set()
            if job_id in self.seen_at_low:
                continue
            self.seen_at_low.add(job_id)
            fresh[job_id] = None
        self.follow(fresh)

    async def changes(self) -> list[bytes]:
        """Events for followed jobs that changed; terminal and vanished ones stop being followed."""
        ids = list(self.followed)
        if not ids:
            return []
        pipe = self.svc.ar.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self.keys.job(job_id))
        out = []
        for job_id, raw in zip(ids, await pipe.execute(), strict=True):
            if not raw:
                self.followed.pop(job_id, None)
                continue
            rec = decode_record(raw)
            owner = rec.get("tenant") or None
            if not self.principal.admin and owner != self.principal.tenant:
                self.followed.pop(job_id, None)  # another tenant's: as if it did not exist
                continue
            mark = _mark(rec)
            if mark == self.followed.get(job_id):
                continue
            job = Job.from_record(rec)
            self.followed[job_id] = mark
            out.append(_sse("job", JobOut.of(job, owner).model_dump(mode="json")))
            if job.terminal:
                self.followed.pop(job_id, None)
        return out

    async def stream(self, request: Request) -> AsyncIterator[bytes]:
        settings = self.svc.settings
        started = last_sent = time.monotonic()
        yield b": following\n\n"
        while True:
            await self.new_jobs()
            for event in await self.changes():
                yield event
                last_sent = time.monotonic()
            now = time.monotonic()
            if now - started > settings.api_sse_max_s:
                yield _sse("end", {"reason": "stream time limit; reconnect"})
                return
            if now - last_sent >= settings.api_sse_heartbeat_s:
                yield b": keep-alive\n\n"
                last_sent = now
            if await request.is_disconnected():
                return
            await asyncio.sleep(settings.api_sse_poll_interval_s)
