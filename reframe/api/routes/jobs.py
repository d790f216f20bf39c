"""``/v1/jobs``: enqueue (one or a batch, with idempotency), read, list, cancel, follow (SSE)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from producer import CancelOutcome, IdempotencyConflict, InvalidRequest, Job
from reframe.api.keys import Principal, Scope
from reframe.api.problems import ProblemError, invalid, not_found
from reframe.api.schemas import (
    CALL_FIELDS,
    BatchEnqueued,
    CancelOut,
    Enqueued,
    JobOut,
    JobPage,
)
from reframe.api.services import Services, require, services
from reframe.api.tenancy import MAX_SCAN_PER_PAGE, Cursor
from worker.contracts.intake import (
    JOB_ID_PATTERN,
    EnqueueCall,
    EnqueueResult,
    check_batch,
    check_enqueue,
)
from worker.contracts.models import JobState
from worker.contracts.store import decode_record
from worker.contracts.tenants import TENANT_PATTERN

router = APIRouter(prefix="/v1", tags=["jobs"])

#: Idempotency-Key header: the library's charset, short enough to carry the tenant prefix.
HEADER_KEY_PATTERN = r"^[A-Za-z0-9._:-]{1,120}$"
#: Most jobs per listing page.
MAX_PAGE = 200

JobIdPath = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="The job id.")]


async def json_body(request: Request) -> Any:
    """The request's JSON body; 415/400 problems when it is not JSON."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise ProblemError(415, "unsupported-media-type", "Unsupported media type", "send application/json")
    raw = await request.body()
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError):
        raise ProblemError(400, "malformed-json", "Malformed JSON", "the body is not valid JSON") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def split_body(body: Any, *, item: bool = False) -> dict[str, Any]:
    """A flat job body as the arguments of ``check_enqueue``: input fields and call fields."""
    if not isinstance(body, dict):
        raise invalid([("", "the body must be a JSON object")])
    call_fields = (*CALL_FIELDS, "idempotency_key") if item else CALL_FIELDS
    args = {k: body[k] for k in call_fields if k in body}
    args["input"] = {k: v for k, v in body.items() if k not in call_fields}
    return args


def own_job(svc: Services, principal: Principal, job_id: str) -> tuple[Job, str | None]:
    """The job if the caller may see it (its tenant's, or any for admins); 404 otherwise."""
    raw = svc.r.hgetall(svc.producer.store.keys.job(job_id))
    if not raw:
        raise not_found(f"job {job_id}")
    rec = decode_record(raw)
    tenant = rec.get("tenant") or None
    if not principal.admin and tenant != principal.tenant:
        raise not_found(f"job {job_id}")
    return Job.from_record(rec), tenant


async def write(
    svc: Services, principal: Principal, calls: list[EnqueueCall], *, batch: bool
) -> list[EnqueueResult]:
    """Enqueue for the caller's tenant atomically (the library's intake, on the event loop); with
    ``REFRAME_ENQUEUE_PROBE_INPUT``, inputs over the model's limits are refused first (422)."""
    if svc.settings.enqueue_probe_input:
        try:
            await run_in_threadpool(svc.producer.refuse_over_limits, calls, batch=batch)
        except InvalidRequest as exc:
            raise invalid(exc.errors) from None
    return await svc.producer.intake.write_async(svc.ar, calls, batch=batch, tenant=principal.tenant)


def _enqueued(result: EnqueueResult) -> Enqueued:
    return Enqueued(id=result.job_id, state=result.state, created=result.created)


@router.post(
    "/jobs",
    status_code=201,
    response_model=Enqueued,
    summary="Enqueue a job",
    responses={200: {"model": Enqueued, "description": "An existing job for the same Idempotency-Key."}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobCreate"}}},
        }
    },
)
async def create_job(
    request: Request,
    response: Response,
    principal: Annotated[Principal, Depends(require(Scope.ENQUEUE))],
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            pattern=HEADER_KEY_PATTERN,
            description="Same key and same input: the first job (200). Another input: 409.",
        ),
    ] = None,
) -> Enqueued:
    """Validate (strictly, every bad field named) and enqueue one job; 201 with ``Location``."""
    svc = services(request)
    args = split_body(await json_body(request))
    if idempotency_key is not None:
        args["idempotency_key"] = idempotency_key
    try:
        call = check_enqueue(args, svc.producer.limits)
    except InvalidRequest as exc:
        raise invalid(exc.errors) from None
    try:
        result = (await write(svc, principal, [call], batch=False))[0]
    except IdempotencyConflict as exc:
        raise ProblemError(
            409,
            "idempotency-conflict",
            "Idempotency key reused",
            f"the Idempotency-Key was already used by job {exc.job_id} with a different request; "
            "nothing was enqueued",
            errors=[("Idempotency-Key", "already used with a different request")],
        ) from None
    response.status_code = 201 if result.created else 200
    response.headers["Location"] = f"/v1/jobs/{result.job_id}"
    return _enqueued(result)


