"""The FastAPI application of ``reframe serve``, built by :func:`create_app` (nothing at import time).

The app is stateless: every job, key, index and limit lives in Redis, so any number of processes
can serve one cluster. Routers: ``routes/jobs.py``, ``routes/dead_letters.py``,
``routes/quotes.py``, ``routes/uploads.py``, ``routes/ops.py``, ``routes/job_views.py`` (timeline,
job-change stream), ``routes/operator.py`` (``/v1/me``, ``/v1/cluster``) and ``fal_webhook.py`` (fal
webhooks; it finds what it needs on ``app.state.services``). The operator console
(``reframe/console/``) is served under ``/console``.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from config import Settings
from reframe.api import fal_webhook
from reframe.api.middleware import ApiMetrics, BodyLimitMiddleware, BodyTooLarge, ObserveMiddleware
from reframe.api.problems import (
    PROBLEM_MEDIA_TYPE,
    PROBLEM_STATUSES,
    Problem,
    ProblemError,
    body_too_large,
    invalid,
)
from reframe.api.routes import dead_letters, job_views, jobs, operator, ops, quotes, uploads
from reframe.api.schemas import BatchCreate, JobCreate, PurgeIn, ReplayIn
from reframe.api.services import Services
from reframe.console import install as install_console
from worker.contracts.durable import NotReplicated

log = logging.getLogger(__name__)

API_VERSION = "1"


def _field_of(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "request"


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(_request: Request, exc: ProblemError) -> Response:
        return exc.response()

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_request: Request, exc: BodyTooLarge) -> Response:
        response = body_too_large(exc.limit_bytes).response()
        response.headers["Connection"] = "close"
        return response

    @app.exception_handler(NotReplicated)
    async def _not_replicated(_request: Request, exc: NotReplicated) -> Response:
        # The write is on the primary but a failover could lose it (README, "Redis durability").
        return ProblemError(
            503,
            "not-replicated",
            "Not acknowledged by Redis replicas",
            str(exc),
            headers={"Retry-After": "1"},
        ).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> Response:
        errors = []
        for err in exc.errors():
            loc = tuple(err.get("loc", ()))
            where = "header" if loc[:1] == ("header",) else "query" if loc[:1] == ("query",) else ""
            name = _field_of(loc)
            field = f"{name}" if not where else name
            errors.append((field, str(err.get("msg", "invalid")).removeprefix("Value error, ")))
        return invalid(errors).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> Response:
        titles = {404: "Not found", 405: "Method not allowed"}
        title = titles.get(exc.status_code, "HTTP error")
        detail = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        slug = title.lower().replace(" ", "-")
        return ProblemError(exc.status_code, slug, title, detail, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> Response:
        log.error("unhandled %s in a request", type(exc).__name__, exc_info=exc)
        return ProblemError(
            500, "internal", "Internal error", "the server failed; it has been logged"
        ).response()


def _problem_response() -> dict[str, Any]:
    return {
        "description": "A problem (RFC 9457).",
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the request-body schemas and a problem answer on every operation."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in (JobCreate, BatchCreate, ReplayIn, PurgeIn, Problem):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    for path, item in doc.get("paths", {}).items():
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            statuses = PROBLEM_STATUSES if path.startswith("/v1") else (404, 405, 413, 500, 503)
            for status in statuses:
                responses[str(status)] = _problem_response()
    app.openapi_schema = doc
    return doc


def create_app(settings: Settings, *, services: Services | None = None) -> FastAPI:
    """Build the API for ``settings`` (Redis clients open lazily; nothing is contacted here)."""
    svc = services or Services.build(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Everything built so far lives as long as the process: keep it out of the collector's
        # scans, so a full collection under load does not stall every request for its length.
        gc.freeze()
        yield
        await svc.aclose()

    app = FastAPI(
        title="Reframe Cluster API",
        version=API_VERSION,
        description="Enqueue and follow Luma Ray 2 Flash Reframe jobs on a Reframe Cluster.",
        lifespan=lifespan,
    )
    app.state.services = svc
    app.state.settings = settings
    app.state.metrics = ApiMetrics(CollectorRegistry(auto_describe=True), webhooks_on=settings.webhooks_on)
    for router in (jobs.router, job_views.router, dead_letters.router, operator.router, quotes.router):
        app.include_router(router)
    for router in (uploads.router, ops.router):
        app.include_router(router)
    app.include_router(fal_webhook.router)
    install_console(app, settings)  # /console: pages and assets only; their data comes from /v1
    _install_handlers(app)

    def limit_for(path: str) -> int:
        return settings.max_upload_bytes if path == uploads.UPLOAD_PATH else settings.api_max_body_bytes

    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for)
    app.add_middleware(ObserveMiddleware, metrics=app.state.metrics)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app
