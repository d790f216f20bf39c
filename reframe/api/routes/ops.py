"""Operations endpoints: ``/healthz`` (process up), ``/readyz`` (Redis reachable), ``/metrics``."""

from __future__ import annotations

import redis
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from reframe.api.problems import ProblemError
from reframe.api.schemas import Health
from reframe.api.services import services

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    """200 while the process serves requests."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, summary="Readiness")
def readyz(request: Request) -> Health:
    """200 when Redis answers PING; 503 otherwise."""
    try:
        services(request).r.ping()
    except redis.RedisError:
        raise ProblemError(503, "not-ready", "Not ready", "Redis is not reachable") from None
    return Health(status="ok")


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def metrics(request: Request) -> Response:
    """Request counts and latency of this process (route templates only, never keys or ids)."""
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