@router.post(
    "/jobs/batch",
    status_code=201,
    response_model=BatchEnqueued,
    summary="Enqueue a batch atomically",
    responses={200: {"model": BatchEnqueued, "description": "Every item returned an existing job."}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BatchCreate"}}},
        }
    },
)
async def create_batch(
    request: Request,
    response: Response,
    principal: Annotated[Principal, Depends(require(Scope.ENQUEUE))],
) -> BatchEnqueued:
    """All or nothing, like ``Producer.enqueue_many``: any bad item or conflicting key refuses the
    whole batch, naming the items (``items[3].idempotency_key``); retrying the same batch is safe."""
    svc = services(request)
    body = await json_body(request)
    items = body.get("items") if isinstance(body, dict) else None
    if not isinstance(body, dict) or set(body) != {"items"} or not isinstance(items, list):
        raise invalid([("items", 'the body must be {"items": [job, ...]}')])
    args: list[dict[str, Any] | str] = []
    for item in items[: svc.producer.limits.max_batch + 1]:
        if not isinstance(item, dict):
            args.append("must be a JSON object")
            continue
        one = split_body(item, item=True)
        key = one.get("idempotency_key")
        if isinstance(key, str) and len(key) > 120:
            args.append("idempotency_key: at most 120 characters")
            continue
        args.append(one)
    try:
        calls = check_batch(args, svc.producer.limits)
    except InvalidRequest as exc:
        raise invalid(exc.errors) from None
    try:
        results = await write(svc, principal, calls, batch=True)
    except IdempotencyConflict as exc:
        errors = []
        for c in exc.conflicts:
            who = f"items[{c.other_index}] of this batch" if c.job_id is None else f"job {c.job_id}"
            errors.append(
                (f"items[{c.index}].idempotency_key", f"already used by {who} with a different request")
            )
        raise ProblemError(
            409,
            "idempotency-conflict",
            "Idempotency key reused",
            "idempotency keys were already used with different requests; nothing was enqueued",
            errors=errors,
        ) from None
    response.status_code = 201 if any(r.created for r in results) else 200
    return BatchEnqueued(items=[_enqueued(r) for r in results])


@router.get("/jobs/{job_id}", response_model=JobOut, summary="Get a job")
def get_job(
    request: Request,
    job_id: JobIdPath,
    principal: Annotated[Principal, Depends(require(Scope.READ))],
) -> JobOut:
    """The job (404 when unknown, expired or another tenant's)."""
    job, tenant = own_job(services(request), principal, job_id)
    return JobOut.of(job, tenant)


@router.get("/jobs", response_model=JobPage, summary="List jobs")
def list_jobs(
    request: Request,
    principal: Annotated[Principal, Depends(require(Scope.READ))],
    state: Annotated[list[JobState] | None, Query(description="Only jobs in these states.")] = None,
    created_from_ms: Annotated[int | None, Query(ge=0, description="Created at or after (ms).")] = None,
    created_to_ms: Annotated[int | None, Query(ge=0, description="Created at or before (ms).")] = None,
    tenant: Annotated[
        str | None, Query(pattern=TENANT_PATTERN, description="Admins: one tenant's jobs.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    cursor: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the previous page.")
    ] = None,
    q: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=200,
            description="Only jobs whose id, idempotency key or metadata (as JSON) contain this text "
            "(case-insensitive).",
        ),
    ] = None,
    order: Annotated[
        Literal["oldest", "newest"], Query(description="Oldest first (default) or newest first.")
    ] = "oldest",
) -> JobPage:
    """Jobs, oldest (or newest) first, from the listing indexes (cursor pagination).

    A tenant key lists its own tenant; an admin lists every tenant or the one named by ``tenant``.
    """
    svc = services(request)
    if tenant is not None and not principal.admin and tenant != principal.tenant:
        raise ProblemError(403, "forbidden", "Forbidden", "only admin keys may list another tenant")
    scope_tenant = tenant or (None if principal.admin else principal.tenant)
    try:
        after = Cursor.decode(cursor) if cursor else None
    except ValueError as exc:
        raise invalid([("cursor", str(exc))]) from None
    wanted = set(state or [])
    items: list[JobOut] = []
    scanned = 0
    last: Cursor | None = after
    exhausted = False
    while len(items) < limit and scanned < MAX_SCAN_PER_PAGE:
        batch = svc.tenants.page(
            scope_tenant,
            after=last,
            created_from_ms=created_from_ms,
            created_to_ms=created_to_ms,
            count=min(limit, MAX_SCAN_PER_PAGE - scanned),
            newest_first=order == "newest",
        )
        if not batch:
            exhausted = True
            break
        scanned += len(batch)
        records = svc.producer.store.get_many([job_id for job_id, _ in batch])
        gone = []
        for (job_id, ms), rec in zip(batch, records, strict=True):
            last = Cursor(ms, job_id)
            if rec is None:
                gone.append(job_id)
                continue
            job = Job.from_record(rec)
            if wanted and job.state not in wanted:
                continue
            if q is not None and not _matches(rec, q):
                continue
            items.append(JobOut.of(job, rec.get("tenant") or None))
            if len(items) == limit:
                break
        svc.tenants.forget(scope_tenant, gone)
    next_cursor = None if exhausted or last is None or last == after else last.encode()
    return JobPage(items=items, next_cursor=next_cursor)


