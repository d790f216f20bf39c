"""``/v1/dead-letters``: list, show and replay dead-lettered jobs (``Producer.replay``); purge the set."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import ValidationError

from producer import ReplayOutcome
from reframe.api.keys import Principal, Scope
from reframe.api.problems import ProblemError, invalid, not_found
from reframe.api.routes.jobs import JobIdPath, json_body, own_job
from reframe.api.schemas import DeadLetterPage, JobOut, PurgeIn, PurgeOut, ReplayIn, ReplayOut
from reframe.api.services import require, services
from worker.contracts.models import InvalidRequest

router = APIRouter(prefix="/v1", tags=["dead letters"])

#: Most dead letters one request reads.
MAX_DEAD_LETTERS = 500


@router.get("/dead-letters", response_model=DeadLetterPage, summary="List dead letters")
def list_dead_letters(
    request: Request,
    principal: Annotated[Principal, Depends(require(Scope.READ))],
    limit: Annotated[int, Query(ge=1, le=MAX_DEAD_LETTERS)] = 100,
) -> DeadLetterPage:
    """Dead-lettered jobs, oldest first: all of them for admins, the tenant's own otherwise (among
    the oldest ``limit`` of the cluster)."""
    svc = services(request)
    ids = [
        x.decode() if isinstance(x, bytes) else str(x)
        for x in svc.r.zrange(svc.producer.store.keys.dlq, 0, limit - 1)
    ]
    items = []
    for rec in svc.producer.store.get_many(ids):
        if rec is None:
            continue
        tenant = rec.get("tenant") or None
        if principal.admin or tenant == principal.tenant:
            from producer import Job

            items.append(JobOut.of(Job.from_record(rec), tenant))
    total = svc.producer.dead_letter_count() if principal.admin else len(items)
    return DeadLetterPage(items=items, total=total)


@router.get("/dead-letters/{job_id}", response_model=JobOut, summary="Show a dead letter")
def get_dead_letter(
    request: Request,
    job_id: JobIdPath,
    principal: Annotated[Principal, Depends(require(Scope.READ))],
) -> JobOut:
    """One dead-lettered job (404 when it is not in the dead-letter set)."""
    svc = services(request)
    job, tenant = own_job(svc, principal, job_id)
    if svc.r.zscore(svc.producer.store.keys.dlq, job_id) is None:
        raise not_found(f"dead letter {job_id}")
    return JobOut.of(job, tenant)


@router.post(
    "/dead-letters/{job_id}/replay",
    response_model=ReplayOut,
    summary="Replay a dead letter",
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ReplayIn"}}},
        }
    },
)
async def replay_dead_letter(
    request: Request,
    job_id: JobIdPath,
    principal: Annotated[Principal, Depends(require(Scope.ENQUEUE))],
) -> ReplayOut:
    """Send the job back to QUEUED as a new life. A death fal may have billed (an ambiguous submit,
    an unreadable result) is refused with 409 unless ``{"force": true}``: replaying may pay twice."""
    svc = services(request)
    raw = await request.body()
    options = ReplayIn()
    if raw.strip():
        body = await json_body(request)
        try:
            options = ReplayIn.model_validate(body)
        except ValidationError as exc:
            raise invalid(InvalidRequest.from_validation_error(exc).errors) from None
    from starlette.concurrency import run_in_threadpool

    await run_in_threadpool(own_job, svc, principal, job_id)
    outcome = await run_in_threadpool(svc.producer.replay, job_id, force=options.force)
    if outcome is ReplayOutcome.NEEDS_FORCE:
        raise ProblemError(
            409,
            "replay-needs-force",
            "Replay may pay twice",
            "fal may already hold (and bill) this job's dead attempt (an ambiguous submit or an "
            'unreadable result): replaying it may pay twice for the same work. Send {"force": true} '
            "to accept that risk.",
        )
    if outcome is ReplayOutcome.NOT_DEAD_LETTERED:
        raise ProblemError(
            409, "not-dead-lettered", "Not a dead letter", f"job {job_id} is not dead-lettered"
        )
    if outcome is ReplayOutcome.NOT_FOUND:
        raise not_found(f"job {job_id}")
    job, tenant = await run_in_threadpool(own_job, svc, principal, job_id)
    return ReplayOut(outcome="replayed", job=JobOut.of(job, tenant))


@router.post(
    "/dead-letters/purge",
    response_model=PurgeOut,
    summary="Purge the dead-letter set (admin)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PurgeIn"}}},
        }
    },
)
async def purge_dead_letters(
    request: Request,
    _principal: Annotated[Principal, Depends(require(Scope.ADMIN))],
) -> PurgeOut:
    """Empty the dead-letter set of every tenant, like ``reframe dlq purge --yes`` (the records
    expire on their own); refused unless the body says ``{"confirm": true}``."""
    svc = services(request)
    try:
        options = PurgeIn.model_validate(await json_body(request))
    except ValidationError as exc:
        raise invalid(InvalidRequest.from_validation_error(exc).errors) from None
    if not options.confirm:
        raise invalid([("confirm", 'purging every dead letter needs {"confirm": true}')])
    from starlette.concurrency import run_in_threadpool

    return PurgeOut(purged=await run_in_threadpool(svc.producer.purge_dead_letters))
