"""``/v1/uploads``: stream a file to fal storage and return its URL (for ``video_url``)."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from reframe.api.keys import Principal, Scope
from reframe.api.middleware import BodyTooLarge
from reframe.api.problems import ProblemError, body_too_large
from reframe.api.schemas import Upload
from reframe.api.services import require, services
from worker.fal import FalClient
from worker.fal.errors import FalError

router = APIRouter(prefix="/v1", tags=["uploads"])
log = logging.getLogger(__name__)

UPLOAD_PATH = "/v1/uploads"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@router.post(
    "/uploads",
    status_code=201,
    response_model=Upload,
    summary="Upload a video to fal storage",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def upload(
    request: Request,
    principal: Annotated[Principal, Depends(require(Scope.ENQUEUE))],
    filename: Annotated[
        str,
        Query(
            min_length=1,
            max_length=200,
            description="Name stored with the file (its extension sets the type).",
        ),
    ] = "upload.mp4",
) -> Upload:
    """The raw body is streamed to a temporary file (413 past ``REFRAME_MAX_UPLOAD_BYTES``), then
    streamed to fal storage with the cluster's fal client (in parts, several at once, above
    ``REFRAME_FAL_MULTIPART_THRESHOLD_BYTES``; neither step holds the file in memory); the answer
    is the file's URL."""
    svc = services(request)
    limit = svc.settings.max_upload_bytes
    name = _SAFE_NAME.sub("_", filename)[:200] or "upload.mp4"
    with tempfile.TemporaryDirectory(prefix="reframe-upload-") as tmp:
        path = Path(tmp) / name
        size = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise body_too_large(limit)
                await run_in_threadpool(os.write, fd, chunk)
        except BodyTooLarge:
            raise body_too_large(limit) from None
        finally:
            os.close(fd)
        if size == 0:
            raise ProblemError(
                422,
                "validation",
                "Invalid request",
                "the body is empty",
                errors=[("body", "send the file's bytes")],
            )
        client = FalClient.from_settings(svc.settings)
        try:
            url = await client.upload_file(path)
        except FalError as exc:
            log.warning("upload to fal storage failed: %s", type(exc).__name__)
            raise ProblemError(
                502, "upload-failed", "Upload failed", "fal storage refused or failed the upload"
            ) from None
        finally:
            await client.aclose()
    return Upload(url=url, size_bytes=size)