def _matches(rec: dict[str, Any], text: str) -> bool:
    """``text`` in the record's id, idempotency key or metadata JSON (case-insensitive)."""
    needle = text.casefold()
    haystack = (
        str(rec.get("id") or ""),
        str(rec.get("idempotency_key") or ""),
        json.dumps(rec.get("metadata") or {}, ensure_ascii=False),
    )
    return any(needle in part.casefold() for part in haystack)


@router.post("/jobs/{job_id}/cancel", response_model=CancelOut, summary="Cancel a job")
def cancel_job(
    request: Request,
    job_id: JobIdPath,
    principal: Annotated[Principal, Depends(require(Scope.ENQUEUE))],
) -> CancelOut:
    """Cancel at once before fal has it; otherwise ask a worker to cancel it at fal."""
    svc = services(request)
    own_job(svc, principal, job_id)
    outcome = svc.producer.cancel(job_id)
    if outcome is CancelOutcome.NOT_FOUND:
        raise not_found(f"job {job_id}")
    job, tenant = own_job(svc, principal, job_id)
    return CancelOut(outcome=outcome.value, job=JobOut.of(job, tenant))


def _sse(event: str, data: dict[str, Any], event_id: str | None = None) -> bytes:
    lines = [f"event: {event}"]
    if event_id:
        lines.append(f"id: {event_id}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode()


@router.get(
    "/jobs/{job_id}/events",
    summary="Follow a job (Server-Sent Events)",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "`event: state` with the job as data at every change; ends at a "
            "terminal state (`event: end`).",
        }
    },
)
def job_events(
    request: Request,
    job_id: JobIdPath,
    principal: Annotated[Principal, Depends(require(Scope.READ))],
) -> StreamingResponse:
    """The job's state changes as SSE until it is terminal (the record is re-read every
    ``REFRAME_API_SSE_POLL_INTERVAL_S``; a keep-alive comment every ``REFRAME_API_SSE_HEARTBEAT_S``)."""
    svc = services(request)
    own_job(svc, principal, job_id)
    settings = svc.settings
    key = svc.producer.store.keys.job(job_id)

    async def stream() -> AsyncIterator[bytes]:
        seq = 0
        last_seen: tuple[Any, ...] | None = None
        started = time.monotonic()
        last_sent = started
        while True:
            raw = await svc.ar.hgetall(key)
            if not raw:
                yield _sse("end", {"id": job_id, "reason": "expired"})
                return
            rec = decode_record(raw)
            job = Job.from_record(rec)
            # terminal too: a success is terminal once its output copy is out of `pending`
            mark = (job.state, job.attempts, rec.get("replays"), job.fal_request_id, job.terminal)
            if mark != last_seen:
                last_seen = mark
                seq += 1
                yield _sse(
                    "state", JobOut.of(job, rec.get("tenant") or None).model_dump(mode="json"), str(seq)
                )
                last_sent = time.monotonic()
                if job.terminal:
                    yield _sse("end", {"id": job_id, "state": job.state.value})
                    return
            now = time.monotonic()
            if now - started > settings.api_sse_max_s:
                yield _sse("end", {"id": job_id, "reason": "stream time limit; reconnect"})
                return
            if now - last_sent >= settings.api_sse_heartbeat_s:
                yield b": keep-alive\n\n"
                last_sent = now
            if await request.is_disconnected():
                return
            await asyncio.sleep(settings.api_sse_poll_interval_s)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
