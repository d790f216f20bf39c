"""Routes of the console: one HTML page per view (Jinja2 templates) and the static assets.

Every page is the same for every visitor (no data, no key: the browser fetches the data from
``/v1`` itself), answered with a strict Content-Security-Policy: scripts, styles and fetches only
from this origin (no inline script, so an injected string cannot run), videos from anywhere (fal's
storage), no framing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from config import Settings
from worker.contracts.intake import JOB_ID_PATTERN

HERE = Path(__file__).resolve().parent
PREFIX = "/console"

#: The console's Content-Security-Policy (media from anywhere: inputs and outputs live at fal).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "media-src http: https: blob:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class _Hardened:
    """ASGI wrapper adding :data:`SECURITY_HEADERS` to every answer under ``/console``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(PREFIX):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, object]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))  # type: ignore[call-overload]
                present = {k.lower() for k, _ in headers}
                for name, value in SECURITY_HEADERS.items():
                    if name.lower().encode() not in present:
                        headers.append((name.lower().encode(), value.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)  # type: ignore[arg-type]


def install(app: FastAPI, settings: Settings) -> None:
    """Serve the console on ``app`` under ``/console`` (kept out of the OpenAPI document)."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    router = APIRouter(prefix=PREFIX, include_in_schema=False)
    common = {"grafana_url": settings.grafana_url, "prefix": PREFIX}

    def page(request: Request, name: str, title: str, **extra: object) -> Response:
        response = templates.TemplateResponse(
            request, f"{name}.html", {"page": name, "title": title, **common, **extra}
        )
        response.headers["Cache-Control"] = "no-store"
        return response

    @router.get("", response_class=RedirectResponse)
    @router.get("/", response_class=RedirectResponse)
    def root() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/jobs", status_code=303)

    @router.get("/signin", response_class=HTMLResponse)
    def signin(request: Request) -> Response:
        return page(request, "signin", "Sign in")

    @router.get("/jobs", response_class=HTMLResponse)
    def jobs(request: Request) -> Response:
        return page(request, "jobs", "Jobs")

    @router.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job(request: Request, job_id: Annotated[str, PathParam(pattern=JOB_ID_PATTERN)]) -> Response:
        return page(request, "job", f"Job {job_id}", job_id=job_id)

    @router.get("/dead-letters", response_class=HTMLResponse)
    def dead_letters(request: Request) -> Response:
        return page(request, "dead_letters", "Dead letters")

    @router.get("/cluster", response_class=HTMLResponse)
    def cluster(request: Request) -> Response:
        return page(request, "cluster", "Cluster")

    app.include_router(router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=str(HERE / "static")), name="console-static")
    app.add_middleware(_Hardened)
