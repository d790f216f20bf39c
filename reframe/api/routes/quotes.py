"""``/v1/quotes``: what a job would cost and whether it would go now, without enqueuing it."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from config.settings import UnknownDurationPolicy
from producer import InvalidRequest
from reframe.api.keys import Principal, Scope
from reframe.api.problems import invalid
from reframe.api.routes.jobs import json_body, split_body
from reframe.api.schemas import Quote, QuoteBudget
from reframe.api.services import Services, require, services
from worker.contracts.intake import check_enqueue
from worker.flow.budget import billable_s, micro_to_usd
from worker.media import BLOCK_BYTES, RangeFile, decode_data_uri, video_duration_s

router = APIRouter(prefix="/v1", tags=["quotes"])


def _size_bytes(svc: Services, url: str) -> int | None:
    """The input's size: a data: URI's payload, or what the server says (one Range request)."""
    settings = svc.settings
    try:
        if url[:5].lower() == "data:":
            return len(decode_data_uri(url, max_bytes=settings.max_data_uri_bytes))
        deadline = time.monotonic() + settings.probe_timeout_s
        with RangeFile(svc.fetcher, url, max_total_bytes=BLOCK_BYTES, deadline=deadline) as source:
            return source.size
    except Exception:  # noqa: BLE001 - unknown size is an answer ("null"), not an error
        return None


def quote(svc: Services, url: str) -> Quote:
    """Probe ``url`` (guarded fetcher) and price it with the budget's estimate rules."""
    settings = svc.settings
    budget = svc.flow.budget
    duration_s = video_duration_s(
        url, fetcher=svc.fetcher, timeout_s=settings.probe_timeout_s, max_bytes=settings.probe_max_bytes
    )
    size = _size_bytes(svc, url)
    reasons: list[str] = []
    estimate_from = None
    if duration_s is not None:
        estimate_from = duration_s + settings.estimate_margin_s
    elif settings.unknown_duration_policy is UnknownDurationPolicy.RESERVE_MAX:
        estimate_from = settings.max_video_duration_s
        reasons.append("duration unreadable: the maximum duration would be reserved")
    else:
        reasons.append(
            "duration unreadable: the job would be refused (REFRAME_UNKNOWN_DURATION_POLICY=refuse)"
        )
    estimate = budget.estimate_micro(estimate_from) if estimate_from is not None else None
    fits_model: bool | None = True
    if duration_s is not None and duration_s > settings.max_video_duration_s:
        fits_model = False
        reasons.append(f"longer than REFRAME_MAX_VIDEO_DURATION_S = {settings.max_video_duration_s:g} s")
    if size is not None and size > settings.max_upload_bytes:
        fits_model = False
        reasons.append(f"larger than REFRAME_MAX_UPLOAD_BYTES = {settings.max_upload_bytes} bytes")
    if duration_s is None or size is None:
        fits_model = None if fits_model else fits_model
    snap = budget.snapshot()
    day_room = snap.day_cap - snap.day_spent - snap.day_reserved
    month_room = snap.month_cap - snap.month_spent - snap.month_reserved
    fits_budget = None if estimate is None else estimate <= min(day_room, month_room)
    if fits_budget is False:
        reasons.append("over the budget's headroom now: the job would wait BLOCKED until there is room")
    return Quote(
        duration_s=duration_s,
        size_bytes=size,
        billable_s=billable_s(estimate_from, settings.billing_unit_s) if estimate_from is not None else None,
        estimate_usd=micro_to_usd(estimate) if estimate is not None else None,
        estimate_micro=estimate,
        max_video_duration_s=settings.max_video_duration_s,
        max_upload_bytes=settings.max_upload_bytes,
        fits_model_limits=fits_model,
        budget=QuoteBudget(
            day_headroom_usd=micro_to_usd(day_room), month_headroom_usd=micro_to_usd(month_room)
        ),
        fits_budget_now=fits_budget,
        would_accept=estimate is not None and fits_model is not False and fits_budget is True,
        reasons=reasons,
    )


@router.post(
    "/quotes",
    response_model=Quote,
    summary="Quote a job",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobCreate"}}},
        }
    },
)
async def create_quote(
    request: Request,
    principal: Annotated[Principal, Depends(require(Scope.ENQUEUE))],
) -> Quote:
    """The same body as ``POST /v1/jobs``, validated the same way; reads the input's duration
    through the guarded fetcher and prices it (whole billing units plus the estimate margin)."""
    svc = services(request)
    try:
        call = check_enqueue(split_body(await json_body(request)), svc.producer.limits)
    except InvalidRequest as exc:
        raise invalid(exc.errors) from None
    return await run_in_threadpool(quote, svc, call.input.video_url)
