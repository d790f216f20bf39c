"""``/v1/quotes``: what a job would cost and whether it would go now, without enqueuing it.

The quote is :meth:`producer.Producer.quote` (worker/contracts/quotes.py prices it), the same one
``reframe quote`` and the library give; the tenant is the API key's.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from producer import InvalidRequest
from reframe.api.keys import Principal, Scope
from reframe.api.problems import invalid
from reframe.api.routes.jobs import json_body, split_body
from reframe.api.services import require, services
from worker.contracts.intake import check_enqueue
from worker.contracts.quotes import Quote

router = APIRouter(prefix="/v1", tags=["quotes"])


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
    """The same body as ``POST /v1/jobs``, validated the same way; reads the input through the
    guarded fetcher (Range requests, bounded) and prices it for the key's tenant: the price it is
    charged when it succeeds, the reservation it holds, the model's limits and both budgets."""
    svc = services(request)
    try:
        call = check_enqueue(split_body(await json_body(request)), svc.producer.limits)
    except InvalidRequest as exc:
        raise invalid(exc.errors) from None
    return await run_in_threadpool(
        svc.producer.quote, call.input, tenant=principal.tenant, dedupe=call.dedupe
    )
