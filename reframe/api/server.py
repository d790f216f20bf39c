"""Run the API on uvicorn: ``reframe serve --host --port --workers``."""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI

from config import Settings, load_settings
from reframe.api.app import create_app
from reframe.logs import setup_logging

#: Seconds open streams (SSE) get to finish when the server stops.
GRACEFUL_SHUTDOWN_S = 5


def app_from_environment() -> FastAPI:
    """The app for uvicorn's ``factory=True``: each worker process reads the settings itself."""
    settings = load_settings()
    setup_logging(settings)
    return create_app(settings)


def serve(settings: Settings, *, host: str, port: int, workers: int) -> None:
    """Serve until SIGINT/SIGTERM. With ``workers`` > 1 uvicorn forks processes that each build the
    app from the environment (the same settings this process validated)."""
    uvicorn.run(
        "reframe.api.server:app_from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,  # our logging (reframe/logs.py); one access line per request from the app
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        log_level=settings.log_level.lower(),
    )
